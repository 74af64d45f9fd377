"""Wan and its derivatives (VACE, Animate, Animate 2, SkyReels-V2, ChronoEdit, Helios, AnyFlow, AnyFlow-FAR), each
from the tiny configuration of its own diffusers test (batch of 2, three or more blocks where cheap)."""

from __future__ import annotations

import torch
import diffusers

from . import Case

B = 2
# the shared Wan test configuration (tests/models/transformers/test_models_transformer_wan.py), three blocks
WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
           text_dim=16, freq_dim=256, ffn_dim=32, num_layers=3, cross_attn_norm=True, rope_max_seq_len=32)


def wan_inputs(channels=4, frames=2, size=16, text_dim=16):
    return dict(hidden_states=torch.randn(B, channels, frames, size, size), timestep=torch.tensor([3, 500]),
                encoder_hidden_states=torch.randn(B, 12, text_dim))


def wan():
    return diffusers.WanTransformer3DModel(qk_norm="rms_norm_across_heads", **WAN), wan_inputs()


def wan_vace():
    # the test's VACE hints after blocks 0 and 2, with five main blocks (the test has four) so that the hint after
    # block 2 falls inside the middle route (1..3), as hints do in the released model (every 5th of 40 blocks)
    model = diffusers.WanVACETransformer3DModel(**{**WAN, "in_channels": 16, "out_channels": 16, "text_dim": 32,
                                                   "num_layers": 5}, qk_norm="rms_norm_across_heads",
                                                vace_layers=[0, 2], vace_in_channels=48)
    return model, dict(wan_inputs(16, text_dim=32), control_hidden_states=torch.randn(B, 48, 2, 16, 16))


def wan_animate():
    # six blocks with a face adapter after every second (0, 2, 4): one sits inside the middle route, as in the
    # released model (40 blocks, every 5th); 5 face frames give 3 motion frames, one per latent frame (3)
    model = diffusers.WanAnimateTransformer3DModel(
        **{**WAN, "in_channels": 12, "num_layers": 6}, latent_channels=4, qk_norm="rms_norm_across_heads",
        image_dim=16, motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16}, motion_encoder_size=16,
        motion_style_dim=8, motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16, face_encoder_num_heads=2,
        inject_face_latents_blocks=2)
    return model, dict(wan_inputs(12, frames=3), encoder_hidden_states_image=torch.randn(B, 12, 16),
                       pose_hidden_states=torch.randn(B, 4, 2, 16, 16), face_pixel_values=torch.randn(B, 3, 5, 16, 16))


def wan_animate_2():
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

    # the reference pass (kv_cache_mode="extract") of the test: per-sample lists, a 2x2x2 patch grid
    model = diffusers.WanAnimate2Transformer3DModel(patch_size=(1, 2, 2), text_len=16, in_dim=36, dim=128, ffn_dim=256,
                                                    freq_dim=64, text_dim=32, out_dim=16, num_heads=4, num_layers=3,
                                                    cross_attn_norm=True, use_img_emb=True)
    return model, dict(hidden_states=[torch.randn(16, 2, 4, 4) for _ in range(B)], timestep=torch.tensor([1.0, 1.0]),
                       encoder_hidden_states=[torch.randn(8, 32) for _ in range(B)],
                       condition_latents=[torch.randn(20, 2, 4, 4) for _ in range(B)],
                       encoder_hidden_states_image=torch.randn(B, 4, 1280), kv_cache=WanAnimate2KVCache(3),
                       kv_cache_mode="extract", seq_len=8, offset_grid_sizes=torch.tensor([[2, 2, 2]]))


def skyreels_v2():
    return diffusers.SkyReelsV2Transformer3DModel(qk_norm="rms_norm_across_heads", **WAN), wan_inputs()


def chronoedit():
    model = diffusers.ChronoEditTransformer3DModel(
        **{**WAN, "attention_head_dim": 8, "in_channels": 16, "out_channels": 16, "text_dim": 32, "freq_dim": 16,
           "rope_max_seq_len": 64}, qk_norm="rms_norm_across_heads", eps=1e-6, rope_temporal_skip_len=8)
    return model, wan_inputs(16, size=8, text_dim=32)


HELIOS_HISTORY = 64 + 16 + 4  # short (1 frame, 8x8 patches), mid (2x2x2 coarser: 4x4), long (4x4x4 coarser: 2x2)


def helios():
    model = diffusers.HeliosTransformer3DModel(**{k: v for k, v in WAN.items() if k != "rope_max_seq_len"},
                                               qk_norm="rms_norm_across_heads", rope_dim=(4, 4, 4),
                                               has_multi_term_memory_patch=True, guidance_cross_attn=True,
                                               zero_history_timestep=True, is_amplify_history=False)
    return model, dict(wan_inputs(), indices_hidden_states=torch.ones(B, 2),
                       indices_latents_history_short=torch.ones(B, 1), indices_latents_history_mid=torch.ones(B, 1),
                       indices_latents_history_long=torch.ones(B, 4),
                       latents_history_short=torch.randn(B, 4, 1, 16, 16),
                       latents_history_mid=torch.randn(B, 4, 1, 16, 16),
                       latents_history_long=torch.randn(B, 4, 4, 16, 16))


ANYFLOW = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
               text_dim=16, freq_dim=256, ffn_dim=32, num_layers=3, cross_attn_norm=True, rope_max_seq_len=32,
               gate_value=0.25, deltatime_type="r")


def anyflow_inputs(frames, size=16):
    return dict(hidden_states=torch.randn(B, frames, 4, size, size), timestep=torch.full((B, frames), 500.0),
                r_timestep=torch.full((B, frames), 250.0), encoder_hidden_states=torch.randn(B, 12, 16))


def anyflow():
    return diffusers.AnyFlowTransformer3DModel(**ANYFLOW), anyflow_inputs(2)


def anyflow_far():
    # the test's training rollout: two chunks of two frames, both full resolution (full_chunk_limit=3); 8x8 latents
    # (the test's 16x16 costs seconds in CPU flex attention)
    model = diffusers.AnyFlowFARTransformer3DModel(compressed_patch_size=(1, 4, 4), full_chunk_limit=3, **ANYFLOW)
    return model, dict(anyflow_inputs(4, size=8), chunk_partition=[2, 2])


CASES = {
    "WanTransformer3DModel": Case(wan),
    "WanVACETransformer3DModel": Case(wan_vace),
    "WanAnimateTransformer3DModel": Case(wan_animate),
    "WanAnimate2Transformer3DModel": Case(wan_animate_2, note="returns .sample as a list of per-sample tensors"),
    "SkyReelsV2Transformer3DModel": Case(skyreels_v2),
    "ChronoEditTransformer3DModel": Case(chronoedit),
    "HeliosTransformer3DModel": Case(helios, image={"blocks": slice(HELIOS_HISTORY, None)}),
    "AnyFlowTransformer3DModel": Case(anyflow),
    "AnyFlowFARTransformer3DModel": Case(anyflow_far, note="flex attention: no backward on CPU"),
}
