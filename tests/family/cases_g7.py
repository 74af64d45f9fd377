"""Qwen-Image (1 and 2.1), Z-Image, OmniGen, GLM-Image, ERNIE-Image, PRX, NucleusMoE-Image, Ideogram 4 and
JoyImage-Edit (and Plus): configurations of their diffusers tests (smallest from the signature where there is none),
at least 3 blocks per container, batch of 2."""

from __future__ import annotations

import torch
import diffusers

from . import Case

B = 2


def qwenimage():
    # test: patch 2, 16 channels, 16 image tokens (4x4), 8 text tokens; blocks run on the image stream only
    # (text is a separate stream, joined inside the attention), return (encoder_hidden_states, hidden_states)
    model = diffusers.QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=3,
                                                  attention_head_dim=16, num_attention_heads=4,
                                                  joint_attention_dim=16, guidance_embeds=False,
                                                  axes_dims_rope=(8, 4, 4))
    return model, dict(hidden_states=torch.randn(B, 16, 16), encoder_hidden_states=torch.randn(B, 8, 16),
                       encoder_hidden_states_mask=torch.ones(B, 8, dtype=torch.long),
                       timestep=torch.tensor([1.0, 0.5]), img_shapes=[(1, 4, 4)] * B)


QWEN21_TEXT = 8


def qwenimage21():
    # no diffusers test: smallest config from the signature. One joint stream [text (8), target image (4x4)]:
    # img_mask marks the image slots of the joint sequence (one slot per 4 image tokens), target slots last.
    model = diffusers.QwenImage21Transformer2DModel(patch_size=1, in_channels=16, out_channels=16, num_layers=3,
                                                    attention_head_dim=16, num_attention_heads=2, context_in_dim=16,
                                                    mlp_ratio=2, axes_dims_rope=(8, 4, 4))
    img_mask = torch.cat([torch.zeros(B, QWEN21_TEXT, dtype=torch.bool), torch.ones(B, 16 // 4, dtype=torch.bool)], 1)
    return model, dict(hidden_states=torch.randn(B, 16, 16), encoder_hidden_states=torch.randn(B, QWEN21_TEXT, 16),
                       timestep=torch.tensor([0.3, 0.7]), img_shapes=[[(1, 4, 4)]] * B, img_mask=img_mask)


ZIMAGE_IMAGE = 64  # 16x16 latent, patch 2: 64 tokens (a multiple of 32, so no image padding)


def zimage():
    # test: dim 16, 16x16 latent (64 tokens), 16 caption tokens (padded to 32). Main stack `layers` runs on
    # [image, caption]; noise_refiner on the image alone, context_refiner on the caption alone.
    model = diffusers.ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=16,
                                               n_layers=3, n_refiner_layers=1, n_heads=1, n_kv_heads=2, qk_norm=True,
                                               cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 4, 4],
                                               axes_lens=[256, 32, 32])
    return model, dict(x=[torch.randn(16, 1, 16, 16) for _ in range(B)],
                       cap_feats=[torch.randn(16, 16) for _ in range(B)], t=torch.tensor([0.3, 0.6]))


OMNIGEN_PREFIX = 24 + 1  # condition tokens (text ids, an input image's tokens spliced in) and the time token


def omnigen():
    # test (num_layers 20 -> 4): one stream [condition (24), time token (1), image (16)], mask (B, L, L)
    model = diffusers.OmniGenTransformer2DModel(hidden_size=16, num_attention_heads=4, num_key_value_heads=4,
                                                intermediate_size=32, num_layers=4, pad_token_id=0, vocab_size=1000,
                                                in_channels=4, time_step_dim=4,
                                                rope_scaling={"long_factor": [1, 2], "short_factor": [1, 2]})
    length = OMNIGEN_PREFIX + 8 * 8 // 4
    return model, dict(hidden_states=torch.randn(B, 4, 8, 8), timestep=torch.rand(B),
                       input_ids=torch.randint(0, 10, (B, 24)), input_img_latents=[torch.randn(1, 4, 8, 8)],
                       input_image_sizes={0: [[0, 16]]}, attention_mask=torch.ones(B, length, length),
                       position_ids=torch.arange(length).repeat(B, 1))


def glm_image():
    # test (num_layers 1 -> 3): image stream alone, text a second stream; blocks return (hidden, encoder_hidden).
    # prior_token_id is per image token (B, N) as the pipeline gives it (the test's (B,) only broadcasts at B=1).
    model = diffusers.GlmImageTransformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=3,
                                                 attention_head_dim=8, num_attention_heads=2, text_embed_dim=32,
                                                 time_embed_dim=16, condition_dim=8,
                                                 prior_vq_quantizer_codebook_size=64)
    return model, dict(hidden_states=torch.randn(B, 4, 8, 8), encoder_hidden_states=torch.randn(B, 12, 32),
                       prior_token_id=torch.randint(0, 64, (B, 16)), prior_token_drop=torch.zeros(B, dtype=torch.bool),
                       timestep=torch.randint(0, 1000, (B,)), target_size=torch.tensor([[8.0, 8.0]] * B),
                       crop_coords=torch.tensor([[0.0, 0.0]] * B))


