"""Synthetic scene classification sets (harma.training.synthetic.classification)."""

from __future__ import annotations

import pytest

from harma.training.classification_data import load_classification_dataset
from harma.training.data import test_transform
from harma.training.models import build_tokenizer
from harma.training.synthetic import (
    LABEL_NAMES,
    SYNTHETIC_TEMPLATES,
    make_synthetic_classification_set,
    synthetic_class_names,
)
from harma.training.zero_shot import ZeroShotSuite


def test_a_set_is_a_class_folder_tree_named_in_the_domains_words(tmp_path):
    made = make_synthetic_classification_set(tmp_path / "source", images_per_class=2, image_size=16, seed=4)
    dataset = load_classification_dataset(made.root)
    assert dataset.layout == "folders" and len(dataset) == made.num_images == 20
    assert dataset.classes == list(made.class_names)
    # classnames.txt follows the sorted folders: each folder's images carry its label's name.
    names = synthetic_class_names("source")
    for path, label in zip(dataset.image_paths, dataset.labels, strict=True):
        assert dataset.classes[label] == names[path.parent.name]
    assert names["parking"] == "parking lot" and names["residential"] == "residential area"
    assert synthetic_class_names("target")["parking"] == "car park"
    assert sorted(names) == sorted(LABEL_NAMES)
    assert made.templates_file.read_text().split("\n")[:-1] == list(SYNTHETIC_TEMPLATES)


def test_same_arguments_give_the_same_files_and_styles_differ(tmp_path):
    first = make_synthetic_classification_set(tmp_path / "a", images_per_class=1, image_size=16, seed=1)
    second = make_synthetic_classification_set(tmp_path / "b", images_per_class=1, image_size=16, seed=1)
    target = make_synthetic_classification_set(tmp_path / "c", images_per_class=1, image_size=16, seed=1,
                                               style="target")
    files = sorted(path.relative_to(first.root) for path in first.root.rglob("*.png"))
    assert files == sorted(path.relative_to(second.root) for path in second.root.rglob("*.png"))
    assert all((first.root / f).read_bytes() == (second.root / f).read_bytes() for f in files)
    assert any((first.root / f).read_bytes() != (target.root / f).read_bytes() for f in files)
    assert target.class_names != first.class_names


@pytest.mark.parametrize("count", [0, -1, 1.5, True])
def test_a_bad_image_count_is_refused(tmp_path, count):
    with pytest.raises(ValueError, match="images_per_class must be an integer >= 1"):
        make_synthetic_classification_set(tmp_path / "x", images_per_class=count)


def test_the_prompts_are_the_class_names_of_each_set(tmp_path):
    source = make_synthetic_classification_set(tmp_path / "source", images_per_class=1, image_size=16)
    target = make_synthetic_classification_set(tmp_path / "target", images_per_class=1, image_size=16,
                                               style="target")
    suite = ZeroShotSuite([source.root, target.root], test_transform(16), build_tokenizer("ViT-B-32", None),
                          templates=source.templates_file, progress=False)
    by_root = {s.root: s.evaluator for s in suite.sets}
    assert [p[0] for p in by_root[str(source.root)].prompts] == list(source.class_names)
    assert [p[0] for p in by_root[str(target.root)].prompts] == list(target.class_names)
