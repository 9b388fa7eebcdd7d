"""Train-step time and peak memory of HarMA against other ways of training open_clip ViT-B-32.

Random weights, CPU, a batch of 8 images (224 px) and 8 captions, a CLIP contrastive loss and
AdamW:

- ``full``: full fine-tuning (every parameter trained).
- ``frozen``: the frozen backbone, forward only (what inference costs).
- ``floor``: the frozen backbone with gradients flowing through every block back to the input,
  nothing trained: the least any adapter method that patches every block can cost.
- ``harma``: harma's adapters, reference layout.
- ``harma_authors``: the same adapters written the way the authors' code writes them
  (``nn.MultiheadAttention`` modules and the convex block-gate mix), as a baseline for ours.
- ``lora``: peft LoRA, r=8, on the MLPs (``c_fc``, ``c_proj``) and attention (``attn``, via
  peft's ``nn.MultiheadAttention`` support: targeting ``attn.out_proj`` alone would have no
  effect because ``nn.MultiheadAttention`` reads that weight directly).
- ``lora_mlp``: peft LoRA, r=8, on the MLPs only.

Each method runs in fresh processes, interleaved with the others over ``--repeats`` rounds; its
step time is the median over those processes of each one's median step, its memory the peak
RSS. Printed as ratios to full fine-tuning and to the floor, all from one run on one machine.

    python benchmarks/adapter_overhead.py                 # all methods
    python benchmarks/adapter_overhead.py --profile harma # where HarMA's step time goes
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

METHODS = ("full", "frozen", "floor", "harma", "harma_authors", "lora", "lora_mlp")


class AuthorsMMadapter(nn.Module):
    """The authors' MGA (``MMadapter``) with ``nn.MultiheadAttention``, for comparison only."""

    def __init__(self, width: int, mini: nn.Module | None):
        super().__init__()
        self.img_proj_down = nn.Linear(width, 128)
        self.img_proj_up = nn.Linear(128, width)
        self.BiShareAdapterxx = mini
        self.multihead_attention = nn.MultiheadAttention(128, 8, batch_first=True)
        self.gate1 = nn.Parameter(torch.tensor(0.6))
        self.block_gate = nn.Parameter(torch.tensor(0.6))

    def forward(self, x):
        h = F.gelu(self.img_proj_down(x))
        a, _ = self.multihead_attention(h, h, h)
        if self.BiShareAdapterxx is not None:
            a = self.BiShareAdapterxx(a)
        a, _ = self.multihead_attention(a, a, a)
        alpha = torch.sigmoid(self.gate1)
        adapted = x + self.img_proj_up(alpha * h + (1 - alpha) * a)
        beta = torch.sigmoid(self.block_gate)
        return beta * adapted + (1 - beta) * x


class AuthorsBiShareAdapter(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(128, 64)
        self.l2 = nn.Linear(64, 128)
        self.multihead_attention1 = nn.MultiheadAttention(64, 8, batch_first=True)
        self.gate1 = nn.Parameter(torch.tensor(0.6))

    def forward(self, x):
        u = self.l1(x)
        attended, _ = self.multihead_attention1(u, u, u)
        alpha = torch.sigmoid(self.gate1)
        return self.l2(alpha * attended + (1 - alpha) * u) + x


def _authors_hook(adapter, module, args, output):
    return adapter(output)


def patch_like_the_authors(model: nn.Module) -> list[nn.Parameter]:
    model.requires_grad_(False)
    for tower, width in ((model.visual.transformer, model.visual.transformer.width),
                         (model.transformer, model.transformer.width)):
        for block in tower.resblocks:
            mini = AuthorsBiShareAdapter() if tower is model.transformer else None
            block.mmadapter = AuthorsMMadapter(width, mini)
            block.mlp.register_forward_hook(functools.partial(_authors_hook, block.mmadapter))
    return [p for n, p in model.named_parameters() if "mmadapter" in n]


def build(method: str):
    import open_clip

    import harma

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32")
    model.train()
    if method == "full":
        params = list(model.parameters())
    elif method in ("frozen", "floor"):
        model.requires_grad_(False)
        params = []
    elif method == "harma":
        harma.inject_harma_adapters(model, harma.HarmaConfig.reference())
        params = list(harma.adapter_parameters(model))
    elif method == "harma_authors":
        params = patch_like_the_authors(model)
    elif method in ("lora", "lora_mlp"):
        from peft import LoraConfig, get_peft_model

        model.requires_grad_(False)
        targets = ["c_fc", "c_proj", "attn"] if method == "lora" else ["c_fc", "c_proj"]
        config = LoraConfig(r=8, lora_alpha=16, target_modules=targets)
        model = get_peft_model(model, config).base_model.model
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    optimizer = torch.optim.AdamW(params, lr=1e-5) if params else None
    return model, optimizer, params


def make_step(method: str, model: nn.Module, optimizer, batch: int):
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, 224, 224, generator=generator)
    texts = torch.randint(1, 49000, (batch, 77), generator=generator)
    texts[:, 20] = 49407
    labels = torch.arange(batch)

    def loss_of(image_embeds, text_embeds):
        logits = F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).T * 100.0
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    def step():
        if method == "frozen":
            with torch.no_grad():
                loss_of(model.encode_image(images), model.encode_text(texts))
            return
        if method == "floor":
            # Gradient through every block to the (token and patch) inputs, nothing trained.
            image_input = images.clone().requires_grad_(True)
            with _text_input_requires_grad(model):
                loss_of(model.encode_image(image_input), model.encode_text(texts)).backward()
            return
        optimizer.zero_grad(set_to_none=True)
        loss_of(model.encode_image(images), model.encode_text(texts)).backward()
        optimizer.step()

    return step


