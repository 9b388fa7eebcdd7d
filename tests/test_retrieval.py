from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

import harma.retrieval
from harma.retrieval import (
    METRIC_KEYS,
    RetrievalEvaluator,
    RetrievalRanks,
    retrieval_metrics,
    retrieval_metrics_from_embeddings,
)

# 3 images with 1, 2 and 5 captions.
HAND_TXT2IMG = [0, 1, 1, 2, 2, 2, 2, 2]
HAND_SCORES = torch.tensor(
    [
        #  c0    c1    c2    c3    c4    c5    c6    c7
        [0.90, 0.10, 0.20, 0.30, 0.40, 0.50, 0.60, 0.95],  # image 0: caption 0 behind c7 -> rank 1
        [0.10, 0.20, 0.80, 0.70, 0.30, 0.30, 0.30, 0.30],  # image 1: caption 2 first -> rank 0
        [0.99, 0.98, 0.97, 0.10, 0.20, 0.30, 0.40, 0.96],  # image 2: c7 behind c0, c1, c2 -> rank 3
    ]
)
# Text-to-image, column by column: c0 1, c1 1, c2 1, c3 2, c4 2, c5 2 (tie with image 1
# counted against; 1 when optimistic), c6 1, c7 0.
HAND_T2I_PESSIMISTIC = [1, 1, 1, 2, 2, 2, 1, 0]
HAND_T2I_OPTIMISTIC = [1, 1, 1, 2, 2, 1, 1, 0]


