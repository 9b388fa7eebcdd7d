"""Caption datasets of every format (harma.training.captions): one small dataset written in each
format from its published field names reads to the same (image, captions) pairs, split by split,
as the equivalent RSITMD-layout files; detection, bad entries, held-out validation splits."""

from __future__ import annotations

import csv
import json
import pickle
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from repo_scripts import load_repo_script

from harma.retrieval import RetrievalEvaluator, retrieval_metrics_from_embeddings
from harma.training import TrainConfig, build_backbone, build_tokenizer
from harma.training.captions import (
    CAPTION_FORMATS,
    CaptionDataset,
    DatasetImage,
    carve_split,
    check_csv_separator,
    detect_caption_format,
    read_caption_dataset,
)
from harma.training.data import (
    RetrievalEvalDataset,
    RetrievalTrainDataset,
    build_datasets,
    read_run_splits,
    test_transform,
)
from harma.training.models import tiny_clip_config

SPLITS = ("train", "val", "test")

# (class, file name, split, captions): 2 classes, any number of captions per image, captions
# holding the CSV separators and quotes. "restval" is Karpathy's: it trains.
IMAGES = [
    ("airport", "airport_1.png", "train", ["Planes park beside the terminal.", "A runway, long and grey."]),
    ("airport", "airport_2.png", "restval", ["Two planes wait\tby the apron.", 'A "big" airport.',
                                             "Many planes.", "A terminal.", "Runways cross.", "Grey."]),
    ("airport", "airport_3.png", "val", ["An airport with one plane."]),
    ("airport", "airport_4.png", "test", ["Planes and a terminal.", "An airport, seen from above.",
                                          "Three planes.", "A runway.", "A grey apron."]),
    ("beach", "beach_1.png", "train", ["Waves reach the sand.", "A beach.", "Umbrellas on the sand."]),
    ("beach", "beach_2.png", "val", ["Blue sea, yellow sand.", "A quiet beach."]),
    ("beach", "beach_3.png", "test", ["A beach with houses."]),
    ("beach", "beach_4.png", "train", ["Sea on the left.", "Sand on the right.", "A beach.", "Waves."]),
]
CLASSES = ["airport", "beach"]


def canonical_split(split: str) -> str:
    return "train" if split == "restval" else split


def rows(split: str) -> list[tuple[str, str, list[str]]]:
    """``(class, file name, captions)`` of one split, in file order."""
    return [(cls, name, caps) for cls, name, s, caps in IMAGES if canonical_split(s) == split]


def write_images(root: Path) -> None:
    for index, (cls, name, _, _) in enumerate(IMAGES):
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (6, 4), (20 * index, 255 - 20 * index, 7)).save(root / cls / name)


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- one writer per format

def write_rsitmd(folder: Path) -> dict[str, Path]:
    train = [{"caption": caption, "image": f"{cls}/{name}", "image_id": index,
              "label": CLASSES.index(cls), "label_name": cls}
             for index, (cls, name, caps) in enumerate(rows("train")) for caption in caps]
    files = {"train": write_json(folder / "rsitmd_train.json", train)}
    for split in ("val", "test"):
        files[split] = write_json(folder / f"rsitmd_{split}.json",
                                  [{"image": f"{cls}/{name}", "caption": caps} for cls, name, caps in rows(split)])
    return files


def write_karpathy(folder: Path, with_filepath: bool = True) -> dict[str, Path]:
    images, sentid = [], 0
    for imgid, (cls, name, split, caps) in enumerate(IMAGES):
        sentences = []
        for caption in caps:
            sentences.append({"tokens": caption.lower().split(), "raw": caption, "imgid": imgid, "sentid": sentid})
            sentid += 1
        entry = {"filename": name if with_filepath else f"{cls}/{name}", "imgid": imgid, "split": split,
                 "sentids": [s["sentid"] for s in sentences], "sentences": sentences}
        if with_filepath:
            entry["filepath"] = cls
        images.append(entry)
    path = write_json(folder / "dataset_tiny.json", {"images": images, "dataset": "tiny"})
    return dict.fromkeys(SPLITS, path)


