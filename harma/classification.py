"""Zero-shot scene classification: class prompts -> text classifier, metrics, and an evaluator.

Protocol (as in CLIP, open_clip, CLIP_benchmark, RemoteCLIP, GeoRSCLIP and SkyScript):

* each class gets prompts (templates filled with its name, `harma.prompts`); the prompts are
  encoded and combined into one unit vector per class (the text classifier);
* an image's score for a class is the cosine of its embedding with that vector;
* ``acc1``/``acc5``: percent of images whose true class is among the 1/5 best-scoring
  classes (``acc5`` only with at least 5 classes, as CLIP_benchmark);
  ``mean_per_class_recall``: the mean over classes (that have images) of the percent of their
  images classified correctly at top 1 (balanced accuracy).

How prompts are combined (``combine``): ``"normalized_mean"`` (default) L2-normalises each
prompt's embedding, averages them and normalises the mean, as CLIP, open_clip and
CLIP_benchmark do: each prompt counts equally, whatever the norm of its embedding (which
carries nothing a cosine classifier uses). ``"raw_mean"`` averages the raw embeddings and then
normalises, as GeoRSCLIP's evaluation does; use it to reproduce GeoRSCLIP's figures.

Ties are broken *pessimistically* by default, as in `harma.retrieval`: a wrong class scoring
exactly as high as the true class is placed before it, so a collapsed model that gives every
class the same score gets 0% rather than 100%. ``ties="optimistic"`` counts only strictly
higher classes. Without ties both agree with any sort-based loop.

Scores are reduced to two integers per image as they are computed (the rank of the true class
and the top-1 prediction), so memory does not grow with the image embeddings.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from ._checks import check_finite, index_vector, score_matrix
from ._precision import tf32_disabled
from .distributed import all_gather_no_grad, get_rank, get_world_size
from .encoding import BatchEncoder, encoders_of, kept_modes, shard_bounds
from .io import atomic_write
from .prompts import DEFAULT_TEMPLATES, build_prompts, load_templates, resolve_class_names

__all__ = [
    "CLASSIFICATION_METRIC_KEYS",
    "COMBINE_MODES",
    "ClassificationResult",
    "ZeroShotEvaluator",
    "class_ranks",
    "classification_metrics",
    "classification_result",
    "combine_prompt_embeddings",
]

CLASSIFICATION_METRIC_KEYS = ("acc1", "acc5", "mean_per_class_recall")
COMBINE_MODES = ("normalized_mean", "raw_mean")
_TIE_CONVENTIONS = ("pessimistic", "optimistic")
# Rows per tile of the dense path: about 2**22 scores, bounding the temporary masks.
_TILE_SCORES = 2**22


def _check_ties(ties: str) -> None:
    if ties not in _TIE_CONVENTIONS:
        raise ValueError(f"ties must be one of {_TIE_CONVENTIONS}, got {ties!r}")


def _true_class_ranks(scores: Tensor, labels: Tensor, pessimistic: bool) -> Tensor:
    """0-based rank of each row's true class, ties as documented."""
    true_scores = scores.gather(1, labels[:, None])
    if pessimistic:
        return (scores >= true_scores).sum(dim=1) - 1
    return (scores > true_scores).sum(dim=1)


def _predictions(scores: Tensor, labels: Tensor, ranks: Tensor) -> Tensor:
    """Each row's top-1 class: the true class when its rank is 0, else the best-scoring wrong
    class (the first of equals), so that the confusion matrix agrees with ``acc1``."""
    predictions = torch.where(ranks == 0, labels, scores.argmax(dim=1))
    # A wrong class tied with the true class at the top (pessimistic ties), where argmax picked
    # the true class: take the best wrong class instead.
    tied = ((ranks > 0) & (predictions == labels)).nonzero().flatten()
    if len(tied):
        wrong = scores[tied].scatter(1, labels[tied, None], -math.inf)
        predictions[tied] = wrong.argmax(dim=1)
    return predictions