def loop_ranks(scores: np.ndarray, txt2img: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The reference's approach: argsort every row and every column."""
    img2txt: dict[int, list[int]] = {}
    for caption, image in enumerate(txt2img):
        img2txt.setdefault(image, []).append(caption)
    i2t = np.zeros(scores.shape[0], dtype=np.int64)
    for image, row in enumerate(scores):
        order = np.argsort(row)[::-1]
        i2t[image] = min(np.where(order == caption)[0][0] for caption in img2txt[image])
    t2i = np.zeros(scores.shape[1], dtype=np.int64)
    for caption, column in enumerate(scores.T):
        order = np.argsort(column)[::-1]
        t2i[caption] = np.where(order == txt2img[caption])[0][0]
    return i2t, t2i


def random_txt2img(n_images: int, rng: np.random.Generator, max_captions: int = 6) -> list[int]:
    counts = rng.integers(1, max_captions + 1, size=n_images)
    txt2img = np.repeat(np.arange(n_images), counts)
    rng.shuffle(txt2img)
    return txt2img.tolist()


# ---------------------------------------------------------------- hand-made cases


def test_hand_made_ranks_and_recalls() -> None:
    metrics, ranks = retrieval_metrics(HAND_SCORES, HAND_TXT2IMG, return_ranks=True)
    assert ranks.i2t.tolist() == [1, 0, 3]
    assert ranks.t2i.tolist() == HAND_T2I_PESSIMISTIC
    assert ranks.i2t.dtype == torch.long and ranks.t2i.dtype == torch.long
    assert metrics["i2t_r1"] == pytest.approx(100 / 3)
    assert metrics["i2t_r5"] == 100.0 and metrics["i2t_r10"] == 100.0
    assert metrics["t2i_r1"] == pytest.approx(12.5)
    assert metrics["t2i_r5"] == 100.0 and metrics["t2i_r10"] == 100.0
    assert metrics["mean_recall"] == pytest.approx((100 / 3 + 200 + 12.5 + 200) / 6)
    assert tuple(metrics) == METRIC_KEYS


def test_hand_made_optimistic_ties() -> None:
    _, ranks = retrieval_metrics(HAND_SCORES, HAND_TXT2IMG, ties="optimistic", return_ranks=True)
    assert ranks.i2t.tolist() == [1, 0, 3]
    assert ranks.t2i.tolist() == HAND_T2I_OPTIMISTIC


def test_recall_thresholds_at_5_and_10() -> None:
    # 12 images, one caption each; caption j's image is placed exactly at rank j in column j.
    # The 0.01 * j offsets keep rows free of ties so the argsort loop is well defined.
    n = 12
    scores = torch.zeros(n, n)
    for j in range(n):
        others = [i for i in range(n) if i != j]
        order = others[:j] + [j] + others[j:]
        scores[order, j] = torch.arange(n, 0, -1, dtype=torch.float32) + 0.01 * j
    _, ranks = retrieval_metrics(scores, list(range(n)), return_ranks=True)
    assert ranks.t2i.tolist() == list(range(n))
    metrics = retrieval_metrics(scores, list(range(n)))
    assert metrics["t2i_r1"] == pytest.approx(100 / 12)
    assert metrics["t2i_r5"] == pytest.approx(500 / 12)
    assert metrics["t2i_r10"] == pytest.approx(1000 / 12)
    expected_i2t, _ = loop_ranks(scores.numpy(), list(range(n)))
    assert ranks.i2t.tolist() == expected_i2t.tolist()


def test_constant_scores_are_worst_case_when_pessimistic() -> None:
    txt2img = [0, 0, 1, 2, 2, 2]
    scores = torch.full((3, 6), 0.3)
    _, ranks = retrieval_metrics(scores, txt2img, return_ranks=True)
    # i2t: every wrong caption ties with the best one and is placed first.
    assert ranks.i2t.tolist() == [4, 5, 3]
    assert ranks.t2i.tolist() == [2] * 6
    optimistic, optimistic_ranks = retrieval_metrics(scores, txt2img, ties="optimistic", return_ranks=True)
    assert optimistic_ranks.i2t.tolist() == [0, 0, 0]
    assert optimistic["mean_recall"] == 100.0


def test_tie_between_captions_of_the_same_image_does_not_hurt() -> None:
    scores = torch.tensor([[0.9, 0.9, 0.1], [0.2, 0.2, 0.8]])
    metrics, ranks = retrieval_metrics(scores, [0, 0, 1], return_ranks=True)
    assert ranks.i2t.tolist() == [0, 0]
    assert metrics["i2t_r1"] == 100.0


def test_tie_with_a_wrong_caption_counts_against() -> None:
    scores = torch.tensor([[0.9, 0.5, 0.9], [0.2, 0.2, 0.8]])
    _, ranks = retrieval_metrics(scores, [0, 0, 1], return_ranks=True)
    assert ranks.i2t.tolist() == [1, 0]
    _, ranks = retrieval_metrics(scores, [0, 0, 1], ties="optimistic", return_ranks=True)
    assert ranks.i2t.tolist() == [0, 0]


def test_accepts_numpy_lists_and_half_precision() -> None:
    expected = retrieval_metrics(HAND_SCORES, HAND_TXT2IMG)
    assert retrieval_metrics(HAND_SCORES.numpy(), np.array(HAND_TXT2IMG)) == expected
    assert retrieval_metrics(HAND_SCORES.double(), torch.tensor(HAND_TXT2IMG, dtype=torch.int32)) == expected
    # Half precision rounds 0.95/0.96 etc. differently but keeps this matrix's order.
    assert retrieval_metrics(HAND_SCORES.half(), tuple(HAND_TXT2IMG)) == expected


# ---------------------------------------------------------------- random data vs. the loop


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_scores_agree_with_argsort_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_images = int(rng.integers(5, 60))
    txt2img = random_txt2img(n_images, rng)
    scores = rng.standard_normal((n_images, len(txt2img)))  # continuous: no ties
    expected_i2t, expected_t2i = loop_ranks(scores, txt2img)
    for ties in ("pessimistic", "optimistic"):
        _, ranks = retrieval_metrics(scores, txt2img, ties=ties, return_ranks=True)
        np.testing.assert_array_equal(ranks.i2t.numpy(), expected_i2t)
        np.testing.assert_array_equal(ranks.t2i.numpy(), expected_t2i)


@pytest.mark.parametrize("tile_scores", [1, 50, 10**9])
def test_dense_tiling_does_not_change_ranks(monkeypatch: pytest.MonkeyPatch, tile_scores: int) -> None:
    rng = np.random.default_rng(5)
    txt2img = random_txt2img(17, rng)
    scores = rng.integers(0, 4, size=(17, len(txt2img))).astype(np.float32)  # many ties
    expected = retrieval_metrics(scores, txt2img, return_ranks=True)
    monkeypatch.setattr(harma.retrieval, "_DENSE_TILE_SCORES", tile_scores)
    metrics, ranks = retrieval_metrics(scores, txt2img, return_ranks=True)
    assert metrics == expected[0]
    assert torch.equal(ranks.i2t, expected[1].i2t) and torch.equal(ranks.t2i, expected[1].t2i)
    # and against a per-row loop on a continuous matrix
    continuous = rng.standard_normal((17, len(txt2img)))
    _, ranks = retrieval_metrics(continuous, txt2img, return_ranks=True)
    expected_i2t, expected_t2i = loop_ranks(continuous, txt2img)
    np.testing.assert_array_equal(ranks.i2t.numpy(), expected_i2t)
    np.testing.assert_array_equal(ranks.t2i.numpy(), expected_t2i)


def test_metrics_match_reference_formula_on_random_scores() -> None:
    rng = np.random.default_rng(11)
    txt2img = np.repeat(np.arange(40), 5).tolist()
    scores = rng.standard_normal((40, 200)) + 2.0 * (np.arange(40)[:, None] == np.array(txt2img)[None, :])
    i2t, t2i = loop_ranks(scores, txt2img)
    metrics = retrieval_metrics(scores, txt2img)
    for k in (1, 5, 10):
        assert metrics[f"i2t_r{k}"] == pytest.approx(100.0 * np.mean(i2t < k))
        assert metrics[f"t2i_r{k}"] == pytest.approx(100.0 * np.mean(t2i < k))


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
def test_embedding_path_equals_dense_path_with_many_ties(ties: str) -> None:
    # Small integers: every dot product is exact, and ties are frequent.
    generator = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    n_images = 23
    txt2img = random_txt2img(n_images, rng, max_captions=5)
    images = torch.randint(-2, 3, (n_images, 6), generator=generator).float()
    texts = torch.randint(-2, 3, (len(txt2img), 6), generator=generator).float()
    dense_metrics, dense_ranks = retrieval_metrics(images @ texts.t(), txt2img, ties=ties, return_ranks=True)
    for chunk_size in (1, 3, 7, 16, 1000):
        metrics, ranks = retrieval_metrics_from_embeddings(
            images, texts, txt2img, chunk_size=chunk_size, normalize=False, ties=ties, return_ranks=True
        )
        assert isinstance(ranks, RetrievalRanks)
        assert torch.equal(ranks.i2t, dense_ranks.i2t), chunk_size
        assert torch.equal(ranks.t2i, dense_ranks.t2i), chunk_size
        assert metrics == dense_metrics


def test_embedding_path_equals_dense_path_on_random_embeddings() -> None:
    generator = torch.Generator().manual_seed(1)
    rng = np.random.default_rng(1)
    txt2img = random_txt2img(50, rng)
    images = torch.randn(50, 32, generator=generator, dtype=torch.float64)
    texts = torch.randn(len(txt2img), 32, generator=generator, dtype=torch.float64)
    normalized_images = images / images.norm(dim=1, keepdim=True)
    normalized_texts = texts / texts.norm(dim=1, keepdim=True)
    expected = retrieval_metrics(normalized_images @ normalized_texts.t(), txt2img)
    for chunk_size in (3, 8, 13, 4096):  # chunk 1 is covered above; here it would only be slow
        assert retrieval_metrics_from_embeddings(images, texts, txt2img, chunk_size=chunk_size) == expected
    # float32 and half inputs (upcast internally) give the same result on this data
    assert retrieval_metrics_from_embeddings(images.float(), texts.float(), txt2img, chunk_size=9) == expected


def test_embedding_path_returns_metrics_only_by_default() -> None:
    result = retrieval_metrics_from_embeddings(torch.eye(3), torch.eye(3), [0, 1, 2])
    assert isinstance(result, dict)
    assert result["mean_recall"] == 100.0


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("scores", "txt2img", "message"),
    [
        (torch.zeros(3, 8), [0, 1, 2], "txt2img has 3 entries but there are 8 captions"),
        (torch.zeros(3, 4), [0, 1, 2, 3], r"txt2img\[3\] = 3 points at a missing image: there are 3 images"),
        (torch.zeros(3, 4), [0, 1, -1, 2], r"txt2img\[2\] = -1 points at a missing image"),
        (torch.zeros(3, 4), [0, 0, 2, 2], r"1 image\(s\) have no caption in txt2img \(image indices 1\)"),
        (torch.zeros(6), [0] * 6, "scores must be a 2-D"),
        (torch.zeros(2, 3, 4), [0, 1, 1], "scores must be a 2-D"),
        (torch.zeros(2, 3), [0.0, 1.0, 1.0], "integer image indices"),
        (torch.zeros(2, 3), ["0", "1", "1"], "flat sequence of integer image indices"),
        (torch.zeros(2, 3), [[0, 1, 1]], "txt2img must be 1-D"),
        (torch.zeros(0, 3), [0, 0, 0], "no images"),
        (torch.tensor([[0.0, float("nan")], [1.0, 0.0]]), [0, 1], "NaN"),
    ],
)
def test_dense_input_errors(scores: torch.Tensor, txt2img: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(scores, txt2img)


def test_embedding_input_errors() -> None:
    with pytest.raises(ValueError, match="differ in width"):
        retrieval_metrics_from_embeddings(torch.randn(2, 4), torch.randn(2, 5), [0, 1])
    with pytest.raises(ValueError, match="image_embeds must be a 2-D"):
        retrieval_metrics_from_embeddings(torch.randn(4), torch.randn(2, 4), [0, 1])
    with pytest.raises(ValueError, match="txt2img has 2 entries but there are 3 captions"):
        retrieval_metrics_from_embeddings(torch.randn(2, 4), torch.randn(3, 4), [0, 1])
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_metrics_from_embeddings(torch.randn(2, 4), torch.randn(2, 4), [0, 1], chunk_size=0)
    with pytest.raises(ValueError, match="ties must be one of"):
        retrieval_metrics_from_embeddings(torch.randn(2, 4), torch.randn(2, 4), [0, 1], ties="random")
    with pytest.raises(ValueError, match="NaN or infinite"):
        retrieval_metrics_from_embeddings(torch.full((2, 4), float("nan")), torch.randn(2, 4), [0, 1])


# ---------------------------------------------------------------- evaluator


class TinyClip(nn.Module):
    """open_clip-like: encode_image(images) / encode_text(tokens)."""

    def __init__(self, vocab_size: int = 50, width: int = 8) -> None:
        super().__init__()
        self.visual = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, width))
        self.token_embedding = nn.EmbeddingBag(vocab_size, width)
        self.dropout = nn.Dropout(0.5)  # would make train-mode encodings random

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.visual(images))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.token_embedding(tokens))