ERNIE_IMAGE = 16 * 16


def ernie_image():
    # test (num_layers 1 -> 3): one stream [image (256), text (16)], SEQUENCE-FIRST (S, B, H)
    model = diffusers.ErnieImageTransformer2DModel(hidden_size=16, num_attention_heads=1, num_layers=3,
                                                   ffn_hidden_size=16, in_channels=16, out_channels=16, patch_size=1,
                                                   text_in_dim=16, rope_theta=256, rope_axes_dim=(8, 4, 4), eps=1e-6,
                                                   qk_layernorm=True)
    return model, dict(hidden_states=torch.randn(B, 16, 16, 16), timestep=torch.tensor([1.0, 0.5]),
                       text_bth=torch.randn(B, 16, 16), text_lens=torch.tensor([16, 16]))


def prx():
    # test config is 1792 wide with 28 heads: shrunk to 32 wide, 2 heads (axes_dim sums to the head dim 16),
    # depth 4 -> 3. Image stream alone, text a separate argument.
    model = diffusers.PRXTransformer2DModel(in_channels=16, patch_size=2, context_in_dim=16, hidden_size=32,
                                            mlp_ratio=3.5, num_heads=2, depth=3, axes_dim=[8, 8], theta=10_000)
    return model, dict(hidden_states=torch.randn(B, 16, 16, 16), encoder_hidden_states=torch.randn(B, 16, 16),
                       timestep=torch.tensor([1.0, 0.5]))


def nucleusmoe_image():
    # test (num_layers 2 -> 3, MoE off as in the test): image stream alone; the text mask reaches the blocks
    # inside attention_kwargs as a joint (B, L_img + L_txt) mask
    model = diffusers.NucleusMoEImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=3,
                                                        attention_head_dim=16, num_attention_heads=4,
                                                        joint_attention_dim=16, axes_dims_rope=(8, 4, 4),
                                                        moe_enabled=False, capacity_factors=[8.0, 8.0, 8.0])
    return model, dict(hidden_states=torch.randn(B, 16, 16), encoder_hidden_states=torch.randn(B, 8, 16),
                       encoder_hidden_states_mask=torch.ones(B, 8, dtype=torch.long), timestep=torch.tensor([1.0, 0.5]),
                       img_shapes=[(1, 4, 4)] * B)


IDEOGRAM_TEXT = 4


def ideogram4():
    # test (4 image tokens -> 16 = 4x4, num_layers 2 -> 3): one stream [text (4), image (16)], text and image rows
    # summed into the same hidden_states; mask (B, 1, L, L) from segment ids; rope (cos, sin) of (B, L, D)
    from diffusers.models.transformers.transformer_ideogram4 import (IMAGE_POSITION_OFFSET, LLM_TOKEN_INDICATOR,
                                                                     OUTPUT_IMAGE_INDICATOR)
    model = diffusers.Ideogram4Transformer2DModel(in_channels=16, num_layers=3, attention_head_dim=8,
                                                  num_attention_heads=4, intermediate_size=32, adaln_dim=16,
                                                  llm_features_dim=24, rope_theta=10_000, mrope_section=(2, 1, 1),
                                                  norm_eps=1e-5)
    text, side = IDEOGRAM_TEXT, 4
    length = text + side * side
    hidden_states = torch.zeros(B, length, 16)
    hidden_states[:, text:] = torch.randn(B, side * side, 16)
    encoder_hidden_states = torch.zeros(B, length, 24)
    encoder_hidden_states[:, :text] = torch.randn(B, text, 24)
    position_ids = torch.zeros(B, length, 3, dtype=torch.long)
    position_ids[:, :text] = torch.arange(text)[:, None]
    h, w = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    position_ids[:, text:, 0] = IMAGE_POSITION_OFFSET
    position_ids[:, text:, 1] = h.flatten() + IMAGE_POSITION_OFFSET
    position_ids[:, text:, 2] = w.flatten() + IMAGE_POSITION_OFFSET
    indicator = torch.full((B, length), OUTPUT_IMAGE_INDICATOR, dtype=torch.long)
    indicator[:, :text] = LLM_TOKEN_INDICATOR
    return model, dict(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                       timestep=torch.tensor([0.5, 0.3]), position_ids=position_ids,
                       segment_ids=torch.ones(B, length, dtype=torch.long), indicator=indicator)


