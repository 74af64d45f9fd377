"""CogVideoX, ConsisID, CogView3Plus, CogView4, Latte, Allegro, EasyAnimate and Mochi (configurations of their
diffusers tests, with 3 blocks per container where the test has fewer)."""

from __future__ import annotations

import torch
import diffusers

from . import Case

B = 2


def cogvideox():
    model = diffusers.CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                  out_channels=4, time_embed_dim=2, text_embed_dim=8, num_layers=3,
                                                  sample_width=8, sample_height=8, sample_frames=8, patch_size=2,
                                                  patch_size_t=None, temporal_compression_ratio=4,
                                                  max_text_seq_length=8)
    return model, dict(hidden_states=torch.randn(B, 1, 4, 8, 8), encoder_hidden_states=torch.randn(B, 8, 8),
                       timestep=torch.tensor([3, 500]))


def consisid():
    model = diffusers.ConsisIDTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                 out_channels=4, time_embed_dim=2, text_embed_dim=8, num_layers=3,
                                                 sample_width=8, sample_height=8, sample_frames=8, patch_size=2,
                                                 temporal_compression_ratio=4, max_text_seq_length=8,
                                                 cross_attn_interval=1, is_kps=False, is_train_face=True,
                                                 cross_attn_dim_head=1, cross_attn_num_heads=1, LFE_id_dim=2,
                                                 LFE_vit_dim=2, LFE_depth=5, LFE_dim_head=8, LFE_num_heads=2,
                                                 LFE_num_id_token=1, LFE_num_querie=1, LFE_output_dim=10,
                                                 LFE_ff_mult=1, LFE_num_scale=1)
    return model, dict(hidden_states=torch.randn(B, 1, 4, 8, 8), encoder_hidden_states=torch.randn(B, 8, 8),
                       timestep=torch.tensor([3, 500]), id_vit_hidden=[torch.randn(B, 2, 2)],
                       id_cond=torch.randn(B, 2))


def _sizes():
    return dict(original_size=torch.tensor([[64, 64]] * B), target_size=torch.tensor([[64, 64]] * B),
                crop_coords=torch.tensor([[0, 0]] * B))


def cogview3plus():
    model = diffusers.CogView3PlusTransformer2DModel(patch_size=2, in_channels=4, num_layers=3, attention_head_dim=4,
                                                     num_attention_heads=2, out_channels=4, text_embed_dim=8,
                                                     time_embed_dim=8, condition_dim=2, pos_embed_max_size=8,
                                                     sample_size=8)
    return model, dict(hidden_states=torch.randn(B, 4, 8, 8), encoder_hidden_states=torch.randn(B, 8, 8),
                       timestep=torch.tensor([3, 500]), **_sizes())


def cogview4():
    model = diffusers.CogView4Transformer2DModel(patch_size=2, in_channels=4, num_layers=3, attention_head_dim=4,
                                                 num_attention_heads=4, out_channels=4, text_embed_dim=8,
                                                 time_embed_dim=8, condition_dim=4)
    return model, dict(hidden_states=torch.randn(B, 4, 8, 8), encoder_hidden_states=torch.randn(B, 8, 8),
                       timestep=torch.tensor([3, 500]), **_sizes())


def latte():
    model = diffusers.LatteTransformer3DModel(sample_size=8, num_layers=3, patch_size=2, attention_head_dim=4,
                                              num_attention_heads=2, caption_channels=8, in_channels=4,
                                              cross_attention_dim=8, out_channels=8, attention_bias=True,
                                              activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                              norm_type="ada_norm_single", norm_elementwise_affine=False,
                                              norm_eps=1e-6, video_length=3)
    return model, dict(hidden_states=torch.randn(B, 4, 3, 8, 8), encoder_hidden_states=torch.randn(B, 8, 8),
                       timestep=torch.tensor([3, 500]), enable_temporal_attentions=True)


def allegro():
    model = diffusers.AllegroTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                out_channels=4, num_layers=3, cross_attention_dim=16,
                                                sample_width=8, sample_height=8, sample_frames=8, caption_channels=8)
    return model, dict(hidden_states=torch.randn(B, 4, 2, 8, 8), encoder_hidden_states=torch.randn(B, 16, 8),
                       timestep=torch.tensor([3, 500]))


def easyanimate():
    model = diffusers.EasyAnimateTransformer3DModel(attention_head_dim=16, num_attention_heads=2, in_channels=4,
                                                    mmdit_layers=2, num_layers=3, out_channels=4, patch_size=2,
                                                    sample_height=60, sample_width=90, text_embed_dim=16,
                                                    time_embed_dim=8, time_position_encoding_type="3d_rope",
                                                    timestep_activation_fn="silu")
    return model, dict(hidden_states=torch.randn(B, 4, 2, 16, 16), timestep=torch.tensor([3, 500]),
                       encoder_hidden_states=torch.randn(B, 16, 16))


def mochi():
    model = diffusers.MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=3,
                                              pooled_projection_dim=16, in_channels=4, out_channels=None,
                                              qk_norm="rms_norm", text_embed_dim=16, time_embed_dim=4,
                                              activation_fn="swiglu", max_sequence_length=16)
    return model, dict(hidden_states=torch.randn(B, 4, 2, 16, 16), encoder_hidden_states=torch.randn(B, 16, 16),
                       timestep=torch.tensor([3, 500]),
                       encoder_attention_mask=torch.ones(B, 16, dtype=torch.bool))


CASES = {
    "CogVideoXTransformer3DModel": Case(cogvideox),
    "ConsisIDTransformer3DModel": Case(consisid),
    "CogView3PlusTransformer2DModel": Case(cogview3plus),
    "CogView4Transformer2DModel": Case(cogview4),
    "LatteTransformer3DModel": Case(latte, note="3 frames (its test has 1, where the temporal blocks see one "
                                                "token); spatial (B*F, HW, D) and temporal (B*HW, F, D) blocks "
                                                "alternate with reshapes between them"),
    "AllegroTransformer3DModel": Case(allegro),
    "EasyAnimateTransformer3DModel": Case(easyanimate),
    "MochiTransformer3DModel": Case(mochi, note="its attention processor calls torch.nonzero on the text mask "
                                                "inside the blocks: not traceable on fake tensors, hooks fallback"),
}
