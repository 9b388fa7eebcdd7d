"""Tests of harma.training.data (annotation files, datasets, transforms) and harma.training.synthetic."""

from __future__ import annotations

import io
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harma.training import data, synthetic
from harma.training.data import (
    DEFAULT_CLIP_MEAN,
    DEFAULT_CLIP_STD,
    RANDOM_OPS,
    RandomOps,
    RetrievalEvalDataset,
    RetrievalTrainDataset,
    check_image_files,
    load_annotations,
    preprocess_caption,
    train_transform,
)
from harma.training.synthetic import (
    SOURCE_STYLE,
    TARGET_STYLE,
    SceneStyle,
    count_word,
    generate_scene,
    make_synthetic_dataset,
)

TRAIN_KEYS = {"caption", "image", "image_id", "label", "label_name"}


# --------------------------------------------------------------------------- helpers

def shared_data_dir() -> Path:
    configured = os.environ.get("HARMA_SHARED_DATA")
    return Path(configured) if configured else Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.fixture(scope="module")
def real_data() -> Path:
    folder = shared_data_dir()
    if not (folder / "rsitmd" / "rsitmd_train.json").is_file():
        pytest.skip(f"real annotation files not found in '{folder}' (set HARMA_SHARED_DATA to the folder "
                    "holding rsitmd/ and rsicd/)")
    return folder


def tiny_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_images(root: Path, relative_paths, size: tuple[int, int] | None = None) -> None:
    if size is None:
        payload = tiny_png()
    else:
        buffer = io.BytesIO()
        Image.new("RGB", size, (120, 90, 60)).save(buffer, format="PNG")
        payload = buffer.getvalue()
    for relative in set(relative_paths):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)


def write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value), encoding="utf-8")
    return path


def small_train_file(tmp_path: Path) -> Path:
    return write_json(tmp_path / "train.json", [
        {"caption": "A red roof.", "image": "train/a.png", "image_id": 7, "label": 0, "label_name": "x"},
        {"caption": "A big red roof!", "image": "train/a.png", "image_id": 7, "label": 0, "label_name": "x"},
        {"caption": "Two green trees.", "image": "train/b.png", "image_id": 3, "label": 1, "label_name": "y"},
        {"caption": "A lake.", "image": "train/c.png", "image_id": 9, "label": 1, "label_name": "y"},
    ])


# --------------------------------------------------------------------------- real annotation files

def test_rsitmd_train_counts(real_data: Path) -> None:
    dataset = RetrievalTrainDataset(real_data / "rsitmd" / "rsitmd_train.json", "/nonexistent", check_files=False)
    assert len(dataset) == 17175
    assert dataset.num_images == 3435
    assert sorted(set(dataset.image_indices)) == list(range(3435))
    assert len(set(dataset.labels)) == 33 and len(dataset.label_names) == 33
    assert np.bincount(dataset.image_indices).tolist() == [5] * 3435
    assert max(len(caption.split()) for caption in dataset.captions) == 30  # three captions are longer