def joyimage_edit():
    # test (4x4 latent -> 8x8 for 16 tokens, num_layers 2 -> 3), single item (5-D): image stream alone,
    # text a separate stream; blocks return (img, txt)
    model = diffusers.JoyImageEditTransformer3DModel(patch_size=[1, 2, 2], in_channels=16, hidden_size=32,
                                                     num_attention_heads=2, text_dim=16, num_layers=3,
                                                     rope_dim_list=[4, 6, 6], theta=256)
    return model, dict(hidden_states=torch.randn(B, 16, 1, 8, 8), encoder_hidden_states=torch.randn(B, 12, 16),
                       timestep=torch.tensor([1.0, 0.5]))


JOY_PLUS_TARGET = 16


def joyimage_edit_plus():
    # test: pre-patchified 6-D (B, N, C, pt, ph, pw), one token per patch, items [target, reference] per
    # shape_list (test: 1+1 tokens; here target 4x4 = 16 tokens, reference 2x2 = 4), num_layers 2 -> 3
    model = diffusers.JoyImageEditPlusTransformer3DModel(patch_size=[1, 2, 2], in_channels=16, hidden_size=32,
                                                         num_attention_heads=2, text_dim=16, num_layers=3,
                                                         rope_dim_list=[4, 6, 6], theta=256)
    return model, dict(hidden_states=torch.randn(B, JOY_PLUS_TARGET + 4, 16, 1, 2, 2),
                       encoder_hidden_states=torch.randn(B, 12, 16), timestep=torch.tensor([1.0, 0.5]),
                       shape_list=[[(1, 4, 4), (1, 2, 2)]] * B)


CASES = {
    "QwenImageTransformer2DModel": Case(qwenimage),
    "QwenImage21Transformer2DModel": Case(
        qwenimage21, image={"transformer_blocks": slice(QWEN21_TEXT, None)},
        note="no diffusers test; one joint stream [text, target image] built with repeat_interleave on a tensor "
             "(untraceable); modulation has batch+1 rows (causal_condition's t=0 row for text/condition tokens)"),
    "ZImageTransformer2DModel": Case(
        zimage, image={"layers": slice(0, ZIMAGE_IMAGE), "context_refiner": slice(0, 0)},
        note="main stack `layers` on [image, caption] joined per sample in a Python loop; noise_refiner (image) "
             "and context_refiner (caption) are separate stacks; output .sample is a list of per-sample tensors"),
    "OmniGenTransformer2DModel": Case(
        omnigen, image={"layers": slice(OMNIGEN_PREFIX, None)},
        note="condition tokens written in place (item assignment) before the cat: untraceable; mask (B, L, L)"),
    "GlmImageTransformer2DModel": Case(
        glm_image, note="prior_token_id (B, N) as the pipeline passes it; the forward calls nonzero (untraceable)"),
    "ErnieImageTransformer2DModel": Case(
        ernie_image, image={"layers": slice(0, ERNIE_IMAGE)},
        note="sequence-first stream (S, B, H) = cat([image^T, text^T], dim=0); modulation expanded to (S, B, H)"),
    "PRXTransformer2DModel": Case(prx, note="test config 1792 wide shrunk to 32"),
    "NucleusMoEImageTransformer2DModel": Case(
        nucleusmoe_image,
        note="joint key mask (B, L_img + L_txt) reaches the blocks inside the attention_kwargs dict"),
    "Ideogram4Transformer2DModel": Case(
        ideogram4, image={"layers": slice(IDEOGRAM_TEXT, None)},
        note="text and image share the rows of one (B, L, C) input: text rows are added (masked), not concatenated"),
    "JoyImageEditTransformer3DModel": Case(joyimage_edit, note="single item as in its test (no reference frames)"),
    "JoyImageEditPlusTransformer3DModel": Case(
        joyimage_edit_plus, image={"double_blocks": slice(0, JOY_PLUS_TARGET)},
        note="[target, reference] tokens of one pre-patchified input, split only by the shape_list Python list"),
}