def _ranks_and_predictions(scores: Tensor, labels: Tensor, pessimistic: bool) -> tuple[Tensor, Tensor]:
    ranks = _true_class_ranks(scores, labels, pessimistic)
    return ranks, _predictions(scores, labels, ranks)


def _check_labels(labels: Any, n_images: int, n_classes: int, device: torch.device) -> Tensor:
    if n_images == 0:
        raise ValueError("there are no images (0 score rows)")
    return index_vector(labels, name="labels", length=n_images, bound=n_classes, device=device, kind="class",
                        per="image", rows="images (score rows)", outside="is not a class", targets="classes")


def _dense_scores(logits: Tensor | np.ndarray, labels: Any, ties: str) -> tuple[Tensor, Tensor]:
    """Checked ``(scores, labels)`` of a dense score matrix."""
    _check_ties(ties)
    scores = score_matrix(logits, "logits", "(n_images, n_classes)", "classification")
    n_images, n_classes = scores.shape
    if n_classes == 0:
        raise ValueError("logits have no class column")
    return scores, _check_labels(labels, n_images, n_classes, scores.device)


def _tiles(scores: Tensor) -> range:
    return range(0, scores.shape[0], max(1, _TILE_SCORES // scores.shape[1]))


def class_ranks(
    logits: Tensor | np.ndarray, labels: Sequence[int] | np.ndarray | Tensor, ties: str = "pessimistic"
) -> tuple[Tensor, Tensor]:
    """Rank of the true class and top-1 prediction of every image.

    Args:
        logits: ``(n_images, n_classes)`` scores (any monotone scale: cosines, ``100 *``
            cosines, log-probabilities), torch on any device or numpy.
        labels: ``(n_images,)`` integer class of every image.
        ties: ``"pessimistic"`` (default) or ``"optimistic"``; see the module docstring.

    Returns:
        The 0-based rank of each image's true class (0 is correct at top 1) and the class
        predicted at top 1, two LongTensors of shape ``(n_images,)``.

    Raises:
        ValueError: non-2-D logits, NaN or infinite logits, labels of the wrong length or
            dtype, a label that is no class.
    """
    scores, indices = _dense_scores(logits, labels, ties)
    rows = _tiles(scores).step
    pieces = [
        _ranks_and_predictions(scores[start : start + rows], indices[start : start + rows], ties == "pessimistic")
        for start in _tiles(scores)
    ]
    return torch.cat([rank for rank, _ in pieces]), torch.cat([prediction for _, prediction in pieces])


@dataclass
class ClassificationResult:
    """Metrics and per-class detail of one classification run.

    Attributes:
        metrics: ``acc1``, ``acc5`` (only with at least 5 classes) and
            ``mean_per_class_recall``, in percent (0-100).
        classnames: the class names (as used in the prompts), in label order.
        per_class_recall: percent of each class's images classified correctly at top 1;
            NaN for a class without images.
        class_counts: images of each class.
        confusion: ``(n_classes, n_classes)`` LongTensor; ``confusion[t, p]`` counts images of
            class ``t`` predicted as ``p``.
        ranks: ``(n_images,)`` 0-based rank of each image's true class.
        predictions: ``(n_images,)`` top-1 class of each image.
        prompts: the prompts of each class, when an evaluator produced the result.
    """

    metrics: dict[str, float]
    classnames: list[str]
    per_class_recall: list[float]
    class_counts: list[int]
    confusion: Tensor
    ranks: Tensor
    predictions: Tensor
    prompts: list[list[str]] | None = None

    def per_class_table(self) -> str:
        """A Markdown table: class, images, recall (percent), most frequent wrong prediction."""
        lines = ["| class | images | recall % | most often mistaken for |", "|---|---|---|---|"]
        for index, name in enumerate(self.classnames):
            wrong = self.confusion[index].clone()
            wrong[index] = 0
            mistaken = (
                f"{self.classnames[int(wrong.argmax())]} ({int(wrong.max())})" if int(wrong.max()) > 0 else "-"
            )
            recall = self.per_class_recall[index]
            shown = "-" if math.isnan(recall) else f"{recall:.2f}"
            lines.append(f"| {name} | {self.class_counts[index]} | {shown} | {mistaken} |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: metrics, class names, per-class recall (null for a class without
        images), class counts, the confusion matrix as lists, and the prompts when known."""
        out: dict[str, Any] = {
            "metrics": dict(self.metrics),
            "classnames": list(self.classnames),
            "per_class_recall": [None if math.isnan(value) else value for value in self.per_class_recall],
            "class_counts": list(self.class_counts),
            "confusion": self.confusion.tolist(),
        }
        if self.prompts is not None:
            out["prompts"] = self.prompts
        return out

    def clip_benchmark_record(self, dataset: str, model: str, pretrained: str, **extra: Any) -> dict[str, Any]:
        """One result in CLIP_benchmark's JSON layout, beside which published results sit.

        ``{"dataset", "model", "pretrained", "task": "zeroshot_classification", "metrics":
        {"acc1", "acc5", "mean_per_class_recall"}, "language": "en", "classnames"}``, metrics
        as fractions (0-1) like CLIP_benchmark's files; ``acc5`` is null below 5 classes
        (CLIP_benchmark writes NaN, which strict JSON cannot hold). ``extra`` keys are added.
        """
        metrics = {key: self.metrics[key] / 100.0 if key in self.metrics else None for key in CLASSIFICATION_METRIC_KEYS}
        return {
            "dataset": dataset,
            "model": model,
            "pretrained": pretrained,
            "task": "zeroshot_classification",
            "metrics": metrics,
            "language": "en",
            "classnames": list(self.classnames),
            **extra,
        }

    def plot_confusion(self, path: str | os.PathLike, title: str | None = None) -> Path:
        """Write the confusion matrix as a PNG, rows normalised to percent of the true class.

        Needs matplotlib (``pip install 'harma[plot]'``), imported here. Cells hold their
        percentage when there are at most 25 classes. The file is written atomically.

        Raises:
            ImportError: matplotlib is not installed.
        """
        try:
            from matplotlib.figure import Figure
        except ImportError as error:
            raise ImportError(
                f"plot_confusion needs matplotlib, which is not installed ({error}); "
                "pip install 'harma[plot]'"
            ) from None
        n_classes = len(self.classnames)
        counts = self.confusion.double()
        percent = (100.0 * counts / counts.sum(dim=1, keepdim=True).clamp_min(1)).numpy()
        side = min(30.0, 3.0 + 0.32 * n_classes)
        figure = Figure(figsize=(side + 1.5, side), dpi=100, layout="constrained")
        axes = figure.add_subplot()
        image = axes.imshow(percent, cmap="Blues", vmin=0, vmax=100)
        figure.colorbar(image, ax=axes, shrink=0.8, label="% of the true class")
        ticks = range(n_classes)
        axes.set_xticks(ticks, self.classnames, rotation=90, fontsize=8)
        axes.set_yticks(ticks, self.classnames, fontsize=8)
        axes.set_xlabel("predicted class")
        axes.set_ylabel("true class")
        if n_classes <= 25:
            for (row, column), value in np.ndenumerate(percent):
                if value >= 0.5:
                    axes.text(column, row, f"{value:.0f}", ha="center", va="center", fontsize=7,
                              color="white" if value > 60 else "black")
        axes.set_title(title or f"confusion matrix, acc1 {self.metrics['acc1']:.2f}%")
        out_path = Path(path)
        atomic_write(out_path, lambda target: figure.savefig(target, format="png"))
        return out_path


def _metrics(ranks: Tensor, labels: Tensor, n_classes: int) -> tuple[dict[str, float], Tensor, Tensor]:
    """Metrics, per-class recall (percent, NaN without images) and per-class image counts."""
    counts = torch.bincount(labels, minlength=n_classes)
    correct = torch.bincount(labels[ranks == 0], minlength=n_classes)
    recall = torch.where(counts > 0, 100.0 * correct.double() / counts.clamp_min(1).double(), math.nan)
    # Percentages of integer counts and a plain left-to-right mean: the values are those of a
    # per-sample loop to the last bit.
    n_images = len(ranks)
    metrics = {"acc1": 100.0 * int((ranks < 1).sum()) / n_images}
    if n_classes >= 5:
        metrics["acc5"] = 100.0 * int((ranks < 5).sum()) / n_images
    present = recall[counts > 0].tolist()
    metrics["mean_per_class_recall"] = sum(present) / len(present)
    return metrics, recall, counts


def _result(ranks: Tensor, predictions: Tensor, labels: Tensor, classnames: Sequence[str]) -> ClassificationResult:
    n_classes = len(classnames)
    ranks, predictions, labels = ranks.cpu(), predictions.cpu(), labels.cpu()
    confusion = torch.bincount(labels * n_classes + predictions, minlength=n_classes * n_classes)
    confusion = confusion.view(n_classes, n_classes)
    metrics, recall, counts = _metrics(ranks, labels, n_classes)
    return ClassificationResult(
        metrics=metrics,
        classnames=list(classnames),
        per_class_recall=recall.tolist(),
        class_counts=counts.tolist(),
        confusion=confusion,
        ranks=ranks,
        predictions=predictions,
    )


def classification_result(
    logits: Tensor | np.ndarray,
    labels: Sequence[int] | np.ndarray | Tensor,
    classnames: Sequence[str] | None = None,
    ties: str = "pessimistic",
) -> ClassificationResult:
    """Metrics, per-class recall and confusion matrix from a dense score matrix.

    Args:
        logits: ``(n_images, n_classes)`` scores; labels: ``(n_images,)`` class indices.
        classnames: one name per class (default ``"0"``, ``"1"``, ...).
        ties: ``"pessimistic"`` (default) or ``"optimistic"``.

    Raises:
        ValueError: as `class_ranks`, or ``classnames`` of the wrong length.
    """
    n_classes = logits.shape[1]
    names = [str(index) for index in range(n_classes)] if classnames is None else list(classnames)
    if len(names) != n_classes:
        raise ValueError(f"classnames has {len(names)} names but logits have {n_classes} class columns")
    _, indices = _dense_scores(logits, labels, ties)
    ranks, predictions = class_ranks(logits, labels, ties)
    return _result(ranks, predictions, indices, names)


def classification_metrics(
    logits: Tensor | np.ndarray, labels: Sequence[int] | np.ndarray | Tensor, ties: str = "pessimistic"
) -> dict[str, float]:
    """Zero-shot (or any) classification metrics from a dense score matrix.

    Args:
        logits: ``(n_images, n_classes)`` scores, torch on any device or numpy.
        labels: ``(n_images,)`` integer class index of every image.
        ties: ``"pessimistic"`` (default) or ``"optimistic"``; see the module docstring.

    Returns:
        ``{"acc1", "acc5", "mean_per_class_recall"}`` in percent (0-100); ``acc5`` only when
        there are at least 5 classes. ``mean_per_class_recall`` averages the classes that have
        images (as scikit-learn's ``balanced_accuracy_score``).

    Raises:
        ValueError: non-2-D logits, NaN or infinite logits (how many, and where the first
            is), labels of the wrong length or dtype, a label that is no class.
    """
    scores, indices = _dense_scores(logits, labels, ties)
    rows = _tiles(scores).step
    ranks = torch.cat([
        _true_class_ranks(scores[start : start + rows], indices[start : start + rows], ties == "pessimistic")
        for start in _tiles(scores)
    ])
    return _metrics(ranks.cpu(), indices.cpu(), scores.shape[1])[0]


def combine_prompt_embeddings(
    embeddings: Tensor, prompt_counts: Sequence[int], combine: str = "normalized_mean"
) -> Tensor:
    """One unit vector per class from the embeddings of its prompts.

    Args:
        embeddings: ``(n_prompts, d)``, the prompts of class 0 first, then class 1, ...
        prompt_counts: prompts of each class (all >= 1, summing to ``n_prompts``).
        combine: ``"normalized_mean"`` (CLIP, open_clip, CLIP_benchmark) or ``"raw_mean"``
            (GeoRSCLIP); see the module docstring.

    Returns:
        ``(n_classes, d)`` float32 or wider, rows of unit length.
    """
    if combine not in COMBINE_MODES:
        raise ValueError(f"combine must be one of {COMBINE_MODES}, got {combine!r}")
    if sum(prompt_counts) != embeddings.shape[0] or min(prompt_counts) < 1:
        raise ValueError(
            f"prompt_counts {list(prompt_counts)} do not split {embeddings.shape[0]} prompt embeddings"
        )
    vectors = embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))
    if combine == "normalized_mean":
        vectors = F.normalize(vectors, dim=-1)
    owner = torch.repeat_interleave(
        torch.arange(len(prompt_counts), device=vectors.device),
        torch.as_tensor(list(prompt_counts), device=vectors.device),
    )
    sums = torch.zeros(len(prompt_counts), vectors.shape[1], dtype=vectors.dtype, device=vectors.device)
    sums.index_add_(0, owner, vectors)
    counts = torch.as_tensor(list(prompt_counts), dtype=vectors.dtype, device=vectors.device)
    return F.normalize(sums / counts[:, None], dim=-1)


class ZeroShotEvaluator(BatchEncoder):
    """Zero-shot classification of an image set with a CLIP-style model.

    Built once (class names, templates, images) and evaluated on any number of models, or on
    one model in several states (named adapter sets, epochs of a training run).

    Args:
        image_dataset: ``image_dataset[i]`` is the ``(C, H, W)`` image tensor of image ``i``,
            or a tuple/list whose first element is it (e.g. ``(image, label)``).
        labels: ``(n_images,)`` class index of every image.
        classnames: the classes' names in the data (folder names, file-name prefixes,
            ``classnames.txt`` lines), in label order.
        tokenizer: ``tokenizer(list_of_str) -> LongTensor (n, context_length)``.
        templates: a template set name (`harma.prompts.TEMPLATE_SETS`), a text file of
            templates, or a list of templates with ``{}``.
        class_prompts: ``{class: [prompt, ...]}`` replacing the templates for some classes.
        name_overrides: ``{name in the data: name to use}``, or a list of every class's name.
        clean_names: make names readable with `harma.prompts.clean_class_name` (classes
            without an override).
        combine: ``"normalized_mean"`` (default) or ``"raw_mean"``; see the module docstring.
        ties: ``"pessimistic"`` (default) or ``"optimistic"``.
        batch_size: images / prompts per forward pass (per process).
        num_workers: DataLoader workers for the images.
        device: where to run the model; default: the device of the model's first parameter.
        autocast_dtype: ``torch.bfloat16`` or ``torch.float16`` to run under CUDA autocast;
            ignored on CPU.
        progress: show tqdm bars (main process only).

    Attributes:
        raw_classnames: the names in the data. ``classnames``: the names used.
        prompts: the prompts of each class. ``labels``: ``(n_images,)`` LongTensor.

    Under ``torch.distributed`` every rank encodes a contiguous shard of the prompts and of
    the images; prompt embeddings are gathered, then each rank reduces its images to the true
    class's rank and the prediction, which are gathered: every rank returns the metrics.
    """

    def __init__(
        self,
        image_dataset: Dataset | Sequence[Any],
        labels: Sequence[int] | np.ndarray | Tensor,
        classnames: Sequence[str],
        tokenizer: Callable[[list[str]], Tensor],
        templates: str | os.PathLike | Sequence[str] = DEFAULT_TEMPLATES,
        class_prompts: Mapping[str, Sequence[str]] | None = None,
        name_overrides: Mapping[str, str] | Sequence[str] | None = None,
        clean_names: bool = True,
        combine: str = "normalized_mean",
        ties: str = "pessimistic",
        batch_size: int = 64,
        num_workers: int = 0,
        device: torch.device | str | None = None,
        autocast_dtype: torch.dtype | None = None,
        progress: bool = True,
    ) -> None:
        self._set_encoding_options(tokenizer, batch_size, num_workers, device, autocast_dtype, progress)
        if combine not in COMBINE_MODES:
            raise ValueError(f"combine must be one of {COMBINE_MODES}, got {combine!r}")
        _check_ties(ties)
        if not classnames:
            raise ValueError("classnames is empty: zero-shot classification needs at least one class")
        self.image_dataset = image_dataset
        self.raw_classnames = [str(name) for name in classnames]
        self.labels = _check_labels(labels, len(image_dataset), len(self.raw_classnames), torch.device("cpu"))
        self.templates = load_templates(templates)
        self.classnames = resolve_class_names(self.raw_classnames, name_overrides, clean=clean_names)
        self.prompts = build_prompts(self.classnames, self.templates, class_prompts, self.raw_classnames)
        self.combine = combine
        self.ties = ties

    @classmethod
    def from_dataset(
        cls, dataset: Any, tokenizer: Callable[[list[str]], Tensor], **options: Any
    ) -> ZeroShotEvaluator:
        """Build from a dataset exposing ``labels`` and ``classes`` (the names in the data),
        such as `harma.training.classification_data.ClassificationDataset`; ``options`` go
        to ``__init__``."""
        return cls(dataset, dataset.labels, dataset.classes, tokenizer, **options)

    def _text_classifier(self, encoder: Any, device: torch.device) -> Tensor:
        flat = [prompt for prompts in self.prompts for prompt in prompts]
        start, stop = shard_bounds(len(flat), get_rank(), get_world_size())
        # An empty shard still encodes one prompt so the embedding width is known for the gather.
        local = self._encode_text_list(encoder, device, flat[start:stop] or flat[:1], desc="encode prompts")
        embeddings = all_gather_no_grad(local if stop > start else local[:0])
        return combine_prompt_embeddings(embeddings, [len(prompts) for prompts in self.prompts], self.combine)

    @torch.no_grad()
    def classifier(self, model: nn.Module) -> Tensor:
        """The text classifier: ``(n_classes, d)`` float32 unit rows, on the evaluation device."""
        with kept_modes(model):
            return self._text_classifier(encoders_of(model), self._resolve_device(model))

    def _classify_shard(self, encoder: Any, device: torch.device, classifier: Tensor) -> tuple[Tensor, Tensor]:
        start, stop = shard_bounds(len(self.image_dataset), get_rank(), get_world_size())
        labels = self.labels.to(device)
        ranks, predictions = [], []
        position = start
        if stop > start:
            for embeds in self._image_batches(encoder, self.image_dataset, device, list(range(start, stop))):
                with tf32_disabled():  # scored in full float32, as retrieval scores are
                    scores = F.normalize(embeds, dim=-1) @ classifier.t()
                check_finite(scores, f"scores of images {position}..{position + len(scores) - 1}", "classification")
                rank, prediction = _ranks_and_predictions(
                    scores, labels[position : position + len(scores)], self.ties == "pessimistic"
                )
                ranks.append(rank)
                predictions.append(prediction)
                position += len(scores)
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return torch.cat(ranks) if ranks else empty, torch.cat(predictions) if predictions else empty

    @torch.no_grad()
    def run(self, model: nn.Module) -> ClassificationResult:
        """Classify every image with ``model``: metrics, per-class recall, confusion matrix."""
        encoder = encoders_of(model)
        device = self._resolve_device(model)
        with kept_modes(model):
            classifier = self._text_classifier(encoder, device)
            ranks, predictions = self._classify_shard(encoder, device, classifier)
        result = _result(all_gather_no_grad(ranks), all_gather_no_grad(predictions), self.labels, self.classnames)
        result.prompts = self.prompts
        return result

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Classify with ``model`` and return `classification_metrics` keys (percent)."""
        return self.run(model).metrics

    __call__ = evaluate