def test_rsitmd_train_with_placeholder_images(real_data: Path, tmp_path: Path) -> None:
    annotation_file = real_data / "rsitmd" / "rsitmd_train.json"
    write_images(tmp_path, [entry["image"] for entry in json.loads(annotation_file.read_text())])
    dataset = RetrievalTrainDataset(annotation_file, tmp_path, transform=data.test_transform(32))
    image, caption, image_index, label = dataset[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert caption == "the river banks decorated with trees grass and houses are connected by bridges"
    assert (image_index, label) == (0, 0)
    assert dataset[5][2] == 1  # next image in order of first appearance


@pytest.mark.parametrize(
    ("relative", "n_images", "has_labels"),
    [
        ("rsitmd/rsitmd_val.json", 856, True),
        ("rsitmd/rsitmd_test.json", 452, False),
        ("rsicd/rsicd_val.json", 1966, False),
        ("rsicd/rsicd_test.json", 1093, False),
    ],
)
def test_eval_files_counts(real_data: Path, relative: str, n_images: int, has_labels: bool) -> None:
    dataset = RetrievalEvalDataset(real_data / relative, "/nonexistent", check_files=False)
    assert len(dataset) == dataset.num_images == n_images
    assert len(dataset.captions) == 5 * n_images
    assert dataset.img2txt[1] == [5, 6, 7, 8, 9]
    assert all(dataset.txt2img[t] == i for i, texts in enumerate(dataset.img2txt) for t in texts)
    assert (dataset.labels is not None) == has_labels
    if has_labels:
        assert len(dataset.labels) == n_images and set(dataset.labels) == set(range(33))


def test_eval_file_with_placeholder_images(real_data: Path, tmp_path: Path) -> None:
    annotation_file = real_data / "rsitmd" / "rsitmd_test.json"
    write_images(tmp_path, [entry["image"] for entry in load_annotations(annotation_file)], size=(7, 5))
    dataset = RetrievalEvalDataset(annotation_file, tmp_path, transform=data.test_transform(16))
    image, index = dataset[451]
    assert image.shape == (3, 16, 16) and index == 451
    assert dataset.image_paths[0] == tmp_path / "test" / "parking_229.tif"


# --------------------------------------------------------------------------- captions

@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("The river banks, decorated with trees.", "the river banks decorated with trees"),
        ("A tennis-court next to a road/railway", "a tennis court next to a road railway"),
        ("it's a  big\tplane\n", "its a big plane"),
        ("the viaduct criss_crossing .", "the viaduct criss crossing"),
        ("wide] road (1 2%) #3 `a` ;", "wide road 1 2 3 a"),
        ("\u201cCurly\u201d quotes \u2014 and dashes\u2026", "curly quotes and dashes"),
        ("   ", ""),
        ("?!.", ""),
        ("Two   planes", "two planes"),
    ],
)
def test_preprocess_caption(raw: str, expected: str) -> None:
    assert preprocess_caption(raw) == expected


def test_preprocess_caption_truncates_words() -> None:
    text = " ".join(f"w{k}" for k in range(40))
    assert preprocess_caption(text).split() == [f"w{k}" for k in range(30)]
    assert preprocess_caption(text, max_words=3) == "w0 w1 w2"
    with pytest.raises(TypeError):
        preprocess_caption(["not", "a", "string"])  # type: ignore[arg-type]


# --------------------------------------------------------------------------- file errors

def test_missing_image_files_message(tmp_path: Path) -> None:
    annotation_file = small_train_file(tmp_path)
    write_images(tmp_path / "images", ["train/a.png"])
    with pytest.raises(FileNotFoundError) as error:
        RetrievalTrainDataset(annotation_file, tmp_path / "images")
    message = str(error.value)
    assert "2 of 3 image files listed in annotation file" in message
    assert "train.json" in message and str(tmp_path / "images") in message
    assert "entry 2: 'train/b.png'" in message and "entry 3: 'train/c.png'" in message
    assert "probably wrong" not in message
    # check_files=False defers the failure to loading
    assert len(RetrievalTrainDataset(annotation_file, tmp_path / "images", check_files=False)) == 4


def test_wrong_image_root_message(tmp_path: Path) -> None:
    annotation_file = small_train_file(tmp_path)
    write_images(tmp_path / "images", ["train/a.png", "train/b.png", "train/c.png"])
    with pytest.raises(FileNotFoundError, match="image root is probably wrong") as error:
        RetrievalTrainDataset(annotation_file, tmp_path)
    assert "3 of 3" in str(error.value)
    with pytest.raises(FileNotFoundError, match="pass its parent folder"):
        RetrievalTrainDataset(annotation_file, tmp_path / "images" / "train")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RetrievalTrainDataset(annotation_file, tmp_path / "no_such_folder")


def test_check_image_files_lists_at_most_max_examples(tmp_path: Path) -> None:
    paths = [f"x/{k}.png" for k in range(12)]
    write_images(tmp_path, paths[:1])
    with pytest.raises(FileNotFoundError) as error:
        check_image_files(paths, tmp_path, source="ann.json", max_examples=3)
    message = str(error.value)
    assert "11 of 12 image files listed in annotation file 'ann.json'" in message
    assert "entry 3:" in message and "entry 4:" not in message and "... and 8 more" in message
    assert check_image_files(paths[:1], tmp_path) == [tmp_path / "x/0.png"]


