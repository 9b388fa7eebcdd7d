"""What adaptation forgets, measured while training: the sets a run evaluates besides its
validation split (`harma.training.TrainConfig`'s ``zero_shot_sets`` and
``extra_retrieval_files``).

They are evaluated before training (epoch 0) and at every validation; their metrics go to
``metrics.jsonl`` (``"zero_shot"``: ``{set: {acc1, acc5, mean_per_class_recall}}``,
``"extra_retrieval"``: ``{file: {i2t_r1, ..., mean_recall}}``), to the third panel of the
training curves, and to ``results.json`` (`monitor_results`: the values before training, at the
best epoch, and their change). They never choose anything: the best epoch is the one with the
best mean recall on the run's own validation split.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..prompts import load_templates, read_class_names, read_class_prompts
from .captions import read_caption_dataset
from .config import TrainConfig
from .data import RetrievalEvalDataset, _reader_options, test_transform
from .zero_shot import ZeroShotSuite

__all__ = ["MONITOR_KEYS", "MonitorSets", "monitor_label", "monitor_results", "short_monitors"]

# Keys of a metrics line, and the metric each one's curve and log line show.
MONITOR_KEYS = {"zero_shot": "acc1", "extra_retrieval": "mean_recall"}


def _named(field_name: str, error: Exception) -> Exception:
    """``error`` with the config field it came from in front of its message."""
    return type(error)(f"{field_name}: {error}")


def _check_prompt_files(config: TrainConfig) -> None:
    """Read the template, class-name and class-prompt files first, so that an error in one
    names its own field."""
    checks = (("zero_shot_templates", load_templates, config.zero_shot_templates),
              ("zero_shot_class_names", read_class_names, config.zero_shot_class_names),
              ("zero_shot_class_prompts", read_class_prompts, config.zero_shot_class_prompts))
    for name, read, value in checks:
        if value is not None:
            try:
                read(value)
            except (OSError, ValueError) as error:
                raise _named(name, error) from None


@dataclass
class MonitorSets:
    """The zero-shot classification sets and extra retrieval sets of a run, read and checked.

    Attributes:
        zero_shot: the classification sets with their evaluators, or None.
        retrieval: ``{annotation file as given: dataset}``.
    """

    zero_shot: ZeroShotSuite | None = None
    retrieval: dict[str, RetrievalEvalDataset] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.zero_shot is not None or bool(self.retrieval)

    @classmethod
    def from_config(
        cls,
        config: TrainConfig,
        tokenizer: Callable[[list[str]], torch.Tensor],
        device: torch.device | None = None,
        autocast_dtype: torch.dtype | None = None,
    ) -> MonitorSets:
        """Read every set the config names (nothing is evaluated yet).

        Raises:
            FileNotFoundError, ValueError: a missing or malformed set, template file, class-name
                or class-prompt file; the message starts with the config field at fault.
        """
        monitors = cls()
        transform = test_transform(config.image_size)
        if config.zero_shot_sets:
            _check_prompt_files(config)
            try:
                monitors.zero_shot = ZeroShotSuite(
                    config.zero_shot_sets, transform, tokenizer, templates=config.zero_shot_templates,
                    class_names=config.zero_shot_class_names, class_prompts=config.zero_shot_class_prompts,
                    combine=config.zero_shot_combine, batch_size=config.eval_batch_size,
                    num_workers=config.num_workers, device=device, autocast_dtype=autocast_dtype,
                    progress=config.progress,
                )
            except (OSError, ValueError) as error:
                raise _named("zero_shot_sets", error) from None
        roots = config.extra_retrieval_image_roots or (config.image_root,) * len(config.extra_retrieval_files)
        for path, root in zip(config.extra_retrieval_files, roots, strict=True):
            # Any caption format, detected (the run's data_format names its own files' format),
            # with the run's CSV and Hugging Face column options; the test split of a file of several.
            options = {**_reader_options(config), "format": None, "image_root": root or None}
            try:
                monitors.retrieval[path] = RetrievalEvalDataset(
                    read_caption_dataset(path, split="test", **options), transform=transform,
                    max_words=config.max_words)
            except (OSError, ValueError, ImportError) as error:
                raise _named("extra_retrieval_files", error) from None
        return monitors

    def evaluate(self, model: torch.nn.Module,
                 evaluate_retrieval: Callable[[RetrievalEvalDataset], dict[str, float]]) -> dict[str, Any]:
        """The entries of a metrics line: ``{"zero_shot": {...}, "extra_retrieval": {...}}``
        (each only when it has sets). ``evaluate_retrieval`` evaluates a retrieval set the way
        the run's validation split is evaluated."""
        out: dict[str, Any] = {}
        if self.zero_shot is not None:
            out["zero_shot"] = {root: result.metrics for root, result in self.zero_shot.evaluate(model).items()}
        if self.retrieval:
            out["extra_retrieval"] = {path: evaluate_retrieval(dataset) for path, dataset in self.retrieval.items()}
        return out

    def describe(self) -> str:
        """Log lines: each set, its size and (zero-shot) the class names its prompts use."""
        lines = []
        if self.zero_shot is not None:
            lines += [f"[harma] zero-shot set {line}" if not line.startswith(" ") else f"[harma] {line}"
                      for line in self.zero_shot.describe_classes().splitlines()]
        for path, dataset in self.retrieval.items():
            lines.append(f"[harma] extra retrieval set {path}: {dataset.num_images} images, "
                         f"{len(dataset.captions)} captions")
        return "\n".join(lines)

    def set_details(self) -> dict[str, dict[str, Any]]:
        """Per zero-shot set: the class names used, those in the data, templates and image count
        (`ZeroShotSuite.details`)."""
        return self.zero_shot.details() if self.zero_shot is not None else {}


