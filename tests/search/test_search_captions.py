"""Archive search reads every caption format harma reads (`harma.training.captions`), with the
reader options of examples/evaluate.py; images stored inside a Hugging Face dataset are indexed
and served from its folder."""

from __future__ import annotations

import io
import json
import shutil
import sys

import numpy as np
import pytest
from PIL import Image
from repo_scripts import load_repo_script
from search_support import run_search

from harma.search import SearchIndex, annotation_source
from harma.training.options import caption_reader_options

ROOFS, FIELD, OTHER = "roofs/img000.png", "fields/img001.png", "roofs/img002.png"


def write_formats(folder, images) -> dict[str, tuple[object, list[str]]]:
    """One small dataset per format over three archive images: ``{format: (annotation, options)}``;
    the test split holds ROOFS (two captions) and FIELD, the train split OTHER."""
    folder.mkdir(parents=True, exist_ok=True)
    karpathy = {"images": [
        {"filename": "img000.png", "filepath": "roofs", "split": "test",
         "sentences": [{"raw": "red roofs"}, {"raw": "houses"}]},
        {"filename": "img001.png", "filepath": "fields", "split": "test", "sentences": [{"raw": "a field"}]},
        {"filename": "img002.png", "filepath": "roofs", "split": "train", "sentences": [{"raw": "roofs"}]},
    ]}
    nwpu = {"roofs": [{"filename": "img000.png", "split": "test", "raw": "red roofs", "raw_1": "houses"},
                      {"filename": "img002.png", "split": "train", "raw": "roofs"}],
            "fields": [{"filename": "img001.png", "split": "test", "raw": "a field"}]}
    rsitmd = [{"image": ROOFS, "caption": ["red roofs", "houses"], "label_name": "roofs"},
              {"image": FIELD, "caption": ["a field"], "label_name": "fields"}]
    (folder / "dataset_tiny.json").write_text(json.dumps(karpathy))
    (folder / "dataset_nwpu.json").write_text(json.dumps(nwpu))
    (folder / "test.json").write_text(json.dumps(rsitmd))
    (folder / "test.csv").write_text(f"path,text\n{ROOFS},red roofs\n{ROOFS},houses\n{FIELD},a field\n")
    return {
        "karpathy": (folder / "dataset_tiny.json", ["--split", "test"]),
        "nwpu": (folder / "dataset_nwpu.json", ["--split", "test"]),
        "rsitmd": (folder / "test.json", []),
        "csv": (folder / "test.csv", ["--csv-img-key", "path", "--csv-caption-key", "text", "--csv-separator", ","]),
    }


def hugging_face_dataset(folder, images, stored: bool):
    """A saved DatasetDict (test: ROOFS, FIELD; train: OTHER): image paths, or the images' PNG
    bytes stored in the dataset (``stored``)."""
    datasets = pytest.importorskip("datasets")
    splits = {}
    for split, paths, captions in (("test", [ROOFS, FIELD], [["red roofs", "houses"], ["a field"]]),
                                   ("train", [OTHER], [["roofs"]])):
        columns = {"filename": [path.split("/")[1] for path in paths], "captions": captions}
        if stored:
            columns["image"] = [{"bytes": (images / path).read_bytes(), "path": None} for path in paths]
            features = datasets.Features({"filename": datasets.Value("string"),
                                          "captions": datasets.Sequence(datasets.Value("string")),
                                          "image": datasets.Image()})
            splits[split] = datasets.Dataset.from_dict(columns, features=features)
        else:
            splits[split] = datasets.Dataset.from_dict({**columns, "image": paths})
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return folder


def items_of(source) -> list[tuple[str, tuple[str, ...], str | None]]:
    return [(item.path, item.captions, item.label) for item in source.items]


def test_every_caption_format_is_an_annotation_source(archive, tmp_path):
    formats = write_formats(tmp_path / "captions", archive.images)
    expected = [(ROOFS, ("red roofs", "houses")), (FIELD, ("a field",))]
    for name, (annotation, options) in formats.items():
        args = load_repo_script("examples/evaluate.py", cached=False).parse_args(
            ["--run", "x", "--annotation", str(annotation), *options])
        source = annotation_source(annotation, archive.images, **caption_reader_options(args))
        assert [(path, captions) for path, captions, _ in items_of(source)] == expected, name
        assert source.description["format"] == name and source.kind == "annotation"
    # Labels: NWPU's class, the RSITMD layout's label_name.
    assert [item.label for item in annotation_source(formats["nwpu"][0], archive.images, split="test").items] \
        == ["roofs", "fields"]
    assert [item.label for item in annotation_source(formats["rsitmd"][0], archive.images).items] == ["roofs", "fields"]
    saved = hugging_face_dataset(tmp_path / "hf-paths", archive.images, stored=False)
    source = annotation_source(saved, archive.images, split="test")
    assert [(path, captions) for path, captions, _ in items_of(source)] == expected
    assert all(item.stored is None for item in source.items)  # files under the image root


