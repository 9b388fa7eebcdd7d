"""Writing a whole synthetic dataset (images and RSITMD-layout annotation files) to disk."""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .scenes import generate_scene
from .styles import LABEL_NAMES, SceneStyle, resolve_style


@dataclass(frozen=True)
class SyntheticDataset:
    """Paths of a generated dataset; the annotation files follow the RSITMD layout."""

    root: Path
    image_root: Path
    train_file: Path
    val_file: Path
    test_file: Path
    metadata_file: Path
    label_names: tuple[str, ...] = LABEL_NAMES


def make_synthetic_dataset(
    root: str | Path,
    num_train_images: int = 200,
    num_val_images: int = 50,
    num_test_images: int = 50,
    image_size: int = 64,
    captions_per_image: int = 5,
    seed: int = 0,
    style: str | SceneStyle = "source",
) -> SyntheticDataset:
    """Write a synthetic retrieval dataset under ``root`` and return its paths.

    Layout (as the real RSITMD files): ``images/{train,val,test}/<label>_<k>.png``,
    ``train.json`` with one entry per caption ``{"caption", "image", "image_id", "label",
    "label_name"}``, ``val.json`` with ``{"image", "caption": [...], "label", "label_name"}``,
    ``test.json`` with ``{"image", "caption": [...]}``, and ``metadata.json`` with each image's
    drawn facts. Labels are balanced and shuffled per split. Image ids are unique over all
    splits. Same arguments -> byte-identical files; different styles draw different scenes
    even with the same seed. Existing files of the same names are overwritten.
    """
    style = resolve_style(style)
    for name, count in (("num_train_images", num_train_images), ("num_val_images", num_val_images),
                        ("num_test_images", num_test_images)):
        if count < 1:
            raise ValueError(f"{name} must be at least 1, got {count}")
    root = Path(root)
    image_root = root / "images"
    style_salt = zlib.crc32(style.name.encode("utf-8"))
    splits = (("train", num_train_images), ("val", num_val_images), ("test", num_test_images))
    annotations: dict[str, list[dict]] = {}
    metadata: list[dict] = []
    image_id = 0
    for split_index, (split, count) in enumerate(splits):
        (image_root / split).mkdir(parents=True, exist_ok=True)
        label_rng = np.random.default_rng([seed, style_salt, split_index])
        labels = label_rng.permutation(np.arange(count) % len(LABEL_NAMES)).tolist()
        entries: list[dict] = []
        for k, label in enumerate(labels):
            label_name = LABEL_NAMES[label]
            scene = generate_scene(label_name, np.random.default_rng([seed, style_salt, split_index, k]),
                                   style, image_size, captions_per_image)
            relative = f"{split}/{label_name}_{k:05d}.png"
            scene.image.save(image_root / relative, format="PNG")
            if split == "train":
                entries.extend({"caption": caption, "image": relative, "image_id": image_id, "label": label,
                                "label_name": label_name} for caption in scene.captions)
            elif split == "val":
                entries.append({"image": relative, "caption": scene.captions, "label": label,
                                "label_name": label_name})
            else:
                entries.append({"image": relative, "caption": scene.captions})
            metadata.append({"image": relative, "split": split, "image_id": image_id, "label": label,
                             "style": style.name, **scene.facts, "captions": scene.captions})
            image_id += 1
        annotations[split] = entries

    files = {split: root / f"{split}.json" for split in ("train", "val", "test")}
    for split, path in files.items():
        _write_json(path, annotations[split])
    metadata_file = root / "metadata.json"
    _write_json(metadata_file, metadata)
    return SyntheticDataset(root, image_root, files["train"], files["val"], files["test"], metadata_file)


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")
