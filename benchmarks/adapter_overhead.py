"""Train-step time of HarMA against other ways of training open_clip ViT-B-32, next to the limit
that the matrix-multiply FLOPs of each step set.

Random weights, CPU, a batch of 8 images (224 px) and 8 captions, a CLIP contrastive loss and
AdamW (``fused=True`` by default, for every method that trains; ``--optimizer``):

- ``full``: full fine-tuning (every parameter trained).
- ``frozen``: the frozen backbone, forward only (what inference costs).
- ``floor``: the strict floor. The frozen backbone with gradients flowing through every block of
  both towers down to the outputs of the patch embedding (``visual.conv1``) and of the token
  embedding, not to the pixels, and nothing trained: the least any method that adapts every
  block can cost.
- ``harma``: harma's adapters, reference layout (``HarmaConfig()``).
- ``harma_compiled``: the same, with ``harma.modules.compile_adapters`` (``torch.compile`` of each
  adapter; compiling takes minutes on a small CPU, before the timed rounds).
- ``harma_plus``: harma's adapters, ``HarmaConfig.plus()`` (after attention and MLP).
- ``harma_authors``: the reference layout written the way the authors' code writes it
  (``nn.MultiheadAttention`` modules and the convex block-gate mix), as a baseline for ours.
- ``lora``: peft LoRA, r=8, on the MLPs (``c_fc``, ``c_proj``) and attention (``attn``, via
  peft's ``nn.MultiheadAttention`` support: targeting ``attn.out_proj`` alone would have no
  effect because ``nn.MultiheadAttention`` reads that weight directly).
- ``lora_mlp``: peft LoRA, r=8, on the MLPs only.

Every method is built in one process and timed step by step in turn: each round runs one step
of every method (in an order rotated from round to round), and a method's time ratio to the
floor is the median over rounds of its step time divided by the floor's step time of the same
round. On a shared machine this cancels the slow drifts that make block-wise timing of the same
code vary by several percent. Each step also records how many cores other processes kept busy
meanwhile (from ``/proc/stat``); ``--max-foreign-load`` keeps only the rounds in which that
stayed below a bound in every step of the round.

The FLOP ratio is the ratio of matrix-multiply FLOPs (``torch.utils.flop_counter``: linear
layers, convolutions, attention products; forward and backward) of one step of the method to
one step of the floor. Elementwise work is not counted, so no implementation of a method can be
faster than its FLOP ratio says unless it skips matrix products; "above the limit" is how much
the measured time ratio exceeds it.

    python benchmarks/adapter_overhead.py --threads 2              # all methods
    python benchmarks/adapter_overhead.py --threads 1 --clock cpu --methods floor harma harma_compiled
    python benchmarks/adapter_overhead.py --methods floor harma --rounds 30
    python benchmarks/adapter_overhead.py --memory                 # also the peak RSS of each
    python benchmarks/adapter_overhead.py --profile harma          # where HarMA's step time goes
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

METHODS = ("full", "frozen", "floor", "harma", "harma_compiled", "harma_plus", "harma_authors", "lora", "lora_mlp")

# The fused attention of PyTorch's CPU kernels has no formula in the flop counter; without one
# the backbone's attention products would go uncounted while the adapters' (plain matmuls) count.
# Arguments arrive as shapes: (query, key, value, ...) forward, (grad_out, query, key, value, ...) backward.
_CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda query, key, value, *args, **kwargs: sdpa_flop_count(query, key, value),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, query, key, value, *args, **kwargs: sdpa_backward_flop_count(grad, query, key, value),
}


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


def _output_requires_grad(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.requires_grad_(True)


def make_strict_floor(model: nn.Module) -> None:
    """Freeze ``model`` and make the patch and token embeddings' outputs require grad, so that
    backward runs through every block of both towers but stops there (never to the pixels)."""
    model.requires_grad_(False)
    model.visual.conv1.register_forward_hook(_output_requires_grad)
    model.token_embedding.register_forward_hook(_output_requires_grad)


def build(method: str, model_name: str = "ViT-B-32", optimizer: str = "fused", model_config: dict | None = None):
    """``(model, optimizer or None, trainable parameters)`` for ``method``, random weights;
    ``optimizer`` is how AdamW runs: ``"fused"``, ``"foreach"`` or ``"for-loop"``. With
    ``model_config`` (``open_clip.CLIP`` keyword arguments) ``model_name`` is ignored."""
    import open_clip

    import harma

    torch.manual_seed(0)
    model = open_clip.CLIP(**model_config) if model_config else open_clip.create_model(model_name)
    model.train()
    if method == "full":
        params = list(model.parameters())
    elif method == "frozen":
        model.requires_grad_(False)
        params = []
    elif method == "floor":
        make_strict_floor(model)
        params = []
    elif method in ("harma", "harma_compiled", "harma_plus"):
        config = harma.HarmaConfig.plus() if method == "harma_plus" else harma.HarmaConfig()
        harma.inject_harma_adapters(model, config)
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
    options = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[optimizer]
    return model, torch.optim.AdamW(params, lr=1e-5, **options) if params else None, params


def make_step(method: str, model: nn.Module, optimizer, batch: int, image_size: int = 224,
              context_length: int = 77) -> Callable[[], None]:
    """One training step of ``method`` on a fixed batch: ``batch`` images ``(3, S, S)`` and
    ``batch`` token rows of ``context_length`` ids."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, image_size, image_size, generator=generator)
    texts = torch.randint(1, 49000, (batch, context_length), generator=generator)
    texts[:, min(20, context_length - 1)] = 49407
    labels = torch.arange(batch)

    def loss_of(image_embeds, text_embeds):
        logits = F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).T * 100.0
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    def step():
        if method == "frozen":
            with torch.no_grad():
                loss_of(model.encode_image(images), model.encode_text(texts))
            return
        if optimizer is None:
            loss_of(model.encode_image(images), model.encode_text(texts)).backward()
            return
        optimizer.zero_grad(set_to_none=True)
        loss_of(model.encode_image(images), model.encode_text(texts)).backward()
        optimizer.step()

    return step


