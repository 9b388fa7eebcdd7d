"""Zero-shot classification of several sets with one model: reading the sets, building their
evaluators once, evaluating a model (or each of its named adapter sets), and the results as a
table, as JSON and as files (CLIP_benchmark's result layout, per-class tables, confusion
matrices).

Used by ``examples/evaluate.py --zero-shot ROOT``; a training run can use the same objects to
follow what adaptation forgets (build `ZeroShotSuite` once, call `ZeroShotSuite.evaluate` at
every validation).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..classification import ClassificationResult, ZeroShotEvaluator
from ..io import atomic_write_text
from ..named_adapters import set_adapter
from ..prompts import DEFAULT_TEMPLATES, clean_class_name, read_class_names, read_class_prompts
from .classification_data import ClassificationDataset, load_classification_dataset
from .data import ImageTransform

__all__ = ["ZeroShotSet", "ZeroShotSuite", "format_zero_shot_table"]


@dataclass
class ZeroShotSet:
    """One classification set: the root as given, a short name for files, the images, and its
    evaluator once built."""

    root: str
    name: str
    dataset: ClassificationDataset
    evaluator: ZeroShotEvaluator | None = None


def _set_name(root: Path, taken: set[str]) -> str:
    """A short name for the files of the set at ``root``: its folder's name, with ``-2``, ``-3``
    ... where an earlier set of the same run already has it (``AID`` and ``other/AID``)."""
    base = root.parent if root.is_file() else root
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", base.resolve().name) or "set"
    unique, number = name, 1
    while unique in taken:
        number += 1
        unique = f"{name}-{number}"
    taken.add(unique)
    return unique


def _per_set(overrides: Mapping[str, Any] | None, sets: Sequence[ZeroShotSet], what: str) -> list[dict[str, Any]]:
    """Split ``{class: value}`` over the sets: each set gets the keys naming one of its classes
    (as in the data or cleaned); a key naming no class of any set is an error."""
    if overrides is None:
        return [{} for _ in sets]
    split: list[dict[str, Any]] = []
    used: set[str] = set()
    for zero_shot_set in sets:
        names = set(zero_shot_set.dataset.classes) | {clean_class_name(c) for c in zero_shot_set.dataset.classes}
        split.append({key: value for key, value in overrides.items() if key in names})
        used.update(split[-1])
    unknown = [key for key in overrides if key not in used]
    if unknown:
        roots = ", ".join(s.root for s in sets)
        raise ValueError(f"{what}: {', '.join(repr(k) for k in unknown)} names no class of {roots}")
    return split


class ZeroShotSuite:
    """Several classification sets, each with its evaluator, evaluated together.

    Args:
        roots: classification sets (`load_classification_dataset` reads each).
        transform: PIL image -> model input (e.g. ``test_transform(image_size)``).
        tokenizer: ``tokenizer(list_of_str) -> LongTensor``.
        templates: a template set name, a template file, or a list of templates.
        class_names: a file of class-name overrides (`harma.prompts.read_class_names`); a
            mapping applies to every set holding its classes, a list needs a single set.
        class_prompts: a JSON file of per-class prompts (`harma.prompts.read_class_prompts`).
        evaluator_options: further `ZeroShotEvaluator` options (``combine``, ``batch_size``,
            ``num_workers``, ``device``, ``autocast_dtype``, ``progress``).

    Every root is read and every name checked here, before any model is needed.
    """

    def __init__(
        self,
        roots: Sequence[str | os.PathLike],
        transform: ImageTransform,
        tokenizer: Callable[[list[str]], torch.Tensor],
        templates: str | os.PathLike | Sequence[str] = DEFAULT_TEMPLATES,
        class_names: str | os.PathLike | None = None,
        class_prompts: str | os.PathLike | None = None,
        **evaluator_options: Any,
    ) -> None:
        given = [str(root) for root in roots]
        repeated = sorted({root for root in given if given.count(root) > 1})
        if repeated:
            raise ValueError(f"--zero-shot: {', '.join(repeated)} given twice")
        taken: set[str] = set()
        self.sets = [
            ZeroShotSet(root, _set_name(Path(root), taken), load_classification_dataset(root, transform))
            for root in given
        ]
        names = read_class_names(class_names) if class_names is not None else None
        if isinstance(names, list) and len(self.sets) != 1:
            raise ValueError(f"class-name file '{class_names}' lists names in class order: give one set only, "
                             "or map names in a JSON object")
        name_split = [names] if isinstance(names, list) else _per_set(names, self.sets, f"class names '{class_names}'")
        prompts = read_class_prompts(class_prompts) if class_prompts is not None else None
        prompt_split = _per_set(prompts, self.sets, f"class prompts '{class_prompts}'")
        for zero_shot_set, overrides, own_prompts in zip(self.sets, name_split, prompt_split, strict=True):
            try:
                zero_shot_set.evaluator = ZeroShotEvaluator.from_dataset(
                    zero_shot_set.dataset, tokenizer, templates=templates, name_overrides=overrides or None,
                    class_prompts=own_prompts or None, **evaluator_options,
                )
            except ValueError as error:
                raise ValueError(f"zero-shot set '{zero_shot_set.root}': {error}") from None

    def evaluate(self, model: nn.Module) -> dict[str, ClassificationResult]:
        """Each set's result with ``model`` as it is (its active adapter set), by root."""
        return {s.root: s.evaluator.run(model) for s in self.sets if s.evaluator is not None}

    def evaluate_adapters(self, model: nn.Module, names: Sequence[str]) -> dict[str, dict[str, ClassificationResult]]:
        """Each named adapter set of ``model`` in turn (``harma.set_adapter(...,
        inference_mode=True)``): ``{adapter name: {root: result}}``."""
        results = {}
        for name in names:
            set_adapter(model, name, inference_mode=True)
            results[name] = self.evaluate(model)
        return results

    def to_json(self, results: Mapping[str, Any], named: bool = False) -> dict[str, dict[str, Any]]:
        """``{root: {"metrics", "classnames", "raw_classnames", "templates", "combine"}}``;
        with ``named``, ``results`` is ``{adapter name: {root: result}}`` and ``metrics``
        becomes ``{adapter name: metrics}``."""
        out = {}
        for s in self.sets:
            assert s.evaluator is not None
            metrics = ({name: results[name][s.root].metrics for name in results} if named
                       else results[s.root].metrics)
            out[s.root] = {
                "metrics": metrics, "classnames": s.evaluator.classnames,
                "raw_classnames": s.evaluator.raw_classnames, "templates": s.evaluator.templates,
                "combine": s.evaluator.combine, "images": len(s.dataset),
            }
        return out

    def describe_classes(self) -> str:
        """The class names each set uses, and which were renamed from the data's names."""
        lines = []
        for s in self.sets:
            assert s.evaluator is not None
            lines.append(f"{s.root}: {len(s.dataset)} images, {len(s.evaluator.classnames)} classes "
                         f"({s.dataset.layout}): {', '.join(s.evaluator.classnames)}")
            renamed = [f"{raw} -> {used}" for raw, used in zip(s.evaluator.raw_classnames, s.evaluator.classnames,
                                                                 strict=True) if raw != used]
            if renamed:
                lines.append("  renamed: " + "; ".join(renamed))
        return "\n".join(lines)

    def write_files(
        self, out_dir: str | os.PathLike, results: Mapping[str, Any], model: str, pretrained: str, named: bool = False
    ) -> list[Path]:
        """Per set (and adapter name): ``<set>[_<name>]_zeroshot_classification.json`` (one
        CLIP_benchmark record, plus per-class recall, counts, prompts and the root),
        ``..._per_class.md`` and, when matplotlib is installed, ``..._confusion.png``."""
        written: list[Path] = []
        plotting = _matplotlib_available()
        for name, by_root in (results.items() if named else [(None, results)]):
            for s in self.sets:
                result = by_root[s.root]
                stem = Path(out_dir) / (s.name + (f"_{name}" if name else "") + "_zeroshot_classification")
                record = result.clip_benchmark_record(
                    s.name, model, pretrained if name is None else f"{pretrained} + adapters {name}",
                    root=s.root, **{k: v for k, v in result.to_dict().items() if k not in ("metrics", "classnames")},
                    raw_classnames=s.dataset.classes,
                )
                atomic_write_text(stem.with_suffix(".json"), json.dumps(record, indent=1) + "\n")
                atomic_write_text(stem.with_name(stem.name + "_per_class.md"), result.per_class_table() + "\n")
                written += [stem.with_suffix(".json"), stem.with_name(stem.name + "_per_class.md")]
                if plotting:
                    title = f"{s.name}{f' ({name})' if name else ''}: acc1 {result.metrics['acc1']:.2f}%"
                    written.append(result.plot_confusion(stem.with_name(stem.name + "_confusion.png"), title=title))
        if not plotting:
            print("confusion matrices not drawn: matplotlib is not installed (pip install 'harma[plot]')",
                  file=sys.stderr)
        return written


def _matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def format_zero_shot_table(rows: Mapping[str, Mapping[str, float]]) -> str:
    """A Markdown table of acc1, acc5 and mean per-class recall (percent), one row per name;
    ``-`` where acc5 is absent (fewer than 5 classes)."""
    lines = ["| | acc1 | acc5 | mean per-class recall |", "|---|---|---|---|"]
    for name, metrics in rows.items():
        cells = [metrics.get(key) for key in ("acc1", "acc5", "mean_per_class_recall")]
        shown = ["-" if value is None or math.isnan(value) else f"{value:.2f}" for value in cells]
        lines.append(f"| {name} | " + " | ".join(shown) + " |")
    return "\n".join(lines)
