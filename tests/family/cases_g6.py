"""LTX, LTX-2, Cosmos, Cosmos 3, Sana-Video, SANA-WM (and its LTX-2 refiner), Kandinsky 5 and 6 (configurations of
their diffusers tests where one exists, else the smallest the signature allows)."""

from __future__ import annotations

import torch
import diffusers

from . import Case

B = 2


def ltx():
    # tests/models/transformers/test_models_transformer_ltx.py (num_layers 1 -> 3)
    model = diffusers.LTXVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                                 attention_head_dim=8, cross_attention_dim=16, num_layers=3,
                                                 qk_norm="rms_norm_across_heads", caption_channels=16)
    frames, height, width = 2, 8, 8  # the test's 16x16 grid, halved: the whole case stays ~1 s on CPU
    return model, dict(hidden_states=torch.randn(B, frames * height * width, 4),
                       encoder_hidden_states=torch.randn(B, 16, 16), timestep=torch.randint(0, 1000, (B,)),
                       encoder_attention_mask=torch.ones(B, 16).bool(), num_frames=frames, height=height, width=width)


def ltx2():
    # tests/models/transformers/test_models_transformer_ltx2.py (num_layers 2 -> 3)
    model = diffusers.LTX2VideoTransformer3DModel(in_channels=4, out_channels=4, patch_size=1, patch_size_t=1,
                                                  num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                                                  audio_in_channels=4, audio_out_channels=4,
                                                  audio_num_attention_heads=2, audio_attention_head_dim=4,
                                                  audio_cross_attention_dim=8, num_layers=3,
                                                  qk_norm="rms_norm_across_heads", caption_channels=16,
                                                  rope_double_precision=False)
    frames, height, width, audio_frames = 2, 8, 8, 9  # the test's 16x16 grid, halved
    return model, dict(hidden_states=torch.randn(B, frames * height * width, 4),
                       audio_hidden_states=torch.randn(B, audio_frames, 4),
                       encoder_hidden_states=torch.randn(B, 16, 16), audio_encoder_hidden_states=torch.randn(B, 16, 16),
                       timestep=torch.rand(B) * 1000, encoder_attention_mask=torch.ones(B, 16).bool(),
                       num_frames=frames, height=height, width=width, audio_num_frames=audio_frames, fps=25.0)


def cosmos():
    # tests/models/transformers/test_models_transformer_cosmos.py (num_layers 2 -> 3), without its padding-mask
    # channel: concat_padding_mask resizes the mask with torchvision, which this environment lacks.
    model = diffusers.CosmosTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                               attention_head_dim=12, num_layers=3, mlp_ratio=2, text_embed_dim=16,
                                               adaln_lora_dim=4, max_size=(4, 32, 32), patch_size=(1, 2, 2),
                                               rope_scale=(2.0, 1.0, 1.0), concat_padding_mask=False,
                                               extra_pos_embed_type="learnable")
    return model, dict(hidden_states=torch.randn(B, 4, 1, 16, 16), timestep=torch.randint(0, 1000, (B,)),
                       encoder_hidden_states=torch.randn(B, 12, 16), attention_mask=torch.ones(B, 12), fps=30)


def cosmos3():
    # tests/models/transformers/test_models_transformer_cosmos3.py (num_hidden_layers 2 -> 3; the 4x4 vision grid of
    # its compile test). A packed, batchless sequence: one text prefix (und) and one generation sequence (gen).
    model = diffusers.Cosmos3OmniTransformer(head_dim=6, hidden_act="relu2", hidden_size=12, intermediate_size=24,
                                             latent_channel=2, latent_patch_size=1, num_attention_heads=2,
                                             num_hidden_layers=3, num_key_value_heads=1, patch_latent_dim=2,
                                             qk_norm_for_text=False, rms_norm_eps=1e-5, rope_axes_dim=[1, 1, 1],
                                             rope_theta=1e8, vocab_size=32)
    height = width = 4
    length = 2 + height * width
    vision = torch.arange(2, length)
    return model, dict(input_ids=torch.tensor([1, 2]), text_indexes=torch.tensor([0, 1]),
                       position_ids=torch.zeros(3, length, dtype=torch.long), und_len=2, sequence_length=length,
                       vision_tokens=[torch.randn(1, 2, 1, height, width)], vision_token_shapes=[(1, height, width)],
                       vision_sequence_indexes=vision, vision_mse_loss_indexes=vision,
                       vision_timesteps=torch.ones(height * width), vision_noisy_frame_indexes=[torch.tensor([0])])