def monitor_label(key: str) -> str:
    """A short name for a set given as a path: its folder's or file's name."""
    path = Path(key)
    return path.name or key


def short_monitors(entries: Mapping[str, Any]) -> str:
    """``"zero-shot aid acc1 61.2, ... | rsicd_test.json mR 12.3"`` for a log line ('' without sets)."""
    parts = []
    if entries.get("zero_shot"):
        parts.append("zero-shot " + ", ".join(
            f"{monitor_label(root)} acc1 {metrics['acc1']:.1f}" for root, metrics in entries["zero_shot"].items()))
    if entries.get("extra_retrieval"):
        parts.append(", ".join(
            f"{monitor_label(path)} mR {metrics['mean_recall']:.2f}"
            for path, metrics in entries["extra_retrieval"].items()))
    return " | ".join(parts)


def _change(before: Mapping[str, float] | None, after: Mapping[str, float] | None) -> dict[str, float] | None:
    if before is None or after is None:
        return None
    return {key: after[key] - before[key] for key in after if key in before}


def monitor_results(
    history: Sequence[Mapping[str, Any]], best_epoch: int | None, details: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """The ``results.json`` entries of the monitored sets.

    For each set: ``before`` (epoch 0), ``best`` (the best epoch, chosen on the validation
    split) and ``change`` (best minus before, per metric; negative: forgotten), each None where
    that epoch did not evaluate the set (a set added when the run was resumed has no ``before``);
    zero-shot sets also hold the ``details`` of `MonitorSets.set_details`.
    """
    first = next((line for line in history if line["epoch"] == 0), {})
    best = next((line for line in history if line["epoch"] == best_epoch), {}) if best_epoch is not None else {}
    out: dict[str, Any] = {}
    for key in MONITOR_KEYS:
        names = list(dict.fromkeys(name for line in history for name in line.get(key, {})))
        if not names:
            continue
        out[key] = {}
        for name in names:
            before, after = first.get(key, {}).get(name), best.get(key, {}).get(name)
            out[key][name] = {"before": before, "best": after, "change": _change(before, after),
                              **dict(details.get(name, {}) if key == "zero_shot" else {})}
    return out
