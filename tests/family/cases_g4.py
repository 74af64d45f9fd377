"""HunyuanVideo (1, 1.5, Framepack), HunyuanImage, HiDream, Motif-Video, MiniMax-H3 and Krea2 (configurations of
their diffusers tests, made a little deeper so each route sits strictly inside its stack, and a little smaller in
their inputs so each case stays fast on CPU)."""

from __future__ import annotations

import torch
import diffusers

from . import Case

B = 2


def hunyuan_video():
    # test_models_transformer_hunyuan_video.py (the default, text-to-video config); 8x8 latent, one frame
    model = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=3, num_single_layers=3,
        num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 4, 4), image_condition_type=None)
    return model, dict(hidden_states=torch.randn(B, 4, 1, 8, 8), timestep=torch.randint(0, 1000, (B,)).float(),
                       encoder_hidden_states=torch.randn(B, 12, 16), pooled_projections=torch.randn(B, 8),
                       encoder_attention_mask=torch.ones(B, 12), guidance=torch.randint(0, 1000, (B,)).float())


def hunyuan_video15():
    # test_models_transformer_hunyuan_1_5.py (t2v: the image embeds are zero); 8x8 latent, one frame
    model = diffusers.HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=3,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8,
        image_embed_dim=12, rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v")
    return model, dict(hidden_states=torch.randn(B, 4, 1, 8, 8), timestep=torch.tensor([1.0, 1.0]),
                       encoder_hidden_states=torch.randn(B, 6, 16), encoder_hidden_states_2=torch.randn(B, 4, 8),
                       encoder_attention_mask=torch.ones(B, 6), encoder_attention_mask_2=torch.ones(B, 4),
                       image_embeds=torch.zeros(B, 3, 12))


FRAMEPACK_NOISY = 3 * 2 * 2  # frames x (height / patch) x (width / patch): the latents being denoised


def hunyuan_video_framepack():
    # test_models_transformer_hunyuan_video_framepack.py: 3 frames of 4x4, patch 2, with clean and 2x / 4x history
    model = diffusers.HunyuanVideoFramepackTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=3, num_single_layers=3,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 4, 4), image_condition_type=None, has_image_proj=True,
        image_proj_dim=16, has_clean_x_embedder=True)
    f = 3
    return model, dict(
        hidden_states=torch.randn(B, 4, f, 4, 4), timestep=torch.randint(0, 1000, (B,)),
        encoder_hidden_states=torch.randn(B, 12, 16), pooled_projections=torch.randn(B, 8),
        encoder_attention_mask=torch.ones(B, 12), guidance=torch.randint(0, 1000, (B,)),
        image_embeds=torch.randn(B, 12, 16), indices_latents=torch.ones(f),
        latents_clean=torch.randn(B, 4, f - 1, 4, 4), indices_latents_clean=torch.ones(f - 1),
        latents_history_2x=torch.randn(B, 4, f - 1, 4, 4), indices_latents_history_2x=torch.ones(f - 1),
        latents_history_4x=torch.randn(B, 4, (f - 1) * 4, 4, 4), indices_latents_history_4x=torch.ones((f - 1) * 4))


def hunyuan_image():
    # no model test; the transformer of tests/pipelines/hunyuan_image_21/test_hunyuanimage.py, without the ByT5
    # projection (text_embed_2_dim: its fixed 2048-wide hidden layer would dominate the tiny model); 8x8 latent
    model = diffusers.HunyuanImageTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=8, num_layers=3, num_single_layers=3,
        num_refiner_layers=1, patch_size=(1, 1), guidance_embeds=False, text_embed_dim=32, rope_axes_dim=(4, 4))
    return model, dict(hidden_states=torch.randn(B, 4, 8, 8), timestep=torch.randint(0, 1000, (B,)).float(),
                       encoder_hidden_states=torch.randn(B, 6, 32), encoder_attention_mask=torch.ones(B, 6))


HIDREAM_IMAGE = (16 // 2) ** 2  # a 16x16 latent in 2x2 patches


def hidream():
    # test_models_transformer_hidream.py; one Llama layer per block (3 double + 3 single), a 16x16 latent
    model = diffusers.HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=3, num_single_layers=3, attention_head_dim=8,
        num_attention_heads=4, caption_channels=[8, 4], text_emb_dim=8, num_routed_experts=2, num_activated_experts=2,
        axes_dims_rope=(4, 2, 2), max_resolution=(32, 32), llama_layers=tuple(range(6)), force_inference_output=True)
    return model, dict(hidden_states=torch.randn(B, 4, 16, 16), encoder_hidden_states_t5=torch.randn(B, 8, 8),
                       encoder_hidden_states_llama3=torch.randn(6, B, 8, 4), pooled_embeds=torch.randn(B, 8),
                       timesteps=torch.randint(0, 1000, (B,)))


