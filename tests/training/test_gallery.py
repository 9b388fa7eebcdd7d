"""Retrieval galleries (harma.training.gallery, gallery_render; HTML and PNG) and
`examples/evaluate.py --gallery`, on the CPU in a few seconds."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from repo_scripts import load_repo_script
from test_trainer import IMAGE_SIZE, make_config

from harma.retrieval import retrieval_metrics, retrieval_metrics_from_embeddings
from harma.training import train
from harma.training.data import RetrievalEvalDataset
from harma.training.gallery import build_gallery, build_gallery_from_embeddings
from harma.training.gallery_render import render_gallery_html, render_gallery_png, write_gallery
from harma.training.synthetic import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[2]
DATA_URI_PREFIX = "data:image/png;base64,"
HOSTILE_CAPTION = '<script>alert("x")</script> & <b>bold</b>'



@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return make_synthetic_dataset(root, num_train_images=16, num_val_images=8, num_test_images=12,
                                   image_size=IMAGE_SIZE, seed=5)


@pytest.fixture(scope="module")
def test_split(data):
    return RetrievalEvalDataset(data.test_file, data.image_root)


def planted_scores(txt2img: list[int], n_images: int, seed: int = 0) -> np.ndarray:
    """Random ``(n_images, n_texts)`` scores, with the correct image of every other caption
    pushed to the top, so a gallery has both hits and misses. Rounded to one decimal so that
    ties occur."""
    rng = np.random.default_rng(seed)
    scores = rng.uniform(0, 1, size=(n_images, len(txt2img))).round(1)
    for caption in range(0, len(txt2img), 2):
        scores[txt2img[caption], caption] = 2.0
    return scores



# ------------------------------------------------------------------------------- ranking


def test_gallery_ranks_and_top_k_agree_with_the_metric_ranks_ties_included():
    txt2img = [0, 0, 1, 2, 2, 2, 3, 4, 5, 5, 6, 6, 6, 6]  # uneven caption counts per image
    scores = planted_scores(txt2img, n_images=7)
    gallery = build_gallery(scores, txt2img, k=5, caption_queries=range(len(txt2img)), image_queries=range(7))
    _, ranks = retrieval_metrics(scores, txt2img, return_ranks=True)
    assert [q.rank for q in gallery.text_to_image] == ranks.t2i.tolist()
    assert [q.rank for q in gallery.image_to_text] == ranks.i2t.tolist()
    queries = [(query, scores[:, query.query]) for query in gallery.text_to_image]
    queries += [(query, scores[query.query, :]) for query in gallery.image_to_text]
    for query, row in queries:
        assert list(query.top_scores) == sorted(query.top_scores, reverse=True)
        assert list(query.top_scores) == [row[item] for item in query.top]
        assert query.best_relevant in query.relevant
        if query.found:
            assert query.hits.index(True) == query.rank and query.top[query.rank] == query.best_relevant
        else:
            assert not any(query.hits)
    assert {q.found for q in gallery.text_to_image} == {True, False}


def test_gallery_from_embeddings_equals_the_gallery_of_the_cosine_matrix():
    generator = torch.Generator().manual_seed(0)
    image_embeds = torch.randn(9, 16, generator=generator)
    text_embeds = torch.randn(27, 16, generator=generator)
    txt2img = [index // 3 for index in range(27)]
    scores = F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).t()
    from_matrix = build_gallery(scores, txt2img, num_queries=4, seed=7)
    from_embeddings = build_gallery_from_embeddings(image_embeds, text_embeds, txt2img, num_queries=4, seed=7)
    for left, right in zip(from_matrix.text_to_image + from_matrix.image_to_text,
                           from_embeddings.text_to_image + from_embeddings.image_to_text, strict=True):
        assert (left.query, left.top, left.rank) == (right.query, right.top, right.rank)
        assert np.allclose(left.top_scores, right.top_scores, atol=1e-6)
    _, ranks = retrieval_metrics_from_embeddings(image_embeds, text_embeds, txt2img, return_ranks=True)
    sampled = [q.query for q in from_embeddings.text_to_image]
    assert [q.rank for q in from_embeddings.text_to_image] == ranks.t2i[sampled].tolist()


def test_queries_are_a_seeded_sample():
    txt2img = [index // 5 for index in range(50)]
    scores = np.random.default_rng(0).normal(size=(10, 50))
    def sampled_captions(seed: int) -> list[int]:
        return [q.query for q in build_gallery(scores, txt2img, num_queries=6, seed=seed).text_to_image]

    assert sampled_captions(1) == sampled_captions(1) and len(set(sampled_captions(1))) == 6
    assert sampled_captions(1) != sampled_captions(2)
    everything = build_gallery(scores, txt2img, num_queries=100, k=20)
    assert len(everything.text_to_image) == 50 and len(everything.image_to_text) == 10
    assert all(len(q.top) == 10 for q in everything.text_to_image)  # k capped at the 10 images
    assert (everything.images_per_query, everything.captions_per_query) == (10, 20)


def test_a_gallery_of_fewer_items_than_k_renders_them_all():
    gallery = build_gallery(np.eye(3), [0, 1, 2], k=5)
    pictures = [Image.new("RGB", (40, 20), colour) for colour in ("red", "green", "blue")]
    document = render_gallery_html(gallery, pictures, ["one", "two", "three"])
    assert "top-3 images" in document and "top-3 captions" in document
    sheet = render_gallery_png(gallery, pictures, ["one", "two", "three"], thumbnail_size=32)
    assert sheet.width == 290 + 4 * (32 + 18)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: build_gallery(np.zeros(5), [0] * 5), "2-D"),
        (lambda: build_gallery(np.zeros((2, 5)), [0, 1, 1]), "txt2img has 3 entries"),
        (lambda: build_gallery(np.zeros((2, 4)), [0, 1, 1, 1], k=0), "k must be a positive integer"),
        (lambda: build_gallery(np.zeros((2, 4)), [0, 1, 1, 1], caption_queries=[4]),
         "caption query indices [4]"),
        (lambda: build_gallery(np.full((2, 4), np.nan), [0, 1, 1, 1]), "NaN"),
        (lambda: build_gallery_from_embeddings(torch.zeros(2, 3), torch.zeros(4, 5), [0, 1, 1, 1]),
         "differ in width"),
    ],
)
def test_bad_gallery_input_is_named(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_rendering_checks_the_images_and_captions_match_the_gallery(tmp_path):
    gallery = build_gallery(np.zeros((2, 4)), [0, 1, 1, 1])
    pictures = [Image.new("RGB", (8, 8))] * 2
    with pytest.raises(ValueError, match="2 images but 3 images"):
        render_gallery_html(gallery, pictures + pictures[:1], ["a"] * 4)
    with pytest.raises(ValueError, match="4 captions but 3 captions"):
        render_gallery_png(gallery, pictures, ["a"] * 3)
    with pytest.raises(ValueError, match="must end in one of"):
        write_gallery(tmp_path / "gallery.jpg", gallery, pictures, ["a"] * 4)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        render_gallery_html(gallery, [tmp_path / "missing.png"] * 2, ["a"] * 4)


# ---------------------------------------------------------------------------------- HTML


class GalleryParser(HTMLParser):
    """Collects what the tests check: query rows per section, images, marked results, scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.section: str | None = None
        self.rows: dict[str, list[int]] = {"text-to-image": [], "image-to-text": []}
        self.results: dict[str, list[dict]] = {"text-to-image": [], "image-to-text": []}
        self.truths: dict[str, list[int]] = {"text-to-image": [], "image-to-text": []}
        self.image_sources: list[str] = []
        self.tags: set[str] = set()
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        classes = (attributes.get("class") or "").split()
        self.tags.add(tag)
        if tag == "section":
            self.section = attributes["id"]
        elif tag == "tr" and "query-row" in classes:
            self.rows[self.section].append(int(attributes["data-query"]))
        elif "result" in classes:
            self.results[self.section].append({
                "query": self.rows[self.section][-1], "position": int(attributes["data-position"]),
                "index": int(attributes["data-index"]), "hit": "hit" in classes,
            })
        elif "truth" in classes:
            self.truths[self.section].append(int(attributes["data-index"]))
        elif tag == "img":
            self.image_sources.append(attributes["src"])

    def handle_data(self, data):
        self.text.append(data)