def write_nwpu(folder: Path) -> dict[str, Path]:
    data: dict[str, list] = {cls: [] for cls in CLASSES}
    for imgid, (cls, name, split, caps) in enumerate(IMAGES):
        entry = {"filename": name, "imgid": imgid, "split": canonical_split(split), "raw": caps[0]}
        entry.update({f"raw_{k}": caption for k, caption in enumerate(caps[1:], start=1)})
        data[cls].append(entry)
    path = write_json(folder / "dataset_nwpu.json", data)
    return dict.fromkeys(SPLITS, path)


def write_csv(folder: Path, separator: str = "\t", img_key: str = "filepath", caption_key: str = "title",
              suffix: str = ".tsv") -> dict[str, Path]:
    files = {}
    for split in SPLITS:
        path = files[split] = folder / f"{split}{suffix}"
        with path.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, delimiter=separator)
            writer.writerow([img_key, caption_key])
            writer.writerows([f"{cls}/{name}", caption] for cls, name, caps in rows(split) for caption in caps)
    return files


def hf_dataset_dict(root: Path, decoded: bool, one_per_row: bool):
    datasets = pytest.importorskip("datasets")
    splits = {}
    for split, name in (("train", "train"), ("val", "validation"), ("test", "test")):
        if one_per_row:
            columns = {"filepath": [f"{cls}/{file}" for cls, file, caps in rows(split) for _ in caps],
                       "title": [caption for _, _, caps in rows(split) for caption in caps]}
        else:
            columns = {"filename": [file for _, file, _ in rows(split)],
                       "captions": [caps for _, _, caps in rows(split)],
                       "image": [f"{cls}/{file}" for cls, file, _ in rows(split)]}
        dataset = datasets.Dataset.from_dict(columns)
        if decoded:  # images held in the dataset (PNG bytes, no path), as on the Hub
            key = "filepath" if one_per_row else "image"
            features = datasets.Features({**dataset.features, key: datasets.Image()})
            columns[key] = [Image.open(root / path).copy() for path in columns[key]]
            dataset = datasets.Dataset.from_dict(columns, features=features)
        splits[name] = dataset
    return datasets.DatasetDict(splits)


def write_hf(folder: Path, root: Path, decoded: bool, one_per_row: bool, saved: bool):
    dataset = hf_dataset_dict(root, decoded, one_per_row)
    if saved:
        dataset.save_to_disk(str(folder / "hf"))
        dataset = folder / "hf"
    return dict.fromkeys(SPLITS, dataset)


WRITERS = {
    "karpathy": lambda folder, root: write_karpathy(folder),
    "karpathy_without_filepath": lambda folder, root: write_karpathy(folder, with_filepath=False),
    "nwpu": lambda folder, root: write_nwpu(folder),
    "tsv": lambda folder, root: write_csv(folder),
    "csv_comma_other_keys": lambda folder, root: write_csv(folder, ",", "image", "caption", ".csv"),
    "hf_paths_caption_lists": lambda folder, root: write_hf(folder, root, False, False, False),
    "hf_decoded_caption_lists_saved": lambda folder, root: write_hf(folder, root, True, False, True),
    "hf_decoded_one_caption_per_row": lambda folder, root: write_hf(folder, root, True, True, False),
    "hf_paths_one_caption_per_row_saved": lambda folder, root: write_hf(folder, root, False, True, True),
}
OPTIONS = {"csv_comma_other_keys": {"csv_img_key": "image", "csv_caption_key": "caption"}}
FORMAT_OF = {"karpathy_without_filepath": "karpathy", "tsv": "csv", "csv_comma_other_keys": "csv"}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("caption_images")
    write_images(folder)
    return folder


@pytest.fixture(scope="module")
def rsitmd(root, tmp_path_factory) -> dict[str, Path]:
    return write_rsitmd(tmp_path_factory.mktemp("rsitmd"))


def pixels(dataset: CaptionDataset, image) -> bytes:
    source = dataset.image_path(image)
    with source.open() if isinstance(source, DatasetImage) else Image.open(source) as opened:
        return opened.convert("RGB").tobytes()


def image_caption_pairs(dataset: CaptionDataset) -> list[tuple[bytes, tuple[str, ...]]]:
    return [(pixels(dataset, image), image.captions) for image in dataset.images]