def matmul_flops(step: Callable[[], None]) -> int:
    """Matrix-multiply FLOPs (forward and backward) of one call of ``step``."""
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS)
    with counter:
        step()
    return counter.get_total_flops()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
"""``wall``: elapsed time. ``cpu``: CPU time of this process, all threads together, which other
processes' load on a shared machine does not stretch; meaningful with one thread only (idle
OpenMP workers spin and count)."""


def _busy_jiffies() -> tuple[int, int]:
    """(busy clock ticks of the whole machine, ticks of this process) from /proc; (0, 0) where
    there is no /proc."""
    try:
        with open("/proc/stat") as stream:
            fields = stream.readline().split()[1:]
        with open("/proc/self/stat") as stream:
            own = stream.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0, 0
    # user nice system [idle iowait] irq softirq steal; utime stime of this process.
    return sum(int(fields[i]) for i in (0, 1, 2, 5, 6, 7)), int(own[11]) + int(own[12])


def interleaved_times(steps: dict[str, Callable[[], None]], rounds: int, warmup: int,
                      clock: str = "wall") -> tuple[dict[str, list[float]], list[float]]:
    """Seconds of each step in each of ``rounds`` rounds, and per round the most cores that
    other processes kept busy during any of its steps. Every round runs each step once, the
    order rotated by one method per round so that no method always follows the same one."""
    names, now, ticks = list(steps), CLOCKS[clock], os.sysconf("SC_CLK_TCK")
    times: dict[str, list[float]] = {name: [] for name in names}
    foreign: list[float] = []
    for index in range(warmup + rounds):
        shift, busiest = index % len(names), 0.0
        for name in names[shift:] + names[:shift]:
            machine, own = _busy_jiffies()
            wall, start = time.perf_counter(), now()
            steps[name]()
            elapsed, wall = now() - start, time.perf_counter() - wall
            machine_after, own_after = _busy_jiffies()
            busiest = max(busiest, ((machine_after - machine) - (own_after - own)) / ticks / wall)
            if index >= warmup:
                times[name].append(elapsed)
        if index >= warmup:
            foreign.append(busiest)
        if (index + 1) % 10 == 0:
            print(f"round {index + 1}/{warmup + rounds}", file=sys.stderr, flush=True)
    return times, foreign


