"""tokenroute: TREAD token routing and its relatives for diffusion backbones, spliced in with one line.

    model = tokenroute.wrap(model, routes=[(2, 8, 0.5)])
"""

from .core import (BLOCK_REGISTRY, BlockSpec, Route, RouteError, explain, is_wrapped, load_routing_state_dict,
                   register_block, routing, routing_masks, routing_state_dict, set_ratio, unwrap, wrap)
from .methods.masking import Decoder, mask

from . import losses, sampling

__version__ = "0.1.0"

__all__ = ["BLOCK_REGISTRY", "BlockSpec", "Decoder", "Route", "RouteError", "explain", "is_wrapped",
           "load_routing_state_dict", "losses", "mask", "register_block", "routing", "routing_masks",
           "routing_state_dict", "sampling", "set_ratio", "unwrap", "wrap"]