def test_html_gallery_is_self_contained_marks_the_correct_results_and_escapes_captions(test_split, tmp_path):
    captions = list(test_split.captions)
    captions[0] = HOSTILE_CAPTION
    scores = planted_scores(test_split.txt2img, test_split.num_images)
    gallery = build_gallery(scores, test_split.txt2img, num_queries=6, k=5, seed=3,
                            caption_queries=[0, 1, 2, 3, 4, 5])
    path = write_gallery(tmp_path / "gallery.html", gallery, test_split.image_paths, captions,
                         title="run <x>", metrics={"mean_recall": 12.5}, thumbnail_size=64)
    document = path.read_text(encoding="utf-8")
    parser = GalleryParser()
    parser.feed(document)
    parser.close()

    assert parser.rows["text-to-image"] == [0, 1, 2, 3, 4, 5]
    assert len(gallery.image_to_text) == 6
    assert parser.rows["image-to-text"] == [q.query for q in gallery.image_to_text]
    # k images per caption query, its correct image when missed, one image per image query.
    expected_images = sum(len(q.top) + (not q.found) for q in gallery.text_to_image)
    expected_images += len(gallery.image_to_text)
    assert len(parser.image_sources) == expected_images
    for source in parser.image_sources:
        assert source.startswith(DATA_URI_PREFIX)
        with Image.open(io.BytesIO(base64.b64decode(source.removeprefix(DATA_URI_PREFIX)))) as thumbnail:
            assert thumbnail.format == "PNG" and max(thumbnail.size) == 64

    # Marked exactly where the ranking puts a correct item, and nowhere else.
    _, ranks = retrieval_metrics(scores, test_split.txt2img, return_ranks=True)
    for section, queries, metric_ranks in (("text-to-image", gallery.text_to_image, ranks.t2i),
                                           ("image-to-text", gallery.image_to_text, ranks.i2t)):
        for query in queries:
            cells = [cell for cell in parser.results[section] if cell["query"] == query.query]
            assert [cell["index"] for cell in cells] == list(query.top)
            assert [cell["position"] for cell in cells] == list(range(len(query.top)))
            assert [cell["hit"] for cell in cells] == [item in query.relevant for item in query.top]
            hit_positions = [cell["position"] for cell in cells if cell["hit"]]
            assert (hit_positions[:1] == [int(metric_ranks[query.query])]) == (metric_ranks[query.query] < 5)
        assert parser.truths[section] == [q.best_relevant for q in queries if not q.found]
    assert any(cell["hit"] for cell in parser.results["text-to-image"])
    assert parser.truths["text-to-image"]  # the planted scores leave some captions missed

    # No script, no external resource; the hostile caption is shown as text.
    assert "script" not in parser.tags and "link" not in parser.tags and "<b>" not in document
    assert "&lt;script&gt;" in document and HOSTILE_CAPTION in "".join(parser.text)
    assert "run <x>" in "".join(parser.text) and "http://" not in document and "https://" not in document


