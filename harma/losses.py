"""HarMA training losses: soft-target contrastive, adaptive triplet and affiliation.

Shapes: a batch holds ``n`` image-caption pairs; ``image_embeds`` and ``text_embeds`` are
``(n, d)`` and row ``i`` of both belongs to pair ``i``. ``image_ids`` ``(n,)`` identifies the
image of each pair (several captions of one image share an id). Embeddings may be raw: every
loss L2-normalises them itself, in float32 or wider, so fp16/bf16 inputs are safe; inside
``torch.autocast`` the losses switch autocast off for their own products, which autocast would
otherwise lower to bf16/fp16 again (at temperature 0.07, neighbouring bf16 logits lie 0.0625 apart).

See ``docs/losses.md`` for the formulas.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harma.distributed import all_gather_no_grad, all_gather_with_grad, is_distributed

__all__ = [
    "TEMPERATURE_MAX",
    "TEMPERATURE_MIN",
    "HarmaLoss",
    "HarmaLossOutput",
    "adaptive_triplet_loss",
    "affiliation_loss",
    "contrastive_loss",
]

TEMPERATURE_MIN = 0.001
TEMPERATURE_MAX = 0.5

_Loss = TypeVar("_Loss", bound=Callable[..., Tensor])


def _without_autocast(loss: _Loss) -> _Loss:
    """Run ``loss`` with autocast off on the device of its first tensor argument, so that its
    products stay in the float32 its inputs were upcast to."""

    @functools.wraps(loss)
    def wrapper(*args, **kwargs):
        device_type = next(arg for arg in (*args, *kwargs.values()) if isinstance(arg, Tensor)).device.type
        if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
            return loss(*args, **kwargs)
        with torch.autocast(device_type, enabled=False):
            return loss(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _upcast(tensor: Tensor) -> Tensor:
    """Return ``tensor`` in float32 unless it already is float32 or wider."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _check_pair_batch(image_embeds: Tensor, text_embeds: Tensor) -> None:
    if image_embeds.ndim != 2 or text_embeds.ndim != 2:
        raise ValueError(
            "image_embeds and text_embeds must be 2-D (n, d); got shapes "
            f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}"
        )
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(
            "image_embeds and text_embeds must have the same shape (one row per image-caption "
            f"pair); got {tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}"
        )
    if image_embeds.shape[0] == 0:
        raise ValueError("the batch is empty (0 image-caption pairs)")


def _as_group_ids(ids: Tensor | None, batch_size: int, device: torch.device, name: str) -> Tensor:
    if ids is None:
        return torch.arange(batch_size, device=device)
    ids = torch.as_tensor(ids, device=device).reshape(-1)
    if ids.shape[0] != batch_size:
        raise ValueError(f"{name} has {ids.shape[0]} entries but the batch has {batch_size} pairs")
    return ids


