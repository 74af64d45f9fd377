"""DiT and Flux (configurations of their diffusers tests); tests/test_diffusers.py builds them from here too."""

from __future__ import annotations

import torch
import diffusers

from . import Case

B = 2


def dit():
    model = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=4,
                                            sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=1)
    return model, dict(hidden_states=torch.randn(B, 4, 8, 8), timestep=torch.tensor([3, 5]),
                       class_labels=torch.tensor([1, 2]))


def flux(layers: int = 3):
    """``layers`` double-stream and as many single-stream blocks."""
    model = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=layers, num_single_layers=layers,
                                             attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                             pooled_projection_dim=10, axes_dims_rope=(2, 2, 4))
    grid = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    return model, dict(hidden_states=torch.randn(B, 16, 16), encoder_hidden_states=torch.randn(B, 5, 12),
                       pooled_projections=torch.randn(B, 10), timestep=torch.tensor([0.3, 0.5]),
                       img_ids=grid.reshape(-1, 3), txt_ids=torch.zeros(5, 3))


CASES = {
    "DiTTransformer2DModel": Case(dit),
    "FluxTransformer2DModel": Case(flux),
}
