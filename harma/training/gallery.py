"""Retrieval galleries: for a few sample captions, the images a model ranked first, and for a
few sample images, the captions it ranked first, with the correct ones marked.

Build one with `build_gallery` (from a score matrix) or `build_gallery_from_embeddings` (from
the embeddings of `harma.retrieval.RetrievalEvaluator.encode`, without the full matrix), then
draw it with `harma.training.gallery_render` (``write_gallery``: HTML or a PNG contact sheet,
chosen by the file name). ``examples/evaluate.py --gallery`` does all of this.

Ranks follow `harma.retrieval`: 0-based, ties broken pessimistically (a wrong item scoring
the same as the correct one is placed before it), so a gallery's ranks equal the
`harma.retrieval.RetrievalRanks` of the same scores. Pictures show them 1-based (``#1``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..retrieval import txt2img_tensor
from .captions import DatasetImage

__all__ = [
    "GALLERY_SUFFIXES",
    "ImageSource",
    "RankedQuery",
    "RetrievalGallery",
    "build_gallery",
    "build_gallery_from_embeddings",
]

GALLERY_SUFFIXES = (".html", ".htm", ".png")

ImageSource = str | os.PathLike | Image.Image | DatasetImage

# ------------------------------------------------------------------------------ the gallery


@dataclass(frozen=True)
class RankedQuery:
    """One query of a gallery and the items the model ranked first for it.

    Attributes:
        query: the caption index (text-to-image) or image index (image-to-text) asked.
        top: the ``k`` retrieved indices, best first: image indices for a caption query,
            caption indices for an image query.
        top_scores: their similarity scores, same length as ``top``.
        relevant: the correct items: ``(txt2img[query],)`` for a caption, the image's captions
            for an image.
        rank: 0-based rank of the best-placed correct item in the whole ranking, as in
            `harma.retrieval.RetrievalRanks`; ``rank >= len(top)`` means none is shown in ``top``.
        best_relevant: that best-placed correct item (the one at ``rank``).
    """

    query: int
    top: tuple[int, ...]
    top_scores: tuple[float, ...]
    relevant: tuple[int, ...]
    rank: int
    best_relevant: int

    @property
    def hits(self) -> tuple[bool, ...]:
        """Per position of ``top``: is that item a correct one."""
        relevant = set(self.relevant)
        return tuple(item in relevant for item in self.top)

    @property
    def found(self) -> bool:
        """A correct item is among ``top``."""
        return self.rank < len(self.top)

    def shown(self) -> Iterator[tuple[int, int, float, bool]]:
        """``(position, index, score, correct)`` of each item of ``top``, best first
        (position 0-based)."""
        results = zip(self.top, self.top_scores, self.hits, strict=True)
        for position, (index, score, hit) in enumerate(results):
            yield position, index, score, hit


@dataclass(frozen=True)
class RetrievalGallery:
    """Sample queries of both directions with their top-``k`` results (`build_gallery`).

    Attributes:
        text_to_image: caption queries; ``top`` holds image indices.
        image_to_text: image queries; ``top`` holds caption indices.
        n_images: size of the evaluation set the indices refer to.
        n_texts: size of the evaluation set the indices refer to.
        k: results asked per query (see `images_per_query`, `captions_per_query`).
    """

    text_to_image: tuple[RankedQuery, ...]
    image_to_text: tuple[RankedQuery, ...]
    n_images: int
    n_texts: int
    k: int

    @property
    def images_per_query(self) -> int:
        """Images shown per caption query: ``k``, or all of them when there are fewer."""
        return min(self.k, self.n_images)

    @property
    def captions_per_query(self) -> int:
        """Captions shown per image query: ``k``, or all of them when there are fewer."""
        return min(self.k, self.n_texts)


def _as_txt2img(txt2img: Any, n_images: int, n_texts: int) -> np.ndarray:
    return txt2img_tensor(txt2img, n_images, n_texts, torch.device("cpu")).numpy()


def _choose_queries(
    explicit: Sequence[int] | None, count: int, num_queries: int, rng: np.random.Generator, what: str
) -> list[int]:
    if explicit is not None:
        chosen = [int(index) for index in explicit]
        bad = [index for index in chosen if not 0 <= index < count]
        if bad:
            raise ValueError(f"{what} query indices {bad[:5]} are out of range: there are {count} {what}s")
        return chosen
    return sorted(rng.choice(count, size=min(num_queries, count), replace=False).tolist())


def _rank_one(
    scores: np.ndarray, relevant_mask: np.ndarray, k: int
) -> tuple[list[int], list[float], int, int]:
    """Top-``k`` indices and scores of one query, the 0-based rank of its first correct item,
    and that item.

    ``scores`` and ``relevant_mask`` are ``(n_items,)``. Sorted by decreasing score, a correct
    item after the wrong ones it ties with (the pessimistic convention of `harma.retrieval`),
    then by index, so the order is deterministic.
    """
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")
    order = np.lexsort((np.arange(scores.shape[0]), relevant_mask, -scores))
    rank = int(np.flatnonzero(relevant_mask[order])[0])
    top = order[:k]
    return top.tolist(), scores[top].tolist(), rank, int(order[rank])


def _rank_queries(
    caption_queries: list[int],
    image_queries: list[int],
    caption_columns: np.ndarray,
    image_rows: np.ndarray,
    txt2img: np.ndarray,
    k: int,
) -> RetrievalGallery:
    """``caption_columns``: ``(n_images, len(caption_queries))`` scores of the caption queries;
    ``image_rows``: ``(len(image_queries), n_texts)`` scores of the image queries."""
    n_images, n_texts = caption_columns.shape[0], image_rows.shape[1]
    k_images, k_texts = min(k, n_images), min(k, n_texts)  # as RetrievalGallery's *_per_query
    image_indices = np.arange(n_images)
    text_to_image = []
    for column, caption in enumerate(caption_queries):
        relevant_image = int(txt2img[caption])
        top, top_scores, rank, best = _rank_one(
            caption_columns[:, column], image_indices == relevant_image, k_images
        )
        text_to_image.append(
            RankedQuery(caption, tuple(top), tuple(top_scores), (relevant_image,), rank, best)
        )
    image_to_text = []
    for row, image in enumerate(image_queries):
        relevant_mask = txt2img == image
        top, top_scores, rank, best = _rank_one(image_rows[row], relevant_mask, k_texts)
        relevant = tuple(np.flatnonzero(relevant_mask).tolist())
        image_to_text.append(RankedQuery(image, tuple(top), tuple(top_scores), relevant, rank, best))
    return RetrievalGallery(tuple(text_to_image), tuple(image_to_text), n_images, n_texts, k)


def _check_counts(num_queries: int, k: int) -> None:
    for name, value in (("num_queries", num_queries), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def build_gallery(
    scores: Tensor | np.ndarray,
    txt2img: Sequence[int] | np.ndarray | Tensor,
    *,
    num_queries: int = 8,
    k: int = 5,
    seed: int = 0,
    caption_queries: Sequence[int] | None = None,
    image_queries: Sequence[int] | None = None,
) -> RetrievalGallery:
    """Pick sample queries of both directions and rank the results of each.

    Args:
        scores: ``(n_images, n_texts)`` similarities, ``scores[i, j]`` of image ``i`` and
            caption ``j`` (torch on any device, or numpy).
        txt2img: ``(n_texts,)`` image index of every caption.
        num_queries: captions and images to sample (each; all of them if there are fewer).
        k: results shown per query (capped by the number of images / captions).
        seed: seed of the sample (`numpy.random.default_rng`): same seed, same queries.
        caption_queries: explicit query indices instead of a sample.
        image_queries: explicit query indices instead of a sample.

    Returns:
        A `RetrievalGallery`; its ranks equal `harma.retrieval.retrieval_metrics(scores,
        txt2img, return_ranks=True)` for the sampled queries.

    Raises:
        ValueError: scores not 2-D or not finite, ``txt2img`` not matching them (as
            `harma.retrieval.retrieval_metrics`), query indices out of range, ``k`` or
            ``num_queries`` not positive.
    """
    _check_counts(num_queries, k)
    matrix = scores.detach().float().cpu().numpy() if isinstance(scores, Tensor) else np.asarray(scores)
    if matrix.ndim != 2:
        raise ValueError(f"scores must be a 2-D (n_images, n_texts) matrix; got shape {tuple(matrix.shape)}")
    n_images, n_texts = matrix.shape
    indices = _as_txt2img(txt2img, n_images, n_texts)
    rng = np.random.default_rng(seed)
    captions = _choose_queries(caption_queries, n_texts, num_queries, rng, "caption")
    images = _choose_queries(image_queries, n_images, num_queries, rng, "image")
    matrix = matrix.astype(np.float64, copy=False)
    return _rank_queries(captions, images, matrix[:, captions], matrix[images, :], indices, k)


def build_gallery_from_embeddings(
    image_embeds: Tensor,
    text_embeds: Tensor,
    txt2img: Sequence[int] | np.ndarray | Tensor,
    *,
    num_queries: int = 8,
    k: int = 5,
    seed: int = 0,
    caption_queries: Sequence[int] | None = None,
    image_queries: Sequence[int] | None = None,
    normalize: bool = True,
) -> RetrievalGallery:
    """`build_gallery` from embeddings, computing only the scores of the sampled queries
    (``num_queries`` columns and rows, never the whole matrix).

    Args:
        image_embeds: ``(n_images, d)``, as `harma.retrieval.RetrievalEvaluator.encode` returns.
        text_embeds: ``(n_texts, d)``, on the same device.
        txt2img: ``(n_texts,)`` image index of every caption.
        normalize: cosine similarity (L2-normalise both sides first), as
            `harma.retrieval.retrieval_metrics_from_embeddings`.
        num_queries: as `build_gallery`.
        k: as `build_gallery`.
        seed: as `build_gallery`.
        caption_queries: as `build_gallery`.
        image_queries: as `build_gallery`.
    """
    _check_counts(num_queries, k)
    for name, embeds in (("image_embeds", image_embeds), ("text_embeds", text_embeds)):
        if not isinstance(embeds, Tensor) or embeds.ndim != 2:
            shape = tuple(embeds.shape) if isinstance(embeds, Tensor) else type(embeds).__name__
            raise ValueError(f"{name} must be a 2-D (n, d) tensor; got {shape}")
    if image_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(
            f"image_embeds and text_embeds differ in width: {image_embeds.shape[1]} vs {text_embeds.shape[1]}"
        )
    images_all = image_embeds.detach().float()
    texts_all = text_embeds.detach().float().to(images_all.device)
    if normalize:
        images_all, texts_all = F.normalize(images_all, dim=-1), F.normalize(texts_all, dim=-1)
    n_images, n_texts = images_all.shape[0], texts_all.shape[0]
    indices = _as_txt2img(txt2img, n_images, n_texts)
    rng = np.random.default_rng(seed)
    captions = _choose_queries(caption_queries, n_texts, num_queries, rng, "caption")
    images = _choose_queries(image_queries, n_images, num_queries, rng, "image")
    caption_columns = (images_all @ texts_all[captions].t()).double().cpu().numpy()
    image_rows = (images_all[images] @ texts_all.t()).double().cpu().numpy()
    return _rank_queries(captions, images, caption_columns, image_rows, indices, k)
