"""The self-contained CPU demonstration: synthetic data, a small CLIP pre-trained on one domain,
HarMA adapters trained on a shifted one, before/after retrieval figures, zero-shot scene
classification of both domains before and after (what adaptation forgot and learnt), and a
reload check.

Run it with ``python -m harma.training.demo`` (or ``make demo``, or ``python examples/demo.py``).
No module of the library imports this one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import HarmaConfig
from ..retrieval import RetrievalEvaluator
from .config import TrainConfig
from .data import RetrievalEvalDataset, test_transform
from .models import build_backbone, build_tokenizer, tiny_clip_config
from .report import format_metrics_table
from .state import BEST_WEIGHTS_NAME
from .synthetic import (
    SyntheticClassificationSet,
    SyntheticDataset,
    make_synthetic_classification_set,
    make_synthetic_dataset,
)
from .trainer import train
from .weights import load_trained_weights
from .zero_shot import format_zero_shot_table

DEMO_MARKER = ".harma-demo"


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of the demo (`run_demo`); the defaults take about two minutes on two cores."""

    image_size: int = 32
    train_images: int = 300
    eval_images: int = 100
    width: int = 128
    layers: int = 3
    batch_size: int = 50
    pretrain_epochs: int = 8
    pretrain_lr: float = 2e-3
    adapter_epochs: int = 8
    adapter_lr: float = 1e-2
    adapter_bottleneck: int = 32

    @classmethod
    def quick(cls) -> DemoPlan:
        """A few seconds: for tests of the demo's plumbing, not of its numbers."""
        return cls(train_images=40, eval_images=20, width=64, layers=2, batch_size=20,
                   pretrain_epochs=1, adapter_epochs=1)


def _prepare_demo_folder(root: Path) -> None:
    if root.exists() and any(root.iterdir()):
        if not (root / DEMO_MARKER).is_file():
            raise FileExistsError(
                f"'{root}' is not empty and was not written by the demo; pass another --output_dir"
            )
        print(f"[demo] replacing the previous demo output in '{root}'", flush=True)
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / DEMO_MARKER).write_text("written by harma.training.demo.run_demo; safe to delete\n", encoding="utf-8")