@pytest.mark.parametrize("variant", sorted(WRITERS))
def test_every_format_reads_to_the_pairs_of_the_rsitmd_layout(variant, root, rsitmd, tmp_path):
    files = WRITERS[variant](tmp_path, root)
    for split in SPLITS:
        expected = read_caption_dataset(rsitmd[split], split=split, image_root=root)
        assert expected.format == "rsitmd"
        got = read_caption_dataset(files[split], split=split, image_root=root, **OPTIONS.get(variant, {}))
        assert got.format == FORMAT_OF.get(variant, variant.split("_")[0])
        assert image_caption_pairs(got) == image_caption_pairs(expected), split
        if not any(isinstance(image.image, DatasetImage) for image in got.images):
            assert [image.image for image in got.images] == [image.image for image in expected.images]
        # ... and to the same training pairs and evaluation splits
        train_got, train_expected = (RetrievalTrainDataset(d) for d in (got, expected))
        assert train_got.captions == train_expected.captions
        assert train_got.image_indices == train_expected.image_indices
        eval_got, eval_expected = (RetrievalEvalDataset(d) for d in (got, expected))
        assert (eval_got.captions, eval_got.txt2img, eval_got.img2txt) == \
            (eval_expected.captions, eval_expected.txt2img, eval_expected.img2txt)
        assert torch.equal(eval_got[0][0], eval_expected[0][0])


def test_the_rsitmd_layout_keeps_its_labels_and_nwpu_labels_are_its_classes(root, rsitmd, tmp_path):
    train = RetrievalTrainDataset(rsitmd["train"], root)
    assert train.label_names == {0: "airport", 1: "beach"} and train.labels[:2] == [0, 0]
    nwpu = RetrievalTrainDataset(read_caption_dataset(write_nwpu(tmp_path)["train"], split="train"), root)
    assert nwpu.labels == train.labels and nwpu.label_names == train.label_names
    assert RetrievalEvalDataset(rsitmd["test"], root).labels is None


def test_an_image_of_several_caption_entries_is_one_image_and_a_repeated_image_entry_is_refused(tmp_path):
    rows = write_json(tmp_path / "train.json", [{"image": "a.png", "caption": "one"},
                                                {"image": "b.png", "caption": "three"},
                                                {"image": "./a.png", "caption": "four"}])
    dataset = read_caption_dataset(rows, image_root=tmp_path, split="train")
    assert [(image.image, image.captions) for image in dataset.images] == [("a.png", ("one", "four")),
                                                                         ("b.png", ("three",))]
    repeated = write_json(tmp_path / "test.json", [{"image": "a.png", "caption": ["one", "two"]},
                                                   {"image": "./a.png", "caption": ["four"]}])
    with pytest.raises(ValueError, match=r"entry 1: image './a.png' is listed again \(entry 0 lists 'a.png'\)"):
        read_caption_dataset(repeated, image_root=tmp_path)
    karpathy = write_json(tmp_path / "k.json", {"images": [
        {"filename": "a.png", "split": "test", "sentences": [{"raw": "one"}]},
        {"filename": "a.png", "split": "test", "sentences": [{"raw": "two"}]}]})
    with pytest.raises(ValueError, match=r"images\[1\]: image 'a.png' is listed again \(images\[0\] lists"):
        read_caption_dataset(karpathy, split="test")


# --------------------------------------------------------------------------- detection

@pytest.mark.parametrize("variant", ["karpathy", "nwpu", "tsv", "csv_comma_other_keys",
                                     "hf_decoded_caption_lists_saved"])
def test_formats_are_detected(variant, root, rsitmd, tmp_path):
    assert detect_caption_format(rsitmd["train"]) == "rsitmd"
    assert detect_caption_format(WRITERS[variant](tmp_path, root)["test"]) == FORMAT_OF.get(variant, variant.split("_")[0])