def motif_video():
    # test_models_transformer_motif_video.py; 2 frames of 4x4 (the test's 9 frames of 16x16 is 2304 tokens)
    model = diffusers.MotifVideoTransformer3DModel(
        in_channels=33, out_channels=16, num_attention_heads=2, attention_head_dim=12, num_layers=3,
        num_single_layers=3, num_decoder_layers=0, mlp_ratio=4.0, patch_size=1, patch_size_t=1, qk_norm="rms_norm",
        norm_type="layer_norm", text_embed_dim=32, image_embed_dim=4, rope_theta=256.0, rope_axes_dim=(4, 4, 4),
        enable_text_cross_attention_dual=False, enable_text_cross_attention_single=False)
    return model, dict(hidden_states=torch.randn(B, 33, 2, 4, 4), encoder_hidden_states=torch.randn(B, 12, 32),
                       timestep=torch.randint(0, 1000, (B,)))


H3_TEXT, H3_AUDIO, H3_VIDEO = 4, 6, 8


def minimax_h3():
    # test_models_transformer_minimax_h3.py: one packed sequence [text, audio, video]
    model = diffusers.MiniMaxH3Transformer3DModel(
        num_attention_heads=2, attention_head_dim=16, hidden_size=24, num_layers=3, num_refiner_layers=2, ffn_dim=32,
        in_channels=4, audio_in_channels=6, patch_size=(1, 2, 2), text_dim=8, freq_dim=8, time_embed_hidden_dim=24,
        time_embed_dim=16, rope_freq_dim=2)
    n = H3_TEXT + H3_AUDIO + H3_VIDEO
    text = torch.arange(H3_TEXT)
    audio = torch.arange(H3_TEXT, H3_TEXT + H3_AUDIO)
    video = torch.arange(H3_TEXT + H3_AUDIO, n)
    tags = torch.zeros(n, dtype=torch.long)  # 0 video, 1 text, 2 audio
    tags[text], tags[audio] = 1, 2
    timestep_indices = torch.zeros(n, dtype=torch.long)
    timestep_indices[audio] = 1
    position_ids = torch.zeros(n, 3)
    position_ids[:, 0] = torch.arange(n)
    position_ids[video, 1] = torch.arange(H3_VIDEO).float() % 4
    position_ids[video, 2] = torch.arange(H3_VIDEO).float() % 2
    return model, dict(hidden_states=torch.randn(B, H3_VIDEO, 16), audio_hidden_states=torch.randn(B, H3_AUDIO, 6),
                       encoder_hidden_states=torch.randn(B, H3_TEXT, 8), timestep=torch.tensor([0.7, 0.3]),
                       timestep_indices=timestep_indices, token_tags=tags, position_ids=position_ids,
                       video_indices=video, audio_indices=audio, text_indices=text)


KREA2_TEXT = 4


def krea2():
    # test_models_transformer_krea2.py; a 4x4 grid of image tokens, the last text token padded
    model = diffusers.Krea2Transformer2DModel(
        in_channels=16, num_layers=3, attention_head_dim=8, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=32, timestep_embed_dim=8, text_hidden_dim=16, num_text_layers=3, text_num_attention_heads=2,
        text_num_key_value_heads=1, text_intermediate_size=16, num_layerwise_text_blocks=1, num_refiner_text_blocks=1,
        axes_dims_rope=(4, 2, 2), rope_theta=1000.0, norm_eps=1e-5)
    h = w = 4
    position_ids = torch.zeros(KREA2_TEXT + h * w, 3)
    position_ids[KREA2_TEXT:, 1] = torch.arange(h).repeat_interleave(w).float()
    position_ids[KREA2_TEXT:, 2] = torch.arange(w).repeat(h).float()
    mask = torch.ones(B, KREA2_TEXT, dtype=torch.bool)
    mask[:, -1] = False
    return model, dict(hidden_states=torch.randn(B, h * w, 16), encoder_hidden_states=torch.randn(B, KREA2_TEXT, 3, 16),
                       timestep=torch.tensor([0.5, 0.3]), position_ids=position_ids, encoder_attention_mask=mask)


CASES = {
    # blocks take (hidden_states, encoder_hidden_states): the stream is the latent tokens; the single blocks join
    # the text inside themselves
    "HunyuanVideoTransformer3DModel": Case(hunyuan_video),
    "HunyuanVideo15Transformer3DModel": Case(hunyuan_video15),
    # the stream is [history 4x, history 2x, clean latents, noisy latents]: only the last are the image
    "HunyuanVideoFramepackTransformer3DModel": Case(hunyuan_video_framepack, image={
        "transformer_blocks": slice(-FRAMEPACK_NOISY, None),
        "single_transformer_blocks": slice(-FRAMEPACK_NOISY, None)}),
    "HunyuanImageTransformer2DModel": Case(hunyuan_image),
    # single blocks run on cat([image, t5, llama(last double), llama(this block)])
    "HiDreamImageTransformer2DModel": Case(hidream, image={"single_stream_blocks": slice(0, HIDREAM_IMAGE)}),
    "MotifVideoTransformer3DModel": Case(motif_video),
    # one packed sequence [text, audio, video]
    "MiniMaxH3Transformer3DModel": Case(minimax_h3, image={"transformer_blocks": slice(H3_TEXT + H3_AUDIO, None)}),
    # one sequence cat([text, image])
    "Krea2Transformer2DModel": Case(krea2, image={"transformer_blocks": slice(KREA2_TEXT, None)}),
}