def sana_video():
    # tests/models/transformers/test_models_transformer_sana_video.py (num_layers 2 -> 3)
    model = diffusers.SanaVideoTransformer3DModel(in_channels=16, out_channels=16, num_attention_heads=2,
                                                  attention_head_dim=12, num_layers=3, num_cross_attention_heads=2,
                                                  cross_attention_head_dim=12, cross_attention_dim=24,
                                                  caption_channels=16, mlp_ratio=2.5, dropout=0.0,
                                                  attention_bias=False, sample_size=8, patch_size=(1, 2, 2),
                                                  norm_elementwise_affine=False, norm_eps=1e-6,
                                                  qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    return model, dict(hidden_states=torch.randn(B, 16, 2, 16, 16), encoder_hidden_states=torch.randn(B, 12, 16),
                       timestep=torch.randint(0, 1000, (B,)))


def sana_wm():
    # No diffusers test: the smallest config the signature allows (GDN heads of 16, a softmax block every 2nd).
    model = diffusers.SanaWMTransformer3DModel(in_channels=4, num_layers=3, hidden_size=32, num_attention_heads=2,
                                               softmax_every_n=2, linear_head_dim=16, caption_channels=16,
                                               mlp_ratio=2.0, chunk_plucker_post_attn_blocks=3, image_size=64)
    frames, height, width = 2, 4, 4
    return model, dict(hidden_states=torch.randn(B, 4, frames, height, width),
                       timestep=torch.randint(0, 1000, (B, 1, frames)),
                       encoder_hidden_states=torch.randn(B, 1, 8, 16), encoder_attention_mask=torch.ones(B, 8))


def sana_wm_refiner():
    # No diffusers test: LTX-2's test config (the refiner is LTX-2's video branch) with 3 layers; the RoPE from the
    # model's own builder, the per-token timestep of its AR refinement.
    model = diffusers.SanaWMLTX2RefinerTransformer3DModel(in_channels=4, out_channels=4, patch_size=1, patch_size_t=1,
                                                          num_attention_heads=2, attention_head_dim=8,
                                                          cross_attention_dim=16, audio_in_channels=4,
                                                          audio_out_channels=4, audio_num_attention_heads=2,
                                                          audio_attention_head_dim=4, audio_cross_attention_dim=8,
                                                          num_layers=3, caption_channels=16,
                                                          rope_double_precision=False)
    frames, height, width = 2, 8, 8
    rope = model.build_rotary_emb_for_absolute_positions(B, list(range(frames)), height, width, torch.device("cpu"),
                                                         fps=24.0)
    return model, dict(hidden_states=torch.randn(B, frames * height * width, 4),
                       encoder_hidden_states=torch.randn(B, 16, 16),
                       timestep=torch.rand(B, 1).expand(B, frames * height * width) * 1000, video_rotary_emb=rope,
                       encoder_attention_mask=torch.ones(B, 16))


def kandinsky5():
    # tests/pipelines/kandinsky5/test_kandinsky5.py's transformer (num_text_blocks 1 -> 3, num_visual_blocks 2 -> 3)
    model = diffusers.Kandinsky5Transformer3DModel(in_visual_dim=16, in_text_dim=32, in_text_dim2=16, time_dim=16,
                                                   out_visual_dim=16, patch_size=(1, 2, 2), model_dim=16, ff_dim=32,
                                                   num_text_blocks=3, num_visual_blocks=3, axes_dims=(1, 1, 2),
                                                   visual_cond=False, attention_type="regular")
    frames, height, width, text = 1, 16, 16, 8
    return model, dict(hidden_states=torch.randn(B, frames, height, width, 16),
                       encoder_hidden_states=torch.randn(B, text, 32), timestep=torch.tensor([300.0, 700.0]),
                       pooled_projections=torch.randn(B, 16),
                       visual_rope_pos=[torch.arange(frames), torch.arange(height // 2), torch.arange(width // 2)],
                       text_rope_pos=torch.arange(text))


def kandinsky6():
    # No diffusers test: the smallest config the signature allows, with the flags of the released checkpoints;
    # video with audio (the fused blocks' full path).
    model = diffusers.Kandinsky6Transformer3DModel(in_visual_dim=4, out_visual_dim=4, in_text_dim=16, in_text_dim2=8,
                                                   time_dim=16, patch_size=(1, 2, 2), model_dim=16, ff_dim=32,
                                                   num_text_blocks=3, num_visual_blocks=3, axes_dims=(2, 2, 4),
                                                   visual_cond=True, in_audio_dim=4, out_audio_dim=4,
                                                   text_token_padding=True, ca_rope=True, cross_gates=True,
                                                   fix_modulation=True)
    frames, height, width = 2, 8, 8
    return model, dict(hidden_states=torch.randn(B, frames, height, width, 2 * 4 + 1),
                       encoder_hidden_states=torch.randn(B, 8, 16), pooled_projections=torch.randn(B, 8),
                       timestep=torch.tensor([300.0, 700.0]), audio_hidden_states=torch.randn(B, 6, 4))


def kandinsky6_sr():
    # No diffusers test: the smallest config the signature allows; NABLA needs the token grid in 8x8 blocks.
    model = diffusers.Kandinsky6SRTransformer3DModel(in_visual_dim=4, out_visual_dim=4, time_dim=16,
                                                     patch_size=(1, 1, 1), model_dim=16, ff_dim=32,
                                                     num_visual_blocks=3, axes_dims=(2, 2, 4))
    return model, dict(hidden_states=torch.randn(B, 2, 8, 8, 2 * 4 + 1), timestep=torch.tensor([300.0, 700.0]))


CASES = {
    "LTXVideoTransformer3DModel": Case(ltx),
    "LTX2VideoTransformer3DModel": Case(ltx2),
    "CosmosTransformer3DModel": Case(cosmos),
    # Layers take (und_seq, gen_seq, rotary_emb): the text prefix and the generation tokens, (L, D) each, no batch
    # axis; gen_seq (all vision tokens here) is the image stream.
    "Cosmos3OmniTransformer": Case(cosmos3, stream="gen_seq"),
    "SanaVideoTransformer3DModel": Case(sana_video),
    "SanaWMTransformer3DModel": Case(sana_wm),
    "SanaWMLTX2RefinerTransformer3DModel": Case(sana_wm_refiner),
    # The text encoder stacks run on the prompt alone (no image token); the visual blocks on video tokens only.
    "Kandinsky5Transformer3DModel": Case(kandinsky5, image={"text_transformer_blocks": slice(0, 0)}),
    "Kandinsky6Transformer3DModel": Case(kandinsky6, image={"video_text_transformer_blocks": slice(0, 0),
                                                            "audio_text_transformer_blocks": slice(0, 0)}),
    "Kandinsky6SRTransformer3DModel": Case(kandinsky6_sr, note="NABLA attention runs on PyTorch's flex attention, "
                                           "which has no backward on CPU: the unwrapped model trains on GPU only"),
}