def _summarise(method: str, times: dict[str, list[float]], keep: list[int], flops: dict[str, int],
               trainable: int) -> dict[str, Any]:
    ratios = [times[method][i] / times["floor"][i] for i in keep]
    time_ratio, flop_ratio = statistics.median(ratios), flops[method] / flops["floor"]
    return {
        "trainable_params": trainable,
        "median_step_s": statistics.median(times[method][i] for i in keep),
        "time_ratio": time_ratio,
        "flops": flops[method],
        "flop_ratio": flop_ratio,
        "above_limit": time_ratio / flop_ratio - 1,
        "round_ratios": ratios,
        "step_s_per_round": [times[method][i] for i in keep],
    }


def build_steps(methods: list[str], batch: int, model_name: str, image_size: int, optimizer: str,
                log: Callable[[str], None], model_config: dict | None = None) -> tuple[dict, dict, dict]:
    """Each method's step function, matmul FLOPs of one step and trainable parameter count.
    ``harma_compiled`` counts the FLOPs of the eager adapters (the same products), then compiles."""
    from harma.modules import compile_adapters

    steps, trainable, flops = {}, {}, {}
    for method in methods:
        model, adamw, params = build(method, model_name, optimizer, model_config)
        steps[method] = make_step(method, model, adamw, batch, image_size, model.context_length)
        trainable[method] = sum(p.numel() for p in params)
        steps[method]()  # lazy allocations (optimizer state) before the FLOP count
        flops[method] = matmul_flops(steps[method])
        if method == "harma_compiled":
            compile_adapters(model)
            started = time.perf_counter()
            steps[method]()
            log(f"compiled the adapters in {time.perf_counter() - started:.0f} s")
    return steps, flops, trainable


def compare(methods: list[str], batch: int, rounds: int, warmup: int, model_name: str = "ViT-B-32",
            image_size: int = 224, optimizer: str = "fused", clock: str = "wall",
            max_foreign_load: float | None = None, log: Callable[[str], None] = lambda message: None,
            model_config: dict | None = None) -> tuple[dict[str, dict], dict[str, Any]]:
    """Time ratio and matmul-FLOP ratio to the strict floor of every method in ``methods``, and
    what the timing saw: rounds kept, other processes' load."""
    methods = ["floor"] + [m for m in methods if m != "floor"]
    steps, flops, trainable = build_steps(methods, batch, model_name, image_size, optimizer, log, model_config)
    log(f"built {len(methods)} methods; timing {rounds} rounds after {warmup} warm-up rounds")
    times, foreign = interleaved_times(steps, rounds, warmup, clock)
    keep = [i for i, load in enumerate(foreign) if max_foreign_load is None or load <= max_foreign_load]
    if not keep:
        raise RuntimeError(f"every round saw other processes above {max_foreign_load} cores "
                           f"(least {min(foreign):.2f}); run again when the machine is quieter")
    results = {method: _summarise(method, times, keep, flops, trainable[method]) for method in methods}
    timing = {"rounds": rounds, "rounds_kept": len(keep), "foreign_load_per_round": foreign,
              "median_foreign_load": statistics.median(foreign), "clock": clock, "optimizer": optimizer}
    return results, timing


def peak_rss_mib(method: str, batch: int, steps: int, threads: int, optimizer: str = "fused") -> float:
    """Peak resident memory (MiB) of a fresh process that builds ``method`` and runs ``steps``."""
    command = [sys.executable, __file__, "--_memory_child", method, "--batch", str(batch),
               "--rounds", str(steps), "--threads", str(threads), "--optimizer", optimizer]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return float(output.strip().splitlines()[-1])