def test_an_ambiguous_or_unknown_file_names_the_candidates(tmp_path):
    both = write_json(tmp_path / "both.json", {"images": [
        {"filename": "a.png", "split": "test", "raw": "a caption", "sentences": [{"raw": "a caption"}]}]})
    with pytest.raises(ValueError, match=r"could be any of the caption formats karpathy, nwpu: name one"):
        read_caption_dataset(both, split="test")
    assert read_caption_dataset(both, "karpathy", split="test").images[0].image == "a.png"
    assert read_caption_dataset(both, "nwpu", split="test").images[0].image == "images/a.png"
    other = write_json(tmp_path / "other.json", {"annotations": [{"file": "a.png"}]})
    with pytest.raises(ValueError, match=r"\(a JSON object with keys \['annotations'\]\) is in none of the caption "
                                         r"formats rsitmd, karpathy, nwpu, csv, hf"):
        detect_caption_format(other)
    (tmp_path / "captions.txt").write_text("a.png\ta caption\n")
    with pytest.raises(ValueError, match="cannot tell the caption format of .*captions.txt.* name it"):
        read_caption_dataset(tmp_path / "captions.txt")
    with pytest.raises(ValueError, match="unknown caption format 'coco'"):
        read_caption_dataset(both, "coco")
    with pytest.raises(FileNotFoundError, match="absent.json"):
        read_caption_dataset(tmp_path / "absent.json")
    assert CAPTION_FORMATS == ("rsitmd", "karpathy", "nwpu", "csv", "hf")


# --------------------------------------------------------------------------- bad entries

def karpathy_file(tmp_path: Path, images: list) -> Path:
    return write_json(tmp_path / "dataset_bad.json", {"images": images})


GOOD = {"filename": "a.png", "split": "train", "sentences": [{"raw": "a caption"}]}


@pytest.mark.parametrize(
    ("images", "split", "pattern"),
    [
        ([GOOD, {"filename": "b.png", "split": "train"}], "train",
         r"images\[1\]: 'sentences' must be a non-empty list, got None"),
        ([GOOD, {**GOOD, "sentences": [{"raw": "x"}, {"raw": 3}]}], "train",
         r"images\[1\]\.sentences\[1\]: 'raw' must be a string, got 3"),
        ([GOOD, {"filename": "b.png", "sentences": [{"raw": "x"}]}], "train",
         r"images\[1\]: 'split' must be a non-empty string, got None"),
        ([GOOD, {**GOOD, "filename": ""}], "train", r"images\[1\]: 'filename' must be a non-empty path string"),
        ([GOOD, {**GOOD, "split": "test"}], "val",
         r"no entry of split 'val'; the file's splits are train \(1\), test \(1\) \(images\)"),
        ([GOOD, {**GOOD, "split": "test"}], None, r"holds the splits train \(1\), test \(1\) \(images\): name the one"),
        ([GOOD, 7], "train", r"images\[1\]: expected an object, got int"),
    ],
)
def test_bad_karpathy_entries_are_named(tmp_path, images, split, pattern):
    path = karpathy_file(tmp_path, images)
    with pytest.raises(ValueError, match=pattern) as error:
        read_caption_dataset(path, split=split)
    assert f"annotation file '{path}'" in str(error.value)


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"airport": [{"filename": "a.png", "split": "test", "raw": "x"}], "beach": {"filename": "b.png"}},
         r"class 'beach': must be a list of entries, got dict"),
        ({"airport": [{"filename": "a.png", "split": "test", "raw": "x"},
                      {"filename": "b.png", "split": "test", "raw_1": "y"}]},
         r"'airport'\[1\]: no caption: the entry has no 'raw'"),
        ({"airport": [{"filename": "a.png", "split": "test", "raw": "x", "raw_1": None}]},
         r"'airport'\[0\]: 'raw_1' must be a string, got None"),
    ],
)
def test_bad_nwpu_entries_are_named(tmp_path, data, pattern):
    path = write_json(tmp_path / "dataset_nwpu.json", data)
    with pytest.raises(ValueError, match=pattern) as error:
        read_caption_dataset(path, "nwpu", split="test")
    assert f"annotation file '{path}'" in str(error.value)


