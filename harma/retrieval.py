"""Image-text retrieval metrics (R@1/5/10 both ways, mean recall) and a model evaluator.

Protocol (as in the RSITMD/RSICD literature and the authors' code): ``scores[i, j]`` is the similarity of image ``i`` and caption
``j``; ``txt2img[j]`` is the image of caption ``j`` (an image may have any number >= 1 of
captions).

* image-to-text rank of image ``i``: position of its best-placed caption in row ``i``;
* text-to-image rank of caption ``j``: position of image ``txt2img[j]`` in column ``j``;
* ``R@K`` = percent of queries with 0-based rank ``< K``; ``mean_recall`` = mean of the six.

Ties are broken *pessimistically* by default: a wrong item whose score equals the relevant
item's score is placed before it. So rank = number of wrong items scoring ``>=`` the
relevant item (for image-to-text, the best-scoring caption of the image). A collapsed model
that gives every pair the same score therefore gets the worst possible ranks rather than
perfect ones. ``ties="optimistic"`` counts only strictly greater wrong items instead. Without
ties both conventions agree with the reference's argsort loop.

Ranks are computed tile by tile (never a full sort), so memory is bounded by the tile size
and the similarity matrix of `retrieval_metrics_from_embeddings` is never built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from harma._checks import index_vector, reject_nonfinite, score_matrix
from harma._precision import tf32_disabled
from harma.distributed import all_gather_no_grad, get_rank, get_world_size
from harma.encoding import BatchEncoder, encoders_of, kept_modes, shard_bounds

__all__ = [
    "METRIC_KEYS",
    "RetrievalEvaluator",
    "RetrievalRanks",
    "ranks_to_metrics",
    "retrieval_metrics",
    "retrieval_metrics_from_embeddings",
]

METRIC_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_recall")
_TIE_CONVENTIONS = ("pessimistic", "optimistic")
# Dense path: whole rows per tile, about 2**22 scores each. Few, large, contiguous tiles keep
# the per-op overhead low and bound the temporary boolean masks to ~4 MB.
_DENSE_TILE_SCORES = 2**22

ScoreTile = Callable[[slice, slice], Tensor]


@dataclass
class RetrievalRanks:
    """0-based ranks for error analysis.

    Attributes:
        i2t: ``(n_images,)`` LongTensor, rank of the best caption of each image.
        t2i: ``(n_texts,)`` LongTensor, rank of the image of each caption.
    """

    i2t: Tensor
    t2i: Tensor


def txt2img_tensor(txt2img: Any, n_images: int, n_texts: int, device: torch.device) -> Tensor:
    """Validate ``txt2img`` against the score-matrix shape; return it as a LongTensor."""
    if n_images == 0:
        raise ValueError("there are no images (0 image rows)")
    indices = index_vector(txt2img, name="txt2img", length=n_texts, bound=n_images, device=device, kind="image",
                           per="caption", rows="captions (text columns)", outside="points at a missing image",
                           targets="images")
    captions_per_image = torch.bincount(indices, minlength=n_images)
    uncaptioned = (captions_per_image == 0).nonzero().flatten().tolist()
    if uncaptioned:
        shown = ", ".join(str(i) for i in uncaptioned[:10]) + (", ..." if len(uncaptioned) > 10 else "")
        raise ValueError(
            f"{len(uncaptioned)} image(s) have no caption in txt2img (image indices {shown}); "
            "every image needs at least one caption"
        )
    return indices


def _check_ties(ties: str) -> None:
    if ties not in _TIE_CONVENTIONS:
        raise ValueError(f"ties must be one of {_TIE_CONVENTIONS}, got {ties!r}")


def _count_true(mask: Tensor, dim: int) -> Tensor:
    """Number of True entries of a boolean tile along ``dim``.

    Summing the bytes with an int32 accumulator is several times faster than ``bool.sum()``
    (which widens every element to int64); a tile edge never approaches 2**31.
    """
    return mask.view(torch.uint8).sum(dim=dim, dtype=torch.int32)


def _tile_ranks(
    score_tile: ScoreTile,
    n_images: int,
    n_texts: int,
    txt2img: Tensor,
    row_tile: int,
    col_tile: int,
    ties: str,
) -> RetrievalRanks:
    """Ranks from a tiled score matrix; ``score_tile(rows, cols)`` returns ``scores[rows, cols]``.

    Pass 1 reads each caption's matching score ``scores[txt2img[j], j]`` from the tiles that
    hold it, and each image's best matching score. Pass 2 counts, tile by tile, the items that
    score at least as high. Both passes obtain every score from the same tile call, so a
    recomputed tile (embedding path) compares bit-for-bit with its own matching scores.
    Pass 1 only visits tiles that hold some caption's own image, so its cost is small when
    captions are grouped by image and tiles are shaped like the matrix.
    """
    device = txt2img.device
    pessimistic = ties == "pessimistic"
    row_block_of_caption = txt2img // row_tile
    col_starts = range(0, n_texts, col_tile)
    row_starts = range(0, n_images, row_tile)

    matching_score: Tensor | None = None
    for col_start in col_starts:
        cols = slice(col_start, min(col_start + col_tile, n_texts))
        blocks_here = row_block_of_caption[cols]
        for block in torch.unique(blocks_here).tolist():
            row_start = block * row_tile
            tile = score_tile(slice(row_start, min(row_start + row_tile, n_images)), cols)
            if matching_score is None:
                matching_score = torch.empty(n_texts, dtype=tile.dtype, device=device)
            local_cols = (blocks_here == block).nonzero().flatten()
            local_rows = txt2img[cols][local_cols] - row_start
            matching_score[col_start + local_cols] = tile[local_rows, local_cols]
    assert matching_score is not None  # n_texts >= n_images >= 1 after validation
    best_matching_score = torch.full((n_images,), -torch.inf, dtype=matching_score.dtype, device=device)
    best_matching_score.scatter_reduce_(0, txt2img, matching_score, reduce="amax")

    at_least_as_high_t2i = torch.zeros(n_texts, dtype=torch.long, device=device)
    at_least_as_high_i2t = torch.zeros(n_images, dtype=torch.long, device=device)
    for row_start in row_starts:
        rows = slice(row_start, min(row_start + row_tile, n_images))
        best_here = best_matching_score[rows, None]
        for col_start in col_starts:
            cols = slice(col_start, min(col_start + col_tile, n_texts))
            tile = score_tile(rows, cols)
            if pessimistic:
                at_least_as_high_t2i[cols] += _count_true(tile >= matching_score[None, cols], dim=0)
                at_least_as_high_i2t[rows] += _count_true(tile >= best_here, dim=1)
            else:
                at_least_as_high_t2i[cols] += _count_true(tile > matching_score[None, cols], dim=0)
                at_least_as_high_i2t[rows] += _count_true(tile > best_here, dim=1)

    if not pessimistic:
        # Strictly greater never counts the relevant item itself (nor, for i2t, any caption
        # of the image, since none beats the best one).
        return RetrievalRanks(i2t=at_least_as_high_i2t, t2i=at_least_as_high_t2i)
    # ">=" counted the relevant image once per caption, and, per image, every caption of
    # that image tied with its best one; those are not wrong items.
    ties_with_best = (matching_score >= best_matching_score[txt2img]).long()
    matching_at_best = torch.zeros(n_images, dtype=torch.long, device=device)
    matching_at_best.scatter_add_(0, txt2img, ties_with_best)
    return RetrievalRanks(i2t=at_least_as_high_i2t - matching_at_best, t2i=at_least_as_high_t2i - 1)


def ranks_to_metrics(ranks: RetrievalRanks) -> dict[str, float]:
    """R@1/5/10 in percent for both directions and their mean from 0-based ranks."""
    metrics: dict[str, float] = {}
    for direction, direction_ranks in (("i2t", ranks.i2t), ("t2i", ranks.t2i)):
        for k in (1, 5, 10):
            metrics[f"{direction}_r{k}"] = 100.0 * float((direction_ranks < k).double().mean())
    metrics["mean_recall"] = sum(metrics.values()) / 6.0
    return metrics


def _as_score_tensor(scores: Any) -> Tensor:
    return score_matrix(scores, "scores", "(n_images, n_texts)", "retrieval")


def retrieval_metrics(
    scores: Tensor | np.ndarray,
    txt2img: Sequence[int] | np.ndarray | Tensor,
    ties: str = "pessimistic",
    return_ranks: bool = False,
) -> dict[str, float] | tuple[dict[str, float], RetrievalRanks]:
    """Retrieval recalls from a dense similarity matrix.

    Args:
        scores: ``(n_images, n_texts)`` similarities (torch, any device, or numpy).
        txt2img: ``(n_texts,)`` integer image index of every caption.
        ties: ``"pessimistic"`` (default) or ``"optimistic"``; see the module docstring.
        return_ranks: also return the 0-based `RetrievalRanks`.

    Returns:
        ``{"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_recall"}``
        in percent (0-100), and the ranks when ``return_ranks``.

    Raises:
        ValueError: non-2-D scores, NaN or infinite scores (how many, and where the first
            is), ``txt2img`` of the wrong length or dtype, a caption pointing at a missing
            image, an image without caption.
    """
    _check_ties(ties)
    score_matrix = _as_score_tensor(scores)
    n_images, n_texts = score_matrix.shape
    indices = txt2img_tensor(txt2img, n_images, n_texts, score_matrix.device)
    rows_per_tile = max(1, _DENSE_TILE_SCORES // n_texts)
    ranks = _tile_ranks(
        lambda rows, cols: score_matrix[rows, cols], n_images, n_texts, indices, rows_per_tile, n_texts, ties
    )
    metrics = ranks_to_metrics(ranks)
    return (metrics, ranks) if return_ranks else metrics


def _prepare_embeddings(embeds: Tensor, name: str) -> Tensor:
    if not isinstance(embeds, Tensor) or embeds.ndim != 2:
        shape = tuple(embeds.shape) if isinstance(embeds, Tensor) else type(embeds).__name__
        raise ValueError(f"{name} must be a 2-D (n, d) tensor; got {shape}")
    embeds = embeds.detach()
    return embeds.to(torch.promote_types(embeds.dtype, torch.float32))


def retrieval_metrics_from_embeddings(
    image_embeds: Tensor,
    text_embeds: Tensor,
    txt2img: Sequence[int] | np.ndarray | Tensor,
    chunk_size: int = 4096,
    normalize: bool = True,
    return_ranks: bool = False,
    ties: str = "pessimistic",
) -> dict[str, float] | tuple[dict[str, float], RetrievalRanks]:
    """Retrieval recalls from embeddings, without building the similarity matrix.

    Similarities are dot products (cosines when ``normalize``), computed in float32 or wider
    (on CUDA with TF32 switched off for these products, whatever the process set) in tiles of ``chunk_size`` captions by at most ``chunk_size`` images; peak extra memory
    is about ``6 * chunk_size**2`` bytes for float32 (tile, comparison mask, counts) plus the
    normalised copies of the inputs. When ``n_images * n_texts <= chunk_size**2`` the matrix
    is computed in one piece (one matmul). Otherwise every score is computed once, plus once
    more for the tiles that hold (image, own caption) pairs: about 1.05-1.2x one full matmul
    when captions are grouped by image, up to 2x when they are shuffled. Works on the inputs'
    device.
    Results equal `retrieval_metrics` on ``image_embeds @ text_embeds.T`` (exactly,
    whenever that product rounds the same way as the tiles; differences can only appear for
    scores within float rounding of each other).

    Args:
        image_embeds: ``(n_images, d)``.
        text_embeds: ``(n_texts, d)``, on the same device.
        txt2img: ``(n_texts,)`` integer image index of every caption.
        chunk_size: tile edge (images x captions per tile), >= 1.
        normalize: L2-normalise both sides first (cosine similarity).
        return_ranks: also return the 0-based `RetrievalRanks`.
        ties: ``"pessimistic"`` (default) or ``"optimistic"``.

    Raises:
        ValueError: non-2-D embeddings of different widths or devices, NaN or infinite
            embeddings (how many, and where the first is), or an invalid ``txt2img``.
    """
    _check_ties(ties)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    images = _prepare_embeddings(image_embeds, "image_embeds")
    texts = _prepare_embeddings(text_embeds, "text_embeds")
    if images.shape[1] != texts.shape[1]:
        raise ValueError(
            f"image_embeds and text_embeds differ in width: {images.shape[1]} vs {texts.shape[1]}"
        )
    if images.device != texts.device:
        raise ValueError(f"image_embeds is on {images.device} but text_embeds is on {texts.device}")
    reject_nonfinite(images, "image_embeds", "retrieval")
    reject_nonfinite(texts, "text_embeds", "retrieval")
    if texts.dtype != images.dtype:
        common = torch.promote_types(images.dtype, texts.dtype)
        images, texts = images.to(common), texts.to(common)
    if normalize:
        images = F.normalize(images, dim=-1)
        texts = F.normalize(texts, dim=-1)
    n_images, n_texts = images.shape[0], texts.shape[0]
    indices = txt2img_tensor(txt2img, n_images, n_texts, images.device)
    # Scores in full float32 even where TF32 is on for training: TF32's 10-bit mantissa moves
    # many ranks among near-equal scores, and a run's metrics must not depend on that switch.
    with tf32_disabled():
        ranks = _score_ranks(images, texts, indices, chunk_size, ties)
    metrics = ranks_to_metrics(ranks)
    return (metrics, ranks) if return_ranks else metrics


def _score_ranks(images: Tensor, texts: Tensor, indices: Tensor, chunk_size: int, ties: str) -> RetrievalRanks:
    """The ranks of `retrieval_metrics_from_embeddings` from prepared embeddings."""
    n_images, n_texts = images.shape[0], texts.shape[0]
    if n_images * n_texts <= chunk_size * chunk_size:
        # The whole matrix fits in one tile's memory: one matmul instead of two passes.
        scores = images @ texts.t()
        return _tile_ranks(lambda rows, cols: scores[rows, cols], n_images, n_texts, indices, n_images, n_texts, ties)
    # Tiles are chunk_size captions wide and proportionally fewer images high: pass 1 of
    # _tile_ranks recomputes only the tiles holding (image, own caption) pairs, and when
    # the captions are grouped by image that is about one tile row per tile column.
    row_tile = min(chunk_size, -(-chunk_size * n_images // n_texts))
    return _tile_ranks(
        lambda rows, cols: images[rows] @ texts[cols].t(), n_images, n_texts, indices, row_tile, chunk_size, ties
    )


class RetrievalEvaluator(BatchEncoder):
    """Encode a retrieval test set with a CLIP-style model and compute the recalls.

    Args:
        image_dataset: ``image_dataset[i]`` is the ``(C, H, W)`` image tensor of image ``i``,
            or a tuple/list whose first element is it (e.g. ``(image, index)``).
        captions: flat list of caption strings (already preprocessed), one per text.
        txt2img: ``(len(captions),)`` image index of every caption.
        tokenizer: ``tokenizer(list_of_str) -> LongTensor (n, context_length)`` (open_clip's).
        batch_size: images / captions per forward pass (per process).
        num_workers: DataLoader workers for the images.
        device: where to run the model; default: the device of the model's first parameter.
        autocast_dtype: ``torch.bfloat16`` or ``torch.float16`` to run under CUDA autocast;
            ignored on CPU.
        progress: show tqdm bars (main process only).

    Under ``torch.distributed`` every rank encodes a contiguous shard of the images and of the
    captions; the embeddings are gathered on all ranks, so every rank returns the metrics.
    """

    def __init__(
        self,
        image_dataset: Dataset | Sequence[Any],
        captions: Sequence[str],
        txt2img: Sequence[int] | np.ndarray | Tensor,
        tokenizer: Callable[[list[str]], Tensor],
        batch_size: int = 64,
        num_workers: int = 0,
        device: torch.device | str | None = None,
        autocast_dtype: torch.dtype | None = None,
        progress: bool = True,
    ) -> None:
        self._set_encoding_options(tokenizer, batch_size, num_workers, device, autocast_dtype, progress)
        self.image_dataset = image_dataset
        self.captions = list(captions)
        self.txt2img = txt2img_tensor(txt2img, len(image_dataset), len(self.captions), torch.device("cpu"))

    @classmethod
    def from_dataset(
        cls, dataset: Any, tokenizer: Callable[[list[str]], Tensor], **options: Any
    ) -> RetrievalEvaluator:
        """Build from an evaluation dataset exposing ``captions`` and ``txt2img`` attributes
        (such as `harma.training.data.RetrievalEvalDataset`); ``options`` go to ``__init__``."""
        return cls(dataset, dataset.captions, dataset.txt2img, tokenizer, **options)

    def _encode_images(self, model: Any, device: torch.device, start: int, stop: int) -> Tensor:
        # An empty shard still runs one image so the embedding width is known for the gather.
        indices = list(range(start, stop)) if stop > start else [0]
        embeds = torch.cat(list(self._image_batches(model, self.image_dataset, device, indices)))
        return embeds if stop > start else embeds[:0]

    def _encode_texts(self, model: Any, device: torch.device, start: int, stop: int) -> Tensor:
        captions = self.captions[start:stop] if stop > start else self.captions[:1]
        embeds = self._encode_text_list(model, device, captions)
        return embeds if stop > start else embeds[:0]

    @torch.no_grad()
    def encode(self, model: nn.Module) -> tuple[Tensor, Tensor]:
        """Embed all images and captions.

        Returns:
            ``(image_embeds (n_images, d), text_embeds (n_texts, d))``, float32, un-normalised,
            on the evaluation device, identical on every rank.
        """
        encoder = encoders_of(model)
        device = self._resolve_device(model)
        with kept_modes(model):
            rank, world_size = get_rank(), get_world_size()
            image_embeds = self._encode_images(
                encoder, device, *shard_bounds(len(self.image_dataset), rank, world_size)
            )
            text_embeds = self._encode_texts(
                encoder, device, *shard_bounds(len(self.captions), rank, world_size)
            )
        return all_gather_no_grad(image_embeds), all_gather_no_grad(text_embeds)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Encode with ``model`` and return `retrieval_metrics` keys (percent)."""
        image_embeds, text_embeds = self.encode(model)
        metrics = retrieval_metrics_from_embeddings(
            image_embeds, text_embeds, self.txt2img.to(image_embeds.device)
        )
        assert isinstance(metrics, dict)
        return metrics

    __call__ = evaluate
