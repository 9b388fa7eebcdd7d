"""Scene styles: the palettes, sizes, noise and words of a synthetic "sensor" (the source and
target domains of the demo and the transfer benchmark)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

RGB = tuple[int, int, int]
Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in image fractions

LABEL_NAMES: tuple[str, ...] = (
    "residential", "forest", "river", "farmland", "desert",
    "industrial", "parking", "airport", "beach", "park",
)

# Colour words that captions use; every palette maps them to RGB.
COLOUR_WORDS: tuple[str, ...] = ("red", "blue", "white", "grey", "orange", "yellow", "green", "brown", "black")
SURFACE_KEYS: tuple[str, ...] = (
    "grass", "forest_floor", "sand", "dune", "soil", "concrete", "asphalt", "road", "marking",
    "water", "sea", "foam", "tree", "tree_light", "tree_autumn", "shrub", "shadow",
    "crop_green", "crop_yellow", "crop_brown", "plane", "tank",
)
VOCABULARY_KEYS: tuple[str, ...] = (
    "building", "road", "tree", "forest", "lake", "river", "bridge", "field", "car", "parking_lot",
    "plane", "runway", "terminal", "tank", "factory", "sea", "beach", "umbrella", "shrub", "dune",
    "path", "playground", "grass", "sand", "residential", "farmland", "industrial", "desert",
    "airport", "park",
)


@dataclass(frozen=True)
class SceneStyle:
    """How scenes look and are worded: one imaging domain.

    palette: RGB (0-255) of every key in ``SURFACE_KEYS`` and ``COLOUR_WORDS``.
    noise_std: per-pixel Gaussian sensor noise, in 0-255 grey levels.
    texture: amplitude of low-frequency brightness mottling, in 0-255 grey levels.
    scale: multiplier of object sizes (buildings, trees, cars, ...); layout is unchanged.
    vocabulary: concept (``VOCABULARY_KEYS``) -> (singular, plural) words used in captions.
    Mappings are stored read-only.
    """

    name: str
    palette: Mapping[str, RGB]
    noise_std: float
    texture: float
    scale: float
    vocabulary: Mapping[str, tuple[str, str]]

    def __post_init__(self) -> None:
        missing_colours = [key for key in (*SURFACE_KEYS, *COLOUR_WORDS) if key not in self.palette]
        missing_words = [key for key in VOCABULARY_KEYS if key not in self.vocabulary]
        if missing_colours or missing_words:
            raise ValueError(
                f"SceneStyle {self.name!r} lacks palette keys {missing_colours} and vocabulary keys {missing_words}"
            )
        if self.noise_std < 0 or self.texture < 0 or self.scale <= 0:
            raise ValueError("noise_std and texture must be >= 0 and scale > 0")
        object.__setattr__(self, "palette", MappingProxyType({k: tuple(v) for k, v in self.palette.items()}))
        object.__setattr__(self, "vocabulary", MappingProxyType({k: tuple(v) for k, v in self.vocabulary.items()}))


def _source_vocabulary() -> dict[str, tuple[str, str]]:
    words = {key: (key, key + "s") for key in VOCABULARY_KEYS}
    words.update({
        "bridge": ("bridge", "bridges"), "parking_lot": ("parking lot", "parking lots"),
        "tank": ("storage tank", "storage tanks"), "factory": ("factory", "factories"),
        "beach": ("beach", "beaches"), "shrub": ("shrub", "shrubs"), "grass": ("grass", "grass"),
        "sand": ("sand", "sand"), "residential": ("residential area", "residential areas"),
        "farmland": ("farmland", "farmlands"), "industrial": ("industrial area", "industrial areas"),
        "terminal": ("terminal", "terminals"),
    })
    return words


SOURCE_STYLE = SceneStyle(
    name="source",
    palette={
        "grass": (92, 140, 64), "forest_floor": (52, 84, 40), "sand": (222, 200, 150), "dune": (190, 162, 110),
        "soil": (150, 110, 75), "concrete": (172, 172, 166), "asphalt": (66, 66, 72), "road": (112, 112, 112),
        "marking": (240, 240, 230), "water": (45, 95, 155), "sea": (28, 72, 135), "foam": (245, 245, 245),
        "tree": (30, 96, 38), "tree_light": (112, 176, 70), "tree_autumn": (206, 160, 48), "shrub": (88, 110, 50),
        "shadow": (28, 34, 28), "crop_green": (88, 162, 58), "crop_yellow": (218, 190, 78),
        "crop_brown": (140, 98, 58), "plane": (238, 238, 238), "tank": (226, 226, 220),
        "red": (192, 48, 44), "blue": (48, 88, 184), "white": (236, 236, 230), "grey": (128, 128, 134),
        "orange": (228, 128, 38), "yellow": (238, 206, 52), "green": (58, 152, 68), "brown": (120, 80, 48),
        "black": (30, 30, 36),
    },
    noise_std=2.0,
    texture=6.0,
    scale=1.0,
    vocabulary=_source_vocabulary(),
)

# Another sensor and season: dry olive vegetation, teal water, warmer haze, smaller objects
# (higher altitude), more noise and texture, and synonyms for most nouns.
TARGET_STYLE = SceneStyle(
    name="target",
    palette={
        "grass": (152, 150, 92), "forest_floor": (92, 96, 60), "sand": (204, 192, 172), "dune": (168, 156, 136),
        "soil": (122, 100, 92), "concrete": (192, 186, 176), "asphalt": (96, 90, 90), "road": (142, 136, 126),
        "marking": (250, 244, 200), "water": (36, 118, 112), "sea": (22, 96, 104), "foam": (230, 240, 236),
        "tree": (70, 112, 54), "tree_light": (142, 172, 88), "tree_autumn": (186, 118, 50), "shrub": (118, 122, 70),
        "shadow": (52, 46, 40), "crop_green": (128, 166, 78), "crop_yellow": (226, 176, 96),
        "crop_brown": (156, 116, 86), "plane": (214, 216, 226), "tank": (204, 210, 216),
        "red": (172, 72, 62), "blue": (72, 104, 160), "white": (226, 228, 222), "grey": (146, 142, 140),
        "orange": (214, 140, 70), "yellow": (224, 200, 90), "green": (84, 146, 84), "brown": (128, 92, 66),
        "black": (48, 44, 44),
    },
    noise_std=7.0,
    texture=14.0,
    scale=0.8,
    vocabulary={
        "building": ("house", "houses"), "road": ("street", "streets"), "tree": ("bush", "bushes"),
        "forest": ("woods", "woods"), "lake": ("pond", "ponds"), "river": ("stream", "streams"),
        "bridge": ("overpass", "overpasses"), "field": ("plot", "plots"), "car": ("vehicle", "vehicles"),
        "parking_lot": ("car park", "car parks"), "plane": ("aircraft", "aircraft"),
        "runway": ("airstrip", "airstrips"), "terminal": ("terminal hall", "terminal halls"),
        "tank": ("silo", "silos"), "factory": ("warehouse", "warehouses"), "sea": ("ocean", "oceans"),
        "beach": ("shore", "shores"), "umbrella": ("parasol", "parasols"), "shrub": ("plant", "plants"),
        "dune": ("sand ridge", "sand ridges"), "path": ("trail", "trails"),
        "playground": ("sports court", "sports courts"), "grass": ("meadow", "meadow"),
        "sand": ("sandy ground", "sandy ground"), "residential": ("neighbourhood", "neighbourhoods"),
        "farmland": ("cropland", "croplands"), "industrial": ("industrial zone", "industrial zones"),
        "desert": ("wasteland", "wastelands"), "airport": ("airfield", "airfields"),
        "park": ("public garden", "public gardens"),
    },
)

SCENE_STYLES: Mapping[str, SceneStyle] = MappingProxyType({"source": SOURCE_STYLE, "target": TARGET_STYLE})


def resolve_style(style: str | SceneStyle) -> SceneStyle:
    """The `SceneStyle` named ``style`` (``"source"`` or ``"target"``), or ``style`` itself."""
    if isinstance(style, SceneStyle):
        return style
    if style not in SCENE_STYLES:
        raise ValueError(f"unknown style {style!r}; choose from {list(SCENE_STYLES)} or pass a SceneStyle")
    return SCENE_STYLES[style]