def test_an_index_of_any_format_carries_the_captions_and_labels(archive, tmp_path):
    formats = write_formats(tmp_path / "captions", archive.images)
    annotation, options = formats["csv"]
    out = tmp_path / "csv-index"
    run_search("index", "--annotation", str(annotation), "--image_root", str(archive.images), *options,
               "--out", str(out), *archive.model_args(), "--num_workers", "0", "--quiet")
    index = SearchIndex(out, use_faiss=False)
    assert [(index.item(i)["path"], index.item(i)["captions"]) for i in range(len(index))] == [
        (ROOFS, ["red roofs", "houses"]), (FIELD, ["a field"])]
    assert index.manifest.source["csv_separator"] == "," and index.image_bytes(1) == (archive.images / FIELD).read_bytes()
    out = tmp_path / "nwpu-index"
    run_search("index", "--annotation", str(formats["nwpu"][0]), "--image_root", str(archive.images),
               "--split", "train", "--out", str(out), *archive.model_args(), "--num_workers", "0", "--quiet")
    result = json.loads(run_search("query", str(out), "--item", "0", "--json").stdout)
    assert [(r["path"], r["captions"], r["label"]) for r in result] == [(OTHER, ["roofs"], "roofs")]


def test_images_stored_in_a_hugging_face_dataset_are_indexed_and_served(archive, tmp_path, monkeypatch):
    saved = hugging_face_dataset(tmp_path / "hf", archive.images, stored=True)
    out = tmp_path / "hf-index"
    run_search("index", "--annotation", str(saved), "--split", "test", "--out", str(out), *archive.model_args(),
               "--num_workers", "1", "--batch_size", "1", "--quiet")  # a worker process reads the rows too
    files = tmp_path / "file-index"  # the same images as files
    run_search("index", "--annotation", str(write_formats(tmp_path / "captions", archive.images)["rsitmd"][0]),
               "--image_root", str(archive.images), "--out", str(files), *archive.model_args(), "--num_workers", "0",
               "--quiet")
    index, from_files = SearchIndex(out, use_faiss=False), SearchIndex(files, use_faiss=False)
    assert [index.item(i) for i in range(len(index))] == [
        {"id": 0, "position": 0, "key": "row 0", "path": "img000.png", "row": 0, "captions": ["red roofs", "houses"]},
        {"id": 1, "position": 1, "key": "row 1", "path": "img001.png", "row": 1, "captions": ["a field"]}]
    for row, path in enumerate((ROOFS, FIELD)):
        np.testing.assert_allclose(index.store.vector(row), from_files.store.vector(row), atol=2e-3)
        assert index.image_bytes(row) == (archive.images / path).read_bytes()
    assert index.manifest.source["hf_image_key"] == "image" and index.manifest.source["split"] == "test"

    # The server sends a row's image as PNG, pixel for pixel.
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from harma.search import Searcher
    from harma.search.server import create_app

    client = TestClient(create_app(Searcher.open(out, use_faiss=False)))
    served = client.get("/images/1")
    assert served.status_code == 200 and served.headers["content-type"] == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(served.content)).convert("RGB")),
                          np.asarray(Image.open(archive.images / FIELD).convert("RGB")))
    assert client.get("/thumbs/0").status_code == 200
    # The dataset folder gone: the image is not available (404), the server keeps answering.
    shutil.move(saved, tmp_path / "moved")
    fresh = TestClient(create_app(Searcher.open(out, use_faiss=False)))
    assert fresh.get("/images/1").status_code == 404
    assert fresh.get("/api/search", params={"text": "a field", "k": 1}).status_code == 200
    shutil.move(tmp_path / "moved", saved)
    # Without the datasets package, serve refuses such an index with one error line.
    monkeypatch.setitem(sys.modules, "datasets", None)
    refused = run_search("serve", str(out), check=False)
    assert refused.returncode == 2 and "needs the datasets package: pip install 'harma[datasets]'" in refused.stderr


def test_bad_caption_sources_and_options_are_named(archive, tmp_path):
    formats = write_formats(tmp_path / "captions", archive.images)
    model = archive.model_args()

    def index(*arguments: str) -> str:
        result = run_search("index", *arguments, "--out", str(tmp_path / "index"), *model, "--num_workers", "0",
                            "--quiet", check=False)
        errors = [line for line in result.stderr.splitlines() if "error:" in line]
        assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
        return errors[0]

    karpathy = formats["karpathy"][0]
    assert f"annotation file '{karpathy}': the file holds the splits test (2), train (1) (images): name the one " \
           f"to read" in index("--annotation", str(karpathy))
    line = index("--annotation", str(formats["csv"][0]), "--csv-separator", ",")
    assert "no column ['filepath', 'title'] in the header ['path', 'text']" in line and "--csv-img-key" in line
    assert "--split says how to read --annotation: give it with --annotation" in index(
        "--images", str(archive.images), "--split", "test")
    assert "argument --format: invalid choice: 'coco'" in index("--annotation", str(karpathy), "--format", "coco")
    assert not (tmp_path / "index").exists()
    datasets = pytest.importorskip("datasets")
    with pytest.raises(TypeError, match="save a Hugging Face dataset with save_to_disk and give the folder"):
        annotation_source(datasets.Dataset.from_dict({"image": [ROOFS], "captions": [["x"]]}))
