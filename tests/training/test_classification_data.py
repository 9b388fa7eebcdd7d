"""Classification sets: class folders, CSV + classnames.txt, class-prefixed files; bad input named."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from harma.training.classification_data import (
    ClassificationDataset,
    detect_layout,
    load_classification_dataset,
)
from harma.training.data import ImageReadError


def write_image(path, shade: int = 0, size: int = 8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (shade, 255 - shade, 40)).save(path)
    return path


def make_folders(root, classes=("DenseResidential", "baseball_field", "forest"), per_class=2):
    for label, name in enumerate(classes):
        for k in range(per_class):
            write_image(root / name / f"{name}_{k}.png", shade=30 * label + k)
    return root


def test_class_folders_give_sorted_classes_and_labels(tmp_path):
    root = make_folders(tmp_path / "set")
    write_image(root / "forest" / "deeper" / "x.jpg", shade=90)  # any depth below the class
    (root / "forest" / "notes.txt").write_text("not an image")
    (root / ".cache").mkdir()
    dataset = load_classification_dataset(root)
    assert dataset.layout == "folders" and detect_layout(root) == "folders"
    assert dataset.classes == ["DenseResidential", "baseball_field", "forest"]
    assert dataset.labels == [0, 0, 1, 1, 2, 2, 2]
    image, label = dataset[4]
    assert isinstance(image, torch.Tensor) and image.shape == (3, 8, 8) and label == 2
    (root / "classnames.txt").write_text("dense residential\nbaseball field\nforest\n")
    assert load_classification_dataset(root).classes == ["dense residential", "baseball field", "forest"]


def test_a_csv_with_integer_labels_and_classnames(tmp_path):
    root = tmp_path / "skyscript"
    for k in range(4):
        write_image(root / "images" / f"{k}.png", shade=k)
    (root / "classnames.txt").write_text("airport\nbaseball field\n")
    (root / "img_txt_pairs_test.csv").write_text(
        "filepath,label\nimages/0.png,0\nimages/1.png,1\nimages/2.png,1\nimages/3.png,0\n")
    dataset = load_classification_dataset(root)
    assert dataset.layout == "csv" and dataset.classes == ["airport", "baseball field"]
    assert dataset.labels == [0, 1, 1, 0] and dataset[1][1] == 1
    # the file itself, text labels, a .tsv, several files picked by split
    (root / "img_txt_pairs_train.csv").write_text("filepath,label\nimages/0.png,baseball field\n")
    assert load_classification_dataset(root, split="train").labels == [1]
    assert len(load_classification_dataset(root / "img_txt_pairs_test.csv")) == 4
    (root / "pairs.tsv").write_text("label\tfilepath\nairport\timages/2.png\n")
    assert ClassificationDataset.from_csv(root / "pairs.tsv").labels == [0]


def test_text_labels_without_classnames_are_their_own_classes(tmp_path):
    for k in range(3):
        write_image(tmp_path / f"{k}.png")
    (tmp_path / "set.csv").write_text("filepath,label\n0.png,river\n1.png,lake\n2.png,river\n")
    dataset = load_classification_dataset(tmp_path / "set.csv")
    assert dataset.classes == ["lake", "river"] and dataset.labels == [1, 0, 1]


def test_class_prefixed_file_names(tmp_path):
    for name in ("baseballfield_12.jpg", "baseballfield_3.jpg", "airplane001.tif", "dense_residential-7.png"):
        write_image(tmp_path / name)
    dataset = load_classification_dataset(tmp_path)
    assert dataset.layout == "prefixed"
    assert dataset.classes == ["airplane", "baseballfield", "dense_residential"]
    assert sorted(zip((p.name for p in dataset.image_paths), dataset.labels, strict=True)) == [
        ("airplane001.tif", 0), ("baseballfield_12.jpg", 1), ("baseballfield_3.jpg", 1),
        ("dense_residential-7.png", 2)]


def test_bad_classification_sets_are_named_with_the_file_and_entry(tmp_path):
    root = make_folders(tmp_path / "set")
    (root / "empty_class").mkdir()
    with pytest.raises(ValueError, match=r"class folder '.*empty_class' holds no image"):
        load_classification_dataset(root)
    (root / "empty_class").rmdir()
    (root / "classnames.txt").write_text("one\ntwo\n")
    with pytest.raises(ValueError, match=r"lists 2 class names but '.*set' has 3 class folders"):
        load_classification_dataset(root)

    csv_root = tmp_path / "csv"
    write_image(csv_root / "a.png")
    (csv_root / "classnames.txt").write_text("airport\nport\n")
    (csv_root / "test.csv").write_text("filepath,label\na.png,0\na.png,2\n")
    with pytest.raises(ValueError, match=r"test.csv', row 2: label 2 is out of range: .* names 2 classes"):
        load_classification_dataset(csv_root)
    (csv_root / "test.csv").write_text("filepath,label\na.png,airport\na.png,harbour\n")
    with pytest.raises(ValueError, match=r"row 2: label 'harbour' is not a class"):
        load_classification_dataset(csv_root)
    (csv_root / "test.csv").write_text("filepath,label\na.png,0\nmissing.png,1\n")
    with pytest.raises(FileNotFoundError, match=r"(?s)1 of 2 image files .* entry 1: 'missing.png'"):
        load_classification_dataset(csv_root)
    (csv_root / "test.csv").write_text("path,label\na.png,0\n")
    with pytest.raises(ValueError, match=r"has no 'filepath' column"):
        load_classification_dataset(csv_root)
    (csv_root / "classnames.txt").unlink()
    (csv_root / "test.csv").write_text("filepath,label\na.png,0\n")
    with pytest.raises(ValueError, match=r"integer labels but there is no '.*classnames.txt'"):
        load_classification_dataset(csv_root)

    flat = tmp_path / "flat"
    write_image(flat / "harbour.png")
    with pytest.raises(ValueError, match=r"image '.*harbour.png': its name does not read as <class><number>"):
        load_classification_dataset(flat)
    write_image(flat / "harbour" / "harbour_1.png")
    with pytest.raises(ValueError, match=r"holds class folders \(harbour, ...\) and 1 image\(s\) beside them"):
        load_classification_dataset(flat)
    with pytest.raises(FileNotFoundError, match="classification set not found"):
        load_classification_dataset(tmp_path / "absent")


def test_an_unreadable_image_is_named_with_its_class(tmp_path):
    root = make_folders(tmp_path / "set")
    (root / "forest" / "forest_0.png").write_bytes(b"not a png")
    dataset = load_classification_dataset(root)
    with pytest.raises(ImageReadError, match=r"forest_0.png' \(class 'forest' of '.*set'\) could not be read"):
        dataset[4]
    csv_root = tmp_path / "csv"
    (csv_root / "broken.png").parent.mkdir()
    (csv_root / "broken.png").write_bytes(b"\x89PNG broken")
    (csv_root / "set.csv").write_text("filepath,label\nbroken.png,x\n")
    with pytest.raises(ImageReadError, match=r"broken.png' \(row 1 of '.*set.csv'\) could not be read"):
        load_classification_dataset(csv_root)[0]