def _memory_child(method: str, batch: int, steps: int, optimizer: str) -> None:
    model, optimizer, _ = build(method, optimizer=optimizer)
    step = make_step(method, model, optimizer, batch)
    for _ in range(steps):
        step()
    # VmHWM belongs to this program's memory; ru_maxrss would carry over the peak of the parent
    # that forked it (Linux keeps it across exec), which holds every method's model.
    try:
        with open("/proc/self/status") as stream:
            peak_kib = next(int(line.split()[1]) for line in stream if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(peak_kib / 1024)


def adapter_seconds(model: nn.Module, batch: int, repeats: int = 10) -> dict[str, float]:
    """Median forward+backward time (s) of one vision and one text adapter of ``model`` on the
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


def profile(method: str, batch: int, rows: int) -> None:
    from harma.modules import compile_adapters

    model, optimizer, _ = build(method)
    step = make_step(method, model, optimizer, batch)
    if method == "harma_compiled":
        compile_adapters(model)
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
        step_s = statistics.median(step_times)
        print(f"\none vision adapter fwd+bwd: {costs['vision'] * 1e3:.1f} ms, one text adapter: "
              f"{costs['text'] * 1e3:.1f} ms; {2 * blocks} adapters: {adapters_total:.3f} s of a "
              f"{step_s:.3f} s step ({100 * adapters_total / step_s:.1f}%)")


def table(results: dict[str, dict], memory: dict[str, float] | None = None) -> str:
    """The markdown table of `compare`'s results (and peak RSS ratios to full, if measured)."""
    header = "| method | trainable params | time vs floor | matmul FLOPs vs floor | above the FLOP limit |"
    rule = "|---|---:|---:|---:|---:|"
    if memory:
        header += " peak RSS vs full |"
        rule += "---:|"
    lines = [header, rule]
    for method, row in results.items():
        line = (f"| {method} | {row['trainable_params']:,} | {row['time_ratio']:.3f}x | "
                f"{row['flop_ratio']:.3f}x | {100 * row['above_limit']:+.1f}% |")
        if memory:
            full = memory.get("full")
            line += f" {memory[method] / full:.3f}x |" if full and method in memory else " n/a |"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random weights)")
    parser.add_argument("--model-config", type=json.loads, default=None,
                        help="open_clip.CLIP keyword arguments as JSON, instead of --model (smoke tests)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (one step of each method per round)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--optimizer", choices=("fused", "foreach", "for-loop"), default="fused",
                        help="how AdamW runs, for every method that trains")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall")
    parser.add_argument("--max-foreign-load", type=float, default=None, metavar="CORES",
                        help="keep only rounds in which other processes kept at most this many cores busy")
    parser.add_argument("--memory", action="store_true",
                        help="also measure each method's peak RSS in a fresh process (not harma_compiled)")
    parser.add_argument("--profile", choices=METHODS, help="profile one method's step instead")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--_memory_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args._memory_child:
        _memory_child(args._memory_child, args.batch, args.rounds, args.optimizer)
        return
    if args.profile:
        profile(args.profile, args.batch, args.rows)
        return

    results, timing = compare(args.methods, args.batch, args.rounds, args.warmup, args.model, args.image_size,
                              args.optimizer, args.clock, args.max_foreign_load,
                              log=lambda message: print(message, file=sys.stderr, flush=True),
                              model_config=args.model_config)
    memory = None
    if args.memory:
        memory = {method: peak_rss_mib(method, args.batch, 3, args.threads, args.optimizer)
                  for method in results if method != "harma_compiled"}
    model = "a CLIP of --model-config" if args.model_config else f"open_clip {args.model}"
    print(f"\n{model}, random weights, CPU ({args.threads} threads), batch {args.batch}, "
          f"image {args.image_size}px, AdamW {args.optimizer}; one process, one step of each method per "
          f"round, {args.clock} clock; median over {timing['rounds_kept']} of {args.rounds} rounds (after "
          f"{args.warmup} warm-up rounds) of the step time divided by the floor's in the same round; "
          f"floor median step {results['floor']['median_step_s']:.3f} s; other processes' load "
          f"median {timing['median_foreign_load']:.2f} cores\n")
    print(table(results, memory))
    if args.json:
        for method, rss in (memory or {}).items():
            results[method]["peak_rss_mib"] = rss
        with open(args.json, "w") as stream:
            json.dump({"args": vars(args), "timing": timing, "results": results}, stream, indent=2)


if __name__ == "__main__":
    main()