def test_bad_csv_rows_are_named(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("filepath,title\na.png,a caption\nb.png,one,two\n")
    with pytest.raises(ValueError, match=r"train.csv', line 3: 3 fields but the header has 2 \(separator ','"):
        read_caption_dataset(path)
    path.write_text("image\tcaption\na.png\tx\n")
    with pytest.raises(ValueError, match=r"line 1: no column \['filepath', 'title'\] in the header \['image', "
                                         r"'caption'\] \(separator '\\t'\); name the columns"):
        read_caption_dataset(path)
    assert len(read_caption_dataset(path, csv_img_key="image", csv_caption_key="caption")) == 1
    path.write_text("filepath\ttitle\n\na.png\ta caption\n\t...\n")
    with pytest.raises(ValueError, match=r"line 4: 'filepath' must be a non-empty path string"):
        read_caption_dataset(path)
    path.write_text("filepath\ttitle\na.png\ta caption\nb.png\t...\n")
    with pytest.raises(ValueError, match=r"train.csv', line 3, 'title': '...' is empty after preprocessing"):
        RetrievalTrainDataset(path, check_files=False)
    path.write_text("")
    with pytest.raises(ValueError, match="is empty: expected a header line"):
        read_caption_dataset(path)
    assert check_csv_separator("\\t") == "\t" == check_csv_separator("tab")
    with pytest.raises(ValueError, match="one character"):
        check_csv_separator(";;")


def test_bad_rsitmd_layouts_are_named(tmp_path):
    mixed = write_json(tmp_path / "mixed.json", [{"image": "a.png", "caption": "one"},
                                                 {"image": "b.png", "caption": ["two"]}])
    with pytest.raises(ValueError, match=r"entry 1: the entry holds a caption list but entry 0 one caption"):
        read_caption_dataset(mixed)
    relabelled = write_json(tmp_path / "labels.json", [{"image": "a.png", "caption": "one", "label": 1},
                                                       {"image": "a.png", "caption": "two", "label": 2}])
    with pytest.raises(ValueError, match=r"entry 1: 'a.png' has label 2 here but label 1 at entry 0"):
        read_caption_dataset(relabelled, split="train")
    train = write_json(tmp_path / "train.json", [{"image": "a.png", "caption": "one"}])
    with pytest.raises(ValueError, match=r"entry 0: 'caption' is a single string: this looks like a train file"):
        read_caption_dataset(train, split="test")
    # read as what it is, a training file serves evaluation too
    assert RetrievalEvalDataset(train, tmp_path, check_files=False, split="train").captions == ["one"]


def test_bad_hugging_face_datasets_are_named(root):
    datasets = pytest.importorskip("datasets")
    splits = hf_dataset_dict(root, decoded=False, one_per_row=False)
    with pytest.raises(ValueError, match=r"holds the splits \['train', 'validation', 'test'\]: name one"):
        read_caption_dataset(splits)
    with pytest.raises(ValueError, match=r"has no split 'restval'; its splits are"):
        read_caption_dataset(splits, split="restval")
    with pytest.raises(ValueError, match=r"no caption column 'text'; its columns are \['filename', 'captions', "
                                         r"'image'\]"):
        read_caption_dataset(splits, split="test", hf_caption_key="text")
    odd = datasets.Dataset.from_dict({"name": ["a.png"], "words": [["x"]]})
    with pytest.raises(ValueError, match=r"no image column among \['name', 'words'\] .* name it with hf_image_key"):
        read_caption_dataset(odd)
    broken = datasets.Dataset.from_dict({"image": ["a.png", "b.png"], "captions": [["x"], []]})
    with pytest.raises(ValueError, match=r"Hugging Face dataset '<in memory>', row 1: 'captions' must be a string or "
                                         r"a non-empty list"):
        read_caption_dataset(broken)
    assert read_caption_dataset(splits, split="validation").split == "validation"
    assert len(read_caption_dataset(splits["test"], hf_image_key="filename")) == 2


def test_images_stored_in_a_dataset_pickle_and_load_in_worker_processes(root):
    pytest.importorskip("datasets")
    dataset = read_caption_dataset(hf_dataset_dict(root, decoded=True, one_per_row=False), split="train")
    train = RetrievalTrainDataset(dataset)
    assert all(isinstance(path, DatasetImage) for path in train.image_paths)
    copy = pickle.loads(pickle.dumps(train))
    assert torch.equal(copy[3][0], train[3][0]) and copy[3][1:] == train[3][1:]
    loader = torch.utils.data.DataLoader(train, batch_size=4, num_workers=1)
    assert sum(len(batch[1]) for batch in loader) == len(train)


def test_a_caption_dataset_is_given_one_image_root(root, rsitmd):
    dataset = read_caption_dataset(rsitmd["test"], split="test", image_root=root)
    assert RetrievalEvalDataset(dataset, root).image_root == root
    with pytest.raises(ValueError, match="two image roots"):
        RetrievalEvalDataset(dataset, root / "airport")
    unrooted = read_caption_dataset(rsitmd["test"], split="test")
    assert RetrievalEvalDataset(unrooted, root).image_paths[0] == root / "airport/airport_4.png"


# --------------------------------------------------------------------------- held-out validation splits

def test_a_held_out_split_takes_whole_images_reproducibly(rsitmd, root, tmp_path):
    train = read_caption_dataset(rsitmd["train"], split="train", image_root=root)
    kept, held = carve_split([train], 0.25, seed=3)
    assert len(held) == 1 and len(kept[0]) == len(train) - 1
    names = [image.image for image in train.images]
    held_name = Path(held.images[0].image).relative_to(root).as_posix()
    assert held_name in names and held_name not in [image.image for image in kept[0].images]
    original = next(image for image in train.images if image.image == held_name)
    assert held.images[0].captions == original.captions  # every caption of the image
    assert held.carved == {"from": [str(rsitmd["train"])], "fraction": 0.25, "seed": 3}
    # the same files, fraction and seed hold out the same images, whatever the order of the file
    reordered = write_json(tmp_path / "reordered.json", json.loads(rsitmd["train"].read_text())[::-1])
    again = carve_split([read_caption_dataset(reordered, split="train", image_root=root)], 0.25, seed=3)[1]
    assert [image.image for image in again.images] == [image.image for image in held.images]
    seeds = {tuple(image.image for image in carve_split([train], 0.25, seed)[1].images) for seed in range(8)}
    assert len(seeds) > 1
    with pytest.raises(ValueError, match=r"cannot hold out 90% of 4 image\(s\)"):
        carve_split([train], 0.9)
    with pytest.raises(ValueError, match=r"must be in \(0, 1\)"):
        carve_split([train], 1.0)


def test_run_splits_read_any_format_and_hold_out_a_validation_split(root, tmp_path):
    files = write_csv(tmp_path)
    config = TrainConfig(train_files=(str(files["train"]),), test_file=str(files["test"]), image_root=str(root),
                         val_fraction=0.25, val_seed=1, batch_size=2, image_size=16)
    train, val, test = read_run_splits(config)
    assert sum(len(dataset) for dataset in train) + len(val) == len(rows("train"))
    assert val.carved == {"from": [str(files["train"])], "fraction": 0.25, "seed": 1}
    train_set, val_set, test_set = build_datasets(config)
    assert train_set.num_images == 3 and val_set.num_images == 1 and test_set.num_images == 2
    assert set(train_set.image_paths).isdisjoint(val_set.image_paths)
    assert val_set.describe()["carved"]["seed"] == 1 and test_set.describe()["format"] == "csv"
    with pytest.raises(ValueError, match="give val_file or val_fraction, not both"):
        config.replace(val_file=str(files["val"]))
    with pytest.raises(ValueError, match=r"val_fraction must be a number in \[0, 1\)"):
        config.replace(val_fraction=1.5)
    with pytest.raises(ValueError, match="data_format must be one of"):
        config.replace(data_format="coco")
    with pytest.raises(ValueError, match="csv_separator must be one character"):
        config.replace(csv_separator="||")
    nwpu = write_nwpu(tmp_path)["train"]
    same_file = config.replace(train_files=(str(nwpu),), test_file=str(nwpu), val_fraction=0.0, val_file=str(nwpu))
    assert [len(split) for split in build_datasets(same_file)] == [15, 2, 2]
    tagged = same_file.replace(data_format="karpathy")
    with pytest.raises(ValueError, match="is no karpathy file: it has no 'images' list"):
        build_datasets(tagged)


def test_eval_splits_with_any_number_of_captions_evaluate(root, tmp_path):
    dataset = RetrievalEvalDataset(write_karpathy(tmp_path)["train"], root, transform=test_transform(16),
                                   split="train")
    assert [len(captions) for captions in dataset.img2txt] == [2, 6, 3, 4]
    model_config = tiny_clip_config(image_size=16, width=32, layers=1, embed_dim=16)
    torch.manual_seed(0)
    model = build_backbone("tiny-clip", None, model_config).eval()
    evaluator = RetrievalEvaluator.from_dataset(dataset, build_tokenizer("tiny-clip", model_config), batch_size=3,
                                                num_workers=0)
    assert evaluator.txt2img.tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3]
    image_embeds, text_embeds = evaluator.encode(model)
    metrics = retrieval_metrics_from_embeddings(image_embeds, text_embeds, evaluator.txt2img)
    # R@10 over 4 images and 15 captions finds everything
    assert metrics["i2t_r10"] == metrics["t2i_r10"] == 100.0
    scores = image_embeds @ text_embeds.T
    best_image_of_caption = scores.argmax(0)
    assert metrics["t2i_r1"] == pytest.approx(100 * (best_image_of_caption == evaluator.txt2img).float().mean().item())