@pytest.mark.parametrize(
    ("entries", "dataset_class", "pattern"),
    [
        ([{"image": "a.png", "caption": "ok"}, {"image": "b.png", "caption": 5}],
         RetrievalTrainDataset, r"entry 1: 'caption' must be a string"),
        ([{"image": "a.png", "caption": "ok"}, {"image": "b.png", "caption": "..."}],
         RetrievalTrainDataset, r"entry 1, 'caption': '...' is empty after preprocessing"),
        ([{"image": "a.png", "caption": "ok"}, {"caption": "no image"}],
         RetrievalTrainDataset, r"entry 1: missing key\(s\) \['image'\]"),
        ([{"image": "a.png", "caption": ["one", "two"]}],
         RetrievalTrainDataset, r"entry 0: 'caption' is a list: this looks like a val/test file"),
        ([{"image": "a.png", "caption": "x", "label": "3"}],
         RetrievalTrainDataset, r"entry 0: 'label' must be an integer"),
        ([{"image": "a.png", "caption": "x", "image_id": 1}, {"image": "b.png", "caption": "y", "image_id": 1}],
         RetrievalTrainDataset, r"entry 1: image_id 1 names 'b.png' but entry 0 gave it to 'a.png'"),
        ([{"image": "a.png", "caption": ["ok"]}, {"image": "b.png", "caption": []}],
         RetrievalEvalDataset, r"entry 1: 'caption' must be a non-empty list"),
        ([{"image": "a.png", "caption": ["ok", None]}],
         RetrievalEvalDataset, r"entry 0: caption 1 must be a string"),
        ([{"image": "a.png", "caption": "a single caption"}],
         RetrievalEvalDataset, r"entry 0: 'caption' is a single string: this looks like a train file"),
        ([{"image": "", "caption": ["ok"]}],
         RetrievalEvalDataset, r"entry 0: 'image' must be a non-empty path string"),
        ([], RetrievalEvalDataset, r"holds no entries"),
    ],
)
def test_malformed_entries(tmp_path: Path, entries, dataset_class, pattern: str) -> None:
    annotation_file = write_json(tmp_path / "broken.json", entries)
    with pytest.raises(ValueError, match=pattern) as error:
        dataset_class(annotation_file, tmp_path, check_files=False)
    assert "broken.json" in str(error.value)


def test_an_eval_file_listing_an_image_twice_is_refused_naming_both_entries(tmp_path: Path) -> None:
    # The protocol scores each entry as one gallery image: a repeated image would be a second,
    # identical gallery item that counts as wrong for the other entry's captions.
    entries = [{"image": "a/x.png", "caption": ["one"]}, {"image": "b.png", "caption": ["two"]},
               {"image": "./a//x.png", "caption": ["three"]}]
    annotation_file = write_json(tmp_path / "test.json", entries)
    write_images(tmp_path, ["a/x.png", "b.png"])
    for check_files in (True, False):
        with pytest.raises(ValueError, match=r"annotation file '.*test\.json', entry 2: image './a//x\.png' is "
                                             r"listed again \(entry 0 lists 'a/x\.png'\).*merge"):
            RetrievalEvalDataset(annotation_file, tmp_path, check_files=check_files)
    entries[2]["image"] = "c.png"
    write_images(tmp_path, ["c.png"])
    assert RetrievalEvalDataset(write_json(tmp_path / "test.json", entries), tmp_path).num_images == 3


