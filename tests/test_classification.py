"""Zero-shot classification: metrics against an independent loop, ties, bad input, the text
classifier, the evaluator on every model family, adapters disabled and named sets."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from repo_scripts import load_repo_script
from tiny_models import IMAGE_SIZE, perturb_adapters, tiny_hf_clip, tiny_hf_siglip, tiny_open_clip

import harma
from harma.classification import (
    ZeroShotEvaluator,
    class_ranks,
    classification_result,
    combine_prompt_embeddings,
)
from harma.prompts import TEMPLATE_SETS


def per_sample_loop(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The benchmark's independent reference: one sample at a time, plain Python and NumPy."""
    return load_repo_script("benchmarks/classification_eval.py").per_sample_loop(logits, labels)


@pytest.mark.parametrize(("n_images", "n_classes", "seed"), [(200, 45, 0), (57, 7, 1), (31, 3, 2), (10, 5, 3)])
def test_metrics_equal_an_independent_per_sample_loop(n_images, n_classes, seed):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, (n_images,), generator=generator)
    # Scores correlated with the labels so that the metrics are neither 0 nor 100.
    logits = torch.randn(n_images, n_classes, generator=generator)
    logits[torch.arange(n_images), labels] += 1.0
    metrics = harma.classification_metrics(logits, labels)
    expected = per_sample_loop(logits.numpy(), labels.numpy())
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert metrics[key] == value, key
    assert ("acc5" in metrics) == (n_classes >= 5)
    assert 0 < metrics["acc1"] < 100
    # numpy input gives the same
    assert harma.classification_metrics(logits.numpy(), labels.numpy()) == metrics


def test_mean_per_class_recall_is_scikit_learns_balanced_accuracy():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    generator = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 9, (300,), generator=generator)
    logits = torch.randn(300, 9, generator=generator)
    logits[torch.arange(300), labels] += 0.8
    expected = 100.0 * sklearn_metrics.balanced_accuracy_score(labels.numpy(), logits.argmax(1).numpy())
    assert harma.classification_metrics(logits, labels)["mean_per_class_recall"] == pytest.approx(expected)


def test_ties_are_pessimistic_by_default():
    collapsed = torch.zeros(6, 6)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    assert harma.classification_metrics(collapsed, labels) == {"acc1": 0.0, "acc5": 0.0, "mean_per_class_recall": 0.0}
    optimistic = harma.classification_metrics(collapsed, labels, ties="optimistic")
    assert optimistic == {"acc1": 100.0, "acc5": 100.0, "mean_per_class_recall": 100.0}
    # one tie with a wrong class: rank 1 pessimistically, and the wrong class is the prediction
    logits = torch.tensor([[0.9, 0.9, 0.1]])
    ranks, predictions = class_ranks(logits, torch.tensor([1]))
    assert ranks.tolist() == [1] and predictions.tolist() == [0]
    ranks, predictions = class_ranks(logits, torch.tensor([1]), ties="optimistic")
    assert ranks.tolist() == [0] and predictions.tolist() == [1]
    # the tied wrong class comes after the true one: still the wrong class is predicted
    ranks, predictions = class_ranks(logits, torch.tensor([0]))
    assert ranks.tolist() == [1] and predictions.tolist() == [1]
    result = classification_result(torch.tensor([[0.5, 0.5], [0.2, 0.7]]), [0, 1])
    assert result.confusion.tolist() == [[0, 1], [0, 1]] and result.metrics["acc1"] == 50.0


def test_the_result_holds_per_class_recall_and_a_confusion_matrix_that_agree_with_acc1():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.2, 0.3]])
    result = classification_result(logits, [0, 1, 1, 0], classnames=["a", "b", "c"])
    assert result.confusion.tolist() == [[1, 0, 1], [1, 1, 0], [0, 0, 0]]
    assert result.per_class_recall[:2] == [50.0, 50.0] and math.isnan(result.per_class_recall[2])
    assert result.class_counts == [2, 2, 0]
    assert result.metrics == {"acc1": 50.0, "mean_per_class_recall": 50.0}
    assert int(result.confusion.trace()) == 2
    table = result.per_class_table()
    assert "| a | 2 | 50.00 | c (1) |" in table and "| c | 0 | - | - |" in table
    as_dict = result.to_dict()
    assert as_dict["per_class_recall"][2] is None and as_dict["confusion"][0] == [1, 0, 1]
    record = result.clip_benchmark_record("aid", "ViT-B-32", "laion2b")
    assert record["task"] == "zeroshot_classification"
    assert record["metrics"] == {"acc1": 0.5, "acc5": None, "mean_per_class_recall": 0.5}


