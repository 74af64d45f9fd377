"""Train diffusers' DiTTransformer2DModel on Fashion-MNIST pixels, in the style of diffusers' example scripts.

    python examples/diffusers_dit.py --max-steps 2000                         # plain DiT
    python examples/diffusers_dit.py --max-steps 2000 --routes 1:2:0.5        # TREAD: the wrap line below
    accelerate launch examples/diffusers_dit.py --routes 1:2:0.5
    accelerate launch --config_file examples/accelerate/fsdp2.yaml --fsdp_transformer_layer_cls_to_wrap \
        BasicTransformerBlock,CombinedTimestepLabelEmbeddings examples/diffusers_dit.py --routes 1:2:0.5   # FSDP2

Epsilon prediction with a DDPMScheduler, Accelerate for devices and mixed precision, an EMA of the weights,
DDIM sampling with classifier-free guidance at the end. Writes to --output: transformer/ and scheduler/ (save_pretrained;
`DiTTransformer2DModel.from_pretrained(OUTPUT / "transformer")` loads it, routed or not), samples.png,
loss.csv, loss.png and summary.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

import tokenroute
from tokenroute.losses import EpsilonPrediction, combine
from tokenroute.sampling import guided_prediction
from tokenroute.training import (DEFAULT_DATA_DIR, EMA, IMAGE_SIZE, NUM_CLASSES, DataError, LossLog, Progress,
                                 StepBatches, check_sharding, check_sharding_packages, class_labels,
                                 configure_sharding, deepspeed_autocast, format_routes, full_state_dict, is_sharded,
                                 load_fashion_mnist, locate_fashion_mnist, mask_checksum, mixed_precision, pad_images,
                                 parse_routes, run_facts, save_grid, save_loss_plot, step_generator, to_model_range,
                                 tread_routes, write_json)


FSDP_UNIT = "CombinedTimestepLabelEmbeddings"  # each block's label and time embedding, its own FSDP2 unit


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="diffusers_dit.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # defaults in --help
    p.add_argument("--routes", type=parse_routes, default=None, metavar="START:END:RATIO[,...]",
                   help="TREAD routes over transformer_blocks (END inclusive); default: none")
    p.add_argument("--max-steps", type=int, default=2000)
    p.add_argument("--output", default="outputs/diffusers-dit")
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW; 1e-3 suits this tiny model")
    p.add_argument("--lr-warmup-steps", type=int, default=0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--ema-decay", type=float, default=0.9999, help="EMA of the weights (warmed up); 0 = off")
    p.add_argument("--loss-mode", default="all", choices=tokenroute.losses.MODES)
    p.add_argument("--num-layers", type=int, default=6)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--attention-head-dim", type=int, default=16)
    p.add_argument("--patch-size", type=int, default=4, choices=(2, 4))
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    p.add_argument("--no-download", action="store_true", help="never fall back to torchvision's download")
    p.add_argument("--num-inference-steps", type=int, default=25, help="DDIM steps at sampling")
    p.add_argument("--samples-per-class", type=int, default=8)
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--guidance-routing", action="store_true", help="TREAD's routing guidance too (needs --routes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed-precision", default="auto", choices=("auto", "no", "bf16", "fp16"))
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    for name in ("max_steps", "batch_size", "num_layers", "num_attention_heads", "attention_head_dim",
                 "num_inference_steps", "samples_per_class", "log_every"):
        if getattr(args, name) < (0 if name == "max_steps" else 1):
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t_start = time.perf_counter()
    try:
        from accelerate import Accelerator
        from accelerate.utils import DistributedType
        from diffusers import DDIMScheduler, DDPMScheduler, DiTTransformer2DModel
        from diffusers.optimization import get_scheduler
    except ImportError as err:
        raise SystemExit(f"diffusers_dit.py: error: {err.name or err} is not installed; this example trains a diffusers "
                         "model: pip install -e '.[diffusers,train]'") from None
    try:
        data_folder = locate_fashion_mnist(args.data_dir, download=not args.no_download)
    except DataError as err:
        raise SystemExit(f"diffusers_dit.py: error: {err}") from None

    torch.manual_seed(args.seed)
    model = DiTTransformer2DModel(
        num_attention_heads=args.num_attention_heads, attention_head_dim=args.attention_head_dim,
        in_channels=1, out_channels=1, num_layers=args.num_layers, sample_size=IMAGE_SIZE,
        patch_size=args.patch_size, num_embeds_ada_norm=NUM_CLASSES, norm_num_groups=1,
    )  # its label embedding drops 10% of the labels in training (label 10 = unconditional)
    ema = EMA(model, decay=args.ema_decay) if args.ema_decay > 0 else None  # like diffusers' EMAModel
    routes = tread_routes(args.num_layers) if args.routes == "tread" else args.routes
    if routes:
        try:
            model = tokenroute.wrap(model, routes=routes, seed=args.seed)  # <- the only change that enables TREAD
        except tokenroute.RouteError as err:
            raise SystemExit(f"diffusers_dit.py: error: --routes {format_routes(routes)}: {err}") from None

    check_sharding_packages("diffusers_dit.py")
    accelerator = Accelerator(mixed_precision=mixed_precision(args.mixed_precision),
                              cpu=not torch.cuda.is_available())  # cpu: several CPU processes use gloo
    check_sharding(accelerator, "diffusers_dit.py")  # an FSDP or DeepSpeed config Accelerate would not run: refused
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if accelerator.is_main_process and not args.quiet \
        else (lambda text: None)

    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    objective = EpsilonPrediction(noise_scheduler)  # tokenroute.losses: per-token epsilon loss

    images, labels = load_fashion_mnist(data_folder, download=False)
    images, labels = pad_images(images).to(device), labels.to(device)
    batches = StepBatches(len(images), args.batch_size, seed=args.seed, rank=rank, world_size=world)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * world)
    net = model  # FSDP2 shards it in place; DeepSpeed's engine wraps it
    configure_sharding(accelerator, net, args.batch_size, args.max_grad_norm, "diffusers_dit.py")
    if accelerator.distributed_type == DistributedType.FSDP and \
            FSDP_UNIT not in (accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap or [FSDP_UNIT]):
        raise SystemExit(f"diffusers_dit.py: error: under FSDP2 wrap {FSDP_UNIT} too: DiTTransformer2DModel.forward "
                         "calls transformer_blocks[0].norm1.emb after the blocks, when block 0 is sharded again. "
                         "Pass --fsdp_transformer_layer_cls_to_wrap BasicTransformerBlock," + FSDP_UNIT)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    if ema is not None:
        ema.module.to(device)
    out_dir = Path(args.output)
    loss_log = LossLog(out_dir / "loss.csv")
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        loss_log.start()
    say(f"DiTTransformer2DModel: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, "
        f"{args.num_layers} blocks, {(IMAGE_SIZE // args.patch_size) ** 2} tokens, routes "
        f"{format_routes(routes)}, {world} process(es) on {device}")

    progress = Progress(args.max_steps, 0, enabled=accelerator.is_main_process and not args.quiet,
                        every=max(args.log_every, args.max_steps // 20))
    rows: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    last_loss = float("nan")
    model.train()
    loop_start = time.perf_counter()
    for step in range(args.max_steps):
        idx = batches.indices(step).to(device)
        clean_images, batch_labels = to_model_range(images[idx]), labels[idx]

        generator = step_generator(args.seed, step, rank, device)
        batch = objective.prepare(clean_images, generator=generator)  # noise, timesteps, noisy images, target
        with deepspeed_autocast(accelerator):
            model_pred = objective.predict(model, batch, class_labels=batch_labels)
        per_token = objective.per_token_loss(model_pred.float(), batch, args.patch_size)
        masks = tokenroute.routing_masks(net) if routes else []
        loss, parts = combine(per_token, masks, mode=args.loss_mode)

        accelerator.backward(loss)
        if accelerator.sync_gradients and args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(net, step)

        rows.append((step + 1, loss.detach(), mask_checksum(masks)))
        if (step + 1) % args.log_every == 0 or step + 1 == args.max_steps:
            values = accelerator.gather(torch.stack([r[1] for r in rows])[None]).float().mean(0).tolist()
            if accelerator.is_main_process:
                loss_log.append({"step": s, "epoch": batches.epoch(s - 1), "loss": repr(v), "denoise": repr(v),
                                 "lr": repr(lr_scheduler.get_last_lr()[0]), "mask_checksum": int(c)}
                                for (s, _, c), v in zip(rows, values))
            last_loss = values[-1]
            rows.clear()
            elapsed = time.perf_counter() - loop_start
            progress.set(loss=last_loss, img_s=(step + 1) * args.batch_size * world / max(elapsed, 1e-9))
        progress.update()
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_time = time.perf_counter() - loop_start
    progress.close()

    accelerator.wait_for_everyone()
    summary: dict[str, Any] = {}
    # as diffusers' scripts do: save and sample the EMA weights; without an EMA, the model's, gathered to the main
    # process where FSDP2 or ZeRO-3 shard them (every process takes part)
    weights = ema.state_dict() if ema is not None else full_state_dict(net)
    if accelerator.is_main_process:
        transformer = accelerator.unwrap_model(model)
        if is_sharded(transformer) or accelerator.distributed_type == DistributedType.DEEPSPEED:
            # a whole copy in full precision to save and sample, routed as the model is
            transformer = DiTTransformer2DModel.from_config(transformer.config).to(device)
            transformer = tokenroute.wrap(transformer, routes=routes, seed=args.seed) if routes else transformer
        transformer.load_state_dict(weights)
        transformer.save_pretrained(out_dir / "transformer")  # routed or not: the plain model's weights and config
        noise_scheduler.save_pretrained(out_dir / "scheduler")

        # Sampling: a diffusers scheduler loop; eval mode runs the full model (no routing).
        transformer.eval()
        scheduler = DDIMScheduler.from_config(noise_scheduler.config)
        scheduler.set_timesteps(args.num_inference_steps, device=device)
        y = class_labels(args.samples_per_class, device)
        x = torch.randn(len(y), 1, IMAGE_SIZE, IMAGE_SIZE,
                        generator=torch.Generator().manual_seed(args.seed)).to(device)
        routing = (0.3, 0.7, 1.5) if args.guidance_routing and routes else None
        with torch.no_grad(), accelerator.autocast():
            for t in scheduler.timesteps:
                eps = guided_prediction(transformer, x, t, y, null_label=NUM_CLASSES, cfg_scale=args.cfg_scale,
                                        routing=routing)
                x = scheduler.step(eps.float(), t, x).prev_sample
        samples_path = save_grid(x.clamp(-1, 1).cpu(), out_dir / "samples.png", nrow=args.samples_per_class)
        loss_png = save_loss_plot(out_dir / "loss.csv", out_dir / "loss.png",
                                  f"DiTTransformer2DModel, routes {format_routes(routes)}")
        images_run = args.max_steps * args.batch_size * world
        summary = {
            "steps": args.max_steps, "images_per_s": images_run / train_time if args.max_steps else 0.0,
            "train_time_s": train_time, "wall_time_s": time.perf_counter() - t_start, "final_loss": last_loss,
            "model": {"class": "DiTTransformer2DModel", "config": dict(transformer.config),
                      "parameters": sum(p.numel() for p in transformer.parameters())},
            **run_facts(args, routes, accelerator),
            "outputs": {"transformer": str(out_dir / "transformer"), "scheduler": str(out_dir / "scheduler"),
                        "samples": str(samples_path), "loss_csv": str(out_dir / "loss.csv"),
                        "loss_png": str(loss_png) if loss_png else None},
        }
        write_json(summary, out_dir / "summary.json")
        say(f"done: {args.max_steps} steps, {summary['images_per_s']:.1f} images/s, loss {last_loss:.4f}; "
            f"outputs in {out_dir}")
    accelerator.wait_for_everyone()
    return summary


if __name__ == "__main__":
    main()
