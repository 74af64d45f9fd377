"""PixArt, SD3, the patched Transformer2DModel, HunyuanDiT, Lumina-Next, Lumina2, Sana, AuraFlow and DreamLite
(configurations of their diffusers tests, block counts raised to 3-4 so a route sits strictly inside each stack)."""

from __future__ import annotations

import torch
import diffusers
from diffusers.models.embeddings import get_2d_rotary_pos_embed

from . import Case

B = 2


def _pixart_config(cls):
    # tests/models/transformers/test_models_pixart_transformer2d.py (num_layers 1 -> 3); the same test builds
    # Transformer2DModel from this config, so it also serves the patched Transformer2DModel.
    return cls(sample_size=8, num_layers=3, patch_size=2, attention_head_dim=2, num_attention_heads=2, in_channels=4,
               cross_attention_dim=8, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
               num_embeds_ada_norm=8, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
               use_additional_conditions=False, caption_channels=None)


def _pixart_inputs():
    return dict(hidden_states=torch.randn(B, 4, 8, 8), timestep=torch.randint(0, 1000, (B,)),
                encoder_hidden_states=torch.randn(B, 8, 8), added_cond_kwargs={"aspect_ratio": None,
                                                                                "resolution": None})


def pixart():
    return _pixart_config(diffusers.PixArtTransformer2DModel), _pixart_inputs()


def transformer_2d():
    # built directly (not from_config), so it stays a Transformer2DModel on its patched-input path
    return _pixart_config(diffusers.Transformer2DModel), _pixart_inputs()


def sd3():
    # test_models_transformer_sd3.py (SD3, 4 joint layers as in the test); inputs shrunk from 32x32 latents and
    # 154 text tokens to 16x16 and 32, to keep the case fast
    model = diffusers.SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=4,
                                            attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                            joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
                                            pos_embed_max_size=96, dual_attention_layers=(), qk_norm=None)
    return model, dict(hidden_states=torch.randn(B, 4, 16, 16), encoder_hidden_states=torch.randn(B, 32, 32),
                       pooled_projections=torch.randn(B, 64), timestep=torch.randint(0, 1000, (B,)))


def hunyuan_dit():
    # test_models_transformer_hunyuan_dit.py; num_layers 1 -> 4 (the long skips need an even count: block 0 -> 3).
    # The test's rotary table is (1, head_dim) and only broadcasts; the pipeline's per-token (N, head_dim) table
    # (get_2d_rotary_pos_embed, as HunyuanDiTPipeline builds it) is used instead.
    model = diffusers.HunyuanDiT2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=4,
                                        attention_head_dim=8, num_attention_heads=2, cross_attention_dim=8,
                                        cross_attention_dim_t5=8, pooled_projection_dim=4, hidden_size=16,
                                        text_len=4, text_len_t5=4, activation_fn="gelu-approximate")
    rotary = get_2d_rotary_pos_embed(8, ((0, 0), (4, 4)), (4, 4), output_type="pt")
    return model, dict(hidden_states=torch.randn(B, 4, 8, 8), encoder_hidden_states=torch.randn(B, 4, 8),
                       text_embedding_mask=torch.ones(B, 4), encoder_hidden_states_t5=torch.randn(B, 4, 8),
                       text_embedding_mask_t5=torch.ones(B, 4), timestep=torch.randint(0, 1000, (B,)).float(),
                       image_meta_size=torch.tensor([[1024.0, 1024, 16, 16, 0, 0]] * B),
                       style=torch.zeros(B, dtype=torch.long), image_rotary_emb=rotary)


def lumina_next():
    # test_models_transformer_lumina.py (num_layers 2 -> 3)
    model = diffusers.LuminaNextDiT2DModel(sample_size=16, patch_size=2, in_channels=4, hidden_size=24, num_layers=3,
                                           num_attention_heads=3, num_kv_heads=1, multiple_of=16,
                                           ffn_dim_multiplier=None, norm_eps=1e-5, learn_sigma=False, qk_norm=True,
                                           cross_attention_dim=32, scaling_factor=1.0)
    return model, dict(hidden_states=torch.randn(B, 4, 16, 16), encoder_hidden_states=torch.randn(B, 16, 32),
                       timestep=torch.rand(B), encoder_mask=torch.randn(B, 16),
                       image_rotary_emb=torch.randn(384, 384, 4), cross_attention_kwargs={})