# --------------------------------------------------------------------------- command lines

IMAGE_SIZE = 16
TINY = tiny_clip_config(image_size=IMAGE_SIZE, width=32, layers=1, embed_dim=16)


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("backbone") / "tiny.pt"
    torch.save(build_backbone("tiny-clip", None, TINY).state_dict(), path)
    return path


def evaluate(arguments: list[str], backbone: Path) -> dict:
    script = load_repo_script("examples/evaluate.py", cached=False)
    return script.main(["--model", "tiny-clip", "--model_config", json.dumps(TINY), "--pretrained", str(backbone),
                        "--num_workers", "0", "--batch_size", "4", "--json", *arguments])


@pytest.mark.parametrize(("variant", "options"), [
    ("karpathy", []), ("nwpu", ["--format", "nwpu"]), ("csv_comma_other_keys", [
        "--csv-img-key", "image", "--csv-caption-key", "caption", "--csv-separator", ","]),
    ("hf_decoded_caption_lists_saved", []),
])
def test_evaluate_reads_every_format(variant, options, root, rsitmd, backbone_file, tmp_path, capsys):
    expected = evaluate(["--annotation", str(rsitmd["test"]), "--image_root", str(root)], backbone_file)
    files = WRITERS[variant](tmp_path, root)
    got = evaluate(["--annotation", str(files["test"]), "--image_root", str(root), "--split", "test", *options],
                   backbone_file)
    assert got == expected
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == got


