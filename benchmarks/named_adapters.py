"""Named adapter sets on one backbone: what switching costs, what each extra set adds in memory, and
whether switching gives exactly the model that holds that set alone.

open_clip ViT-B-32 with random weights (no download) on the CPU gets K named HarMA adapter sets
(default four: ``rsitmd``, ``rsicd``, ``ucm``, ``sydney``; reference ``HarmaConfig()``). Each set's
weights are random (so that the sets compute different things), saved to a safetensors file with
``harma.save_adapters`` from a copy of the backbone, and added to the model under test with
``harma.load_adapters(model, file, adapter_name=...)``: the file route a user takes.

Measured, in one process:

- ``harma.set_adapter``, training (the default) and with ``inference_mode=True`` (every set
  frozen, no ``requires_grad`` flips): microseconds per call (median and p90 over ``--switches`` calls, every
  call switching to another set, cycling through the sets held), once the model holds 2, 3, ...
  K sets; next to the median time of one forward pass (``model(images, texts)``, no grad) of a
  batch of ``--batch`` images and captions, and the time of re-loading a set from its file into
  the model (``load_adapters`` into an existing set: the alternative to switching).
- memory of each set added: its parameter bytes (``harma.count_parameters(model).per_adapter``
  times the element size), the size of its adapter file on disk (tensor bytes plus the
  safetensors header), and the growth of this process's resident memory (VmRSS from
  ``/proc/self/statm``, after ``gc.collect()`` and glibc's ``malloc_trim``) when the set is added.
- that no backbone tensor is copied: the ``data_ptr`` (and object) of every backbone parameter
  and buffer is the same after adding every set and switching between them.
- correctness: after ``set_adapter(model, X)`` the model's outputs on a fixed batch equal
  (``torch.equal``) those of a separate model holding only X, loaded from the same file; and the
  sets' outputs differ from each other and from the bare backbone's (so the check can fail). The
  script exits with status 1 when any check fails.

    python benchmarks/named_adapters.py --threads 1
    python benchmarks/named_adapters.py --threads 1 --names a b c d e f g h --json named.json
    python benchmarks/named_adapters.py --model-config '{"embed_dim": 32, ...}' --image-size 32  # tests
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEFAULT_NAMES = ("rsitmd", "rsicd", "ucm", "sydney")


# --------------------------------------------------------------------------------------------
# Measuring


def _malloc_trim() -> Callable[[], Any]:
    """glibc's ``malloc_trim(0)`` (returns freed heap memory to the system), or a no-op elsewhere."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda pad: 0


_TRIM = _malloc_trim()


def rss_bytes() -> int:
    """Resident memory of this process (bytes), after collecting garbage and trimming the heap,
    so that memory freed by earlier work does not hide or inflate what a set adds; 0 where there
    is no /proc."""
    gc.collect()
    _TRIM(0)
    try:
        with open("/proc/self/statm") as stream:
            return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def percentile(values: list[float], fraction: float) -> float:
    """The ``fraction`` quantile of ``values`` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def switch_times_us(model: nn.Module, names: list[str], switches: int, warmup: int = 50,
                    inference_mode: bool = False) -> list[float]:
    """Microseconds of each of ``switches`` calls of ``harma.set_adapter`` (with
    ``inference_mode``), each to the next of ``names`` (cyclically, so every call changes the
    active set), garbage collection paused."""
    import harma

    times = []
    enabled = gc.isenabled()
    gc.disable()
    try:
        for index in range(warmup + switches):
            name = names[index % len(names)]
            start = time.perf_counter_ns()
            harma.set_adapter(model, name, inference_mode=inference_mode)
            elapsed = time.perf_counter_ns() - start
            if index >= warmup:
                times.append(elapsed / 1e3)
    finally:
        if enabled:
            gc.enable()
    return times


def median_seconds(function: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall time (s) of ``repeats`` calls of ``function`` after ``warmup`` untimed ones."""
    times = []
    for index in range(warmup + repeats):
        start = time.perf_counter()
        function()
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


