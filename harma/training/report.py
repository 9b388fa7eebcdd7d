"""Retrieval results as text: one-line summaries for logs and markdown tables for reports."""

from __future__ import annotations

from collections.abc import Mapping

from ..retrieval import METRIC_KEYS


def short_metrics(metrics: Mapping[str, float]) -> str:
    """``"i2t R1/R5/R10 t2i R1/R5/R10 mR x"`` on one line."""
    return (
        f"i2t {metrics['i2t_r1']:.1f}/{metrics['i2t_r5']:.1f}/{metrics['i2t_r10']:.1f} "
        f"t2i {metrics['t2i_r1']:.1f}/{metrics['t2i_r5']:.1f}/{metrics['t2i_r10']:.1f} "
        f"mR {metrics['mean_recall']:.2f}"
    )


def format_metrics_table(rows: Mapping[str, Mapping[str, float]]) -> str:
    """A markdown table of R@1/5/10 both ways and mR (percent), one row per named result."""
    header = "| | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | mR |"
    lines = [header, "|" + "---|" * 8]
    for name, metrics in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{metrics[key]:.2f}" for key in METRIC_KEYS) + " |")
    return "\n".join(lines)
