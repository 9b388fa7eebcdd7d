"""Why does HarMA trail LoRA in the transfer benchmark? One change at a time, on its quick setting.

A diagnostic companion to ``benchmarks/transfer.py``, not a second benchmark: it builds the same
data, the same pretrained backbone and the same training protocol (``--quick`` sizes, 80 steps,
same batches per seed), then trains variants of HarMA and LoRA that each change one thing:

- which tower is adapted (vision only, text only);
- HarMA's text-tower adapters attending causally, so the end-of-text token's adapter no longer
  reads padding (the reference's adapters use no mask);
- HarMA's adapter self-attention applied once instead of twice;
- the loss temperature frozen at its initial 0.07 instead of trained (a scalar trained with the
  adapters' high learning rate drifts quickly);
- LoRA on the MLPs only, without the attention, at a rank matched to HarMA's count again;
- HarMA and full fine-tuning with three times as many steps.

Every variant of a method uses that method's learning rate from the quick benchmark (HarMA 1e-2,
LoRA 3e-3; ``--lr-harma``/``--lr-lora`` to change); nothing here is tuned or used to choose
anything in the benchmark. The variants that alter HarMA's forward pass use the library's options
(``HarmaConfig(adapter_mask="tower")``, ``HarmaConfig(attention_passes=1)``).

    python benchmarks/transfer_ablations.py --json docs/transfer_ablations.json   # about 15 min, 1 CPU core
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transfer  # noqa: E402  (the benchmark this diagnoses; it puts the repository on sys.path)

import harma  # noqa: E402
from harma.losses import HarmaLoss  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Variant:
    method: str  # "harma" or "lora": sets the learning rate and the initialisation seed
    description: str
    towers: tuple[str, ...] = ("vision", "text")
    causal_text_adapters: bool = False
    one_attention_pass: bool = False
    train_temperature: bool = True
    step_factor: int = 1
    lora_modules: tuple[str, ...] | None = None  # None: the benchmark's LoRA targets


VARIANTS: dict[str, Variant] = {
    "harma": Variant("harma", "HarMA, reference layout (as in the benchmark)"),
    "harma_vision_only": Variant("harma", "HarMA, vision tower only", towers=("vision",)),
    "harma_text_only": Variant("harma", "HarMA, text tower only", towers=("text",)),
    "harma_causal_text": Variant("harma", "HarMA, text adapters attend causally (no padding)",
                                 causal_text_adapters=True),
    "harma_one_attention": Variant("harma", "HarMA, adapter attention applied once, not twice",
                                   one_attention_pass=True),
    "harma_fixed_temperature": Variant("harma", "HarMA, loss temperature frozen at 0.07",
                                       train_temperature=False),
    "harma_3x_steps": Variant("harma", "HarMA, 3x the adaptation steps", step_factor=3),
    "lora": Variant("lora", "LoRA (as in the benchmark)"),
    "lora_vision_only": Variant("lora", "LoRA, vision tower only", towers=("vision",)),
    "lora_text_only": Variant("lora", "LoRA, text tower only", towers=("text",)),
    "lora_fixed_temperature": Variant("lora", "LoRA, loss temperature frozen at 0.07", train_temperature=False),
    "lora_mlp_only": Variant("lora", "LoRA on the MLPs only (no attention), rank matched to HarMA again",
                             lora_modules=("c_fc", "c_proj")),
    "full_3x_steps": Variant("full", "full fine-tuning, 3x the adaptation steps", step_factor=3),
}


def build_variant(variant: Variant, settings: transfer.Settings, state: dict[str, torch.Tensor],
                  vocab_size: int, lora_rank: int) -> nn.Module:
    model = transfer.build_clip(settings, vocab_size)
    model.load_state_dict(state)
    if variant.method == "harma":
        # adapter_mask="tower" makes the text tower's adapters (their MMS included) causal and
        # leaves the vision tower's unmasked; attention_passes=1 drops the second attention.
        config = harma.HarmaConfig.reference(
            **settings.harma_sizes(), towers=variant.towers,
            adapter_mask="tower" if variant.causal_text_adapters else "none",
            attention_passes=1 if variant.one_attention_pass else 2,
        )
        return harma.inject_harma_adapters(model, config)
    model = transfer.apply_method(model, variant.method, settings, lora_rank, variant.lora_modules)
    if variant.method == "lora":
        for name, param in model.named_parameters():
            in_vision = name.startswith("visual.")
            keep = ("vision" in variant.towers and in_vision) or ("text" in variant.towers and not in_vision)
            param.requires_grad_(param.requires_grad and keep)
    return model


def run_variant(name: str, variant: Variant, seed: int, lr: float, settings: transfer.Settings,
                state: dict[str, torch.Tensor], vocab_size: int, target: transfer.Domain,
                lora_rank: int) -> dict[str, Any]:
    torch.manual_seed(transfer.derived_seed("init", variant.method, seed))  # as the benchmark does
    model = build_variant(variant, settings, state, vocab_size, lora_rank)
    loss_fn = HarmaLoss()
    loss_fn.temperature.requires_grad_(variant.train_temperature)
    losses: list[float] = []
    steps = settings.adapt_steps * variant.step_factor
    result = transfer.train(model, target.train, steps, settings.adapt_batch, lr,
                            transfer.derived_seed("order", seed), loss_fn, loss_log=losses)
    return {
        "variant": name, "seed": seed, "lr": lr, "steps": steps,
        "trainable_params": transfer.trainable_count(model) + int(variant.train_temperature),
        "temperature": result.temperature,
        "loss_by_step": {str(k): statistics.fmean(losses[max(0, k - 5):k]) for k in (10, 20, 40, 80, steps)
                         if k <= len(losses)},
        "val": transfer.evaluate(model, target.val, settings.eval_batch),
        "test": transfer.evaluate(model, target.test, settings.eval_batch),
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def mean_std(values: list[float]) -> tuple[float, float]:
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    test, test_std = mean_std([run["test"]["mean_recall"] for run in runs])
    val, val_std = mean_std([run["val"]["mean_recall"] for run in runs])
    # A run that diverged stopped early and lacks the later steps: average what every run has.
    loss_keys = [k for k in runs[0]["loss_by_step"] if all(k in run["loss_by_step"] for run in runs)]
    return {
        "test_mean_recall": test, "test_mean_recall_std": test_std,
        "val_mean_recall": val, "val_mean_recall_std": val_std,
        "loss_by_step": {k: statistics.fmean(run["loss_by_step"][k] for run in runs) for k in loss_keys},
        "temperature": statistics.fmean(run["temperature"] for run in runs),
        "trainable_params": runs[0]["trainable_params"], "lr": runs[0]["lr"], "steps": runs[0]["steps"],
        "per_seed": runs,
    }


def markdown_table(results: dict[str, Any]) -> str:
    lines = [
        "| variant | trainable params | steps | test mR (mean ± std) | val mR | loss at step 10 / 40 / 80 | final temperature |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in results.items():
        if name.startswith("_"):
            continue
        losses = " / ".join(f"{row['loss_by_step'][k]:.2f}" for k in ("10", "40", "80") if k in row["loss_by_step"])
        lines.append(
            f"| {VARIANTS[name].description} | {row['trainable_params']:,} | {row['steps']} | "
            f"**{row['test_mean_recall']:.1f}** ± {row['test_mean_recall_std']:.1f} | {row['val_mean_recall']:.1f} | "
            f"{losses} | {row['temperature']:.3f} |"
        )
    return "\n".join(lines)


def run(settings: transfer.Settings, data_dir: Path, names: Sequence[str], lrs: dict[str, float]) -> dict[str, Any]:
    start = time.perf_counter()
    source, targets, tokenizer, _ = transfer.prepare_domains(settings, data_dir)
    state, pretrain_info = transfer.pretrain(settings, source, tokenizer.vocab_size)
    transfer.log(f"pretrained: source test mR {pretrain_info['source_test']['mean_recall']:.1f}")
    harma_params = transfer.trainable_count(
        transfer.apply_method(transfer.build_clip(settings, tokenizer.vocab_size), "harma", settings))
    results: dict[str, Any] = {}
    lora_ranks: dict[str, int] = {}
    for name in names:
        variant = VARIANTS[name]
        lora_rank = 0
        if variant.method == "lora":  # the rank matching HarMA's count, for these target modules
            per_rank = transfer.lora_parameters_per_rank(settings, tokenizer.vocab_size, variant.lora_modules)
            lora_rank = lora_ranks[name] = max(1, round(harma_params / per_rank))
        runs = []
        for seed in settings.seeds:
            runs.append(run_variant(name, variant, seed, lrs[variant.method], settings, state,
                                    tokenizer.vocab_size, targets[seed], lora_rank))
            transfer.log(f"  {name:24s} seed {seed}: test mR {runs[-1]['test']['mean_recall']:5.1f}, "
                         f"val mR {runs[-1]['val']['mean_recall']:5.1f}")
        results[name] = summarise(runs)
    results["_meta"] = {
        "settings": dataclasses.asdict(settings), "lrs": lrs, "lora_ranks": lora_ranks,
        "pretrain_source_test_mean_recall": pretrain_info["source_test"]["mean_recall"],
        "threads": torch.get_num_threads(), "wall_seconds": round(time.perf_counter() - start, 1),
    }
    return results


def markdown_page(table: str) -> str:
    """The results page written next to the JSON, with a title of its own."""
    return ("# Transfer benchmark: ablations, one change at a time\n\n"
            "Raw results of `benchmarks/transfer_ablations.py` (quick mode, new-vocabulary "
            "scenario, mean ± std over seeds); how to read them: [what holds HarMA back]"
            "(transfer_benchmark.md#what-holds-harma-back-one-change-at-a-time).\n\n" + table)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lr-harma", type=float, default=1e-2, help="HarMA's learning rate (quick benchmark's)")
    parser.add_argument("--lr-lora", type=float, default=3e-3, help="LoRA's learning rate (quick benchmark's)")
    parser.add_argument("--lr-full", type=float, default=3e-4, help="full fine-tuning's (quick benchmark's)")
    parser.add_argument("--smoke", action="store_true", help="the benchmark's tiny smoke sizes (for the test)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the results here (and a .md table next to it)")
    parser.add_argument("--data-dir", type=Path, help="where to write the synthetic data (default: a temporary folder)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    settings = dataclasses.replace(transfer.MODES["smoke" if args.smoke else "quick"], seeds=tuple(args.seeds))
    lrs = {"harma": args.lr_harma, "lora": args.lr_lora, "full": args.lr_full}
    if args.data_dir is not None:
        args.data_dir.mkdir(parents=True, exist_ok=True)
        results = run(settings, args.data_dir, args.variants, lrs)
    else:
        with tempfile.TemporaryDirectory(prefix="harma-ablations-") as tmp:
            results = run(settings, Path(tmp), args.variants, lrs)
    table = markdown_table(results)
    print()
    print(table)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(transfer.json_safe(results), indent=1) + "\n", encoding="utf-8")
        args.json.with_suffix(".md").write_text(markdown_page(table), encoding="utf-8")
        transfer.log(f"wrote {args.json} and {args.json.with_suffix('.md')}")
    return results


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
