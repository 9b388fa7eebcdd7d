"""Benchmark of the zero-shot classification metrics against a per-sample loop.

10,000 images x 45 classes (RESISC45's class count) by default: the time of the usual
per-sample loop (sort each image's scores, look for its class, count per class: top-1, top-5,
mean per-class recall) versus ``harma.classification_metrics`` on the same score matrix. The
metrics must be identical; the script stops if they are not.

Usage::

    python benchmarks/classification_eval.py --threads 1
    python benchmarks/classification_eval.py --images 2000 --classes 10 --repeats 5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

try:
    import harma  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harma.classification import classification_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from retrieval_eval import best_time  # noqa: E402  (the sibling benchmark's timer)


def per_sample_loop(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The usual way, one image at a time."""
    n_classes = logits.shape[1]
    top1 = top5 = 0
    hits = [0] * n_classes
    totals = [0] * n_classes
    for row, label in zip(logits, labels.tolist(), strict=True):
        order = np.argsort(-row, kind="stable")
        totals[label] += 1
        if order[0] == label:
            top1 += 1
            hits[label] += 1
        if label in order[:5]:
            top5 += 1
    metrics = {"acc1": 100.0 * top1 / len(labels)}
    if n_classes >= 5:
        metrics["acc5"] = 100.0 * top5 / len(labels)
    recalls = [100.0 * hit / total for hit, total in zip(hits, totals, strict=True) if total]
    metrics["mean_per_class_recall"] = sum(recalls) / len(recalls)
    return metrics


def make_scores(n_images: int, n_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine-like float32 scores with the true class raised, so that accuracy is about 50%."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, (n_images,), generator=generator)
    scores = 0.1 * torch.randn(n_images, n_classes, generator=generator)
    scores[torch.arange(n_images), labels] += 0.2
    return scores, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--classes", type=int, default=45)
    parser.add_argument("--repeats", type=int, default=20, help="repeats of classification_metrics")
    parser.add_argument("--loop-repeats", type=int, default=3, help="repeats of the per-sample loop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (the loop is single-threaded)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    scores, labels = make_scores(args.images, args.classes, args.seed)
    scores_numpy, labels_numpy = scores.numpy(), labels.numpy()
    expected = per_sample_loop(scores_numpy, labels_numpy)
    got = classification_metrics(scores, labels)
    if got != expected:
        raise SystemExit(f"classification_metrics disagrees with the loop: {got} vs {expected}")

    loop = best_time(lambda: per_sample_loop(scores_numpy, labels_numpy), args.loop_repeats)
    vectorised = best_time(lambda: classification_metrics(scores, labels), args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, numpy {np.__version__}")
    print(f"{args.images:,} images x {args.classes} classes; metrics identical: {got}")
    print()
    print("| method | wall (ms) | CPU (ms) |")
    print("|---|---|---|")
    print(f"| per-sample loop (numpy argsort per image) | {1000 * loop[0]:.1f} | {1000 * loop[1]:.1f} |")
    print(f"| harma.classification_metrics | {1000 * vectorised[0]:.2f} | {1000 * vectorised[1]:.2f} |")
    print()
    print(f"speed-up: {loop[0] / vectorised[0]:,.1f}x wall-clock, {loop[1] / vectorised[1]:,.1f}x CPU time "
          f"(minimum over repeats: loop x{args.loop_repeats}, classification_metrics x{args.repeats})")
    print(f"load average at the end (other processes share these cores): {Path('/proc/loadavg').read_text().split()[:3]}")


if __name__ == "__main__":
    main()
