"""What the example scripts and benchmarks share for training the reference backbones on Fashion-MNIST.

    from tokenroute.training import StepBatches, build_model, load_fashion_mnist, sample_images

One module per concern: `data` (the idx files, a synthetic stand-in, per-step batches and noise), `presets`
(backbone sizes, routes on a command line), `tasks` (objectives), `samplers` (sampling loops), `samples`
(class-conditional sample grids from a model), `ema`, `checkpoints`, `sharding` (FSDP2 and DeepSpeed through
Accelerate), `logs` (loss log, plots, image grids, JSON, progress), `runs` (what a summary records) and `flops` (FLOP counts
with attention included on the CPU too).
`import tokenroute` does not import this package. Beyond torch it uses numpy, matplotlib, safetensors and tqdm,
each imported where it is needed (``pip install 'tokenroute[train]'``).
"""

from __future__ import annotations

from .checkpoints import (checkpoint_dirs, full_optimizer_state, full_state_dict, gathered_parameters, is_sharded,
                          latest_checkpoint, load_full_optimizer_state, load_full_state_dict, load_weights,
                          prune_checkpoints, save_weights, write_checkpoint)
from .data import (CLASSES, DEFAULT_DATA_DIR, IMAGE_SIZE, NUM_CLASSES, PAD, SPLITS, DataError, StepBatches,
                   load_fashion_mnist, locate_fashion_mnist, pad_images, read_idx, resize_images, step_generator,
                   to_model_range,
                   write_idx, write_synthetic_fashion_mnist)
from .ema import EMA
from .flops import flop_category, flop_counter, flops_by_category
from .logs import (LOSS_FIELDS, LossLog, Progress, image_grid, jsonable, mask_checksum, read_loss_csv, save_grid,
                   save_loss_plot, write_json)
from .presets import (BACKBONE_NAMES, PRESET_DEFAULTS, PRESET_NAMES, PRESETS, build_model, format_routes,
                      model_config, parse_routes, stack_depth, tread_routes)
from .runs import environment, mixed_precision, run_config, run_facts
from .samplers import edm_heun_sampler, flow_euler_sampler, scheduler_sampler
from .samples import class_labels, sample_images
from .sharding import (block_class_names, check_sharding, check_sharding_packages, configure_sharding,
                       deepspeed_autocast, requested_sharding)
from .tasks import Task, drop_labels, mae_term, make_task

__all__ = [
    "BACKBONE_NAMES",
    "CLASSES",
    "DEFAULT_DATA_DIR",
    "EMA",
    "IMAGE_SIZE",
    "LOSS_FIELDS",
    "NUM_CLASSES",
    "PAD",
    "PRESETS",
    "PRESET_DEFAULTS",
    "PRESET_NAMES",
    "SPLITS",
    "DataError",
    "LossLog",
    "Progress",
    "StepBatches",
    "Task",
    "block_class_names",
    "build_model",
    "checkpoint_dirs",
    "check_sharding",
    "check_sharding_packages",
    "class_labels",
    "configure_sharding",
    "deepspeed_autocast",
    "drop_labels",
    "edm_heun_sampler",
    "environment",
    "flop_category",
    "flop_counter",
    "flops_by_category",
    "flow_euler_sampler",
    "format_routes",
    "full_optimizer_state",
    "full_state_dict",
    "gathered_parameters",
    "image_grid",
    "is_sharded",
    "jsonable",
    "latest_checkpoint",
    "load_fashion_mnist",
    "load_full_optimizer_state",
    "load_full_state_dict",
    "load_weights",
    "locate_fashion_mnist",
    "mae_term",
    "make_task",
    "mask_checksum",
    "mixed_precision",
    "model_config",
    "pad_images",
    "parse_routes",
    "prune_checkpoints",
    "read_idx",
    "read_loss_csv",
    "requested_sharding",
    "resize_images",
    "run_config",
    "run_facts",
    "sample_images",
    "save_grid",
    "save_loss_plot",
    "save_weights",
    "scheduler_sampler",
    "stack_depth",
    "step_generator",
    "to_model_range",
    "tread_routes",
    "write_idx",
    "write_checkpoint",
    "write_json",
    "write_synthetic_fashion_mnist",
]