def _configs(plan: DemoPlan, root: Path, source: SyntheticDataset, target: SyntheticDataset,
             classes: dict[str, SyntheticClassificationSet]) -> tuple[TrainConfig, TrainConfig]:
    """The recipes of the two trainings: full pre-training on the source domain, then HarMA
    adapters on the target domain, with both domains' classification sets monitored."""
    model_config = tiny_clip_config(image_size=plan.image_size, width=plan.width, layers=plan.layers)
    common: dict[str, Any] = dict(
        model="tiny-clip", pretrained=None, model_config=model_config, image_size=plan.image_size,
        batch_size=plan.batch_size, num_workers=0, progress=False, device="cpu", eval_batch_size=100,
        augment=False, seed=0, threads=1,
    )
    pretrain = TrainConfig(**{
        **common, "method": "full", "lr": plan.pretrain_lr, "epochs": plan.pretrain_epochs,
        "image_root": str(source.image_root), "train_files": (str(source.train_file),),
        "val_file": str(source.val_file), "output_dir": str(root / "pretrain"),
    })
    adapt = TrainConfig(**{
        **common, "method": "harma", "pretrained": str(root / "pretrain" / BEST_WEIGHTS_NAME),
        "lr": plan.adapter_lr, "epochs": plan.adapter_epochs, "image_root": str(target.image_root),
        "train_files": (str(target.train_file),), "val_file": str(target.val_file),
        "test_file": str(target.test_file), "output_dir": str(root / "harma"),
        "harma": HarmaConfig(bottleneck=plan.adapter_bottleneck, heads=4,
                             mini_bottleneck=plan.adapter_bottleneck // 2, mini_heads=4),
        "zero_shot_sets": (str(classes["source"].root), str(classes["target"].root)),
        "zero_shot_templates": str(classes["source"].templates_file),
    })
    return pretrain, adapt


def _backbone(config: TrainConfig) -> nn.Module:
    return build_backbone(config.model, config.pretrained, config.model_config, config.image_size)


def _evaluate(model: nn.Module, dataset: RetrievalEvalDataset, config: TrainConfig) -> dict[str, float]:
    tokenizer = build_tokenizer(config.model, config.model_config)
    return RetrievalEvaluator.from_dataset(dataset, tokenizer, batch_size=100, progress=False).evaluate(model)


def _zero_shot(adapted_run: dict[str, Any], classes: dict[str, SyntheticClassificationSet]) -> dict[str, Any]:
    """``{domain: {"before", "after"}}`` top-1 metrics of the adapted run's classification sets:
    the frozen backbone (epoch 0) and the best epoch."""
    entries = adapted_run["zero_shot"]
    return {domain: {"before": entries[str(made.root)]["before"], "after": entries[str(made.root)]["best"]}
            for domain, made in classes.items()}


def _print_zero_shot(zero_shot: dict[str, Any], classes: dict[str, SyntheticClassificationSet]) -> None:
    source, target = zero_shot["source"], zero_shot["target"]
    print()
    print(f"Zero-shot scene classification ({classes['source'].num_images} images of 10 classes per domain, "
          f"prompts: the class names in each domain's words), percent")
    print(format_zero_shot_table({
        "source domain, frozen backbone (before)": source["before"],
        "source domain, + HarMA adapters (after)": source["after"],
        "target domain, frozen backbone (before)": target["before"],
        "target domain, + HarMA adapters (after)": target["after"],
    }))
    print()
    print(f"source domain (what adaptation may forget): top-1 {source['before']['acc1']:.1f} -> "
          f"{source['after']['acc1']:.1f} ({source['after']['acc1'] - source['before']['acc1']:+.1f}); "
          f"target domain: top-1 {target['before']['acc1']:.1f} -> {target['after']['acc1']:.1f} "
          f"({target['after']['acc1'] - target['before']['acc1']:+.1f})")


def _print_report(result: dict[str, Any], plan: DemoPlan, adapter_file: Path,
                  classes: dict[str, SyntheticClassificationSet]) -> None:
    before, after = result["before"], result["after"]
    pretrained_run, adapted_run = result["pretrain"], result["adapt"]
    print()
    print("HarMA demo (synthetic data, CPU): image-text retrieval on the target domain, percent")
    print(format_metrics_table({
        "val, frozen backbone (before)": before["val"],
        "val, + HarMA adapters (after)": after["val"],
        "test, frozen backbone (before)": before["test"],
        "test, + HarMA adapters (after)": after["test"],
        "test, adapter file reloaded": result["reloaded_test"],
    }))
    _print_zero_shot(result["zero_shot"], classes)
    print()
    print(f"backbone: {pretrained_run['total_parameters']:,} parameters, pre-trained for {plan.pretrain_epochs} "
          f"epochs on the source domain (source val mR {pretrained_run['best_val']['mean_recall']:.2f})")
    print(f"adapters: {adapted_run['trainable_parameters']:,} trainable parameters "
          f"({100 * adapted_run['trainable_parameters'] / adapted_run['total_parameters']:.1f}% of the model), "
          f"best epoch {adapted_run['best_epoch']} of {plan.adapter_epochs} by validation mR")
    print(f"target test mR {before['test']['mean_recall']:.2f} -> {after['test']['mean_recall']:.2f} "
          f"({after['test']['mean_recall'] - before['test']['mean_recall']:+.2f})")
    print(f"adapter file {adapter_file} ({adapter_file.stat().st_size / 1e6:.2f} MB) reloaded: "
          f"{'same test metrics' if result['reload_matches'] else 'DIFFERENT test metrics'}")
    print(f"done in {result['time_s']:.0f} s; all outputs in {result['output_dir']}")


def run_demo(
    output_dir: str | os.PathLike = "runs/demo",
    *,
    quick: bool = False,
    plan: DemoPlan | None = None,
) -> dict[str, Any]:
    """The CPU demonstration behind ``python -m harma.training.demo`` and ``make demo``.

    1. Generates two small synthetic retrieval datasets in the RSITMD layout
       (`harma.training.synthetic.make_synthetic_dataset`): a "source" domain, and a "target"
       domain drawn by another sensor with other colours, smaller objects, more noise and other
       words for most things.
    2. Pre-trains a small open_clip CLIP (`harma.training.models.tiny_clip_config`) end to end
       from random initialisation on the source domain: a stand-in for a pretrained CLIP.
    3. Freezes it, injects HarMA adapters, and trains only the adapters (and the temperature)
       on the target domain, choosing the best epoch on target validation.
    4. Reports validation and test recalls on the target domain of the frozen backbone
       (before) and with the adapters (after), and the zero-shot scene classification accuracy
       on each domain before and after (`make_synthetic_classification_set`, evaluated by the
       adapter training through ``TrainConfig.zero_shot_sets``): on the source domain, what
       adaptation forgot; on the target domain, what it learnt. Then it reloads the saved
       adapter file into a fresh backbone and checks that it reproduces the test metrics.

    ``output_dir`` is the demo's own scratch folder: a previous demo's output there is replaced;
    any other non-empty folder is refused.

    Args:
        output_dir: the demo's folder.
        quick: use `DemoPlan.quick` (seconds; for tests).
        plan: explicit sizes (overrides ``quick``).

    Returns:
        A dict with the keys ``before`` and ``after`` (each ``{"val", "test"}`` metrics),
        ``zero_shot`` (``{"source", "target"}``, each ``{"before", "after"}`` classification
        metrics), ``reloaded_test``, ``reload_matches``, ``pretrain`` and ``adapt`` (the two
        runs' results), ``time_s`` and ``output_dir``.
    """
    plan = plan or (DemoPlan.quick() if quick else DemoPlan())
    start = time.time()
    # One thread: the small model's operations take well under a millisecond, so OpenMP's
    # fork/join costs more than it saves, and on a busy machine spinning threads stall badly.
    torch.set_num_threads(1)
    root = Path(output_dir)
    _prepare_demo_folder(root)
    sizes = dict(num_train_images=plan.train_images, num_val_images=plan.eval_images,
                 num_test_images=plan.eval_images, image_size=plan.image_size)
    print("[demo] generating synthetic remote-sensing-like scenes with captions: a source domain and a "
          "target domain (other sensor, colours, object sizes and words)", flush=True)
    source = make_synthetic_dataset(root / "data" / "source", seed=0, style="source", **sizes)
    target = make_synthetic_dataset(root / "data" / "target", seed=1, style="target", **sizes)
    classes = {
        domain: make_synthetic_classification_set(root / "data" / f"{domain}_classes", seed=seed, style=domain,
                                                  images_per_class=max(1, plan.eval_images // 10),
                                                  image_size=plan.image_size)
        for domain, seed in (("source", 0), ("target", 1))
    }
    pretrain, adapt = _configs(plan, root, source, target, classes)
    print("[demo] step 1/3: PRE-TRAINING a small open_clip CLIP end to end on the source domain, from "
          "random initialisation (a stand-in for a pretrained CLIP such as GeoRSCLIP)", flush=True)
    pretrained_run = train(pretrain)

    transform = test_transform(plan.image_size)
    target_val = RetrievalEvalDataset(target.val_file, target.image_root, transform=transform)
    target_test = RetrievalEvalDataset(target.test_file, target.image_root, transform=transform)
    frozen = _backbone(adapt)
    before = {"val": _evaluate(frozen, target_val, adapt), "test": _evaluate(frozen, target_test, adapt)}
    print(f"[demo] frozen pre-trained backbone on the target domain: val mR "
          f"{before['val']['mean_recall']:.2f}, test mR {before['test']['mean_recall']:.2f}", flush=True)
    print("[demo] step 2/3: training HarMA adapters on the target domain, backbone frozen; zero-shot scene "
          "classification of both domains is followed from epoch 0 (what adaptation forgets)", flush=True)
    adapted_run = train(adapt)
    after = {"val": adapted_run["best_val"], "test": adapted_run["test"]}

    print("[demo] step 3/3: reloading the saved adapter file into a fresh copy of the backbone", flush=True)
    adapter_file = Path(adapt.output_dir) / BEST_WEIGHTS_NAME
    reloaded = load_trained_weights(_backbone(adapt), adapter_file)
    reloaded_test = _evaluate(reloaded, target_test, adapt)
    result = {
        "before": before, "after": after, "zero_shot": _zero_shot(adapted_run, classes),
        "reloaded_test": reloaded_test,
        "reload_matches": reloaded_test == after["test"], "pretrain": pretrained_run, "adapt": adapted_run,
        "time_s": time.time() - start, "output_dir": str(root),
    }
    _print_report(result, plan, adapter_file, classes)
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m harma.training.demo [--output_dir DIR] [--quick]``."""
    parser = argparse.ArgumentParser(
        prog="python -m harma.training.demo",
        description="CPU demo on generated data: pre-train a small CLIP, then train HarMA adapters on a "
        "shifted domain (about two minutes on two cores; nothing is downloaded).",
    )
    parser.add_argument("--output_dir", "--output-dir", default="runs/demo",
                        help="the demo's own folder; a previous demo's output there is replaced")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds): checks the plumbing only")
    args = parser.parse_args(argv)
    try:
        return run_demo(args.output_dir, quick=args.quick)
    except FileExistsError as error:
        parser.exit(2, f"error: {error}\n")


if __name__ == "__main__":
    main()
