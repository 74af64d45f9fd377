"""One file per method, each a config dataclass with ``apply_x(model, config)`` and ``remove_x(model)``,
registered on the model's patch registry so that methods stack and come off by name."""

from .masking import Decoder, MaskingConfig, apply_masking, remove_masking
from .tread import TreadConfig, apply_tread, remove_tread

__all__ = ["Decoder", "MaskingConfig", "TreadConfig", "apply_masking", "apply_tread", "remove_masking",
           "remove_tread"]
