"""Synthetic remote-sensing scenes with captions, in the RSITMD annotation layout.

Small top-down renderings (land cover, buildings, roads, water, trees, fields, cars, planes,
...) of ten scene labels, each with five different template captions that state what is
drawn: counts ("two", "several", "many"), colours, positions and relations. Used by the CPU
demo training and by the source -> target transfer benchmark; see ``docs/data.md``.

Everything is a pure function of the seed: the same seed gives byte-identical files.

- `harma.training.synthetic.styles`: how a "sensor" draws and words a scene (`SceneStyle`);
- `harma.training.synthetic.scenes`: one scene (`generate_scene`);
- `harma.training.synthetic.dataset`: a whole dataset on disk (`make_synthetic_dataset`);
- `harma.training.synthetic.classification`: a scene classification set of one domain, in that
  domain's words (`make_synthetic_classification_set`), for zero-shot classification.
"""

from .classification import (
    SYNTHETIC_TEMPLATES,
    SyntheticClassificationSet,
    make_synthetic_classification_set,
    synthetic_class_names,
)
from .dataset import SyntheticDataset, make_synthetic_dataset
from .scenes import MAX_CAPTIONS_PER_IMAGE, SyntheticScene, count_word, generate_scene
from .styles import LABEL_NAMES, SCENE_STYLES, SOURCE_STYLE, TARGET_STYLE, SceneStyle

__all__ = [
    "LABEL_NAMES",
    "MAX_CAPTIONS_PER_IMAGE",
    "SCENE_STYLES",
    "SOURCE_STYLE",
    "SYNTHETIC_TEMPLATES",
    "TARGET_STYLE",
    "SceneStyle",
    "SyntheticClassificationSet",
    "SyntheticDataset",
    "SyntheticScene",
    "count_word",
    "generate_scene",
    "make_synthetic_classification_set",
    "make_synthetic_dataset",
    "synthetic_class_names",
]
