"""The shared machinery: find the block stack, plan the segments every method adds, splice them in, undo it.

Flow: ``stack`` finds the blocks (``blocks``: per-block facts) -> ``plan`` merges the segments and stages of
every applied method (``patches``; a segment is a ``route`` and a token operation, ``operations``) ->
``splice`` carries the plan out (and tells a method tapping a block where its stream's tokens sit,
``Boundaries.tokens_at``) at each forward (``splice.graph`` or ``splice.hooks``, both through
``splice.boundaries``).
"""

from .control import (is_wrapped, load_routing_state_dict, routing, routing_masks, routing_state_dict,
                      set_ratio)
from .explain import explain
from .layout import INPUT_PACKINGS, StreamTokens, TokenLayout, register_input_packing
from .operations import MaskTokens, OrderTokens, PoolTokens, SkipTokens, TokenOperation
from .plan import Plan, Segment, Stage, Tap
from .patches import Patch, PatchRegistry, SpliceOptions, apply_patch, remove_patch, reset_state
from .blocks import BLOCK_REGISTRY, BlockSpec, Branch, block_branches, register_block
from .route import Route, RouteError
from .stack import BlockStack, find_stack

__all__ = ["BLOCK_REGISTRY", "INPUT_PACKINGS", "BlockSpec", "BlockStack", "Branch", "MaskTokens", "OrderTokens", "Patch", "PatchRegistry", "Plan", "PoolTokens",
           "Route", "RouteError", "Segment", "SkipTokens", "SpliceOptions", "Stage", "StreamTokens", "Tap", "TokenLayout", "TokenOperation", "apply_patch",
           "block_branches", "explain", "find_stack", "is_wrapped", "load_routing_state_dict", "register_block", "register_input_packing",
           "remove_patch", "reset_state", "routing", "routing_masks", "routing_state_dict", "set_ratio"]