# --------------------------------------------------------------------------------------------
# Models, batches, files


def build_model(model_name: str = "ViT-B-32", model_config: dict | None = None) -> nn.Module:
    """An open_clip CLIP with random weights (seed 0), in eval mode: ``model_name`` through
    ``open_clip.create_model(pretrained=None)``, or ``open_clip.CLIP(**model_config)``."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.CLIP(**model_config) if model_config else open_clip.create_model(model_name, pretrained=None)
    return model.eval()


def make_batch(model: nn.Module, batch: int, image_size: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch of ``batch`` random images ``(3, S, S)`` and token rows (an end token at 20)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, image_size, image_size, generator=generator)
    context = model.context_length
    vocab = model.vocab_size
    texts = torch.randint(1, vocab - 1, (batch, context), generator=generator)
    texts[:, min(20, context - 1)] = vocab - 1
    return images, texts


def outputs(model: nn.Module, images: torch.Tensor, texts: torch.Tensor) -> list[torch.Tensor]:
    """The tensors ``model(images, texts)`` returns (image and text features, logit scale...)."""
    with torch.no_grad():
        result = model(images, texts)
    values = result.values() if isinstance(result, dict) else result
    return [value for value in values if isinstance(value, torch.Tensor)]


def all_equal(first: list[torch.Tensor], second: list[torch.Tensor]) -> bool:
    return len(first) == len(second) and all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def randomize_adapters(model: nn.Module, seed: int, scale: float = 0.05) -> None:
    """Add seeded noise to every adapter parameter of ``model``'s active set, so that each set
    computes something different (freshly added adapters compute the identity)."""
    import harma

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in harma.adapter_parameters(model):
            param.add_(scale * torch.randn(param.shape, generator=generator, dtype=param.dtype))


def safetensors_header_bytes(path: Path) -> int:
    """Bytes of a safetensors file before its tensor data: the 8-byte length and the JSON header."""
    with open(path, "rb") as stream:
        (length,) = struct.unpack("<Q", stream.read(8))
    return 8 + length


def make_adapter_files(scratch: nn.Module, names: list[str], config, folder: Path) -> dict[str, Path]:
    """One adapter file per name, each set with its own random weights, written from ``scratch``
    (a copy of the backbone; each set is added, saved and removed again)."""
    import harma

    files = {}
    for index, name in enumerate(names):
        harma.inject_harma_adapters(scratch, config)
        randomize_adapters(scratch, seed=1000 + index)
        files[name] = harma.save_adapters(scratch, folder / f"{name}.safetensors")
        harma.remove_harma_adapters(scratch)
    return files


def backbone_tensors(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``(id, data_ptr)`` of every parameter and buffer of ``model`` outside the adapter sets."""
    from harma.named_adapters import is_adapter_parameter_name

    tensors = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not is_adapter_parameter_name(name):
            tensors[name] = (id(tensor), tensor.data_ptr())
    return tensors


# --------------------------------------------------------------------------------------------
# The benchmark


