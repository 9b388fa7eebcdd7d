"""How the ``harma_plus`` preset (``harma.HarmaConfig.plus``) was chosen: a fixed handful of
candidate layouts scored on a validation split, never on a test split.

The candidates and the rule were written down in ``docs/transfer_benchmark.md`` before any
candidate was scored:

- every candidate combines the options of ``harma.HarmaConfig`` (``placement``,
  ``adapter_mask``, ``attention_passes``) with the reference sharing, and is sized so that its
  trainable parameters are at most the reference layout's on ViT-B/32 and at most LoRA's in the
  transfer benchmark (candidates over either budget are reported and excluded);
- data and protocol: the transfer benchmark's quick mode in the ``known-vocabulary`` scenario,
  seed 0 only; each candidate gets the benchmark's learning-rate rule (centre 3e-3, its two
  neighbours, one extension past an edge winner) and is scored by its best target
  *validation* mR; the test split is not evaluated at all;
- the highest score wins; a tie goes to fewer parameters, then to the earlier candidate.

    python benchmarks/select_harma_plus.py --json docs/harma_plus_selection.json   # about 10 min, 1 CPU core
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transfer  # noqa: E402  (the benchmark whose protocol this reuses; it puts the repository on sys.path)

import harma  # noqa: E402

SCENARIO = "known-vocabulary"
SEED = 0
# ViT-B/32 sizes; the benchmark scales bottlenecks with the model and keeps head widths. Two
# adapter positions per block get half the MGA bottleneck (64, heads of 16) to stay in budget;
# every candidate has an MMS of 32 features (heads of 8), half the reference's, for the same reason.
_SINGLE = dict(bottleneck=128, heads=8, mini_bottleneck=32, mini_heads=4)
_DOUBLE = dict(bottleneck=64, heads=4, mini_bottleneck=32, mini_heads=4)
CANDIDATES: dict[str, harma.HarmaConfig] = {
    "mlp-masked-1pass": harma.HarmaConfig(placement="mlp", adapter_mask="tower", attention_passes=1, **_SINGLE),
    "attention-masked-1pass": harma.HarmaConfig(placement="attention", adapter_mask="tower", attention_passes=1,
                                                **_SINGLE),
    "both-masked-1pass": harma.HarmaConfig(placement="attention+mlp", adapter_mask="tower", attention_passes=1,
                                           **_DOUBLE),
    "both-masked-2pass": harma.HarmaConfig(placement="attention+mlp", adapter_mask="tower", attention_passes=2,
                                           **_DOUBLE),
    "both-unmasked-2pass": harma.HarmaConfig(placement="attention+mlp", adapter_mask="none", attention_passes=2,
                                             **_DOUBLE),
}


def vit_b32_parameters(config: harma.HarmaConfig) -> int:
    """Adapter parameters of ``config`` on open_clip's ViT-B-32 (random weights, no download)."""
    import open_clip

    model = open_clip.create_model("ViT-B-32", pretrained=None)
    return harma.count_parameters(harma.inject_harma_adapters(model, config)).adapter


def budgets(settings: transfer.Settings, vocab_size: int) -> dict[str, int]:
    reference = transfer.build_clip(settings, vocab_size)
    harma_params = transfer.trainable_count(transfer.apply_method(reference, "harma", settings))
    per_rank = transfer.lora_parameters_per_rank(settings, vocab_size)
    lora_rank = max(1, round(harma_params / per_rank))
    return {"reference_vit_b32": vit_b32_parameters(harma.HarmaConfig()), "reference_benchmark": harma_params,
            "lora_benchmark": lora_rank * per_rank, "lora_rank": lora_rank}


def score(name: str, config: harma.HarmaConfig, settings: transfer.Settings, state: dict[str, torch.Tensor],
          vocab_size: int, target: transfer.Domain, lora_rank: int) -> dict[str, Any]:
    def runner(lr: float) -> dict[str, Any]:
        return transfer.run_method("harma_plus", lr, SEED, settings, state, vocab_size, target, lora_rank,
                                   ("val",), harma_config=config)

    def report(run: dict[str, Any]) -> None:
        transfer.log(f"  {name:24s} lr {run['lr']:.0e}: val mR {run['val']['mean_recall']:5.1f} "
                     f"(loss {run['final_loss']:.3f})")

    best_lr, runs = transfer.choose_lr("harma_plus", runner, settings.grid_extensions, report)
    return {"lr": best_lr, "val_mean_recall": max(run["val"]["mean_recall"] for run in runs),
            "grid": [{"lr": run["lr"], "val_mean_recall": run["val"]["mean_recall"],
                      "final_loss": run["final_loss"]} for run in runs]}


def select(data_dir: Path) -> dict[str, Any]:
    settings = dataclasses.replace(transfer.MODES["quick"], seeds=(SEED,))
    source, targets, tokenizer, _ = transfer.prepare_domains(settings, data_dir, SCENARIO)
    state, pretrain_info = transfer.pretrain(settings, source, tokenizer.vocab_size)
    transfer.log(f"pretrained: source test mR {pretrain_info['source_test']['mean_recall']:.1f}")
    limits = budgets(settings, tokenizer.vocab_size)
    transfer.log(f"budgets: {limits}")
    candidates: dict[str, Any] = {}
    for name, config in CANDIDATES.items():
        scaled = settings.scaled_harma_config(config)
        model = transfer.build_clip(settings, tokenizer.vocab_size)
        params = transfer.trainable_count(transfer.apply_method(model, "harma_plus", settings, harma_config=config))
        entry: dict[str, Any] = {"config": config.to_dict(), "benchmark_config": scaled.to_dict(),
                                 "benchmark_params": params, "vit_b32_params": vit_b32_parameters(config)}
        entry["within_budget"] = bool(params <= min(limits["reference_benchmark"], limits["lora_benchmark"])
                                      and entry["vit_b32_params"] <= limits["reference_vit_b32"])
        if entry["within_budget"]:
            entry |= score(name, config, settings, state, tokenizer.vocab_size, targets[SEED], limits["lora_rank"])
        transfer.log(f"{name}: {params:,} parameters (ViT-B/32 {entry['vit_b32_params']:,}), "
                     f"best val mR {entry.get('val_mean_recall', float('nan')):.1f}")
        candidates[name] = entry
    scored = [name for name, entry in candidates.items() if entry["within_budget"]]
    order = list(CANDIDATES)
    winner = max(scored, key=lambda n: (candidates[n]["val_mean_recall"], -candidates[n]["benchmark_params"],
                                        -order.index(n)))
    return {"scenario": SCENARIO, "mode": "quick", "seed": SEED, "budgets": limits, "candidates": candidates,
            "winner": winner, "pretrain_source_test_mr": pretrain_info["source_test"]["mean_recall"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write every candidate's scores here")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="harma-select-") as tmp:
        result = select(Path(tmp))
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    print("\n| candidate | benchmark params | ViT-B/32 params | lr | best val mR |\n|---|---:|---:|---:|---:|")
    for name, entry in result["candidates"].items():
        lr = f"{entry['lr']:.0e}" if "lr" in entry else "-"
        mr = f"{entry['val_mean_recall']:.1f}" if "val_mean_recall" in entry else "over budget"
        print(f"| {name} | {entry['benchmark_params']:,} | {entry['vit_b32_params']:,} | {lr} | {mr} |")
    print(f"\nwinner: {result['winner']}")
    if args.json:
        args.json.write_text(json.dumps(transfer.json_safe(result), indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
