"""Training throughput and peak GPU memory of HarMA, LoRA and full fine-tuning, and their step
time against the strict floor.

One training step is what ``harma.training.train`` does: both towers of an open_clip CLIP on a batch of
images and captions, the HarMA loss (contrastive + adaptive triplet, learnable temperature),
backward, AdamW. Weights are random and inputs synthetic (random images, random token ids
ending in an end-of-text token), so nothing is downloaded; speed and memory do not depend on
the weight values.

    python benchmarks/train_throughput.py                       # GPU: ViT-B-32, batch 214, fp32 and bf16
    python benchmarks/train_throughput.py --device cpu --batch-size 8 --steps 3   # smoke check

Prints a markdown table: images per second (timed steps only, warm-up excluded) and, on CUDA,
the peak memory allocated by tensors during the timed steps (weights, gradients, optimizer
state and activations; ``torch.cuda.max_memory_allocated``).

The method ``floor`` (in the default list) is the strict floor of ``adapter_overhead.py``: the
frozen backbone with gradients through every block down to the patch and token embeddings'
outputs, nothing trained. Each method's step time is also given as a ratio to the floor's at the
same precision, next to the ratio of their matrix-multiply FLOPs (counted on one step) and how
far the time ratio is above that limit. Configurations are timed one after the other, which on
a dedicated GPU is stable; on a shared CPU use ``adapter_overhead.py``, which interleaves them.

    python benchmarks/train_throughput.py --precisions fp32,bf16,fp16 --json throughput.json
    python benchmarks/train_throughput.py --device cpu --model tiny \
        --model-config '{"embed_dim": 32, "vision_cfg": {...}, "text_cfg": {...}}' --image-size 32
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from harma import HarmaConfig
from harma.losses import HarmaLoss
from harma.training import METHODS, TrainConfig, apply_precision, build_model, build_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adapter_overhead import make_strict_floor, matmul_flops  # noqa: E402  (the sibling benchmark's floor)

THROUGHPUT_METHODS = ("floor", *METHODS)


def synthetic_batch(batch_size: int, image_size: int, context_length: int, device: torch.device,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images ``(B, 3, S, S)``, token ids ``(B, L)`` shaped like tokenised captions, image ids ``(B,)``."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    tokens = torch.zeros(batch_size, context_length, dtype=torch.long)
    lengths = torch.randint(8, min(context_length - 1, 32), (batch_size,), generator=generator)
    for row, length in enumerate(lengths.tolist()):
        tokens[row, 0] = 49406  # start of text
        tokens[row, 1:length] = torch.randint(1, 49405, (length - 1,), generator=generator)
        tokens[row, length] = 49407  # end of text: open_clip pools at the largest id
    image_ids = torch.arange(batch_size) // 2  # two captions per image, as in a real batch
    return images.to(device), tokens.to(device), image_ids.to(device)


def build_step(method: str, precision: str, args: argparse.Namespace,
               device: torch.device) -> tuple[Callable[[], None], int]:
    """One training step of ``method`` at ``precision`` on a fixed synthetic batch, and the number
    of parameters it trains (the loss temperature included). ``floor``: forward, loss and
    backward through the frozen backbone down to the embeddings' outputs, no optimizer."""
    config = TrainConfig(model=args.model, pretrained=None, method="full" if method == "floor" else method,
                         model_config=args.model_config, image_size=args.image_size,
                         harma=HarmaConfig(sharing=args.sharing), lr=1e-5)
    torch.manual_seed(0)
    model = build_model(config, load_weights=False).to(device).train()
    loss = HarmaLoss().to(device)
    optimizer = None
    if method == "floor":
        make_strict_floor(model)
        loss.requires_grad_(False)
    else:
        optimizer = build_optimizer(model, loss, config)
    context_length = model.context_length if hasattr(model, "context_length") else 77
    images, tokens, image_ids = synthetic_batch(args.batch_size, args.image_size, context_length, device)
    trainable = sum(p.numel() for p in [*model.parameters(), *loss.parameters()] if p.requires_grad)
    autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def step() -> None:
        autocast = (
            torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype
            else contextlib.nullcontext()
        )
        with autocast:
            image_embeds, text_embeds, _ = model(images, tokens)
            total = loss(image_embeds, text_embeds, image_ids).loss
        scaler.scale(total).backward()
        if optimizer is None:
            return
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step, trainable