def test_evaluate_names_an_ambiguous_file_and_a_missing_split(tmp_path, backbone_file, capsys):
    both = write_json(tmp_path / "both.json", {"images": [
        {"filename": "a.png", "split": "test", "raw": "x", "sentences": [{"raw": "x"}]}]})
    for arguments, message in (
        ([], "could be any of the caption formats karpathy, nwpu: name one"),
        (["--format", "karpathy", "--split", "val"], "no entry of split 'val'; the file's splits are test (1)"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            evaluate(["--annotation", str(both), "--image_root", str(tmp_path), *arguments], backbone_file)
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and error[0].startswith("error: ") and message in error[0]


def test_a_run_on_a_csv_file_holds_out_its_validation_images_and_evaluate_finds_them(
        root, tmp_path, backbone_file, capsys):
    from harma.training import main

    files = write_csv(tmp_path, ",", "path", "text", ".csv")
    karpathy = write_karpathy(tmp_path)["test"]
    output_dir = tmp_path / "run"
    main(["--model", "tiny-clip", "--pretrained", str(backbone_file), "--model_config", json.dumps(TINY),
          "--image_size", str(IMAGE_SIZE), "--train_files", str(files["train"]), "--csv-img-key", "path",
          "--csv-caption-key", "text", "--val-fraction", "0.25", "--val-seed", "5", "--test_file", str(karpathy),
          "--image_root", str(root), "--batch_size", "4", "--epochs", "1", "--num_workers", "0", "--threads", "1",
          "--progress", "false", "--augment", "false", "--eval_batch_size", "4", "--output_dir", str(output_dir),
          "--harma.bottleneck", "8", "--harma.heads", "2", "--harma.mini_bottleneck", "4", "--harma.mini_heads", "2"])
    results = json.loads((output_dir / "results.json").read_text())
    data = results["data"]
    assert data["val"]["carved"] == {"from": [str(files["train"])], "fraction": 0.25, "seed": 5}
    assert data["val"]["images"] == 1 and data["train"]["images"] == 3
    assert data["test"]["format"] == "karpathy" and data["test"]["split"] == "test"
    assert TrainConfig.from_json_file(output_dir / "config.json").val_fraction == 0.25
    capsys.readouterr()
    # the held-out images are found again from the run's config: the validation metrics reproduce
    assert evaluate(["--run", str(output_dir), "--split", "val"], backbone_file) == results["best_val"]
    assert evaluate(["--run", str(output_dir)], backbone_file) == results["test"]


def test_the_general_training_script_takes_every_format_option(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["train.py", "--train_files", "train.tsv", "--data-format", "csv",
                                     "--csv-separator", "\\t", "--val_fraction", "0.1", "--print-config"])
    runpy.run_path(str(Path(__file__).resolve().parents[2] / "examples" / "train.py"), run_name="__main__")
    printed = json.loads(capsys.readouterr().out)
    assert (printed["data_format"], printed["csv_separator"], printed["val_fraction"]) == ("csv", "\\t", 0.1)
    assert TrainConfig.from_dict(printed).val_seed == 0


def test_a_gallery_shows_images_stored_in_a_dataset(root, backbone_file, tmp_path, capsys):
    pytest.importorskip("datasets")
    folder = write_hf(tmp_path, root, decoded=True, one_per_row=False, saved=True)["test"]
    page = tmp_path / "gallery.html"
    evaluate(["--annotation", str(folder), "--gallery", str(page), "--gallery-queries", "2"], backbone_file)
    text = page.read_text()
    assert text.count("data:image/png;base64,") >= 2 and "beach_3.png" in text  # named by its filename


def test_missing_images_are_named_with_their_rows(root, tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("filepath,title\nairport/airport_1.png,a caption\nairport/nowhere.png,another\n")
    with pytest.raises(FileNotFoundError) as error:
        RetrievalTrainDataset(path, root)
    message = str(error.value)
    assert "1 of 2 image files listed in annotation file" in message
    assert f"line 3: 'airport/nowhere.png' -> '{root / 'airport/nowhere.png'}'" in message


def test_datasets_is_imported_only_for_a_hugging_face_dataset(root, rsitmd, tmp_path, monkeypatch):
    code = ("import sys; from harma.training.data import read_caption_dataset as read; "
            f"read({str(rsitmd['test'])!r}); read({str(write_csv(tmp_path)['test'])!r}); "
            "assert 'datasets' not in sys.modules, 'datasets was imported'")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "dataset_dict.json").write_text("{}")
    with pytest.raises(ImportError, match=r"needs the datasets package: pip install 'harma\[datasets\]'"):
        read_caption_dataset(tmp_path / "saved", split="test")


def test_files_with_a_byte_order_mark_read_as_without_and_nwpu_keeps_every_numbered_caption(tmp_path):
    # Excel's "CSV UTF-8" and some editors start files with a byte-order mark.
    csv_file = tmp_path / "captions.csv"
    csv_file.write_text("filepath,title\na.png,one\na.png,two\n", encoding="utf-8-sig")
    json_file = write_json(tmp_path / "test.json", [{"image": "a.png", "caption": ["one", "two"]}])
    json_file.write_text(json_file.read_text(), encoding="utf-8-sig")
    for path in (csv_file, json_file):
        dataset = read_caption_dataset(path, image_root=tmp_path)
        assert [(image.image, image.captions) for image in dataset.images] == [("a.png", ("one", "two"))]
    gap = write_json(tmp_path / "nwpu.json", {"forest": [
        {"filename": "a.png", "split": "test", "raw": "zero", "raw_1": "one", "raw_3": "three"}]})
    assert read_caption_dataset(gap, "nwpu", split="test").images[0].captions == ("zero", "one", "three")
