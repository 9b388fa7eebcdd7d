"""Synthetic remote-sensing scenes with captions, in the RSITMD annotation layout.

Small top-down renderings (land cover, buildings, roads, water, trees, fields, cars, planes,
...) of ten scene labels, each with five different template captions that state what is
drawn: counts ("two", "several", "many"), colours, positions and relations. Used by the CPU
demo training and by the source -> target transfer benchmark; see ``docs/data.md``.

Everything is a pure function of the seed: the same seed gives byte-identical files.

- `harma.training.synthetic.styles`: how a "sensor" draws and words a scene (`SceneStyle`);
- `harma.training.synthetic.scenes`: one scene (`generate_scene`);
- `harma.training.synthetic.dataset`: a whole dataset on disk (`make_synthetic_dataset`).
"""

from .dataset import SyntheticDataset, make_synthetic_dataset
from .scenes import MAX_CAPTIONS_PER_IMAGE, SyntheticScene, count_word, generate_scene
from .styles import LABEL_NAMES, SCENE_STYLES, SOURCE_STYLE, TARGET_STYLE, SceneStyle

__all__ = [
    "LABEL_NAMES",
    "MAX_CAPTIONS_PER_IMAGE",
    "SCENE_STYLES",
    "SOURCE_STYLE",
    "TARGET_STYLE",
    "SceneStyle",
    "SyntheticDataset",
    "SyntheticScene",
    "count_word",
    "generate_scene",
    "make_synthetic_dataset",
]