def toy_tokenizer(captions: list[str]) -> torch.Tensor:
    return torch.tensor([[ord(ch) % 50 for ch in caption[:6].ljust(6)] for caption in captions])


def toy_retrieval_set(n_images: int = 7) -> tuple[list, list[str], list[int]]:
    generator = torch.Generator().manual_seed(3)
    images = [(torch.randn(3, 4, 4, generator=generator), index) for index in range(n_images)]
    txt2img = [i for i in range(n_images) for _ in range(1 + i % 3)]
    captions = [f"cap{i}-{j}" for j, i in enumerate(txt2img)]
    return images, captions, txt2img


def test_evaluator_matches_direct_computation_and_restores_modes() -> None:
    torch.manual_seed(0)
    model = TinyClip()
    model.train()
    model.visual.eval()  # a frozen part kept in eval mode must stay so
    images, captions, txt2img = toy_retrieval_set()
    evaluator = RetrievalEvaluator(images, captions, txt2img, toy_tokenizer, batch_size=3, progress=False)

    metrics = evaluator(model)
    assert model.training and model.token_embedding.training and not model.visual.training

    model.eval()
    with torch.no_grad():
        image_embeds = model.encode_image(torch.stack([image for image, _ in images]))
        text_embeds = model.encode_text(toy_tokenizer(captions))
    model.train()
    expected = retrieval_metrics(
        torch.nn.functional.normalize(image_embeds, dim=1)
        @ torch.nn.functional.normalize(text_embeds, dim=1).t(),
        txt2img,
    )
    assert metrics == pytest.approx(expected)
    encoded_images, encoded_texts = evaluator.encode(model)
    torch.testing.assert_close(encoded_images, image_embeds)
    torch.testing.assert_close(encoded_texts, text_embeds)