def test_load_annotations_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.json"):
        load_annotations(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json' is not valid JSON"):
        load_annotations(tmp_path / "bad.json")
    write_json(tmp_path / "dict.json", {"image": "a.png"})
    with pytest.raises(ValueError, match="must hold a JSON list"):
        load_annotations(tmp_path / "dict.json")
    write_json(tmp_path / "scalar.json", [{"image": "a", "caption": "b"}, 3])
    with pytest.raises(ValueError, match="entry 1: expected an object"):
        load_annotations(tmp_path / "scalar.json")


def test_train_dataset_items_and_ids(tmp_path: Path) -> None:
    annotation_file = small_train_file(tmp_path)
    write_images(tmp_path, ["train/a.png", "train/b.png", "train/c.png"], size=(9, 6))
    no_ids = write_json(tmp_path / "more.json", [
        {"caption": "Another caption of c.", "image": "train/c.png"},
        {"caption": "A new image.", "image": "train/a.png"},
    ])
    dataset = RetrievalTrainDataset([annotation_file, no_ids], tmp_path)
    assert dataset.num_images == 3 and len(dataset) == 6
    assert dataset.image_indices == [0, 0, 1, 2, 2, 0]  # by path, in order of first appearance
    assert dataset.labels == [0, 0, 1, 1, -1, -1]
    assert dataset.label_names == {0: "x", 1: "y"}
    image, caption, image_index, label = dataset[2]
    assert image.shape == (3, 6, 9) and 0 <= image.min() and image.max() <= 1  # to_tensor without transform
    assert (caption, image_index, label) == ("two green trees", 1, 1)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=2)))
    assert batch[2].tolist() == [0, 0] and list(batch[1]) == ["a red roof", "a big red roof"]


# --------------------------------------------------------------------------- transforms

def test_constants_are_immutable_tuples() -> None:
    assert DEFAULT_CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert DEFAULT_CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    assert isinstance(DEFAULT_CLIP_MEAN, tuple) and isinstance(DEFAULT_CLIP_STD, tuple)