def measure(method: str, precision: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Time ``args.steps`` training steps after ``args.warmup`` untimed ones; count the
    matrix-multiply FLOPs of one more (untimed) step."""
    step, trainable = build_step(method, precision, args, device)
    for _ in range(args.warmup):
        step()
    flops = matmul_flops(step)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "method": method, "precision": precision, "batch_size": args.batch_size, "steps": args.steps,
        "images_per_s": args.batch_size * args.steps / elapsed, "step_ms": 1000 * elapsed / args.steps,
        "peak_memory_gib": peak, "trainable_parameters": trainable, "matmul_flops": flops,
    }


def add_floor_ratios(rows: list[dict]) -> None:
    """Give every row its step time and FLOPs as ratios to the floor's at the same precision, and
    ``above_limit`` = time ratio / FLOP ratio - 1 (None where no floor was measured)."""
    floors = {row["precision"]: row for row in rows if row["method"] == "floor"}
    for row in rows:
        floor = floors.get(row["precision"])
        row["time_vs_floor"] = row["step_ms"] / floor["step_ms"] if floor else None
        row["flops_vs_floor"] = row["matmul_flops"] / floor["matmul_flops"] if floor else None
        row["above_limit"] = row["time_vs_floor"] / row["flops_vs_floor"] - 1 if floor else None


def write_json(path: str, payload: dict) -> None:
    """Write ``payload`` whole to a temporary file, then move it into place: a run killed while
    writing leaves the previous table, never half of one."""
    temporary = Path(f"{path}.tmp")
    temporary.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    os.replace(temporary, path)


def markdown(rows: list[dict], device_name: str, args: argparse.Namespace) -> str:
    lines = [
        f"{args.model}, batch {args.batch_size}, image {args.image_size}px, {args.steps} timed steps after "
        f"{args.warmup} warm-up steps, on {device_name}",
        "",
        "| method | precision | trainable params (with temperature) | images/s | ms/step | peak memory (GiB) "
        "| time vs floor | matmul FLOPs vs floor | above the FLOP limit |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        memory = f"{row['peak_memory_gib']:.2f}" if row["peak_memory_gib"] is not None else "n/a"
        ratios = (
            f"{row['time_vs_floor']:.3f}x | {row['flops_vs_floor']:.3f}x | {100 * row['above_limit']:+.1f}%"
            if row.get("time_vs_floor") is not None else "n/a | n/a | n/a"
        )
        lines.append(
            f"| {row['method']} | {row['precision']} | {row['trainable_parameters']:,} | "
            f"{row['images_per_s']:.1f} | {row['step_ms']:.1f} | {memory} | {ratios} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random weights)")
    parser.add_argument("--model-config", type=json.loads, default=None,
                        help="open_clip.CLIP keyword arguments as JSON (then --model is only a label)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=214, help="per step (the reference's per-GPU batch)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (allocator, kernel selection); default 3 on CUDA, 1 on the CPU")
    parser.add_argument("--methods", default=",".join(THROUGHPUT_METHODS),
                        help="comma-separated: floor,harma,lora,full")
    parser.add_argument("--precisions", default=None,
                        help="comma-separated fp32,bf16,fp16 (default: fp32,bf16 on CUDA, fp32 on the CPU)")
    parser.add_argument("--sharing", default="reference", help="HarMA layout: reference | paper | none")
    parser.add_argument("--device", default="auto", help="auto | cuda | cpu")
    parser.add_argument("--no-tf32", action="store_true", help="full-precision fp32 matmuls on CUDA")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.warmup is None:
        args.warmup = 3 if device.type == "cuda" else 1
    precisions = (args.precisions or ("fp32,bf16" if device.type == "cuda" else "fp32")).split(",")
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in THROUGHPUT_METHODS] + [p for p in precisions if p not in ("fp32", "bf16", "fp16")]
    if unknown:
        parser.error(f"unknown method or precision: {unknown}")
    if device.type == "cuda":
        # Same setting as harma.training's default (tf32=True): fp32 storage, TF32 tensor-core matmuls.
        apply_precision("fp32", not args.no_tf32, device)
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"CPU ({torch.get_num_threads()} threads)"

    rows, failed = [], []
    for precision in precisions:
        for method in methods:
            try:
                row = measure(method, precision, args, device)
            except Exception as error:  # e.g. out of memory: the other configurations still run
                failed.append({"method": method, "precision": precision, "error": f"{type(error).__name__}: {error}"})
                print(f"{method:>5} {precision}: failed: {failed[-1]['error']}", flush=True)
            else:
                rows.append(row)
                print(f"{method:>5} {precision}: {row['images_per_s']:.1f} images/s", flush=True)
            # The previous configuration's model and optimizer state must not count in the next peak.
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if args.json:  # after every configuration: a run cut short keeps what it measured
                add_floor_ratios(rows)
                write_json(args.json, {"device": device_name, "rows": rows, "failed": failed, "args": vars(args)})
    add_floor_ratios(rows)
    print()
    print(markdown(rows, device_name, args))
    if failed:
        raise SystemExit(f"{len(failed)} configuration(s) failed: " + "; ".join(
            f"{f['method']} {f['precision']}: {f['error']}" for f in failed))
    return rows

if __name__ == "__main__":
    main()