def test_evaluator_accepts_bare_image_tensors() -> None:
    torch.manual_seed(0)
    model = TinyClip()
    images, captions, txt2img = toy_retrieval_set()
    with_tuples = RetrievalEvaluator(images, captions, txt2img, toy_tokenizer, progress=False).evaluate(model)
    bare = [image for image, _ in images]
    assert (
        RetrievalEvaluator(bare, captions, txt2img, toy_tokenizer, progress=False).evaluate(model)
        == with_tuples
    )


def test_evaluator_validates_txt2img() -> None:
    images, captions, _ = toy_retrieval_set(3)
    with pytest.raises(ValueError, match="have no caption"):
        RetrievalEvaluator(images, captions[:2], [0, 0], toy_tokenizer)


@pytest.mark.parametrize(("options", "message"), [
    ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
    ({"batch_size": 2.5}, "batch_size must be an integer >= 1, got 2.5"),
    ({"num_workers": -1}, "num_workers must be an integer >= 0, got -1"),
    ({"num_workers": True}, "num_workers must be an integer >= 0, got True"),
])
def test_evaluator_names_a_bad_batch_size_or_worker_count_before_encoding(options, message) -> None:
    images, captions, txt2img = toy_retrieval_set(3)
    with pytest.raises(ValueError, match=re.escape(message)):
        RetrievalEvaluator(images, captions, txt2img, toy_tokenizer, **options)