def random_image(width: int = 80, height: int = 60, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_test_transform_shape_and_determinism() -> None:
    transform = data.test_transform(32)
    image = random_image()
    first, second = transform(image), transform(image)
    assert first.shape == (3, 32, 32) and first.dtype == torch.float32
    assert torch.equal(first, second)
    grey = Image.new("RGB", (10, 10), tuple(round(255 * m) for m in DEFAULT_CLIP_MEAN))
    assert transform(grey).abs().max() < 0.01  # CLIP-mean colour normalises to ~0


def test_train_transform_random_but_seeded() -> None:
    transform = train_transform(48)
    image = random_image()
    torch.manual_seed(0)
    first = transform(image)
    torch.manual_seed(0)
    again = transform(image)
    torch.manual_seed(1)
    other = transform(image)
    assert first.shape == (3, 48, 48) and first.dtype == torch.float32
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("op", RANDOM_OPS)
def test_random_ops_keep_type_and_size(op: str) -> None:
    always = RandomOps(num_ops=1, ops=[op], p=1.0)
    pil_out = always(random_image(40, 30))
    assert isinstance(pil_out, Image.Image) and pil_out.size == (40, 30)
    tensor_out = always(torch.randint(0, 256, (3, 30, 40), dtype=torch.uint8))
    assert tensor_out.shape == (3, 30, 40) and tensor_out.dtype == torch.uint8


def test_random_ops_strengths() -> None:
    grey = Image.new("RGB", (16, 16), (100, 100, 100))
    brighter = RandomOps(num_ops=1, ops=["brightness"], p=1.0)(grey)
    assert brighter.getpixel((5, 5)) == (136, 136, 136)  # factor 0.1 + 1.8 * 0.7 = 1.36
    torch.manual_seed(0)
    assert RandomOps(num_ops=2, p=0.0)(grey) is grey
    with pytest.raises(ValueError, match="unknown ops"):
        RandomOps(ops=["solarize"])
    # translation moves by magnitude / 224 of the side: 7 px at 224
    bar = Image.new("RGB", (224, 224), (0, 0, 0))
    bar.paste((255, 255, 255), (100, 0, 101, 224))
    moved = np.asarray(RandomOps(num_ops=1, ops=["translate_x"], p=1.0)(bar))[112, :, 0]
    assert int(np.argmax(moved)) in (93, 107)


# --------------------------------------------------------------------------- synthetic data

@pytest.fixture(scope="module")
def synthetic_source(tmp_path_factory: pytest.TempPathFactory) -> synthetic.SyntheticDataset:
    return make_synthetic_dataset(tmp_path_factory.mktemp("source"), 30, 10, 10, image_size=32, seed=3)


@pytest.fixture(scope="module")
def synthetic_target(tmp_path_factory: pytest.TempPathFactory) -> synthetic.SyntheticDataset:
    return make_synthetic_dataset(tmp_path_factory.mktemp("target"), 30, 10, 10, image_size=32, seed=3,
                                  style="target")


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_synthetic_layout_matches_real_layout(synthetic_source, real_data_optional) -> None:
    train, val, test = (read_json(p) for p in (synthetic_source.train_file, synthetic_source.val_file,
                                               synthetic_source.test_file))
    assert {frozenset(entry) for entry in train} == {frozenset(TRAIN_KEYS)}
    assert {frozenset(entry) for entry in val} == {frozenset({"image", "caption", "label", "label_name"})}
    assert {frozenset(entry) for entry in test} == {frozenset({"image", "caption"})}
    assert len(train) == 5 * 30 and len(val) == len(test) == 10
    assert all(isinstance(entry["caption"], str) and isinstance(entry["image_id"], int) for entry in train)
    assert all(entry["image"].startswith("val/") for entry in val)
    if real_data_optional is not None:
        for relative, generated in (("rsitmd/rsitmd_train.json", train), ("rsitmd/rsitmd_val.json", val),
                                    ("rsitmd/rsitmd_test.json", test)):
            real_entry = read_json(real_data_optional / relative)[0]
            assert set(real_entry) == set(generated[0])
            assert type(real_entry["caption"]) is type(generated[0]["caption"])


@pytest.fixture(scope="module")
def real_data_optional() -> Path | None:
    folder = shared_data_dir()
    return folder if (folder / "rsitmd" / "rsitmd_train.json").is_file() else None


def files_by_name(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_synthetic_is_deterministic(tmp_path: Path) -> None:
    first = make_synthetic_dataset(tmp_path / "a", 12, 4, 4, image_size=32, seed=5)
    make_synthetic_dataset(tmp_path / "b", 12, 4, 4, image_size=32, seed=5)
    make_synthetic_dataset(tmp_path / "c", 12, 4, 4, image_size=32, seed=6)
    a, b, c = (files_by_name(tmp_path / name) for name in "abc")
    assert a == b
    assert len(a) == 12 + 4 + 4 + 4  # images and four JSON files
    assert a["train.json"] != c["train.json"]
    assert sum(a[name] != c.get(name) for name in a if name.endswith(".png")) > 10
    assert first.image_root == tmp_path / "a" / "images"


def test_synthetic_captions_distinct_and_grounded(tmp_path: Path) -> None:
    dataset = make_synthetic_dataset(tmp_path, 60, 5, 5, image_size=32, seed=11)
    metadata = read_json(dataset.metadata_file)
    assert {entry["label_name"] for entry in metadata} == set(synthetic.LABEL_NAMES)
    checked = 0
    for entry in metadata:
        captions = entry["captions"]
        assert len(captions) == 5 and len(set(captions)) == 5
        assert all(preprocess_caption(caption) for caption in captions)
        counts = entry["counts"]
        primary = preprocess_caption(captions[0])
        if entry["label_name"] == "residential":
            n = counts["building"]
            assert re.search(rf"\b{count_word(n)} buildings?\b", primary), (n, primary)
            assert entry["roof_colour"] in primary
            checked += 1
        elif entry["label_name"] == "airport":
            assert f"{count_word(counts['plane'])} plane" in primary
            checked += 1
        elif entry["label_name"] == "parking":
            assert f"{count_word(counts['car'])} car" in primary and entry["car_colour"] in primary
            checked += 1
        elif entry["label_name"] == "industrial":
            assert f"{count_word(counts['factory'])} factor" in primary
            assert f"{count_word(counts['tank'])} storage tank" in primary
            checked += 1
    assert checked >= 20
    # images of one label are told apart by their captions
    residential = [tuple(e["captions"]) for e in metadata if e["label_name"] == "residential"]
    assert len(set(residential)) == len(residential)


def test_count_words() -> None:
    assert [count_word(n) for n in (0, 1, 2, 5, 6, 9, 10, 40)] == [
        "no", "one", "two", "five", "several", "several", "many", "many"]


def test_generate_scene_every_label() -> None:
    for label in synthetic.LABEL_NAMES:
        for seed in range(3):
            scene = generate_scene(label, seed, image_size=32, num_captions=synthetic.MAX_CAPTIONS_PER_IMAGE)
            assert scene.image.size == (32, 32) and scene.image.mode == "RGB"
            assert len(set(scene.captions)) == synthetic.MAX_CAPTIONS_PER_IMAGE
            assert all(len(c.split()) <= 30 for c in scene.captions)
            json.dumps(scene.facts)
    with pytest.raises(ValueError, match="unknown scene label"):
        generate_scene("volcano", 0)


def mean_colour(dataset: synthetic.SyntheticDataset) -> np.ndarray:
    paths = sorted((dataset.image_root / "train").glob("*.png"))
    return np.mean([np.asarray(Image.open(path), dtype=np.float64).mean(axis=(0, 1)) for path in paths], axis=0)


def test_styles_differ(synthetic_source, synthetic_target) -> None:
    source_mean, target_mean = mean_colour(synthetic_source), mean_colour(synthetic_target)
    assert np.abs(source_mean - target_mean).max() > 10
    source_words = " ".join(e["caption"] for e in read_json(synthetic_source.train_file)).lower()
    target_words = " ".join(e["caption"] for e in read_json(synthetic_target.train_file)).lower()
    assert re.search(r"\b(buildings?|trees?|lake|river)\b", source_words)
    assert not re.search(r"\b(buildings?|trees?|lake|river)\b", target_words)
    assert re.search(r"\b(houses?|bush(es)?|pond|stream)\b", target_words)
    assert TARGET_STYLE.scale < SOURCE_STYLE.scale and TARGET_STYLE.noise_std > SOURCE_STYLE.noise_std


def test_scene_style_is_frozen_and_validated(tmp_path: Path) -> None:
    with pytest.raises(Exception):  # noqa: B017 - dataclasses.FrozenInstanceError
        SOURCE_STYLE.noise_std = 0.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        SOURCE_STYLE.palette["grass"] = (0, 0, 0)  # type: ignore[index]
    with pytest.raises(ValueError, match="lacks palette keys"):
        SceneStyle("broken", {}, 0.0, 0.0, 1.0, {})
    custom = SceneStyle("custom", dict(SOURCE_STYLE.palette), 0.0, 0.0, 1.5, dict(SOURCE_STYLE.vocabulary))
    dataset = make_synthetic_dataset(tmp_path, 10, 2, 2, image_size=32, style=custom)
    assert read_json(dataset.metadata_file)[0]["style"] == "custom"
    with pytest.raises(ValueError, match="unknown style"):
        make_synthetic_dataset(tmp_path, 1, 1, 1, style="winter")


def test_synthetic_loads_with_real_dataset_classes(synthetic_source) -> None:
    train = RetrievalTrainDataset(synthetic_source.train_file, synthetic_source.image_root,
                                  transform=train_transform(32))
    assert len(train) == 150 and train.num_images == 30
    assert set(train.label_names.values()) <= set(synthetic.LABEL_NAMES)
    image, caption, image_index, label = train[7]
    assert image.shape == (3, 32, 32) and isinstance(caption, str) and image_index == 1 and 0 <= label < 10
    val = RetrievalEvalDataset(synthetic_source.val_file, synthetic_source.image_root, data.test_transform(32))
    test = RetrievalEvalDataset(synthetic_source.test_file, synthetic_source.image_root, data.test_transform(32))
    assert len(val) == len(test) == 10 and len(val.captions) == 50
    assert val.labels is not None and test.labels is None
    assert val[3][0].shape == (3, 32, 32)


def test_synthetic_generation_is_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    make_synthetic_dataset(tmp_path, 60, 20, 20, image_size=64)
    assert time.perf_counter() - start < 5.0  # 100 images; about 0.3 s on one core
