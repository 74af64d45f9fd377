"""Train a class-conditional diffusion backbone on Fashion-MNIST, with or without TREAD token routing.

    python examples/train.py --backbone dit --preset tiny --max-steps 300                      # baseline
    python examples/train.py --backbone dit --preset tiny --max-steps 300 --routes 1:4:0.5     # TREAD
    accelerate launch --num_processes 2 examples/train.py --backbone dit --preset small --routes 2:8:0.5
    accelerate launch --config_file examples/accelerate/fsdp2.yaml examples/train.py --backbone dit --routes tread

Under FSDP2 or DeepSpeed (configs in examples/accelerate/) the model is wrapped first and sharded by
`accelerator.prepare`; tokenroute traces its graph at the first training forward, on the sharded blocks.

The routed and the baseline run differ in one line, `tokenroute.wrap(...)` below. Writes to --output:
samples.png, summary.json, loss.csv, loss.png, samples/step_*.png and checkpoints/step_*/ (model.safetensors
and ema.safetensors, which load into the plain backbone, plus the training state for --resume).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

import tokenroute
from tokenroute.training import (BACKBONE_NAMES, DEFAULT_DATA_DIR, EMA, NUM_CLASSES, PRESET_DEFAULTS, PRESET_NAMES,
                                 DataError, LossLog, Progress, StepBatches, build_model, check_sharding,
                                 check_sharding_packages, configure_sharding, deepspeed_autocast, drop_labels,
                                 format_routes, full_optimizer_state, full_state_dict, latest_checkpoint,
                                 load_fashion_mnist, load_full_optimizer_state, load_full_state_dict, load_weights,
                                 locate_fashion_mnist, mae_term, make_task, mask_checksum, mixed_precision,
                                 model_config, pad_images, parse_routes, prune_checkpoints, run_config, run_facts,
                                 sample_images, save_grid, save_loss_plot, save_weights, stack_depth, step_generator,
                                 to_model_range, tread_routes, write_json)

SAMPLE_STEPS = {"edm": 18, "flow": 32, "eps": 32}


def num_tokens(model: nn.Module) -> int:
    """Routable (patch) tokens per image."""
    h, w = model.grid_size
    return h * w


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def guidance_params(text: str) -> tuple[float, float, float]:
    try:
        g1, g2, w = (float(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be G1:G2:W, e.g. 0.3:0.7:1.5") from None
    if not 0 <= g1 < g2 < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: routing guidance needs 0 <= G1 < G2 < 1")
    return g1, g2, w


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description=__doc__.splitlines()[0])
    p.add_argument("--backbone", required=True, choices=BACKBONE_NAMES, help="repo backbone to train")
    p.add_argument("--preset", default="tiny", choices=PRESET_NAMES,
                   help="tiny: CPU smoke (hidden 64, patch 4, 64 tokens); small: ~DiT-S/2; base: ~DiT-B/2 "
                        "(patch 2, 256 tokens). Default: %(default)s")
    p.add_argument("--routes", type=parse_routes, default=None, metavar="START:END:RATIO[,...]",
                   help="TREAD routes: END inclusive, RATIO = fraction of tokens that skip (write "
                        "--routes=-4:-2:0.5 for negative indices); 'tread' for (2, depth-4, 0.5). Default: none")
    p.add_argument("--mask", type=float, default=None, metavar="RATIO",
                   help="MaskDiT masked training: drop this fraction of the tokens (use --loss-mode visible)")
    p.add_argument("--decoder", type=positive_int, default=2, help="with --mask: decoder blocks; default: 2")
    p.add_argument("--mae-weight", type=float, default=0.1, help="with --mask: MAE term weight; default: 0.1")
    p.add_argument("--unmask-steps", type=non_negative_int, default=0,
                   help="with --mask: train the last N steps unmasked (MaskDiT's unmasking tuning)")
    p.add_argument("--max-steps", type=non_negative_int, default=10_000, help="default: %(default)s")
    p.add_argument("--output", default=None, help="default: outputs/BACKBONE-PRESET-ROUTES")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    p.add_argument("--overwrite", action="store_true", help="clear a run already in --output and start afresh")
    p.add_argument("--report-to", default=None, choices=("tensorboard", "wandb"),
                   help="log losses, learning rate and the routing facts to this tracker (through Accelerate); "
                        "default: none")
    p.add_argument("--init-from", default=None, metavar="PATH",
                   help="start a fresh run from these weights: a model.safetensors (or a checkpoint folder holding "
                        "one) of the same backbone and preset")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="per process; default: 32 (tiny), 128 (small, base)")
    p.add_argument("--lr", type=float, default=None, help="AdamW; default: 1e-3 (tiny), 1e-4 (small, base)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="default: %(default)s")
    p.add_argument("--warmup-steps", type=non_negative_int, default=0, help="linear lr warm-up; default: 0")
    p.add_argument("--grad-clip", type=float, default=0.0, help="max gradient norm; default: 0 (off)")
    p.add_argument("--loss-mode", default="all", choices=tokenroute.losses.MODES,
                   help="tokenroute.losses.combine mode: 'all' tokens (TREAD's code), per-'routes' means "
                        "(TREAD's first release), 'visible' (MaskDiT). Default: %(default)s")
    p.add_argument("--objective", default="edm", choices=("edm", "flow", "eps"),
                   help="EDM (Heun sampler), rectified flow (Euler), DDPM epsilon (DDIM; needs diffusers). "
                        "Default: %(default)s")
    p.add_argument("--label-dropout", type=float, default=0.1, help="for classifier-free guidance; default: 0.1")
    p.add_argument("--ema-decay", type=float, default=0.9999,
                   help="at most; warmed up as (1 + step) / (10 + step). Default: %(default)s")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                   help="Fashion-MNIST's idx .gz files; default: %(default)s")
    p.add_argument("--no-download", action="store_true", help="never fall back to torchvision's download")
    p.add_argument("--sample-every", type=non_negative_int, default=1000,
                   help="steps between sample grids; 0 = only at the end. Default: %(default)s")
    p.add_argument("--ckpt-every", type=non_negative_int, default=1000,
                   help="steps between checkpoints; 0 = only at the end. Default: %(default)s")
    p.add_argument("--keep-checkpoints", type=non_negative_int, default=2, help="0 = all; default: %(default)s")
    p.add_argument("--samples-per-class", type=positive_int, default=8, help="grid columns; default: %(default)s")
    p.add_argument("--sample-steps", type=positive_int, default=None,
                   help="sampler steps; default: 18 (edm, Heun), 32 (flow, eps)")
    p.add_argument("--cfg-scale", type=float, default=2.0, help="classifier-free guidance; default: %(default)s")
    p.add_argument("--guidance-routing", action="store_true",
                   help="also TREAD's routing guidance at sampling (needs --routes)")
    p.add_argument("--guidance-routing-params", type=guidance_params, default=(0.3, 0.7, 1.5), metavar="G1:G2:W",
                   help="default: 0.3:0.7:1.5")
    p.add_argument("--seed", type=int, default=0, help="weights, data order, noise and routing; default: 0")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS", help="stop after this long")
    p.add_argument("--mixed-precision", default="auto", choices=("auto", "no", "bf16", "fp16"),
                   help="auto: what accelerate launch was configured with, else bf16 on a GPU that has it, "
                        "else no. Default: auto")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the training forward (routing compiles with it into the model's graph; "
                        "sampling stays eager); BACKEND defaults to inductor")
    p.add_argument("--log-every", type=positive_int, default=10, help="steps between loss.csv writes; default: 10")
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    return p


RUN_FILES = ("checkpoints", "samples", "summary.json", "loss.csv", "loss.png", "samples.png")


def joined_negative_values(argv: Sequence[str], options: Sequence[str] = ("--routes",)) -> list[str]:
    """``--routes -4:-2:0.5`` as ``--routes=-4:-2:0.5``: argparse takes a value that starts with '-' for an option."""
    out, items = [], list(argv)
    for i, item in enumerate(items):
        if i > 0 and items[i - 1] in options and item.startswith("-") and ":" in item:
            out[-1] = f"{items[i - 1]}={item}"
        else:
            out.append(item)
    return out


def check_run_directory(output: Path, resume: bool, overwrite: bool) -> None:
    """A run directory is never reused silently: an existing run needs --resume (continue it) or --overwrite
    (clear it first)."""
    existing = [name for name in RUN_FILES if (output / name).exists()]
    if resume and overwrite:
        raise SystemExit("train.py: error: --resume and --overwrite contradict each other; give one")
    if existing and not resume and not overwrite:
        raise SystemExit(f"train.py: error: {output} holds a run already ({', '.join(existing)}); continue it with "
                         "--resume, start afresh with --overwrite (its files are deleted), or name another --output")
    if overwrite:
        import shutil

        for name in existing:
            path = output / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(joined_negative_values(sys.argv[1:] if argv is None else argv))
    if args.report_to is not None:
        import importlib.util

        module = {"tensorboard": "tensorboard", "wandb": "wandb"}[args.report_to]
        if importlib.util.find_spec(module) is None:
            parser.error(f"--report-to {args.report_to} needs the {module} package: pip install {module}")
    if args.unmask_steps and args.mask is None:
        parser.error("--unmask-steps tunes a MaskDiT run with masking off; it needs --mask")
    if args.unmask_steps > args.max_steps:
        parser.error(f"--unmask-steps {args.unmask_steps} is more than --max-steps {args.max_steps}")
    t_start = time.perf_counter()
    defaults = PRESET_DEFAULTS[args.preset]
    args.batch_size = args.batch_size or defaults["batch_size"]
    args.lr = args.lr if args.lr is not None else defaults["lr"]
    args.sample_steps = args.sample_steps or SAMPLE_STEPS[args.objective]
    if not 0 <= args.label_dropout < 1:
        parser.error(f"--label-dropout {args.label_dropout} must be in [0, 1)")

    # --- checks before any work: data present, routes valid for this backbone -------------------------
    try:
        data_folder = locate_fashion_mnist(args.data_dir, download=not args.no_download)
    except DataError as err:
        raise SystemExit(f"train.py: error: {err}") from None
    task = make_task(args.objective)

    torch.manual_seed(args.seed)  # same initial weights on every rank and every run with this seed
    model = build_model(args.backbone, args.preset)
    if args.init_from is not None:
        if args.resume:
            parser.error("--init-from starts a fresh run from given weights; --resume continues the run in --output")
        source = Path(args.init_from)
        source = source / "model.safetensors" if source.is_dir() else source
        try:
            model.load_state_dict(load_weights(source))
        except (OSError, RuntimeError, ValueError) as err:
            raise SystemExit(f"train.py: error: --init-from {args.init_from}: {str(err).splitlines()[0]} (the weights "
                             f"must be a {args.preset} {args.backbone}'s model.safetensors)") from None
    depth = stack_depth(model)
    routes = tread_routes(depth) if args.routes == "tread" else args.routes
    ema = EMA(model, decay=args.ema_decay)  # a plain copy of the backbone, made before routing

    if routes and args.mask is None:
        try:
            model = tokenroute.wrap(model, routes=routes, seed=args.seed)  # <- the one line that enables TREAD
        except tokenroute.RouteError as err:
            raise SystemExit(f"train.py: error: --routes {format_routes(routes)}: {err} "
                             f"(the {args.preset} {args.backbone} has {depth} blocks, 0..{depth - 1})") from None
    if args.mask is not None:  # MaskDiT: drop --mask of the tokens, the last --decoder blocks decode
        try:
            model = tokenroute.mask(model, args.mask, decoder=args.decoder, routes=routes or (), seed=args.seed)
        except tokenroute.RouteError as err:
            if routes and "overlap" in str(err):
                raise SystemExit(
                    f"train.py: error: --routes {format_routes(routes)} with --mask: the encoder blocks "
                    f"0..{depth - args.decoder - 1} run on the visible tokens (MaskDiT's masking), so TREAD routes "
                    f"must lie in the {args.decoder} decoder blocks, {depth - args.decoder}..{depth - 1} (or -"
                    f"{args.decoder}..-1)") from None
            raise SystemExit(f"train.py: error: --mask {args.mask} --decoder {args.decoder}: {err}") from None
    routed = tokenroute.is_wrapped(model)
    rg = args.guidance_routing_params if args.guidance_routing and routes else None
    if rg is not None:  # routing guidance at sampling routes the EMA copy: it gets the same routes
        tokenroute.wrap(ema.module, routes=routes, seed=args.seed + 1)

    output = Path(args.output or f"outputs/{args.backbone}-{args.preset}-{format_routes(routes)}")
    if int(os.environ.get("RANK", "0")) == 0:
        check_run_directory(output, args.resume, args.overwrite)

    # --- accelerate: devices, processes, mixed precision -----------------------------------------------
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, broadcast

    check_sharding_packages("train.py")
    accelerator = Accelerator(log_with=args.report_to, project_dir=str(output),
                              mixed_precision=mixed_precision(args.mixed_precision),
                              cpu=not torch.cuda.is_available())  # cpu: several CPU processes use gloo
    check_sharding(accelerator, "train.py")  # an FSDP or DeepSpeed config that Accelerate would not run is refused
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    main_process = accelerator.is_main_process
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if main_process and not args.quiet else \
        (lambda text: None)
    if args.guidance_routing and not routes:
        say("--guidance-routing has no effect without --routes")

    images, labels = load_fashion_mnist(data_folder, download=False)
    images = pad_images(images).to(device)
    labels = labels.to(device)
    batches = StepBatches(len(images), args.batch_size, seed=args.seed, rank=rank, world_size=world)

    net = model  # the backbone itself (FSDP2 shards it in place); `model` becomes its DDP or DeepSpeed wrapper
    objective, patch_size, null_label = task.objective, net.patch_size, net.num_classes
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
    warmup = args.warmup_steps
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    configure_sharding(accelerator, net, args.batch_size, args.grad_clip, "train.py")  # FSDP2 units, DeepSpeed's batch
    model, optimizer = accelerator.prepare(model, optimizer)  # the scheduler is stepped once per step, by hand
    forward = torch.compile(model, backend=args.compile) if args.compile else model  # masks are read from `net`
    ema.module.to(device)

    # --- resume ---------------------------------------------------------------------------------------
    loss_log = LossLog(output / "loss.csv")
    start_step = 0
    checkpoint = latest_checkpoint(output) if args.resume else None
    if args.resume and checkpoint is None:
        say(f"--resume: no checkpoint in {output / 'checkpoints'}; starting from step 0")
    if checkpoint is not None:
        state = torch.load(checkpoint / "training_state.pt", map_location="cpu", weights_only=False)
        saved = state["args"]
        for key in ("backbone", "preset", "objective"):
            if saved[key] != getattr(args, key):
                raise SystemExit(f"train.py: error: --resume: {checkpoint} was trained with --{key} {saved[key]}, "
                                 f"not {getattr(args, key)}")
        if saved["routes"] != format_routes(routes):
            raise SystemExit(f"train.py: error: --resume: {checkpoint} was trained with --routes {saved['routes']}, "
                             f"not {format_routes(routes)}")
        if deepspeed or state["optimizer"] is None:
            raise SystemExit(f"train.py: error: --resume: {checkpoint} cannot be continued exactly under DeepSpeed"
                             + ("" if deepspeed else ", where it was written")
                             + ": DeepSpeed keeps the optimizer's moments and fp32 weights in its own partitions, "
                             "which these checkpoints do not hold. Resume with FSDP2 or plain data parallelism, or "
                             f"start a new run from its weights: --init-from {checkpoint}")
        for key in ("batch_size", "seed", "lr", "loss_mode"):
            if saved[key] != getattr(args, key):
                say(f"--resume: --{key.replace('_', '-')} changed from {saved[key]} to {getattr(args, key)}")
        load_full_state_dict(net, load_weights(checkpoint / "model.safetensors"))  # sharded or not
        ema.load_state_dict(load_weights(checkpoint / "ema.safetensors"))
        load_full_optimizer_state(net, optimizer, state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        rank_file = checkpoint / f"rank{rank}.pt"
        if state.get("world_size") != world or not rank_file.exists():
            say(f"--resume: saved with {state.get('world_size')} process(es), now {world}: routing masks and data "
                "order continue from new seeds")
        else:
            rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
            if routed and rank_state["routing"]:
                tokenroute.load_routing_state_dict(net, rank_state["routing"])
            if rg is not None and rank_state.get("ema_routing"):
                tokenroute.load_routing_state_dict(ema.module, rank_state["ema_routing"])
            torch.set_rng_state(rank_state["torch_rng"])
            if rank_state.get("cuda_rng") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state(rank_state["cuda_rng"])
        start_step = int(state["step"])
        if main_process:
            loss_log.truncate(start_step)
        say(f"resumed from {checkpoint} at step {start_step}")
    elif main_process:
        output.mkdir(parents=True, exist_ok=True)
        loss_log.start()
    if args.report_to is not None:  # the tracker gets the run's facts: routes, mask, sizes
        accelerator.init_trackers("tokenroute", config={
            "backbone": args.backbone, "preset": args.preset, "routes": format_routes(routes),
            "mask": args.mask if args.mask is not None else 0.0, "objective": args.objective,
            "batch_size": args.batch_size, "lr": args.lr, "max_steps": args.max_steps, "seed": args.seed})

    # --- helpers that need the run's state ------------------------------------------------------------
    pending: list[tuple[int, int, torch.Tensor, torch.Tensor, float]] = []  # step, epoch, (loss, denoise), checksum, lr
    last_loss = [float("nan")]
    overhead = [0.0]  # seconds spent sampling and checkpointing, not training

    def flush() -> None:
        """Write the pending steps' losses (averaged over processes) to loss.csv: one sync per call."""
        if not pending:
            return
        values = accelerator.gather(torch.stack([p[2] for p in pending])[None]).float().mean(0).tolist()
        checksums = torch.stack([p[3] for p in pending]).tolist()
        if main_process:
            loss_log.append({"step": s + 1, "epoch": e, "loss": repr(v[0]), "denoise": repr(v[1]), "lr": repr(lr),
                             "mask_checksum": c} for (s, e, _, _, lr), v, c in zip(pending, values, checksums))
        last_loss[0] = values[-1][0]
        if args.report_to is not None:
            for (s, _, _, _, lr), v in zip(pending, values):
                accelerator.log({"loss": v[0], "denoise": v[1], "lr": lr}, step=s + 1)
        pending.clear()

    def sample(path: Path) -> Path | None:
        accelerator.wait_for_everyone()
        t0 = time.perf_counter()
        written = None
        if main_process:
            imgs = sample_images(ema.module, task, samples_per_class=args.samples_per_class,
                                 steps=args.sample_steps, cfg_scale=args.cfg_scale, routing=rg,
                                 seed=args.seed, device=device, autocast=accelerator.autocast)
            written = save_grid(imgs, path, nrow=args.samples_per_class)
        accelerator.wait_for_everyone()
        overhead[0] += time.perf_counter() - t0
        return written

    def save_checkpoint(step: int) -> Path:
        flush()
        accelerator.wait_for_everyone()
        t0 = time.perf_counter()
        final = output / "checkpoints" / f"step_{step:07d}"
        tmp = final.with_name(final.name + ".tmp")
        if main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        model_state = full_state_dict(net)  # every rank takes part; gathered under FSDP2 and ZeRO-3
        optimizer_state = None if deepspeed else full_optimizer_state(net, optimizer)  # DeepSpeed partitions its own
        torch.save({"routing": tokenroute.routing_state_dict(net) if routed else None,
                    "ema_routing": tokenroute.routing_state_dict(ema.module) if rg is not None else None,
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
                   tmp / f"rank{rank}.pt")
        if main_process:
            meta = {"backbone": args.backbone, "preset": args.preset, "step": str(step)}
            save_weights(model_state, tmp / "model.safetensors", meta)
            save_weights(ema.state_dict(), tmp / "ema.safetensors", meta)
            write_json({"backbone": args.backbone, "preset": args.preset,
                        "model_config": model_config(args.backbone, args.preset),
                        "routes": format_routes(routes), "objective": args.objective, "step": step},
                       tmp / "config.json")
            torch.save({"step": step, "optimizer": optimizer_state, "lr_scheduler": lr_scheduler.state_dict(),
                        "args": run_config(args, routes), "world_size": world},
                       tmp / "training_state.pt")
        accelerator.wait_for_everyone()
        if main_process:
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            prune_checkpoints(output, args.keep_checkpoints)
        accelerator.wait_for_everyone()
        overhead[0] += time.perf_counter() - t0
        return final

    say(f"{args.backbone}/{args.preset}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, "
        f"{depth} blocks, {num_tokens(net)} tokens, routes {format_routes(routes)}, "
        + (f"mask {args.mask} (decoder {args.decoder}, unmasked for the last {args.unmask_steps} steps), "
           if args.mask is not None else "")
        + f"objective {args.objective}, {world} process(es) on {device}, mixed precision {accelerator.mixed_precision}, "
        f"global batch {args.batch_size * world}, {len(images)} images")

    # --- training loop ----------------------------------------------------------------------------------
    progress = Progress(args.max_steps, start_step, enabled=main_process and not args.quiet,
                        every=max(args.log_every, (args.max_steps - start_step) // 20))
    first_checksums = None
    first_step_s = None
    stopped_by = "max_steps"
    last_checkpoint = checkpoint
    model.train()
    loop_start = time.perf_counter()
    step = start_step
    unmasked = False
    while step < args.max_steps:
        t_step = time.perf_counter()
        idx = batches.indices(step).to(device)
        x0 = to_model_range(images[idx])
        y = labels[idx]
        g = step_generator(args.seed, step, rank, device)
        y = drop_labels(y, args.label_dropout, null_label, g)  # the null label is num_classes

        if args.mask is not None and args.unmask_steps and step >= args.max_steps - args.unmask_steps \
                and not unmasked:  # MaskDiT's unmasking tuning: the last --unmask-steps steps (resumed ones too)
            tokenroute.set_ratio(net, [0.0] + [r[2] for r in routes or ()])
            unmasked = True
        batch = objective.prepare(x0, generator=g)
        with deepspeed_autocast(accelerator):
            prediction = objective.predict(task.backbone_fn(forward), batch, y)
        per_token = objective.per_token_loss(prediction.float(), batch, patch_size)
        masks = tokenroute.routing_masks(net) if routed else []  # (B, N) bool per route, True = skipped
        extra = {}
        if args.mask is not None:  # MaskDiT's MAE term on the dropped tokens, target: the normalised noisy input
            extra = dict(mae=mae_term(prediction, batch, patch_size), mae_weight=args.mae_weight)
        loss, parts = tokenroute.losses.combine(per_token, masks, mode=args.loss_mode, **extra)

        accelerator.backward(loss)
        if args.grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        lr = lr_scheduler.get_last_lr()[0]
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(net, step)

        checksum = mask_checksum(masks).to(device)
        if first_checksums is None:  # one number per rank: ranks route different tokens
            first_checksums = accelerator.gather(checksum[None]).tolist()
            if device.type == "cuda":
                torch.cuda.synchronize()
            first_step_s = time.perf_counter() - t_step
        pending.append((step, batches.epoch(step), torch.stack([parts["total"], parts["denoise"]]).float(),
                        checksum, lr))
        step += 1
        if step % args.log_every == 0 or step == args.max_steps:
            flush()
            elapsed = time.perf_counter() - loop_start - overhead[0]
            progress.set(loss=last_loss[0], img_s=(step - start_step) * args.batch_size * world / max(elapsed, 1e-9))
        progress.update()
        if args.sample_every and step % args.sample_every == 0 and step < args.max_steps:
            flush()
            path = sample(output / "samples" / f"step_{step:07d}.png")
            if path:
                progress.write(f"step {step}: samples in {path}")
        if args.ckpt_every and step % args.ckpt_every == 0:
            last_checkpoint = save_checkpoint(step)
        if args.time_budget is not None:
            over = torch.tensor([float(time.perf_counter() - t_start >= args.time_budget)], device=device)
            if world > 1:
                over = broadcast(over)
            if over.item() > 0 and step < args.max_steps:
                stopped_by = "time_budget"
                break
    flush()
    if device.type == "cuda":
        torch.cuda.synchronize()
    loop_s = time.perf_counter() - loop_start - overhead[0]
    progress.close()

    # --- the end: checkpoint, samples, loss plot, summary -------------------------------------------------
    if last_checkpoint is None or last_checkpoint.name != f"step_{step:07d}":
        last_checkpoint = save_checkpoint(step)
    samples_path = sample(output / "samples.png")
    summary: dict[str, Any] = {}
    if main_process:
        title = (f"{args.backbone}/{args.preset}, routes {format_routes(routes)}, {args.objective}, "
                 f"batch {args.batch_size * world}")
        loss_png = save_loss_plot(output / "loss.csv", output / "loss.png", title)
        rows = loss_log.read()
        losses = [float(r["loss"]) for r in rows]
        tail = losses[-max(1, len(losses) // 10):] if losses else []
        steps_run = step - start_step
        images_run = steps_run * args.batch_size * world
        summary = {
            "steps": step, "start_step": start_step, "steps_this_run": steps_run, "max_steps": args.max_steps,
            "stopped_by": stopped_by, "images_seen": step * args.batch_size * world, "images_this_run": images_run,
            "images_per_s": images_run / loop_s if steps_run else 0.0,
            "images_per_s_after_first_step": (images_run - args.batch_size * world) / (loop_s - first_step_s)
            if steps_run > 1 and first_step_s is not None and loop_s > first_step_s else None,
            "step_time_ms": 1000 * loop_s / steps_run if steps_run else None,
            "first_step_s": first_step_s, "train_time_s": loop_s, "wall_time_s": time.perf_counter() - t_start,
            "final_loss": losses[-1] if losses else None,
            "final_loss_mean": sum(tail) / len(tail) if tail else None,
            "epoch": batches.epoch(max(step - 1, 0)),
            "first_step_mask_checksums": first_checksums,
            "model": {"backbone": args.backbone, "preset": args.preset, "class": type(net).__name__,
                      "config": model_config(args.backbone, args.preset),
                      "parameters": sum(p.numel() for p in net.parameters()), "depth": depth,
                      "tokens": num_tokens(net)},
            "data": {"dir": str(data_folder), "images": len(images), "classes": NUM_CLASSES},
            **run_facts(args, routes, accelerator), "global_batch_size": args.batch_size * world,
            "outputs": {"samples": str(samples_path), "loss_csv": str(output / "loss.csv"),
                        "loss_png": str(loss_png) if loss_png else None, "checkpoint": str(last_checkpoint),
                        "summary": str(output / "summary.json")},
        }
        write_json(summary, output / "summary.json")
        say(f"done: {step} steps, {summary['images_per_s']:.1f} images/s, loss {summary['final_loss']}, "
            f"{summary['wall_time_s']:.1f} s; outputs in {output}")
    accelerator.wait_for_everyone()
    if args.report_to is not None:
        accelerator.end_training()
    return summary


if __name__ == "__main__":
    main()
