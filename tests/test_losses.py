from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from harma.losses import (
    HarmaLoss,
    HarmaLossOutput,
    adaptive_triplet_loss,
    affiliation_loss,
    contrastive_loss,
)


def focal_weight(cost: float, gamma: float = 2.0) -> float:
    return (1.0 - math.exp(-cost)) ** gamma


def triplet_by_loop(
    images: torch.Tensor,
    texts: torch.Tensor,
    margin: float = 0.2,
    gamma: float = 2.0,
    hardest: bool = False,
    ids: list[int] | None = None,
) -> float:
    """DESIGN section 4 written as plain loops (ids given: same-id pairs are not negatives)."""
    scores = (F.normalize(images.double(), dim=1) @ F.normalize(texts.double(), dim=1).t()).tolist()
    n = len(scores)

    def is_negative(i: int, j: int) -> bool:
        return i != j and (ids is None or ids[i] != ids[j])

    caption_costs = [[0.0] * n for _ in range(n)]
    image_costs = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if is_negative(i, j):
                c_s = max(0.0, margin + scores[i][j] - scores[i][i])
                c_im = max(0.0, margin + scores[i][j] - scores[j][j])
                caption_costs[i][j] = focal_weight(c_s, gamma) * c_s
                image_costs[i][j] = focal_weight(c_im, gamma) * c_im
    if hardest:
        caption_total = sum(max(caption_costs[i]) for i in range(n))
        image_total = sum(max(image_costs[i][j] for i in range(n)) for j in range(n))
    else:
        caption_total = sum(map(sum, caption_costs))
        image_total = sum(map(sum, image_costs))
    return (caption_total + image_total) / 2


