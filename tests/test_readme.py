"""The README's Python snippets run as written against today's API, on a small DiT with the names they leave to
the reader (``x, t, y``, an objective, per-token losses) filled in. Lines a snippet gives as alternatives to one
another run each on a fresh model; router training is checked by its call (its own tests train routers)."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
import torch

import tokenroute
from tokenroute.methods import caching
from tokenroute.models import DiT
from tokenroute.models.dit import DiTBlock

README = Path(__file__).resolve().parent.parent / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
BATCH, LABELS = 2, 10


def model_for(snippet: str) -> DiT:
    """A DiT deep enough for every route the README shows; 1 x 32 x 32 images where the snippet's data are."""
    torch.manual_seed(0)
    channels, size = (1, 32) if "torch.randn(64, 1, 32, 32" in snippet else (4, 16)
    return DiT(input_size=size, patch_size=2, in_channels=channels, hidden_size=64, depth=12, num_heads=4,
               num_classes=LABELS)


def namespace(model: DiT) -> dict:
    """The names a snippet leaves to the reader, shaped for ``model``."""
    size, channels = model.x_embedder.img_size[0], model.in_channels
    tokens = model.x_embedder.num_patches
    return {"torch": torch, "tokenroute": tokenroute, "model": model, "DiTBlock": DiTBlock,
            "x": torch.randn(BATCH, channels, size, size), "t": torch.rand(BATCH) * 1000,
            "y": torch.randint(0, LABELS, (BATCH,)), "labels": torch.randint(0, LABELS, (BATCH,)),
            "noise": torch.randn(BATCH, channels, size, size), "target": torch.randn(BATCH, channels, size, size),
            "objective": lambda prediction: prediction.float().square().mean(),
            "denoise_per_token": torch.rand(BATCH, tokens), "mae_per_token": torch.rand(BATCH, tokens)}


def statements(snippet: str) -> list[str]:
    return [ast.get_source_segment(snippet, node) for node in ast.parse(snippet).body]


def runs(snippet: str) -> list[tuple[str, bool]]:
    """What to run on one fresh model each: the snippet whole, or, where it rebinds ``model`` by one method several
    times (alternatives), each of those lines alone and the rest after the first of them."""
    lines = statements(snippet)
    alternatives = [s for s in lines if s.startswith("model = tokenroute.mask(")]
    if len(alternatives) < 2:
        return [(snippet, False)]
    rest = "\n".join(s for s in lines if s not in alternatives)
    return [(line, False) for line in alternatives] + [(rest, True)]


def test_the_readme_has_the_snippets_this_file_runs():
    joined = "\n".join(SNIPPETS)
    for name in ("tokenroute.wrap", "tokenroute.mask", "apply_masking", "apply_caching", "apply_local_attention",
                 "apply_token_density"):
        assert name in joined, name


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index, monkeypatch, tmp_path):
    snippet = SNIPPETS[index]
    real_train_router = caching.train_router

    def train_router_call(*args, **kwargs):  # the README's call must bind to the real signature
        inspect.signature(real_train_router).bind(*args, **kwargs)
        return caching.registry_of(args[0]).get(caching.NAME).router

    monkeypatch.setattr(caching, "train_router", train_router_call)
    monkeypatch.chdir(tmp_path)  # where a snippet saves a file
    for source, masked_first in runs(snippet):
        model = model_for(snippet)
        if masked_first:
            tokenroute.mask(model, ratio=0.5, decoder=2)
        exec(compile(source, f"README snippet {index + 1}", "exec"), namespace(model))