LUMINA2_TEXT = 16


def lumina2():
    # test_models_transformer_lumina2.py (num_layers 2 -> 3, one refiner layer each as in the test)
    model = diffusers.Lumina2Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, hidden_size=24,
                                                num_layers=3, num_refiner_layers=1, num_attention_heads=3,
                                                num_kv_heads=1, multiple_of=2, ffn_dim_multiplier=None, norm_eps=1e-5,
                                                scaling_factor=1.0, axes_dim_rope=(4, 2, 2), axes_lens=(128, 128, 128),
                                                cap_feat_dim=32)
    return model, dict(hidden_states=torch.randn(B, 4, 16, 16), encoder_hidden_states=torch.randn(B, LUMINA2_TEXT, 32),
                       timestep=torch.rand(B), encoder_attention_mask=torch.ones(B, LUMINA2_TEXT, dtype=torch.bool))


def sana():
    # test_models_transformer_sana.py (num_layers 1 -> 3)
    model = diffusers.SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=3,
                                             attention_head_dim=4, num_attention_heads=2, num_cross_attention_heads=2,
                                             cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
                                             sample_size=32)
    return model, dict(hidden_states=torch.randn(B, 4, 32, 32), encoder_hidden_states=torch.randn(B, 8, 8),
                       timestep=torch.randint(0, 1000, (B,)))


AURA_REGISTERS, AURA_TEXT = 8, 32  # register tokens (8, fixed in __init__) are prepended to the text tokens


def aura_flow():
    # test_models_transformer_aura_flow.py (1 joint + 1 single layer -> 3 + 3); inputs shrunk from 32x32 latents
    # and 256 text tokens to 16x16 and 32
    model = diffusers.AuraFlowTransformer2DModel(sample_size=32, patch_size=2, in_channels=4, num_mmdit_layers=3,
                                                 num_single_dit_layers=3, attention_head_dim=8, num_attention_heads=4,
                                                 caption_projection_dim=32, joint_attention_dim=32, out_channels=4,
                                                 pos_embed_max_size=256)
    return model, dict(hidden_states=torch.randn(B, 4, 16, 16), encoder_hidden_states=torch.randn(B, AURA_TEXT, 32),
                       timestep=torch.randint(0, 1000, (B,)))


def dreamlite():
    # no model test in diffusers; the transformer of the first down block of DreamLite's pipeline test U-Net
    # (block_out_channels 32, norm_num_groups 8, cross_attention_dim 16), with 3 layers instead of 1
    model = diffusers.DreamLiteTransformer2DModel(num_attention_heads=4, attention_head_dim=8, in_channels=32,
                                                  num_layers=3, norm_num_groups=8, cross_attention_dim=16)
    return model, dict(hidden_states=torch.randn(B, 32, 8, 8), encoder_hidden_states=torch.randn(B, 8, 16))


CASES = {
    "PixArtTransformer2DModel": Case(pixart),
    "SD3Transformer2DModel": Case(sd3),
    "Transformer2DModel": Case(transformer_2d, note="patched (PixArt-style ada_norm_single) inputs"),
    "HunyuanDiT2DModel": Case(hunyuan_dit),
    "LuminaNextDiT2DModel": Case(lumina_next),
    # joint stream of `layers`: [caption (all 16 valid), image]; the refiners run on caption or image alone
    "Lumina2Transformer2DModel": Case(lumina2, image={"layers": slice(LUMINA2_TEXT, None)}),
    "SanaTransformer2DModel": Case(sana),
    # single blocks run on cat([registers, text, image])
    "AuraFlowTransformer2DModel": Case(aura_flow,
                                       image={"single_transformer_blocks": slice(AURA_REGISTERS + AURA_TEXT, None)}),
    "DreamLiteTransformer2DModel": Case(dreamlite),
}
