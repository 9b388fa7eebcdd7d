"""Synthetic scene classification sets: the ten scene labels of the synthetic data as a
class-per-folder tree, named in a domain's own words, for zero-shot classification.

A set of the ``"source"`` style measures what a model pre-trained on source-domain captions
still knows of the source domain after adaptation to the target (what it forgot); a set of the
``"target"`` style measures what it learnt of the target domain.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..classification_data import CLASSNAMES_FILE
from .scenes import generate_scene
from .styles import LABEL_NAMES, SceneStyle, resolve_style

__all__ = [
    "SYNTHETIC_TEMPLATES",
    "TEMPLATES_FILE",
    "SyntheticClassificationSet",
    "make_synthetic_classification_set",
    "synthetic_class_names",
]

# The concept of the style's vocabulary that names each scene label.
_LABEL_CONCEPTS = {"parking": "parking_lot"}
# The prompts' template: the bare class name. The synthetic captions are the model's only
# language, and no wording around a scene's name occurs in the captions of every label ("a ...",
# "an ...", "... seen from above" each favour some classes), so none is added.
SYNTHETIC_TEMPLATES: tuple[str, ...] = ("{}",)
TEMPLATES_FILE = "templates.txt"
# Classification images are drawn from their own random streams: a set made with the seed of a
# retrieval dataset (whose splits use 0, 1, 2 here) draws other scenes.
_CLASSIFICATION_STREAM = 3


def synthetic_class_names(style: str | SceneStyle = "source") -> dict[str, str]:
    """``{label: name}`` of the ten scene labels in ``style``'s words (``"parking"`` is
    ``"parking lot"`` in the source style and ``"car park"`` in the target style)."""
    words = resolve_style(style).vocabulary
    return {label: words[_LABEL_CONCEPTS.get(label, label)][0] for label in LABEL_NAMES}


@dataclass(frozen=True)
class SyntheticClassificationSet:
    """A generated classification set: ``root/<label>/<label>_<k>.png`` and, in ``root``,
    ``classnames.txt`` (the style's words, in the sorted order of the folders) and
    ``templates.txt`` (`SYNTHETIC_TEMPLATES`).

    Read it with `harma.training.classification_data.load_classification_dataset(root)`, give
    ``root`` to ``examples/evaluate.py --zero-shot`` with ``--templates templates_file``, or to
    `harma.training.TrainConfig`'s ``zero_shot_sets`` with ``zero_shot_templates``."""

    root: Path
    class_names: tuple[str, ...]
    templates_file: Path
    num_images: int
    style: str


def make_synthetic_classification_set(
    root: str | Path,
    images_per_class: int = 10,
    image_size: int = 64,
    seed: int = 0,
    style: str | SceneStyle = "source",
) -> SyntheticClassificationSet:
    """Render ``images_per_class`` scenes of each of the ten labels under ``root``.

    The scenes are drawn as `harma.training.synthetic.make_synthetic_dataset` draws them (same
    styles, same generator), from random streams of their own, so a set made with a retrieval
    dataset's seed and style shows other scenes of the same domain. Same arguments ->
    byte-identical files; files of the same names are overwritten.

    Raises:
        ValueError: ``images_per_class`` below 1, an unknown style, or ``image_size`` below 8.
    """
    if isinstance(images_per_class, bool) or not isinstance(images_per_class, int) or images_per_class < 1:
        raise ValueError(f"images_per_class must be an integer >= 1, got {images_per_class!r}")
    style = resolve_style(style)
    root = Path(root)
    salt = zlib.crc32(style.name.encode("utf-8"))
    for label in LABEL_NAMES:
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        label_index = LABEL_NAMES.index(label)
        for k in range(images_per_class):
            rng = np.random.default_rng([seed, salt, _CLASSIFICATION_STREAM, label_index, k])
            scene = generate_scene(label, rng, style, image_size, num_captions=1)
            scene.image.save(folder / f"{label}_{k:05d}.png", format="PNG")
    names = synthetic_class_names(style)
    ordered = tuple(names[label] for label in sorted(LABEL_NAMES))  # the folders' sorted order
    (root / CLASSNAMES_FILE).write_text("".join(f"{name}\n" for name in ordered), encoding="utf-8")
    templates_file = root / TEMPLATES_FILE
    templates_file.write_text("".join(f"{template}\n" for template in SYNTHETIC_TEMPLATES), encoding="utf-8")
    return SyntheticClassificationSet(root, ordered, templates_file, images_per_class * len(LABEL_NAMES), style.name)
