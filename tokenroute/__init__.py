"""tokenroute: TREAD token routing and its relatives for diffusion backbones, spliced in with one line.

    model = tokenroute.wrap(model, routes=[(2, 8, 0.5)])
"""

from .api import mask, unwrap, wrap
from .core import (BLOCK_REGISTRY, BlockSpec, Branch, Route, RouteError, block_branches, explain, is_wrapped,
                   load_routing_state_dict, register_block, register_input_packing, reset_state, routing, routing_masks, routing_state_dict,
                   set_ratio)
from .methods import (Decoder, MaskingConfig, TreadConfig, apply_masking, apply_tread, remove_masking,
                      remove_tread)

from . import losses, sampling

__version__ = "0.1.0"

__all__ = ["BLOCK_REGISTRY", "BlockSpec", "Branch", "Decoder", "MaskingConfig", "Route", "RouteError",
           "TreadConfig", "apply_masking", "apply_tread", "block_branches", "explain", "is_wrapped",
           "load_routing_state_dict", "losses", "mask", "register_block", "register_input_packing", "remove_masking", "remove_tread",
           "reset_state", "routing", "routing_masks", "routing_state_dict", "sampling", "set_ratio", "unwrap",
           "wrap"]