def random_batch(n: int = 8, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    # Texts correlated with their images so that some hinge costs are zero and some are not.
    texts = images + 2.0 * torch.randn(n, dim, generator=generator, dtype=torch.float64)
    return images, texts


# ---------------------------------------------------------------- contrastive


def test_contrastive_two_by_two_by_hand() -> None:
    identity = torch.eye(2)
    expected = math.log(1 + math.exp(-2))  # logits [[2, 0], [0, 2]] at temperature 0.5
    loss = contrastive_loss(identity, identity, torch.tensor([0, 1]), 0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_contrastive_normalises_raw_embeddings() -> None:
    identity = torch.eye(2)
    loss = contrastive_loss(3.0 * identity, 0.25 * identity, torch.tensor([0, 1]), 0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)


def test_contrastive_soft_targets_for_repeated_ids() -> None:
    identity = torch.eye(2)
    # Both pairs show the same image: each row's target is (1/2, 1/2).
    expected = math.log(math.exp(2) + 1) - 1
    loss = contrastive_loss(identity, identity, torch.tensor([7, 7]), 0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_contrastive_soft_targets_match_explicit_cross_entropy() -> None:
    images, texts = random_batch(6)
    ids = torch.tensor([0, 0, 1, 2, 2, 2])
    temperature = 0.07
    logits = F.normalize(images, dim=1) @ F.normalize(texts, dim=1).t() / temperature
    same = (ids[:, None] == ids[None, :]).double()
    targets = same / same.sum(1, keepdim=True)
    expected = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
    assert contrastive_loss(images, texts, ids, temperature).item() == pytest.approx(
        expected.item(), rel=1e-10
    )


def test_contrastive_none_ids_means_all_distinct() -> None:
    images, texts = random_batch(5)
    a = contrastive_loss(images, texts, None, 0.1)
    b = contrastive_loss(images, texts, torch.arange(5), 0.1)
    assert a.item() == pytest.approx(b.item(), rel=1e-12)


# ---------------------------------------------------------------- triplet


def test_triplet_two_by_two_by_hand() -> None:
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    texts = torch.tensor([[1.0, 0.0], [0.96, 0.28]], dtype=torch.float64)
    # scores [[1, .96], [0, .28]]: caption cost of (0, 1) = .16, image cost of (0, 1) = .88.
    expected = (focal_weight(0.16) * 0.16 + focal_weight(0.88) * 0.88) / 2
    assert adaptive_triplet_loss(images, texts).item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_triplet_default_equals_loop_of_design_formula(seed: int) -> None:
    images, texts = random_batch(7, seed=seed)
    expected = triplet_by_loop(images, texts)
    assert expected > 0
    assert adaptive_triplet_loss(images, texts).item() == pytest.approx(expected, rel=1e-9)


def test_triplet_default_ignores_image_ids() -> None:
    images, texts = random_batch(6)
    ids = torch.tensor([0, 0, 0, 1, 1, 2])
    default = adaptive_triplet_loss(images, texts)
    assert adaptive_triplet_loss(images, texts, image_ids=ids).item() == default.item()


def test_triplet_hardest_negative_keeps_max_per_row_and_column() -> None:
    images, texts = random_batch(7, seed=3)
    hardest = adaptive_triplet_loss(images, texts, hardest_negative=True).item()
    assert hardest == pytest.approx(triplet_by_loop(images, texts, hardest=True), rel=1e-9)
    assert 0 < hardest < adaptive_triplet_loss(images, texts).item()


def test_triplet_same_image_positive_drops_same_image_negatives() -> None:
    images, texts = random_batch(6, seed=4)
    ids = [0, 0, 1, 1, 1, 2]
    masked = adaptive_triplet_loss(images, texts, image_ids=torch.tensor(ids), same_image_positive=True)
    assert masked.item() == pytest.approx(triplet_by_loop(images, texts, ids=ids), rel=1e-9)
    assert masked.item() < adaptive_triplet_loss(images, texts).item()
    # With distinct ids nothing is masked beyond the diagonal.
    distinct = adaptive_triplet_loss(images, texts, image_ids=torch.arange(6), same_image_positive=True)
    assert distinct.item() == pytest.approx(adaptive_triplet_loss(images, texts).item(), rel=1e-12)


def test_triplet_hardest_and_same_image_combined() -> None:
    images, texts = random_batch(6, seed=5)
    ids = [0, 0, 1, 2, 2, 3]
    value = adaptive_triplet_loss(
        images, texts, hardest_negative=True, image_ids=torch.tensor(ids), same_image_positive=True
    )
    assert value.item() == pytest.approx(triplet_by_loop(images, texts, hardest=True, ids=ids), rel=1e-9)


def test_triplet_same_image_positive_needs_ids() -> None:
    images, texts = random_batch(3)
    with pytest.raises(ValueError, match="needs image_ids"):
        adaptive_triplet_loss(images, texts, same_image_positive=True)


def test_triplet_gamma_below_one_has_finite_gradient() -> None:
    images, texts = random_batch(5)
    images.requires_grad_(True)
    adaptive_triplet_loss(images, texts, gamma=0.5).backward()
    assert torch.isfinite(images.grad).all()


# ---------------------------------------------------------------- affiliation


def affiliation_by_loop(
    images: torch.Tensor, texts: torch.Tensor, labels: list[int], temperature: float
) -> float:
    images = F.normalize(images.double(), dim=1)
    texts = F.normalize(texts.double(), dim=1)
    classes = sorted(set(labels))
    members = {k: [i for i, label in enumerate(labels) if label == k] for k in classes}
    image_centres = torch.stack([F.normalize(images[members[k]].mean(0), dim=0) for k in classes])
    text_centres = torch.stack([F.normalize(texts[members[k]].mean(0), dim=0) for k in classes])
    total = 0.0
    for i, label in enumerate(labels):
        target = classes.index(label)
        total -= torch.log_softmax(images[i] @ text_centres.t() / temperature, 0)[target].item()
        total -= torch.log_softmax(texts[i] @ image_centres.t() / temperature, 0)[target].item()
    return total / (2 * len(labels))


def test_affiliation_equals_loop() -> None:
    images, texts = random_batch(7, seed=6)
    labels = [3, 1, 3, 3, 9, 1, 9]
    value = affiliation_loss(images, texts, torch.tensor(labels), 0.07)
    assert value.item() == pytest.approx(affiliation_by_loop(images, texts, labels, 0.07), rel=1e-9)


def test_affiliation_ignores_unlabelled_pairs() -> None:
    images, texts = random_batch(7, seed=9)
    labels = torch.tensor([3, -1, 3, 5, -1, 5, 5])
    keep = labels >= 0
    value = affiliation_loss(images, texts, labels, 0.1)
    expected = affiliation_by_loop(images[keep], texts[keep], labels[keep].tolist(), 0.1)
    assert value.item() == pytest.approx(expected, rel=1e-9)
    images.requires_grad_(True)
    nothing = affiliation_loss(images, texts, torch.full((7,), -1), 0.1)
    nothing.backward()
    assert nothing.item() == 0.0 and torch.equal(images.grad, torch.zeros_like(images))


def test_affiliation_single_class_is_zero() -> None:
    images, texts = random_batch(4)
    assert affiliation_loss(images, texts, torch.zeros(4, dtype=torch.long), 0.07).item() == 0.0


# ---------------------------------------------------------------- HarmaLoss


def test_harma_loss_total_and_dict() -> None:
    images, texts = random_batch(6)
    ids = torch.tensor([0, 0, 1, 2, 3, 3])
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    criterion = HarmaLoss(affiliation_weight=0.5)
    output = criterion(images, texts, ids, labels)
    assert isinstance(output, HarmaLossOutput)
    assert output.contrastive.item() == pytest.approx(contrastive_loss(images, texts, ids, 0.07).item())
    assert output.triplet.item() == pytest.approx(adaptive_triplet_loss(images, texts).item())
    assert output.affiliation is not None
    expected_total = output.contrastive + output.triplet + 0.5 * output.affiliation
    assert output.loss.item() == pytest.approx(expected_total.item())
    logged = output.to_dict()
    assert set(logged) == {"loss", "contrastive", "triplet", "affiliation"}
    assert all(isinstance(value, float) for value in logged.values())


def test_harma_loss_without_affiliation() -> None:
    images, texts = random_batch(4)
    output = HarmaLoss()(images, texts, torch.arange(4))
    assert output.affiliation is None
    assert set(output.to_dict()) == {"loss", "contrastive", "triplet"}
    assert output.loss.item() == pytest.approx((output.contrastive + output.triplet).item())


def test_harma_loss_affiliation_needs_labels() -> None:
    images, texts = random_batch(4)
    with pytest.raises(ValueError, match="labels are required"):
        HarmaLoss(affiliation_weight=1.0)(images, texts, torch.arange(4))


def test_harma_loss_options_reach_triplet() -> None:
    images, texts = random_batch(6, seed=7)
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    output = HarmaLoss(hardest_negative=True, same_image_positive=True, margin=0.3, gamma=1.0)(
        images, texts, ids
    )
    expected = triplet_by_loop(images, texts, margin=0.3, gamma=1.0, hardest=True, ids=ids.tolist())
    assert output.triplet.item() == pytest.approx(expected, rel=1e-9)


def test_gradient_reaches_temperature_and_embeddings() -> None:
    images, texts = random_batch(5)
    images = images.float().requires_grad_(True)
    criterion = HarmaLoss()
    criterion(images, texts.float(), torch.tensor([0, 0, 1, 2, 3])).loss.backward()
    assert criterion.temperature.grad is not None and criterion.temperature.grad.abs().item() > 0
    assert images.grad is not None and torch.isfinite(images.grad).all()


def test_fixed_temperature_is_not_trained() -> None:
    criterion = HarmaLoss(learnable_temperature=False)
    assert not criterion.temperature.requires_grad
    assert isinstance(criterion.temperature, torch.nn.Parameter)


def test_temperature_is_clamped() -> None:
    images, texts = random_batch(4)
    criterion = HarmaLoss()
    with torch.no_grad():
        criterion.temperature.fill_(2.0)
    assert criterion.effective_temperature().item() == 0.5
    output = criterion(images, texts, torch.arange(4))
    assert output.contrastive.item() == pytest.approx(
        contrastive_loss(images, texts, None, 0.5).item(), rel=1e-6
    )
    criterion.clamp_temperature_()
    assert criterion.temperature.item() == 0.5
    with pytest.raises(ValueError, match="temperature_init"):
        HarmaLoss(temperature_init=1.0)


@pytest.mark.parametrize("ids", [torch.tensor([0]), None])
def test_batch_of_one_is_finite(ids: torch.Tensor | None) -> None:
    criterion = HarmaLoss(affiliation_weight=1.0)
    image = torch.randn(1, 8, requires_grad=True)
    output = criterion(image, torch.randn(1, 8), ids, torch.tensor([4]))
    output.loss.backward()
    for value in output.to_dict().values():
        assert math.isfinite(value)
    assert output.triplet.item() == 0.0
    assert torch.isfinite(image.grad).all()


def test_all_equal_ids_are_finite() -> None:
    images, texts = random_batch(5)
    images = images.float().requires_grad_(True)
    output = HarmaLoss(same_image_positive=True)(images, texts.float(), torch.zeros(5, dtype=torch.long))
    output.loss.backward()
    assert math.isfinite(output.loss.item())
    assert output.triplet.item() == 0.0  # every other pair shows the same image: no negatives
    assert torch.isfinite(images.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype: torch.dtype) -> None:
    images, texts = random_batch(8, seed=8)
    ids = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6])
    low_images = (images * 50).to(dtype).requires_grad_(True)  # large raw norms would overflow fp16 dots
    low_texts = (texts * 50).to(dtype)
    criterion = HarmaLoss(affiliation_weight=1.0)
    output = criterion(low_images, low_texts, ids, ids % 3)
    output.loss.backward()
    assert output.loss.dtype == torch.float32
    assert torch.isfinite(output.loss)
    assert low_images.grad is not None and torch.isfinite(low_images.grad.float()).all()
    reference = criterion(low_images.detach().double(), low_texts.double(), ids, ids % 3)
    assert output.loss.item() == pytest.approx(reference.loss.item(), rel=1e-4)


def test_losses_compute_in_float32_under_autocast(monkeypatch) -> None:
    """Autocast lowers matrix products to bf16 (on the CPU as on CUDA); the losses switch it off
    for theirs: float32 logits, and the values and gradients of the plain float32 call."""
    images, texts = (x.float() for x in random_batch(16, seed=9))
    ids, labels = torch.arange(16) // 2, torch.arange(16) % 4
    criterion = HarmaLoss(affiliation_weight=1.0)
    logit_dtypes = []
    log_softmax = F.log_softmax
    monkeypatch.setattr(F, "log_softmax", lambda x, *a, **k: logit_dtypes.append(x.dtype) or log_softmax(x, *a, **k))

    def run(autocast: bool) -> tuple[torch.Tensor, ...]:
        leaf = images.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            output = criterion(leaf, texts, ids, labels)
            # autocast is on here: a product outside the loss is lowered (the test would be void otherwise)
            assert (leaf @ texts.t()).dtype == (torch.bfloat16 if autocast else torch.float32)
        output.loss.backward()
        return output.contrastive, output.triplet, output.affiliation, leaf.grad

    plain, under_autocast = run(False), run(True)
    assert logit_dtypes == [torch.float32] * 4  # both directions of the contrastive loss, twice
    for got, expected in zip(under_autocast, plain, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        alone = contrastive_loss(image_embeds=images, text_embeds=texts, image_ids=ids, temperature=0.07)
    assert alone.dtype == torch.float32 and alone.item() == contrastive_loss(images, texts, ids, 0.07).item()


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="same shape"):
        contrastive_loss(torch.randn(3, 4), torch.randn(2, 4), None, 0.1)
    with pytest.raises(ValueError, match="2-D"):
        adaptive_triplet_loss(torch.randn(3), torch.randn(3))
    with pytest.raises(ValueError, match="image_ids has 2 entries"):
        contrastive_loss(torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0, 1]), 0.1)


@pytest.mark.parametrize(("options", "message"), [
    ({"margin": float("nan")}, "margin must be a finite number >= 0, got nan"),
    ({"margin": -0.1}, "margin must be a finite number >= 0, got -0.1"),
    ({"gamma": float("nan")}, "gamma must be a finite number >= 0, got nan"),
    ({"gamma": float("inf")}, "gamma must be a finite number >= 0, got inf"),
    ({"affiliation_weight": float("nan")}, "affiliation_weight must be a finite number >= 0, got nan"),
    ({"temperature_init": float("nan")}, "temperature_init=nan is outside [0.001, 0.5]"),
])
def test_harma_loss_names_non_finite_or_negative_options_when_built(options, message) -> None:
    # A NaN option would only show as a NaN loss steps later, blamed on the learning rate.
    with pytest.raises(ValueError, match=re.escape(message)):
        HarmaLoss(**options)
    if "gamma" in options:
        image, text = torch.randn(2, 4), torch.randn(2, 4)
        with pytest.raises(ValueError, match=re.escape(message)):
            adaptive_triplet_loss(image, text, gamma=options["gamma"])