def test_evaluator_from_dataset_uses_its_captions() -> None:
    torch.manual_seed(0)
    model = TinyClip()
    images, captions, txt2img = toy_retrieval_set()

    class EvalSplit(list):
        pass

    split = EvalSplit(images)
    split.captions, split.txt2img = captions, txt2img
    evaluator = RetrievalEvaluator.from_dataset(split, toy_tokenizer, batch_size=4, progress=False)
    direct = RetrievalEvaluator(images, captions, txt2img, toy_tokenizer, progress=False)
    assert evaluator.batch_size == 4
    assert evaluator.evaluate(model) == direct.evaluate(model)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_scores_are_rejected_with_count_and_place(bad: float) -> None:
    scores = torch.eye(3, dtype=torch.float64)
    scores[1, 2] = bad
    scores[2, 0] = bad
    kind = "2 NaN, 0 infinite" if bad != bad else "0 NaN, 2 infinite"
    with pytest.raises(ValueError, match=rf"scores contain 2 NaN or infinite value\(s\) \({kind}\) of 9, "
                                         rf"the first at scores\[1, 2\]"):
        retrieval_metrics(scores, [0, 1, 2])
    with pytest.raises(ValueError, match=r"scores contain 2 NaN or infinite"):
        retrieval_metrics(scores.numpy(), [0, 1, 2])


def test_non_finite_embeddings_are_named_like_scores() -> None:
    texts = torch.randn(3, 4)
    texts[2, 1] = float("inf")
    with pytest.raises(ValueError, match=r"text_embeds contain 1 NaN or infinite value\(s\) \(0 NaN, 1 infinite\) "
                                         r"of 12, the first at text_embeds\[2, 1\]"):
        retrieval_metrics_from_embeddings(torch.randn(3, 4), texts, [0, 1, 2])


def test_finite_scores_whose_sum_overflows_are_accepted() -> None:
    scores = torch.full((2, 2), 3e38, dtype=torch.float32)  # the sum is inf in float32
    scores[0, 1] = scores[1, 0] = 0
    assert retrieval_metrics(scores, [0, 1])["mean_recall"] == 100.0