def _check_non_negative(name: str, value: float) -> None:
    # A NaN option would show only as a NaN loss steps later.
    if not (math.isfinite(float(value)) and float(value) >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _normalized_pair(image_embeds: Tensor, text_embeds: Tensor) -> tuple[Tensor, Tensor]:
    _check_pair_batch(image_embeds, text_embeds)
    return F.normalize(_upcast(image_embeds), dim=-1), F.normalize(_upcast(text_embeds), dim=-1)


def _focal_weight(cost: Tensor, gamma: float) -> Tensor:
    """``(1 - exp(-cost)) ** gamma``, elementwise; ``cost >= 0``.

    expm1 keeps the many tiny costs near the margin accurate. The base is floored at the
    smallest normal float so that for ``gamma < 1`` the power's derivative at a zero cost
    stays finite (it would otherwise be ``inf * 0 = nan``); the floor only touches costs
    below ~1e-38, where the weighted cost is 0 either way.
    """
    base = -torch.expm1(-cost)
    return base.clamp_min(torch.finfo(base.dtype).tiny) ** gamma


@_without_autocast
def contrastive_loss(
    image_embeds: Tensor,
    text_embeds: Tensor,
    image_ids: Tensor | None,
    temperature: float | Tensor,
) -> Tensor:
    """Symmetric InfoNCE with soft targets built from image ids.

    Logits are ``S / temperature`` with ``S_ij = cos(v_i, t_j)``. Target row ``i`` spreads
    probability uniformly over the pairs that show the same image as pair ``i``:
    ``y_ij = 1[id_i = id_j] / #{k : id_k = id_i}``. The loss is the mean of the image-to-text
    and text-to-image cross-entropies (each averaged over the batch). ``y`` is symmetric, so
    the same targets serve both directions.

    Args:
        image_embeds: ``(n, d)``, raw or normalised.
        text_embeds: ``(n, d)``, raw or normalised.
        image_ids: ``(n,)`` integer image identity per pair; ``None`` means all distinct.
        temperature: positive scalar (float or 0-dim tensor, may require grad).

    Returns:
        0-dim tensor, nats.
    """
    images, texts = _normalized_pair(image_embeds, text_embeds)
    ids = _as_group_ids(image_ids, images.shape[0], images.device, "image_ids")
    logits = images @ texts.t() / temperature
    same_image = ids[:, None] == ids[None, :]
    targets = same_image.to(logits.dtype)
    targets = targets / targets.sum(dim=1, keepdim=True)
    loss_image_to_text = -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()
    loss_text_to_image = -(F.log_softmax(logits.t(), dim=1) * targets).sum(dim=1).mean()
    return (loss_image_to_text + loss_text_to_image) / 2


@_without_autocast
def adaptive_triplet_loss(
    image_embeds: Tensor,
    text_embeds: Tensor,
    margin: float = 0.2,
    gamma: float = 2.0,
    hardest_negative: bool = False,
    image_ids: Tensor | None = None,
    same_image_positive: bool = False,
) -> Tensor:
    """HarMA's weighted (focal-style) hinge triplet loss.

    With cosine scores ``s_ij`` and positives on the diagonal:

    * caption retrieval, per image row ``i``: ``c^s_ij = [m + s_ij - s_ii]+``
    * image retrieval, per caption column ``j``: ``c^im_ij = [m + s_ij - s_jj]+``
    * costs on non-negatives (the diagonal, and with ``same_image_positive`` every pair of
      the same image) are set to 0;
    * each cost is weighted by ``w = (1 - exp(-c)) ** gamma`` (the weight is not detached);
    * ``L = (sum w^s c^s + sum w^im c^im) / 2``.

    The sums run over all negatives, so the value grows roughly linearly with the batch size
    (as in the reference); with ``hardest_negative`` only the largest weighted cost of each
    image row and each caption column is kept (VSE++ "max violation").

    Args:
        image_embeds: ``(n, d)``, raw or normalised.
        text_embeds: ``(n, d)``, raw or normalised.
        margin: hinge margin ``m`` in cosine units.
        gamma: focusing exponent of the weight.
        hardest_negative: keep only the hardest negative per row/column.
        image_ids: ``(n,)`` image identity per pair; needed only with ``same_image_positive``.
        same_image_positive: exclude pairs that show the same image from the negatives. The
            default (False) matches the reference, where other captions of the same image
            count as negatives.

    Returns:
        0-dim tensor (cosine units, summed over negatives).
    """
    _check_non_negative("gamma", gamma)
    images, texts = _normalized_pair(image_embeds, text_embeds)
    scores = images @ texts.t()
    positive_scores = scores.diagonal()
    cost_caption = (margin + scores - positive_scores[:, None]).clamp(min=0)
    cost_image = (margin + scores - positive_scores[None, :]).clamp(min=0)

    batch_size = scores.shape[0]
    not_negative = torch.eye(batch_size, dtype=torch.bool, device=scores.device)
    if same_image_positive:
        if image_ids is None:
            raise ValueError("same_image_positive=True needs image_ids")
        ids = _as_group_ids(image_ids, batch_size, scores.device, "image_ids")
        not_negative = not_negative | (ids[:, None] == ids[None, :])
    cost_caption = cost_caption.masked_fill(not_negative, 0.0)
    cost_image = cost_image.masked_fill(not_negative, 0.0)

    weighted_caption = _focal_weight(cost_caption, gamma) * cost_caption
    weighted_image = _focal_weight(cost_image, gamma) * cost_image
    if hardest_negative:
        weighted_caption = weighted_caption.amax(dim=1)
        weighted_image = weighted_image.amax(dim=0)
    return (weighted_caption.sum() + weighted_image.sum()) / 2


@_without_autocast
def affiliation_loss(
    image_embeds: Tensor,
    text_embeds: Tensor,
    labels: Tensor,
    temperature: float | Tensor,
) -> Tensor:
    """Class-centre ("affiliation") loss: pull each sample towards its class centre of the
    other modality.

    For each scene class ``k`` present in the batch, ``C^v_k`` and ``C^t_k`` are the
    L2-normalised means of the normalised image / text embeddings of that class. With
    ``y_i`` the class index of pair ``i``:

        L = ( CE(softmax_k(v_i . C^t_k / T), y_i) + CE(softmax_k(t_i . C^v_k / T), y_i) ) / 2

    averaged over the labelled pairs. The softmax runs over the distinct classes of the
    batch, so a batch with one class gives 0. Negative labels mean "no label" (the datasets
    use -1): those pairs take no part, neither in the centres nor in the average; a batch
    without labelled pairs gives 0. This fixes the reference's ``get_affil_loss``, which read
    an undefined temperature and used one (duplicated) centre per sample with identity
    targets, which made same-class samples compete against themselves.

    Args:
        image_embeds: ``(n, d)``, raw or normalised.
        text_embeds: ``(n, d)``, raw or normalised.
        labels: ``(n,)`` integer scene-class labels, negative for unlabelled pairs.
        temperature: positive scalar (float or 0-dim tensor).

    Returns:
        0-dim tensor, nats.
    """
    images, texts = _normalized_pair(image_embeds, text_embeds)
    labels = _as_group_ids(labels, images.shape[0], images.device, "labels")
    labelled = labels >= 0
    if not bool(labelled.all()):
        if not bool(labelled.any()):
            # Keep the graph connected so callers can always backward through the total.
            return (images.sum() + texts.sum()) * 0.0
        images, texts, labels = images[labelled], texts[labelled], labels[labelled]
    _, class_index = torch.unique(labels, return_inverse=True)
    membership = F.one_hot(class_index).to(images.dtype)  # (n, n_classes)
    image_centres = F.normalize(membership.t() @ images, dim=-1)
    text_centres = F.normalize(membership.t() @ texts, dim=-1)
    loss_image_to_centre = F.cross_entropy(images @ text_centres.t() / temperature, class_index)
    loss_text_to_centre = F.cross_entropy(texts @ image_centres.t() / temperature, class_index)
    return (loss_image_to_centre + loss_text_to_centre) / 2


@dataclass
class HarmaLossOutput:
    """Result of `HarmaLoss`; every field is a 0-dim tensor (``affiliation`` may be None).

    ``loss`` is the total to back-propagate:
    ``contrastive + triplet + affiliation_weight * affiliation``.
    """

    loss: Tensor
    contrastive: Tensor
    triplet: Tensor
    affiliation: Tensor | None = None

    def to_dict(self) -> dict[str, float]:
        """Plain floats for logging (``affiliation`` only when it was computed)."""
        values = {
            "loss": float(self.loss.detach()),
            "contrastive": float(self.contrastive.detach()),
            "triplet": float(self.triplet.detach()),
        }
        if self.affiliation is not None:
            values["affiliation"] = float(self.affiliation.detach())
        return values


class HarmaLoss(nn.Module):
    """HarMA's training objective ``L = L_con + L_tri (+ w * L_aff)`` with a learnable temperature.

    Under ``torch.distributed`` (and ``gather_distributed=True``) the embeddings of all ranks
    are gathered with gradient, and ids/labels without, so every rank computes the loss over
    the global batch. Parameter gradients after DDP's averaging then equal those of a single
    process on the concatenated batch (see `harma.distributed.all_gather_with_grad`).

    Args:
        temperature_init: initial contrastive temperature (0.07 in the reference).
        learnable_temperature: train the temperature (the reference does).
        margin: triplet margin (cosine units).
        gamma: focusing exponent of the triplet weight.
        hardest_negative: triplet keeps only the hardest negative per row/column.
        same_image_positive: triplet stops treating captions of the same image as negatives.
        affiliation_weight: weight of the class-centre loss; 0 disables it (default).
        gather_distributed: gather the global batch across ranks before the losses.
    """

    def __init__(
        self,
        temperature_init: float = 0.07,
        learnable_temperature: bool = True,
        margin: float = 0.2,
        gamma: float = 2.0,
        hardest_negative: bool = False,
        same_image_positive: bool = False,
        affiliation_weight: float = 0.0,
        gather_distributed: bool = True,
    ) -> None:
        super().__init__()
        if not TEMPERATURE_MIN <= temperature_init <= TEMPERATURE_MAX:
            raise ValueError(
                f"temperature_init={temperature_init} is outside [{TEMPERATURE_MIN}, {TEMPERATURE_MAX}]"
            )
        for name, value in (("margin", margin), ("gamma", gamma), ("affiliation_weight", affiliation_weight)):
            _check_non_negative(name, value)
        self.temperature = nn.Parameter(
            torch.tensor(float(temperature_init)), requires_grad=learnable_temperature
        )
        self.margin = margin
        self.gamma = gamma
        self.hardest_negative = hardest_negative
        self.same_image_positive = same_image_positive
        self.affiliation_weight = affiliation_weight
        self.gather_distributed = gather_distributed

    def effective_temperature(self) -> Tensor:
        """The temperature used in the forward pass: the parameter clamped to [0.001, 0.5]."""
        return self.temperature.clamp(TEMPERATURE_MIN, TEMPERATURE_MAX)

    @torch.no_grad()
    def clamp_temperature_(self) -> None:
        """Clamp the stored parameter into [0.001, 0.5] in place.

        Optional: call after ``optimizer.step()`` so the parameter never drifts into the range
        where the forward clamp would block its gradient.
        """
        self.temperature.clamp_(TEMPERATURE_MIN, TEMPERATURE_MAX)

    def forward(
        self,
        image_embeds: Tensor,
        text_embeds: Tensor,
        image_ids: Tensor | None,
        labels: Tensor | None = None,
    ) -> HarmaLossOutput:
        """Compute the losses for a local batch of ``n`` pairs.

        Args:
            image_embeds: ``(n, d)`` raw embeddings of this rank (any float dtype).
            text_embeds: ``(n, d)`` raw embeddings of this rank (any float dtype).
            image_ids: ``(n,)`` image identity per pair (``None``: all distinct).
            labels: ``(n,)`` scene-class labels; required when ``affiliation_weight > 0``.
        """
        use_affiliation = self.affiliation_weight > 0
        if use_affiliation and labels is None:
            raise ValueError("labels are required when affiliation_weight > 0")
        _check_pair_batch(image_embeds, text_embeds)
        device = image_embeds.device
        batch_size = image_embeds.shape[0]
        image_embeds = _upcast(image_embeds)
        text_embeds = _upcast(text_embeds)
        if image_ids is not None:
            image_ids = _as_group_ids(image_ids, batch_size, device, "image_ids")
        if labels is not None:
            labels = _as_group_ids(labels, batch_size, device, "labels")

        if self.gather_distributed and is_distributed():
            image_embeds = all_gather_with_grad(image_embeds)
            text_embeds = all_gather_with_grad(text_embeds)
            if image_ids is None:
                # Pairs of different ranks must not collide, so number them globally.
                image_ids = torch.arange(image_embeds.shape[0], device=device)
            else:
                image_ids = all_gather_no_grad(image_ids)
            if labels is not None:
                labels = all_gather_no_grad(labels)

        temperature = self.effective_temperature()
        contrastive = contrastive_loss(image_embeds, text_embeds, image_ids, temperature)
        triplet = adaptive_triplet_loss(
            image_embeds,
            text_embeds,
            margin=self.margin,
            gamma=self.gamma,
            hardest_negative=self.hardest_negative,
            image_ids=image_ids,
            same_image_positive=self.same_image_positive,
        )
        total = contrastive + triplet
        affiliation = None
        if use_affiliation:
            assert labels is not None
            affiliation = affiliation_loss(image_embeds, text_embeds, labels, temperature)
            total = total + self.affiliation_weight * affiliation
        return HarmaLossOutput(loss=total, contrastive=contrastive, triplet=triplet, affiliation=affiliation)

    def extra_repr(self) -> str:
        return (
            f"temperature={float(self.temperature):.4f}, margin={self.margin}, gamma={self.gamma}, "
            f"hardest_negative={self.hardest_negative}, same_image_positive={self.same_image_positive}, "
            f"affiliation_weight={self.affiliation_weight}, gather_distributed={self.gather_distributed}"
        )