# ----------------------------------------------------------------------------------- PNG


def test_png_contact_sheet_has_the_documented_size_and_marks(test_split, tmp_path):
    scores = planted_scores(test_split.txt2img, test_split.num_images)
    gallery = build_gallery(scores, test_split.txt2img, num_queries=4, k=5, seed=0)
    in_memory = [Image.open(path).convert("RGB") for path in test_split.image_paths]
    captions = list(test_split.captions)
    captions[0] = HOSTILE_CAPTION + " " + "very long " * 30
    path = write_gallery(tmp_path / "gallery.png", gallery, in_memory, captions, metrics={"mean_recall": 1.0},
                         thumbnail_size=80)
    with Image.open(path) as sheet:
        assert sheet.format == "PNG" and sheet.mode == "RGB"
        width, height = sheet.size
        pixels = np.asarray(sheet)
    assert width == 290 + 6 * (80 + 18)
    rows = len(gallery.text_to_image) + len(gallery.image_to_text)
    assert rows * (80 + 20) < height < rows * (80 + 80) + 300
    green = (pixels == np.array([30, 140, 60], dtype=np.uint8)).all(axis=-1).sum()
    assert green > 0  # frames and check marks of the correct results


# -------------------------------------------------------------------- evaluate.py --gallery


@pytest.fixture(scope="module")
def tiny_run(data, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("runs") / "tiny"
    train(make_config(data, output_dir, epochs=2, max_steps_per_epoch=1, eval_before_training=True))
    return output_dir



def load_evaluate_script():
    return load_repo_script("examples/evaluate.py", cached=False)


def test_evaluate_script_writes_html_and_png_galleries_from_one_encoding(
    tiny_run, tmp_path, capsys, monkeypatch
):
    from harma.retrieval import RetrievalEvaluator

    encodings = []
    original_encode = RetrievalEvaluator.encode
    monkeypatch.setattr(RetrievalEvaluator, "encode",
                        lambda self, model: encodings.append(1) or original_encode(self, model))
    html_path, png_path = tmp_path / "gallery.html", tmp_path / "gallery.png"
    metrics = load_evaluate_script().main([
        "--run", str(tiny_run), "--json", "--num_workers", "0", "--gallery", str(html_path),
        "--gallery", str(png_path), "--gallery-queries", "3",
    ])
    assert len(encodings) == 1
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == metrics
    assert metrics == json.loads((tiny_run / "results.json").read_text())["test"]
    parser = GalleryParser()
    parser.feed(html_path.read_text(encoding="utf-8"))
    assert len(parser.rows["text-to-image"]) == 3 and len(parser.rows["image-to-text"]) == 3
    assert parser.image_sources and all(source.startswith(DATA_URI_PREFIX) for source in parser.image_sources)
    with Image.open(png_path) as sheet:
        assert sheet.format == "PNG"


def test_evaluate_script_refuses_an_unknown_gallery_format(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_evaluate_script().parse_args(["--run", "x", "--gallery", "gallery.pdf"])
    assert exit_info.value.code == 2 and "must end in one of" in capsys.readouterr().err
