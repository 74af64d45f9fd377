"""One file per method, each a config dataclass with ``apply_x(model, config)`` and ``remove_x(model)``,
registered on the model's patch registry so that methods stack and come off by name."""

from .caching import CacheRouter, CachingConfig, apply_caching, cache_slots, caching_context, remove_caching
from .local_attention import LocalAttentionConfig, apply_local_attention, remove_local_attention
from .masking import Decoder, MaskingConfig, apply_masking, remove_masking
from .token_density import TokenDensityConfig, apply_token_density, remove_token_density
from .tread import TreadConfig, apply_tread, remove_tread

__all__ = ["CacheRouter", "CachingConfig", "Decoder", "LocalAttentionConfig", "MaskingConfig", "TokenDensityConfig", "TreadConfig", "apply_caching", "apply_local_attention", "apply_masking",
           "apply_token_density", "apply_tread", "cache_slots", "caching_context", "remove_caching", "remove_local_attention", "remove_masking",
           "remove_token_density", "remove_tread"]