def test_bad_logits_and_labels_are_named():
    logits = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"labels\[2\] = 3 is not a class: there are 3 classes"):
        harma.classification_metrics(logits, [0, 1, 3, 2])
    with pytest.raises(ValueError, match="labels has 3 entries but there are 4 images"):
        harma.classification_metrics(logits, [0, 1, 2])
    with pytest.raises(ValueError, match="integer class indices"):
        harma.classification_metrics(logits, torch.tensor([0.0, 1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="2-D"):
        harma.classification_metrics(torch.randn(4), [0, 1, 2, 0])
    bad = logits.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"1 NaN or infinite value\(s\) \(1 NaN, 0 infinite\) of 12, the first at logits\[1, 2\]"):
        harma.classification_metrics(bad, [0, 1, 2, 0])


def test_prompt_embeddings_are_combined_as_clip_or_as_georsclip():
    embeddings = torch.tensor([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    normalized = combine_prompt_embeddings(embeddings, [2, 1])
    # CLIP: mean of unit vectors -> (0.5, 0.5) -> 45 degrees, whatever the norms
    torch.testing.assert_close(normalized[0], torch.tensor([1.0, 1.0]) / math.sqrt(2))
    raw = combine_prompt_embeddings(embeddings, [2, 1], combine="raw_mean")
    # GeoRSCLIP: raw mean (1.5, 0.5): the longer embedding pulls the class vector
    torch.testing.assert_close(raw[0], F.normalize(torch.tensor([1.5, 0.5]), dim=0))
    torch.testing.assert_close(normalized[1], raw[1])
    with pytest.raises(ValueError, match="combine must be one of"):
        combine_prompt_embeddings(embeddings, [2, 1], combine="sum")


# --------------------------------------------------------------------------- the evaluator

def open_clip_tokenizer(texts: list[str]) -> torch.Tensor:
    import open_clip

    return open_clip.get_tokenizer("ViT-B-32")(texts)


def small_set(n_images: int = 12, n_classes: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = [(torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=generator), i % n_classes) for i in range(n_images)]
    labels = [label for _, label in images]
    classnames = ["BaseballField", "dense_residential", "Forest", "river"][:n_classes]
    return images, labels, classnames


def manual_scores(model, images, prompts, tokenizer, combine="normalized_mean"):
    """Logits computed by hand with the open_clip interface: the evaluator must agree."""
    with torch.no_grad():
        image_embeds = F.normalize(model.encode_image(torch.stack([image for image, _ in images])), dim=-1)
        flat = [prompt for class_prompts in prompts for prompt in class_prompts]
        text_embeds = model.encode_text(tokenizer(flat))
    classifier = combine_prompt_embeddings(text_embeds, [len(p) for p in prompts], combine)
    return image_embeds @ classifier.t()


@pytest.mark.parametrize("combine", ["normalized_mean", "raw_mean"])
def test_the_evaluator_equals_metrics_of_scores_computed_by_hand(combine):
    model = tiny_open_clip()
    images, labels, classnames = small_set()
    evaluator = ZeroShotEvaluator(images, labels, classnames, open_clip_tokenizer, templates="skyscript",
                                  combine=combine, batch_size=64, progress=False)
    assert evaluator.classnames == ["baseball field", "dense residential", "forest", "river"]
    assert evaluator.prompts[0] == ["a satellite photo of baseball field.", "a satellite image of baseball field."]
    result = evaluator.run(model)
    expected = classification_result(manual_scores(model, images, evaluator.prompts, open_clip_tokenizer, combine),
                                     labels, evaluator.classnames)
    assert result.metrics == expected.metrics
    assert torch.equal(result.ranks, expected.ranks) and torch.equal(result.confusion, expected.confusion)
    assert evaluator(model) == result.metrics
    # batching changes nothing but the speed
    small_batches = ZeroShotEvaluator(images, labels, classnames, open_clip_tokenizer, templates="skyscript",
                                      combine=combine, batch_size=5, progress=False)
    assert small_batches.evaluate(model) == pytest.approx(result.metrics)


def test_scores_are_float32_outside_autocast_whatever_the_encoding_precision(monkeypatch):
    # On CUDA the evaluator encodes under autocast; the scores must not be computed there (bf16
    # steps of about 0.001 at cosine 0.2 merge near ties). CPU autocast stands in for CUDA's.
    import harma.classification as classification

    monkeypatch.setattr(ZeroShotEvaluator, "_autocast",
                        lambda self, device: torch.autocast("cpu", dtype=torch.bfloat16))
    seen = []
    ranks_and_predictions = classification._ranks_and_predictions

    def recording(scores, labels, pessimistic):
        seen.append((scores.dtype, torch.is_autocast_enabled("cpu")))
        return ranks_and_predictions(scores, labels, pessimistic)

    monkeypatch.setattr(classification, "_ranks_and_predictions", recording)
    images, labels, classnames = small_set()
    ZeroShotEvaluator(images, labels, classnames, open_clip_tokenizer, batch_size=5,
                      progress=False).run(tiny_open_clip())
    assert seen and set(seen) == {(torch.float32, False)}


def hash_tokenizer(vocab: int, length: int):
    """Word ids from a hash (the tiny Hugging Face models have their own small vocabularies)."""

    def tokenize(texts: list[str]) -> torch.Tensor:
        ids = torch.zeros(len(texts), length, dtype=torch.long)
        for row, text in enumerate(texts):
            words = [1 + sum(map(ord, word)) % (vocab - 3) for word in text.split()][: length - 1]
            ids[row, : len(words) + 1] = torch.tensor(words + [vocab - 1])
        return ids

    return tokenize


@pytest.mark.parametrize("family", ["hf_clip", "hf_siglip"])
def test_hugging_face_models_are_evaluated_through_their_feature_methods(family):
    model = tiny_hf_clip() if family == "hf_clip" else tiny_hf_siglip()
    length = 77 if family == "hf_clip" else 16
    tokenizer = hash_tokenizer(1000, length)
    images, labels, classnames = small_set()
    evaluator = ZeroShotEvaluator(images, labels, classnames, tokenizer, progress=False)
    result = evaluator.run(model)
    with torch.no_grad():
        image_embeds = model.get_image_features(pixel_values=torch.stack([image for image, _ in images]))
        text_embeds = model.get_text_features(input_ids=tokenizer([p[0] for p in evaluator.prompts]))
    image_embeds = getattr(image_embeds, "pooler_output", image_embeds)
    text_embeds = getattr(text_embeds, "pooler_output", text_embeds)
    expected = classification_result(F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).t(), labels)
    assert result.metrics == expected.metrics


def test_the_evaluator_keeps_each_submodules_mode_and_refuses_models_without_encoders():
    model = tiny_open_clip().train()
    model.visual.eval()
    images, labels, classnames = small_set()
    ZeroShotEvaluator(images, labels, classnames, open_clip_tokenizer, progress=False).evaluate(model)
    assert model.training and not model.visual.training
    with pytest.raises(TypeError, match="no encode_image/encode_text"):
        ZeroShotEvaluator(images, labels, classnames, open_clip_tokenizer, progress=False).evaluate(torch.nn.Linear(2, 2))


def test_adapters_disabled_classify_exactly_as_the_frozen_backbone():
    images, labels, classnames = small_set(n_images=16)
    evaluator = ZeroShotEvaluator(images, labels, classnames, open_clip_tokenizer, templates="remote_sensing",
                                  progress=False)
    frozen = evaluator.run(tiny_open_clip())
    patched = harma.inject_harma_adapters(tiny_open_clip(), harma.HarmaConfig())
    perturb_adapters(patched)
    with harma.disable_adapters(patched):
        disabled = evaluator.run(patched)
    assert disabled.metrics == frozen.metrics
    assert torch.equal(disabled.ranks, frozen.ranks) and torch.equal(disabled.predictions, frozen.predictions)
    # the adapters do change the classifier, so the equality above is not vacuous
    assert not torch.equal(evaluator.classifier(patched), evaluator.classifier(tiny_open_clip()))


def test_named_adapter_sets_are_evaluated_in_turn_and_each_equals_its_set_alone(tmp_path):
    images, labels, classnames = small_set(n_images=16)
    evaluator = ZeroShotEvaluator(images, labels, classnames, open_clip_tokenizer, progress=False)
    alone = {}
    for seed, name in ((3, "first"), (9, "second")):
        model = harma.inject_harma_adapters(tiny_open_clip(), harma.HarmaConfig())
        perturb_adapters(model, seed=seed)
        alone[name] = evaluator.run(model)
        harma.save_adapters(model, tmp_path / f"{name}.safetensors")
    assert not torch.equal(alone["first"].ranks, alone["second"].ranks)
    served = tiny_open_clip()
    for name in alone:
        harma.load_adapters(served, tmp_path / f"{name}.safetensors", adapter_name=name)
    for name, expected in alone.items():
        harma.set_adapter(served, name, inference_mode=True)
        result = evaluator.run(served)
        assert result.metrics == pytest.approx(expected.metrics), name
        assert torch.equal(result.ranks, expected.ranks), name


# --------------------------------------------------------------------------- confusion picture

def test_the_confusion_matrix_is_drawn_as_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    logits = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    result = classification_result(logits, torch.arange(40) % 6, classnames=[f"class {i}" for i in range(6)])
    path = result.plot_confusion(tmp_path / "confusion.png", title="test")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 300


def test_without_matplotlib_the_confusion_picture_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    result = classification_result(torch.eye(3), [0, 1, 2])
    with pytest.raises(ImportError, match=r"harma\[plot\]"):
        result.plot_confusion(tmp_path / "confusion.png")
    assert not (tmp_path / "confusion.png").exists()


def test_template_sets_hold_a_placeholder_each():
    for name, templates in TEMPLATE_SETS.items():
        assert templates and all("{}" in template for template in templates), name
    assert len(TEMPLATE_SETS["remote_sensing"]) == 48
    nouns = ("satellite image", "aerial image", "remote sensing image")
    assert all(sum(noun in t for t in TEMPLATE_SETS["remote_sensing"]) >= 16 for noun in nouns)
