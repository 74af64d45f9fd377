"""What each class of the family needs, or why it is refused or still fails, in one place (the group modules
hold the configurations). Applied to the cases by ``all_cases``."""

from __future__ import annotations

UNTRACEABLE = r"could not trace .* so the token layout .* cannot be read"
GRID = r"ran on .* tokens: .*(unflatten|invalid for input).* cannot run on a subset of the tokens"

# The forward depends on tensor values, so the layout cannot be read from a graph: the user declares it
# (every token of these streams is an image token, or condition, time or history tokens lead) and hooks route.
DECLARATIONS = {
    "GlmImageTransformer2DModel": dict(prefix_tokens=0),
    "MochiTransformer3DModel": dict(prefix_tokens=0),
    "HunyuanVideo15Transformer3DModel": dict(prefix_tokens=0),
    "LuminaNextDiT2DModel": dict(prefix_tokens=0),
    "OmniGenTransformer2DModel": dict(prefix_tokens=25),
    "HunyuanVideoFramepackTransformer3DModel": dict(prefix_tokens=11),  # the clean history tokens lead
}

# Routing cannot be made correct: a RouteError says why.
REFUSED = {
    "SanaTransformer2DModel": GRID,  # the conv MLP reshapes the tokens to the full grid
    "SanaVideoTransformer3DModel": GRID,
    "SanaWMTransformer3DModel": GRID,  # per-frame recurrences over the full grid
    "Lumina2Transformer2DModel": UNTRACEABLE,  # per-sample caption lengths read from tensor values
    "HiDreamImageTransformer2DModel": UNTRACEABLE,  # MoE gate (bincount); text trails the image in single blocks
    "QwenImage21Transformer2DModel": UNTRACEABLE,  # the joined stream's lengths come from tensor values
    "WanAnimateTransformer3DModel": UNTRACEABLE,  # writes into a slice of the stream
    "WanAnimate2Transformer3DModel": UNTRACEABLE,  # per-sample lists and grid sizes read from tensor values
    # image tokens written into a buffer (index_copy) or selected against padding (where): not laid out
    "MiniMaxH3Transformer3DModel": r"index_copy\) places the image tokens among other tokens",
    "ZImageTransformer2DModel": r"where\) places the image tokens among other tokens",
    "ErnieImageTransformer2DModel": r"its tokens lie on axis 0 \(sequence first\)",
    "Ideogram4Transformer2DModel": r"adds embed_image_indicator output, per-token values",  # packed text and image
    "Cosmos3OmniTransformer": UNTRACEABLE,  # one packed sequence with no batch axis (refused too once declared)
}

# Not yet routed correctly; each is an expected (strict) failure, listed in the README's backbone table.
KNOWN_FAILURES = {
    "HeliosTransformer3DModel": "its blocks split history from current tokens by a count (original_context_length) "
                                "that routing changes: a RouteError inside the route today, and declaring the "
                                "per-token modulation would make the split silently wrong",
    "AnyFlowFARTransformer3DModel": "FlexAttention has no backward on the CPU: the unwrapped model cannot train here",
    "Kandinsky6SRTransformer3DModel": "FlexAttention has no backward on the CPU: the unwrapped model cannot train here",
}