def run(names: list[str], model_name: str = "ViT-B-32", model_config: dict | None = None, image_size: int = 224,
        batch: int = 8, check_batch: int = 2, switches: int = 2000, forward_repeats: int = 5,
        reload_repeats: int = 5, log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Every measurement and check of this benchmark (see the module docstring), as a dict."""
    import harma

    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"need at least two distinct adapter names, got {names}")
    config = harma.HarmaConfig()
    model = build_model(model_name, model_config)
    scratch = copy.deepcopy(model)  # the same backbone: writes the files, then holds one set at a time
    images, texts = make_batch(model, batch, image_size)
    check_images, check_texts = images[:check_batch], texts[:check_batch]
    backbone_before = backbone_tensors(model)
    backbone_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bare_outputs = outputs(model, check_images, check_texts)

    with tempfile.TemporaryDirectory(prefix="harma-named-") as folder:
        files = make_adapter_files(scratch, names, config, Path(folder))
        log(f"wrote {len(files)} adapter files")

        # Add the sets one by one from their files, measuring memory, then switching among those held.
        sets: list[dict[str, Any]] = []
        rss_before = rss_bytes()
        for index, name in enumerate(names):
            started = time.perf_counter()
            harma.load_adapters(model, files[name], adapter_name=name)
            add_s = time.perf_counter() - started
            rss_after = rss_bytes()
            params = harma.count_parameters(model).per_adapter[name]
            element_size = next(harma.adapter_parameters(model, name)).element_size()
            file_bytes = files[name].stat().st_size
            header_bytes = safetensors_header_bytes(files[name])
            row: dict[str, Any] = {
                "name": name,
                "sets_held": index + 1,
                "parameters": params,
                "parameter_bytes": params * element_size,
                "file_bytes": file_bytes,
                "file_header_bytes": header_bytes,
                "file_tensor_bytes": file_bytes - header_bytes,
                "rss_growth_bytes": rss_after - rss_before,
                "add_from_file_s": add_s,
            }
            rss_before = rss_after
            if index >= 1:
                times = switch_times_us(model, names[: index + 1], switches)
                row.update(set_adapter_median_us=statistics.median(times), set_adapter_p90_us=percentile(times, 0.9),
                           set_adapter_min_us=min(times))
                frozen = switch_times_us(model, names[: index + 1], switches, inference_mode=True)
                row.update(inference_median_us=statistics.median(frozen), inference_p90_us=percentile(frozen, 0.9))
            sets.append(row)
            log(f"added {name}: {len(sets)} sets held")
        held = names[:]
        assert harma.list_adapters(model) == held, harma.list_adapters(model)

        # One forward pass of the batch, and re-loading a set from its file, for comparison.
        harma.set_adapter(model, names[0])
        forward_s = median_seconds(lambda: outputs(model, images, texts), forward_repeats)
        log(f"forward pass of batch {batch}: {forward_s:.3f} s")
        reload_s = median_seconds(lambda: harma.load_adapters(model, files[names[0]], adapter_name=names[0]),
                                  reload_repeats)

        # Correctness: each set, switched to, against a separate model holding only that set.
        checks, switched_outputs = [], {}
        for name in names:
            harma.set_adapter(model, name)
            switched = switched_outputs[name] = outputs(model, check_images, check_texts)
            harma.load_adapters(scratch, files[name])
            alone = outputs(scratch, check_images, check_texts)
            harma.remove_harma_adapters(scratch)
            checks.append({"name": name, "equal_to_set_alone": all_equal(switched, alone),
                           "differs_from_backbone": not all_equal(switched, bare_outputs)})
        for check in checks:
            check["differs_from_other_sets"] = all(
                not all_equal(switched_outputs[check["name"]], switched_outputs[other])
                for other in names if other != check["name"]
            )

    backbone_after = backbone_tensors(model)
    backbone = {
        "parameter_bytes": backbone_bytes,
        "tensors": len(backbone_before),
        "same_tensors_after": backbone_after == backbone_before,
    }
    last = sets[-1]
    results = {
        "names": names,
        "sets": sets,
        "set_adapter_median_us": last["set_adapter_median_us"],
        "set_adapter_p90_us": last["set_adapter_p90_us"],
        "inference_median_us": last["inference_median_us"],
        "inference_vs_forward": last["inference_median_us"] / 1e6 / forward_s,
        "forward_s": forward_s,
        "set_adapter_vs_forward": last["set_adapter_median_us"] / 1e6 / forward_s,
        "reload_from_file_s": reload_s,
        "reload_vs_set_adapter": reload_s / (last["set_adapter_median_us"] / 1e6),
        "backbone": backbone,
        "checks": checks,
    }
    results["passed"] = backbone["same_tensors_after"] and all(
        c["equal_to_set_alone"] and c["differs_from_backbone"] and c["differs_from_other_sets"] for c in checks
    )
    return results


def _mib(value: float) -> str:
    return f"{value / 2**20:.2f} MiB"


def table(results: dict[str, Any]) -> str:
    """The markdown tables of `run`'s results: one row per set added, then the summary."""
    lines = [
        "| sets held | set added | its parameters | parameter bytes | file size (header) | RSS growth | "
        "add from file | set_adapter median | p90 | inference_mode median | p90 |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["sets"]:
        switch = (f"{row['set_adapter_median_us']:.1f} µs | {row['set_adapter_p90_us']:.1f} µs | "
                  f"{row['inference_median_us']:.1f} µs | {row['inference_p90_us']:.1f} µs"
                  if "set_adapter_median_us" in row else "n/a | n/a | n/a | n/a")
        lines.append(
            f"| {row['sets_held']} | {row['name']} | {row['parameters']:,} | {_mib(row['parameter_bytes'])} | "
            f"{_mib(row['file_bytes'])} ({row['file_header_bytes']:,} B) | {_mib(row['rss_growth_bytes'])} | "
            f"{row['add_from_file_s'] * 1e3:.1f} ms | {switch} |"
        )
    k = len(results["sets"])
    backbone = results["backbone"]
    checks = results["checks"]
    equal = sum(c["equal_to_set_alone"] for c in checks)
    distinct = sum(c["differs_from_backbone"] and c["differs_from_other_sets"] for c in checks)
    lines += [
        "",
        "| quantity | value |",
        "|---|---:|",
        f"| set_adapter, {k} sets held (median) | {results['set_adapter_median_us']:.1f} µs |",
        f"| one forward pass of the batch (median) | {results['forward_s'] * 1e3:.1f} ms |",
        f"| set_adapter / forward pass | {results['set_adapter_vs_forward']:.2e} |",
        f"| set_adapter(..., inference_mode=True), {k} sets held (median) | {results['inference_median_us']:.1f} µs |",
        f"| the same / forward pass | {results['inference_vs_forward']:.2e} |",
        f"| re-loading a set from its file (median) | {results['reload_from_file_s'] * 1e3:.1f} ms |",
        f"| re-loading / set_adapter | {results['reload_vs_set_adapter']:,.0f}x |",
        f"| backbone parameters | {_mib(backbone['parameter_bytes'])} |",
        f"| backbone tensors copied or moved | "
        f"{'none' if backbone['same_tensors_after'] else 'YES'} (of {backbone['tensors']}) |",
        f"| outputs after switching equal a model holding only that set | {equal} of {len(checks)} sets |",
        f"| sets whose outputs differ from the backbone's and each other's | {distinct} of {len(checks)} |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--names", nargs="+", default=list(DEFAULT_NAMES), help="adapter set names (two or more)")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random weights)")
    parser.add_argument("--model-config", type=json.loads, default=None,
                        help="open_clip.CLIP keyword arguments as JSON, instead of --model (smoke tests)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8, help="batch of the timed forward pass")
    parser.add_argument("--check-batch", type=int, default=2, help="batch of the correctness check")
    parser.add_argument("--switches", type=int, default=2000, help="timed set_adapter calls per number of sets")
    parser.add_argument("--forward-repeats", type=int, default=5)
    parser.add_argument("--reload-repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    results = run(args.names, args.model, args.model_config, args.image_size, args.batch, args.check_batch,
                  args.switches, args.forward_repeats, args.reload_repeats,
                  log=lambda message: print(message, file=sys.stderr, flush=True))
    model = "a CLIP of --model-config" if args.model_config else f"open_clip {args.model}"
    print(f"\n{model}, random weights, CPU ({args.threads} threads), {len(args.names)} named sets "
          f"(HarmaConfig()), each added with load_adapters from its file; set_adapter over {args.switches} "
          f"calls per row, each switching sets; forward pass: model(images, texts), no grad, batch "
          f"{args.batch}, image {args.image_size}px, median of {args.forward_repeats}; RSS after gc and "
          f"malloc_trim\n")
    print(table(results))
    if not results["passed"]:
        print("\nFAILED: see the checks above", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as stream:
            json.dump({"args": vars(args), "results": results}, stream, indent=2)
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