class _text_input_requires_grad:
    """Make the token embeddings' output require grad, so the text tower backpropagates too."""

    def __init__(self, model):
        self.embedding = model.token_embedding

    def __enter__(self):
        self.handle = self.embedding.register_forward_hook(lambda m, a, out: out.requires_grad_(True))

    def __exit__(self, *exc):
        self.handle.remove()


def measure(method: str, batch: int, warmup: int, steps: int, threads: int) -> dict:
    """Median step time (s) and peak RSS (MiB) of a fresh process that builds ``method``."""
    torch.set_num_threads(threads)
    model, optimizer, params = build(method)
    step = make_step(method, model, optimizer, batch)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {
        "median_step_s": statistics.median(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable_params": sum(p.numel() for p in params),
    }


def adapter_seconds(model: nn.Module, batch: int, repeats: int = 10) -> dict[str, float]:
    """Median forward+backward time of one vision and one text adapter of ``model`` on the
    shapes they see in a step (``(batch, 50, 768)`` and ``(batch, 77, 512)``), alone."""
    result = {}
    for name, tower, tokens in (("vision", model.visual.transformer, 50), ("text", model.transformer, 77)):
        adapter = tower.resblocks[1].harma_adapter
        inputs = torch.randn(batch, tokens, tower.width, requires_grad=True)
        times = []
        for _ in range(repeats + 2):
            start = time.perf_counter()
            adapter(inputs).square().sum().backward()
            times.append(time.perf_counter() - start)
        result[name] = statistics.median(times[2:])
    return result


def profile(method: str, batch: int, threads: int, rows: int) -> None:
    torch.set_num_threads(threads)
    model, optimizer, _ = build(method)
    step = make_step(method, model, optimizer, batch)
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(3):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    if method == "harma":
        # The hook runs the adapters inside the backbone's autograd graph, so the profiler cannot
        # attribute their time by module; time them alone on the shapes they see instead.
        step_times = []
        for _ in range(3):
            start = time.perf_counter()
            step()
            step_times.append(time.perf_counter() - start)
        costs = adapter_seconds(model, batch)
        blocks = len(model.visual.transformer.resblocks)
        adapters_total = blocks * (costs["vision"] + costs["text"])
        print(f"\none vision adapter fwd+bwd: {costs['vision'] * 1e3:.1f} ms, one text adapter: "
              f"{costs['text'] * 1e3:.1f} ms; {2 * blocks} adapters: {adapters_total:.3f} s of a "
              f"{statistics.median(step_times):.3f} s step ({100 * adapters_total / statistics.median(step_times):.1f}%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per process")
    parser.add_argument("--repeats", type=int, default=3, help="processes per method, interleaved")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--profile", choices=METHODS, help="profile one method's step instead")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.profile:
        profile(args.profile, args.batch, args.threads, args.rows)
        return
    if args._child:
        print(json.dumps(measure(args._child, args.batch, args.warmup, args.steps, args.threads)))
        return

    # Each method in a fresh process (its own peak memory, no other model's data in the caches),
    # and the methods interleaved over several repeats, so that drifts in the machine's speed
    # hit every method alike; a method's time is the median over its repeats.
    runs: dict[str, list[dict]] = {method: [] for method in args.methods}
    for repeat in range(args.repeats):
        for method in args.methods:
            command = [sys.executable, __file__, "--_child", method, "--batch", str(args.batch),
                       "--warmup", str(args.warmup), "--steps", str(args.steps), "--threads", str(args.threads)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            runs[method].append(json.loads(output.strip().splitlines()[-1]))
            print(f"repeat {repeat + 1}/{args.repeats} {method}: "
                  f"{runs[method][-1]['median_step_s']:.3f} s/step", file=sys.stderr)
    results = {
        method: {
            "median_step_s": statistics.median(r["median_step_s"] for r in rows),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rows),
            "trainable_params": rows[0]["trainable_params"],
            "step_s_per_repeat": [r["median_step_s"] for r in rows],
        }
        for method, rows in runs.items()
    }

    full = results.get("full")
    floor = results.get("floor")
    print(f"\nopen_clip ViT-B-32, random weights, CPU ({args.threads} threads), batch {args.batch}, "
          f"median over {args.repeats} interleaved processes of the median of {args.steps} steps "
          f"after {args.warmup} warm-up\n")
    print("| method | trainable params | step time vs full | step time vs floor | peak RSS vs full |")
    print("|---|---:|---:|---:|---:|")
    for method, row in results.items():
        vs_full = f"{row['median_step_s'] / full['median_step_s']:.3f}x" if full else "n/a"
        vs_floor = f"{row['median_step_s'] / floor['median_step_s']:.3f}x" if floor else "n/a"
        memory = f"{row['peak_rss_mb'] / full['peak_rss_mb']:.3f}x" if full else "n/a"
        print(f"| {method} | {row['trainable_params']:,} | {vs_full} | {vs_floor} | {memory} |")
    if args.json:
        with open(args.json, "w") as stream:
            json.dump(results, stream, indent=2)


if __name__ == "__main__":
    main()
