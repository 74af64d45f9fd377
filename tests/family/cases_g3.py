"""Flux 2, Flux 3, Chroma, Bria (Fibo, Fibo 2), LongCat-Image and Ovis-Image (configurations of their diffusers
tests; Flux 3 and Bria Fibo 2 have none: the smallest configuration of their signature)."""

from __future__ import annotations

import torch
import diffusers

from . import Case

B = 2
TEXT = 48  # text tokens of the diffusers tests (joined before the image tokens where a stream holds both)


def _text_image(ids_dim: int = 3, text: int = TEXT, image: int = 16, channels: int = 4, width: int = 32):
    """The Flux-like inputs of the diffusers tests: packed latents, text, random position ids."""
    return dict(hidden_states=torch.randn(B, image, channels), encoder_hidden_states=torch.randn(B, text, width),
                img_ids=torch.randn(image, ids_dim), txt_ids=torch.randn(text, ids_dim),
                timestep=torch.tensor([0.3, 0.5]))


def flux2():
    model = diffusers.Flux2Transformer2DModel(patch_size=1, in_channels=4, num_layers=3, num_single_layers=3,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                              timestep_guidance_channels=256, axes_dims_rope=(4, 4, 4, 4))
    img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(4), torch.arange(4), torch.arange(1))
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(TEXT))
    return model, dict(hidden_states=torch.randn(B, 16, 4), encoder_hidden_states=torch.randn(B, TEXT, 32),
                       img_ids=img_ids, txt_ids=txt_ids, timestep=torch.tensor([0.3, 0.5]),
                       guidance=torch.tensor([1.0, 1.0]))


def flux3():
    # num_single_layers > num_layers as in the released model (5 per-mode, 28 joint blocks)
    model = diffusers.Flux3Transformer2DModel(in_channels=4, cond_in_channels=4, num_layers=3, num_single_layers=4,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                              timestep_channels=32, axes_dims_rope=(4, 4, 4, 4))
    img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(4), torch.arange(4), torch.arange(1))
    cond_ids = torch.cartesian_prod(torch.arange(1, 2), torch.arange(2), torch.arange(2), torch.arange(1))
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(8))
    return model, dict(hidden_states=torch.randn(B, 16, 4), encoder_hidden_states=torch.randn(B, 8, 32),
                       timestep=torch.tensor([0.3, 0.5]), img_ids=img_ids, txt_ids=txt_ids,
                       image_cond_hidden_states=torch.randn(B, 4, 4), image_cond_ids=cond_ids)


def chroma():
    model = diffusers.ChromaTransformer2DModel(patch_size=1, in_channels=4, num_layers=3, num_single_layers=3,
                                               attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                               axes_dims_rope=(4, 4, 8), approximator_num_channels=8,
                                               approximator_hidden_dim=16, approximator_layers=1)
    return model, _text_image()


def bria():
    model = diffusers.BriaTransformer2DModel(patch_size=1, in_channels=4, num_layers=3, num_single_layers=3,
                                             attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                             pooled_projection_dim=None, axes_dims_rope=[0, 4, 4])
    return model, _text_image()


def bria_fibo():
    model = diffusers.BriaFiboTransformer2DModel(patch_size=1, in_channels=48, num_layers=3, num_single_layers=3,
                                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64,
                                                 text_encoder_dim=32, pooled_projection_dim=None,
                                                 axes_dims_rope=[0, 4, 4])
    inputs = _text_image(text=32, image=256, channels=48, width=64)
    # one text-encoder layer per block (double and single), as the test slices them from the text
    inputs["text_encoder_layers"] = [inputs["encoder_hidden_states"][:, :, :32]] * 6
    return model, inputs


def bria_fibo2():
    # 4 gist tokens whatever the text length; injection (cross-attention) block in the middle of the main stack
    model = diffusers.BriaFibo2Transformer2DModel(in_channels=4, patch_size=2, dim=32, n_layers=3, n_refiner_layers=3,
                                                  n_heads=2, cap_feat_dim=16, injection_layer_ids=(1,),
                                                  perceiver_num_layers=1, min_num_gist_tokens=4,
                                                  max_num_gist_tokens=4, gist_step=4, gist_min_text_len=4,
                                                  gist_max_text_len=8, axes_dims=(4, 6, 6), axes_lens=(16, 8, 8))
    return model, dict(hidden_states=torch.randn(B, 4, 8, 8), timestep=torch.tensor([0.3, 0.5]),
                       encoder_hidden_states=torch.randn(B, 2, 6, 16), context_latents=[torch.randn(B, 4, 4, 4)])


def longcat_image():
    model = diffusers.LongCatImageTransformer2DModel(patch_size=1, in_channels=4, num_layers=3, num_single_layers=3,
                                                     attention_head_dim=16, num_attention_heads=2,
                                                     joint_attention_dim=32, pooled_projection_dim=32,
                                                     axes_dims_rope=[4, 4, 8])
    return model, dict(_text_image(), guidance=torch.tensor([3.5, 3.5]))


def ovis_image():
    model = diffusers.OvisImageTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=3,
                                                  num_single_layers=3, attention_head_dim=16, num_attention_heads=2,
                                                  joint_attention_dim=32, axes_dims_rope=(4, 4, 8))
    return model, _text_image()


CASES = {
    # single blocks run on cat([text, image]) (the forward joins them before the single stack)
    "Flux2Transformer2DModel": Case(flux2, image={"single_transformer_blocks": slice(TEXT, None)}),
    # joint blocks take text apart and run on cat([image, reference image]); per-token modulation (B, L, 3D)
    "Flux3Transformer2DModel": Case(flux3, image={"single_transformer_blocks": slice(0, 16)},
                                    note="no diffusers test; with num_layers == num_single_layers the text stack "
                                         "txt_mode_blocks ties in parameters and is taken as the stack"),
    "ChromaTransformer2DModel": Case(chroma, image={"single_transformer_blocks": slice(TEXT, None)}),
    # single blocks take text apart and join it inside the block
    "BriaTransformer2DModel": Case(bria),
    # the forward joins text before each single block (its text refreshed from the block's text-encoder layer)
    "BriaFiboTransformer2DModel": Case(bria_fibo, image={"single_transformer_blocks": slice(32, None)}),
    # refiner on cat([image, context]); main layers on cat([gist, image, context])
    "BriaFibo2Transformer2DModel": Case(bria_fibo2, image={"noise_refiner": slice(0, 16), "layers": slice(4, 20)},
                                        note="no diffusers test: the smallest configuration of the signature"),
    "LongCatImageTransformer2DModel": Case(longcat_image),
    "OvisImageTransformer2DModel": Case(ovis_image),
}
