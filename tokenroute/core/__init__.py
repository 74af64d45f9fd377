"""The routing core: find the block stack, splice route boundaries into it, undo it."""

from .explain import explain
from .registry import BLOCK_REGISTRY, BlockSpec, register_block
from .route import Route, RouteError
from .stack import BlockStack, find_stack
from .wrap import (Extension, is_wrapped, load_routing_state_dict, routing, routing_masks, routing_state_dict,
                   set_ratio, unwrap, wrap)

__all__ = ["BLOCK_REGISTRY", "BlockSpec", "BlockStack", "Route", "RouteError", "explain", "find_stack",
           "is_wrapped", "load_routing_state_dict", "register_block", "routing", "routing_masks",
           "routing_state_dict", "set_ratio", "unwrap", "wrap", "Extension"]
