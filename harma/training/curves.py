"""Training curves: `plot_training_curves` draws a run's ``metrics.jsonl`` (train loss and its
parts, validation mean recall, the best epoch, and the zero-shot and extra retrieval sets a run
monitors) as a PNG; training calls it after every epoch.

It needs matplotlib (the ``plot`` extra: ``pip install 'harma[plot]'``), imported when called.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_write
from .monitor import MONITOR_KEYS, monitor_label

__all__ = ["plot_training_curves"]

# ------------------------------------------------------------------------- training curves


def _read_metrics_lines(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: '{path}'")
    lines = []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"'{path}', line {number}: not valid JSON ({error})") from None
        if not isinstance(line, dict) or not isinstance(line.get("epoch"), int):
            raise ValueError(f"'{path}', line {number}: expected a JSON object with an integer 'epoch'")
        lines.append(line)
    if not lines:
        raise ValueError(f"'{path}' holds no epochs yet")
    return lines


def _plot_losses(loss_axes: Any, trained: list[dict[str, Any]]) -> None:
    if trained:
        epochs = [line["epoch"] for line in trained]
        loss_axes.plot(epochs, [line["train"].get("loss", np.nan) for line in trained], marker="o",
                       linewidth=2, color="black", label="loss")
        logged = {key for line in trained for key in line["train"]}
        parts = [key for key in ("contrastive", "triplet", "affiliation") if key in logged]
        for part in parts:
            loss_axes.plot(epochs, [line["train"].get(part, np.nan) for line in trained], marker=".",
                           linestyle="--", linewidth=1, label=part)
        loss_axes.legend(loc="best", fontsize="small")
    else:
        loss_axes.text(0.5, 0.5, "no training epoch yet", ha="center", va="center",
                       transform=loss_axes.transAxes)
    loss_axes.set_title("training loss (mean per epoch)")
    loss_axes.set_ylabel("loss")


def _plot_recalls(recall_axes: Any, validated: list[dict[str, Any]], best_epoch: int | None) -> None:
    if validated:
        epochs = [line["epoch"] for line in validated]
        recalls = [line["val"]["mean_recall"] for line in validated]
        recall_axes.plot(epochs, recalls, marker="o", linewidth=2, color="tab:blue", label="val mR")
        best = next((line for line in validated if line["epoch"] == best_epoch), None)
        if best is not None:
            best_recall = best["val"]["mean_recall"]
            recall_axes.plot([best_epoch], [best_recall], marker="*", markersize=18, color="gold",
                             markeredgecolor="black", linestyle="none",
                             label=f"best: epoch {best_epoch}, mR {best_recall:.2f}")
        recall_axes.legend(loc="best", fontsize="small")
    else:
        recall_axes.text(0.5, 0.5, "no validation yet", ha="center", va="center",
                         transform=recall_axes.transAxes)
    recall_axes.set_title("validation mean recall")
    recall_axes.set_ylabel("mR (%)")


def _monitored(lines: list[dict[str, Any]]) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """``{(kind, set): [(epoch, value), ...]}`` of the monitored sets (`harma.training.monitor`)."""
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for line in lines:
        for kind, metric in MONITOR_KEYS.items():
            for name, metrics in (line.get(kind) or {}).items():
                if isinstance(metrics, Mapping) and metrics.get(metric) is not None:
                    series.setdefault((kind, name), []).append((line["epoch"], metrics[metric]))
    return series


def _plot_monitored(axes: Any, series: dict[tuple[str, str], list[tuple[int, float]]]) -> None:
    for (kind, name), points in series.items():
        label = f"{monitor_label(name)} ({'zero-shot acc1' if kind == 'zero_shot' else 'mR'})"
        axes.plot([epoch for epoch, _ in points], [value for _, value in points], marker="o",
                  linestyle="-" if kind == "zero_shot" else "--", label=label)
    axes.legend(loc="best", fontsize="small")
    axes.set_title("monitored sets (not used for selection)")
    axes.set_ylabel("%")


def plot_training_curves(
    metrics_jsonl_path: str | os.PathLike,
    out_png: str | os.PathLike,
    *,
    title: str | None = None,
) -> Path:
    """Draw a run's ``metrics.jsonl`` as a PNG: training loss and validation mean recall per epoch.

    Left: the mean training ``loss`` per epoch and each logged part of it (``contrastive``,
    ``triplet``, ``affiliation``). Middle: validation ``mean_recall`` (percent) per epoch,
    epoch 0 included when the run validated before training. Right, when the run monitors
    sets besides its validation split (``zero_shot_sets``, ``extra_retrieval_files``): the
    zero-shot top-1 accuracy and the mean recall of each, from epoch 0 (what adaptation
    forgets). The best epoch (the last line's ``best_epoch``, else the highest validation mR)
    is marked on each panel: a dashed line, and a star with its mR. The file is written
    atomically (about 1100 x 400 pixels; 1500 x 400 with the third panel).

    Training calls this after every epoch for ``output_dir/training_curves.png``; call it to
    redraw any run, finished or not.

    Args:
        metrics_jsonl_path: a ``metrics.jsonl`` written by `harma.training.train`.
        out_png: where to write the PNG.
        title: figure title; default: the run folder's name.

    Returns:
        ``out_png`` as a `Path`.

    Raises:
        ImportError: matplotlib is not installed (``pip install 'harma[plot]'``).
        FileNotFoundError: no metrics file there.
        ValueError: a line that is not a JSON object with an integer ``epoch``, or no line.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as error:
        raise ImportError(
            f"plot_training_curves needs matplotlib, which is not installed ({error}); "
            "pip install 'harma[plot]'"
        ) from None

    metrics_path, out_path = Path(metrics_jsonl_path), Path(out_png)
    lines = _read_metrics_lines(metrics_path)
    trained = [line for line in lines if isinstance(line.get("train"), Mapping)]
    validated = [
        line for line in lines if isinstance(line.get("val"), Mapping) and "mean_recall" in line["val"]
    ]
    best_epoch = lines[-1].get("best_epoch")
    if best_epoch is None and validated:
        best_epoch = max(validated, key=lambda line: line["val"]["mean_recall"])["epoch"]

    # A Figure with its own Agg canvas, not pyplot: no global figure list, and the backend of
    # the user's session (a notebook, a GUI) is left alone.
    monitored = _monitored(lines)
    panels = 3 if monitored else 2
    figure = Figure(figsize=(15 if monitored else 11, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    all_axes = list(figure.subplots(1, panels, sharex=True))
    loss_axes, recall_axes = all_axes[:2]
    figure.suptitle(title if title is not None else metrics_path.resolve().parent.name)

    _plot_losses(loss_axes, trained)
    _plot_recalls(recall_axes, validated, best_epoch)
    if monitored:
        _plot_monitored(all_axes[2], monitored)
    for axes in all_axes:
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        if best_epoch is not None:
            axes.axvline(best_epoch, color="gray", linestyle=":", linewidth=1)

    # savefig would take the format from the temporary file's name, which is not ".png".
    atomic_write(out_path, lambda target: figure.savefig(target, format="png"))
    return out_path
