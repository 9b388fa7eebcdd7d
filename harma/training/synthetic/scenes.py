"""Drawing one synthetic scene and writing its captions: ten scene labels, each painted
top-down on a canvas, with template captions that state what is drawn."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .styles import LABEL_NAMES, RGB, Box, SceneStyle, resolve_style

# --------------------------------------------------------------------------- words

_NUMBER_WORDS = ("no", "one", "two", "three", "four", "five")


def count_word(count: int) -> str:
    """Caption word for a count: exact up to five, "several" for 6-9, "many" from 10."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if count < len(_NUMBER_WORDS):
        return _NUMBER_WORDS[count]
    return "several" if count < 10 else "many"


# Regions: nine cells of a 3x3 grid, and four halves that share the side cells' phrases.
_POSITION_PHRASES = MappingProxyType({
    "top left": "in the top left corner", "top": "at the top", "top right": "in the top right corner",
    "left": "on the left", "middle": "in the middle", "right": "on the right",
    "bottom left": "in the bottom left corner", "bottom": "at the bottom",
    "bottom right": "in the bottom right corner",
})
_CELLS = tuple(_POSITION_PHRASES)
_HALVES = ("left", "right", "top", "bottom")
_OPPOSITE = MappingProxyType({"left": "right", "right": "left", "top": "bottom", "bottom": "top"})
_RELATIVE_PHRASES = MappingProxyType({
    "left": "to the left of", "right": "to the right of", "top": "above", "bottom": "below",
})
_DIRECTION_PHRASES = MappingProxyType({
    "horizontal": "from left to right", "vertical": "from top to bottom",
    "diagonal": "diagonally from the top left to the bottom right",
})


def _cell_box(cell: str) -> Box:
    col, row = _CELLS.index(cell) % 3, _CELLS.index(cell) // 3
    return (col / 3, row / 3, (col + 1) / 3, (row + 1) / 3)


def _half_box(half: str, margin: float = 0.0) -> Box:
    return {
        "left": (0.0, 0.0, 0.5 - margin, 1.0), "right": (0.5 + margin, 0.0, 1.0, 1.0),
        "top": (0.0, 0.0, 1.0, 0.5 - margin), "bottom": (0.0, 0.5 + margin, 1.0, 1.0),
    }[half]


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


class _Words:
    """Noun lookup in a style's vocabulary."""

    def __init__(self, vocabulary: Mapping[str, tuple[str, str]]) -> None:
        self.vocabulary = vocabulary

    def noun(self, concept: str, count: int = 1) -> str:
        singular, plural = self.vocabulary[concept]
        return singular if count == 1 else plural

    def counted(self, concept: str, count: int) -> str:
        return f"{count_word(count)} {self.noun(concept, count)}"


# --------------------------------------------------------------------------- drawing

class _Canvas:
    """A super-sampled RGB drawing surface addressed in image fractions (0..1)."""

    def __init__(self, size: int, style: SceneStyle, rng: np.random.Generator, background: str) -> None:
        self.size = size
        self.style = style
        self.rng = rng
        self.image = Image.new("RGB", (size, size), self.colour(background))
        self.draw = ImageDraw.Draw(self.image)

    def colour(self, key: str, jitter: int = 10, shade: float = 1.0) -> RGB:
        base = np.asarray(self.style.palette[key], dtype=np.float64) * shade
        noisy = base + self.rng.integers(-jitter, jitter + 1, size=3)
        return tuple(int(v) for v in np.clip(noisy, 0, 255))

    def px(self, value: float) -> float:
        return value * self.size

    def rect(self, cx: float, cy: float, w: float, h: float, fill: RGB) -> None:
        x0, y0 = self.px(cx - w / 2), self.px(cy - h / 2)
        self.draw.rectangle((x0, y0, x0 + self.px(w), y0 + self.px(h)), fill=fill)

    def box(self, box: Box, fill: RGB) -> None:
        self.draw.rectangle(tuple(self.px(v) for v in box), fill=fill)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, fill: RGB) -> None:
        self.draw.ellipse((self.px(cx - rx), self.px(cy - ry), self.px(cx + rx), self.px(cy + ry)), fill=fill)

    def line(self, points: list[tuple[float, float]], width: float, fill: RGB) -> None:
        self.draw.line([(self.px(x), self.px(y)) for x, y in points], fill=fill,
                       width=max(1, round(self.px(width))), joint="curve")

    def polygon(self, points: list[tuple[float, float]], fill: RGB) -> None:
        self.draw.polygon([(self.px(x), self.px(y)) for x, y in points], fill=fill)

    # objects, sizes scaled by the style
    def building(self, cx: float, cy: float, roof: str, size: float = 0.11) -> None:
        s = size * self.style.scale
        w, h = s * self.rng.uniform(0.8, 1.25), s * self.rng.uniform(0.8, 1.25)
        offset = 0.18 * s
        self.rect(cx + offset, cy + offset, w, h, self.colour("shadow", 4))
        roof_rgb = self.colour(roof)
        self.rect(cx, cy, w, h, roof_rgb)
        ridge = tuple(int(v * 0.72) for v in roof_rgb)
        if w >= h:
            self.line([(cx - w / 2, cy), (cx + w / 2, cy)], 0.012, ridge)
        else:
            self.line([(cx, cy - h / 2), (cx, cy + h / 2)], 0.012, ridge)

    def tree(self, cx: float, cy: float, tone: str = "tree", size: float = 0.038) -> None:
        r = size * self.style.scale * self.rng.uniform(0.8, 1.2)
        self.ellipse(cx + 0.35 * r, cy + 0.35 * r, r, r, self.colour("shadow", 4))
        self.ellipse(cx, cy, r, r, self.colour(tone, 14))

    def road(self, orientation: str, position: float, width: float, key: str = "road", dashed: bool = True) -> None:
        ends = {
            "horizontal": [(-0.05, position), (1.05, position)],
            "vertical": [(position, -0.05), (position, 1.05)],
            "diagonal": [(-0.05, -0.05 + position - 0.5), (1.05, 1.05 + position - 0.5)],
        }[orientation]
        self.line(ends, width, self.colour(key, 6))
        if dashed:
            (x0, y0), (x1, y1) = ends
            for t in np.arange(0.0, 1.0, 0.1):
                self.line([(x0 + (x1 - x0) * t, y0 + (y1 - y0) * t),
                           (x0 + (x1 - x0) * (t + 0.05), y0 + (y1 - y0) * (t + 0.05))],
                          max(0.008, width / 8), self.colour("marking", 4))

    def river(self, orientation: str, width: float, key: str = "water") -> list[tuple[float, float]]:
        phase, amplitude = self.rng.uniform(0, 2 * math.pi), self.rng.uniform(0.03, 0.07)
        offset = self.rng.uniform(-0.08, 0.08)
        points = []
        for t in np.linspace(-0.05, 1.05, 24):
            wiggle = amplitude * math.sin(2 * math.pi * 1.3 * t + phase)
            if orientation == "horizontal":
                points.append((t, 0.5 + offset + wiggle))
            elif orientation == "vertical":
                points.append((0.5 + offset + wiggle, t))
            else:
                points.append((t + wiggle / 2, t - wiggle / 2))
        self.line(points, width, self.colour(key, 8))
        return points

    def plane(self, cx: float, cy: float, vertical: bool, size: float = 0.17) -> None:
        s = size * self.style.scale
        colour, shadow = self.colour("plane", 6), self.colour("shadow", 4)
        parts = [(0.0, 0.0, 0.2 * s, s), (0.0, -0.05 * s, s, 0.2 * s), (0.0, 0.4 * s, 0.45 * s, 0.12 * s)]
        for fill, dx in ((shadow, 0.1 * s), (colour, 0.0)):
            for px, py, w, h in parts:
                if vertical:
                    self.rect(cx + px + dx, cy + py + dx, w, h, fill)
                else:
                    self.rect(cx + py + dx, cy + px + dx, h, w, fill)

    def finish(self, output_size: int) -> np.ndarray:
        """Texture, downsample to ``output_size`` (box filter) and sensor noise: uint8 (S, S, 3)."""
        pixels = np.asarray(self.image, dtype=np.float32)
        if self.style.texture > 0:
            coarse = self.rng.normal(size=(5, 5)).astype(np.float32)
            mottling = np.asarray(Image.fromarray(coarse).resize((self.size, self.size), Image.Resampling.BICUBIC))
            pixels = pixels + self.style.texture * mottling[..., None]
        factor = self.size // output_size
        pixels = pixels.reshape(output_size, factor, output_size, factor, 3).mean(axis=(1, 3))
        if self.style.noise_std > 0:
            pixels = pixels + self.rng.normal(0.0, self.style.noise_std, size=pixels.shape)
        return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _inner(box: Box, margin: float) -> Box:
    x0, y0, x1, y1 = box
    return (x0 + margin, y0 + margin, x1 - margin, y1 - margin)


def _slots(rng: np.random.Generator, box: Box, count: int, cols: int, rows: int) -> list[tuple[float, float]]:
    """Centres of ``count`` distinct cells of a cols x rows grid over ``box``, slightly jittered."""
    x0, y0, x1, y1 = box
    cell_w, cell_h = (x1 - x0) / cols, (y1 - y0) / rows
    chosen = rng.choice(cols * rows, size=count, replace=False)
    return [
        (x0 + (k % cols + 0.5 + rng.uniform(-0.15, 0.15)) * cell_w,
         y0 + (k // cols + 0.5 + rng.uniform(-0.15, 0.15)) * cell_h)
        for k in sorted(chosen.tolist())
    ]


def _scatter(rng: np.random.Generator, box: Box, count: int,
             keep: Callable[[float, float], bool] = lambda x, y: True) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    points: list[tuple[float, float]] = []
    for _ in range(count * 30):
        if len(points) == count:
            break
        x, y = rng.uniform(x0, x1), rng.uniform(y0, y1)
        if keep(x, y):
            points.append((x, y))
    return points


def _choice(rng: np.random.Generator, options: tuple | list) -> Any:
    return options[int(rng.integers(len(options)))]


# --------------------------------------------------------------------------- scenes
# Each composer draws a scene on the canvas and returns (facts, caption pool). Facts are
# JSON-able; "counts" holds the exact number drawn of each counted concept. The first
# caption of the pool is always used, so it carries the main facts.

def _residential(canvas: _Canvas, rng: np.random.Generator, w: _Words) -> tuple[dict, list[str]]:
    orientation = _choice(rng, ("horizontal", "vertical"))
    sides = ("left", "right") if orientation == "vertical" else ("top", "bottom")
    side = _choice(rng, (*sides, "both"))
    roof = _choice(rng, ("red", "blue", "white", "grey", "orange"))
    road_at = 0.5 + rng.uniform(-0.06, 0.06)
    canvas.road(orientation, road_at, 0.1)
    building_sides = sides if side == "both" else (side,)
    capacity = 10 * len(building_sides)
    n_buildings = min(int(rng.integers(2, 13)), capacity)
    shares = [n_buildings // len(building_sides) + (k < n_buildings % len(building_sides))
              for k in range(len(building_sides))]
    for half, share in zip(building_sides, shares, strict=True):
        box = _inner(_half_box(half, 0.08), 0.03)
        cols, rows = (2, 5) if orientation == "vertical" else (5, 2)
        for cx, cy in _slots(rng, box, share, cols, rows):
            canvas.building(cx, cy, roof)
    n_trees = 0 if side == "both" else int(rng.integers(0, 7))
    if n_trees:
        for cx, cy in _slots(rng, _inner(_half_box(_OPPOSITE[side], 0.1), 0.04), n_trees, 3, 3):
            canvas.tree(cx, cy)
    facts = {"road": orientation, "building_side": side, "roof_colour": roof,
             "counts": {"building": n_buildings, "tree": n_trees}}

    road, buildings = w.noun("road"), w.counted("building", n_buildings)
    house_word = w.noun("building", n_buildings)
    where = "on both sides of the " + road if side == "both" else f"{_RELATIVE_PHRASES[side]} the {road}"
    trees = (f"{w.counted('tree', n_trees)} grow {_POSITION_PHRASES[_OPPOSITE[side]]}" if n_trees
             else f"there are no {w.noun('tree', 2)} near the {house_word}")
    pool = [
        f"{buildings} with {roof} roofs stand {where}",
        f"a {w.noun('residential')} with {buildings} and a {road}",
        f"a {road} runs {_DIRECTION_PHRASES[orientation]} past the {roof} {house_word}",
        f"the {house_word} are {where}" if n_buildings > 1 else f"the {house_word} is {where}",
        trees,
        f"{count_word(n_buildings)} {roof} roofs line a straight {road}",
        f"{w.noun('residential')} where {buildings} have {roof} roofs",
    ]
    return facts, pool


def _forest(canvas: _Canvas, rng: np.random.Generator, w: _Words) -> tuple[dict, list[str]]:
    density = _choice(rng, ("dense", "sparse"))
    tone_key, tone = _choice(rng, (("tree", "dark green"), ("tree_light", "light green"), ("tree_autumn", "yellow")))
    feature = _choice(rng, ("lake", "path", "none"))
    where = _choice(rng, _CELLS)
    path_direction = _choice(rng, ("horizontal", "vertical", "diagonal"))
    keep: Callable[[float, float], bool] = lambda x, y: True  # noqa: E731
    if feature == "lake":
        x0, y0, x1, y1 = _cell_box(where)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        canvas.ellipse(cx, cy, 0.15, 0.12, canvas.colour("water"))
        keep = lambda x, y: ((x - cx) / 0.19) ** 2 + ((y - cy) / 0.16) ** 2 > 1  # noqa: E731
    elif feature == "path":
        canvas.road(path_direction, 0.5, 0.05, key="soil", dashed=False)
        axis = {"horizontal": lambda x, y: abs(y - 0.5), "vertical": lambda x, y: abs(x - 0.5),
                "diagonal": lambda x, y: abs(y - x) / math.sqrt(2)}[path_direction]
        keep = lambda x, y: axis(x, y) > 0.07  # noqa: E731
    n_trees = int(rng.integers(45, 70)) if density == "dense" else int(rng.integers(12, 24))
    for cx, cy in _scatter(rng, (0.0, 0.0, 1.0, 1.0), n_trees, keep):
        canvas.tree(cx, cy, tone_key, 0.045)
    facts = {"density": density, "tree_colour": tone, "feature": feature,
             "feature_position": where if feature == "lake" else None,
             "path": path_direction if feature == "path" else None, "counts": {"tree": n_trees}}

    forest, trees, lake, path = w.noun("forest"), w.noun("tree", 2), w.noun("lake"), w.noun("path")
    spacing = "close together" if density == "dense" else "far apart"
    if feature == "lake":
        main = f"a {density} {forest} of {tone} {trees} with a {lake} {_POSITION_PHRASES[where]}"
        detail = f"a small {lake} lies {_POSITION_PHRASES[where]} of the {forest}"
        extra = f"{tone} {trees} surround a {lake}"
    elif feature == "path":
        main = f"a {density} {forest} of {tone} {trees} crossed by a {path} {_DIRECTION_PHRASES[path_direction]}"
        detail = f"a {path} runs through the {forest} {_DIRECTION_PHRASES[path_direction]}"
        extra = f"a narrow {path} divides the {tone} {trees}"
    else:
        main = f"a {density} {forest} of {tone} {trees} without any clearing"
        detail = f"the {forest} has no {lake} and no {path}"
        extra = f"{tone} {trees} cover the whole image"
    pool = [
        main, detail, extra,
        f"the {tone} {trees} stand {spacing}",
        f"{'many' if density == 'dense' else 'scattered'} {tone} {trees} in a {forest}",
        f"this {forest} is {density}",
        f"a {forest} seen from above with {tone} {trees}",
    ]
    return facts, pool


def _river(canvas: _Canvas, rng: np.random.Generator, w: _Words) -> tuple[dict, list[str]]:
    bank = _choice(rng, ("grass", "sand"))
    canvas.box((0, 0, 1, 1), canvas.colour(bank))
    orientation = _choice(rng, ("horizontal", "vertical", "diagonal"))
    width_word = _choice(rng, ("narrow", "wide"))
    width = 0.09 if width_word == "narrow" else 0.17
    points = canvas.river(orientation, width)
    has_bridge = bool(rng.integers(2))
    if has_bridge:
        cross = {"horizontal": "vertical", "vertical": "horizontal", "diagonal": "diagonal"}[orientation]
        if cross == "diagonal":
            mx, my = points[len(points) // 2]
            canvas.line([(mx - 0.2, my + 0.2), (mx + 0.2, my - 0.2)], 0.06, canvas.colour("road", 6))
        else:
            canvas.road(cross, 0.5 + rng.uniform(-0.15, 0.15), 0.06, dashed=False)
    n_trees = int(rng.integers(0, 11))
    banks = []
    for k in range(n_trees):
        x, y = points[int(rng.integers(2, len(points) - 2))]
        side = 1 if k % 2 else -1
        gap = width / 2 + 0.06
        if orientation == "horizontal":
            banks.append((x, y + side * gap))
        elif orientation == "vertical":
            banks.append((x + side * gap, y))
        else:
            banks.append((x + side * gap * 0.7, y - side * gap * 0.7))
    for cx, cy in banks:
        canvas.tree(cx, cy)
    facts = {"bank": bank, "river": orientation, "width": width_word, "bridge": has_bridge,
             "counts": {"tree": n_trees, "bridge": int(has_bridge)}}

    river, bank_word = w.noun("river"), w.noun(bank)
    trees = (f"{w.counted('tree', n_trees)} grow along the banks of the {river}" if n_trees
             else f"no {w.noun('tree', 2)} grow along the {river}")
    bridge = (f"a {w.noun('bridge')} crosses the {width_word} {river}" if has_bridge
              else f"there is no {w.noun('bridge')} over the {river}")
    pool = [
        f"a {width_word} {river} flows {_DIRECTION_PHRASES[orientation]} through {bank_word}"
        + (f" under a {w.noun('bridge')}" if has_bridge else "")
        + f" with {w.counted('tree', n_trees)} on its banks",
        trees, bridge,
        f"the banks of the {river} are covered with {bank_word}",
        f"a winding {river} runs {_DIRECTION_PHRASES[orientation]}",
        f"a {width_word} {river} with {count_word(n_trees)} {w.noun('tree', n_trees)} beside it",
        f"{bank_word} lies on both sides of a {width_word} {river}",
    ]
    return facts, pool


_FIELD_KEYS = MappingProxyType({"green": "crop_green", "yellow": "crop_yellow", "brown": "crop_brown"})


def _farmland(canvas: _Canvas, rng: np.random.Generator, w: _Words) -> tuple[dict, list[str]]:
    cols, rows = _choice(rng, ((2, 1), (1, 2), (3, 1), (2, 2), (3, 2), (2, 3)))
    n_fields = cols * rows
    stripes = _choice(rng, ("horizontal", "vertical"))
    colours = [_choice(rng, tuple(_FIELD_KEYS)) for _ in range(n_fields)]
    canvas.box((0, 0, 1, 1), canvas.colour("soil"))
    for k, colour in enumerate(colours):
        c, r = k % cols, k // cols
        box = (c / cols + 0.015, r / rows + 0.015, (c + 1) / cols - 0.015, (r + 1) / rows - 0.015)
        base = canvas.colour(_FIELD_KEYS[colour])
        canvas.box(box, base)
        dark = tuple(int(v * 0.8) for v in base)
        x0, y0, x1, y1 = box
        for t in np.arange(0.03, 1.0, 0.07):
            if stripes == "horizontal":
                canvas.line([(x0, y0 + t * (y1 - y0)), (x1, y0 + t * (y1 - y0))], 0.012, dark)
            else:
                canvas.line([(x0 + t * (x1 - x0), y0), (x0 + t * (x1 - x0), y1)], 0.012, dark)
    n_houses = int(rng.integers(0, 3))
    house_roof = _choice(rng, ("red", "white", "blue"))
    house_cell = _choice(rng, _CELLS)
    if n_houses:
        for cx, cy in _slots(rng, _inner(_cell_box(house_cell), 0.04), n_houses, 2, 1):
            canvas.building(cx, cy, house_roof, 0.09)
    by_colour = {colour: colours.count(colour) for colour in _FIELD_KEYS if colours.count(colour)}
    facts = {"fields_grid": [cols, rows], "field_colours": colours, "stripes": stripes,
             "house_roof": house_roof if n_houses else None, "house_position": house_cell if n_houses else None,
             "counts": {"field": n_fields, "building": n_houses, **{f"{c}_field": n for c, n in by_colour.items()}}}

    fields, field_word = w.counted("field", n_fields), w.noun("field", n_fields)
    colour_list = _join(list(by_colour))
    by_colour_text = _join([f"{count_word(n)} {c}" for c, n in by_colour.items()])
    houses = (f"{w.counted('building', n_houses)} with {house_roof} roofs {'stand' if n_houses > 1 else 'stands'} "
              f"{_POSITION_PHRASES[house_cell]}" if n_houses
              else f"there is no {w.noun('building')} on the {w.noun('farmland')}")
    pool = [
        f"{fields} of {colour_list} crops" + (f" with {w.counted('building', n_houses)}" if n_houses else ""),
        f"the {w.noun('farmland')} is divided into {fields}",
        f"{by_colour_text} {field_word}",
        f"crop rows run {_DIRECTION_PHRASES[stripes]} in every {w.noun('field')}",
        houses,
        f"{colour_list} {w.noun('field', 2)} separated by thin strips of soil",
        f"a {w.noun('farmland')} with {fields} in {rows} {'row' if rows == 1 else 'rows'}",
    ]
    return facts, pool


def _desert(canvas: _Canvas, rng: np.random.Generator, w: _Words) -> tuple[dict, list[str]]:
    canvas.box((0, 0, 1, 1), canvas.colour("sand"))
    dunes = _choice(rng, ("horizontal", "diagonal"))
    phase = rng.uniform(0, 2 * math.pi)
    dune_rgb = canvas.colour("dune", 6)
    for base in np.arange(-0.4 if dunes == "diagonal" else 0.06, 1.0, 0.11):
        points = [(t, base + 0.03 * math.sin(9 * t + phase) + (0.5 * t if dunes == "diagonal" else 0.0))
                  for t in np.linspace(-0.05, 1.05, 16)]
        canvas.line(points, 0.018, dune_rgb)
    road = _choice(rng, ("none", "horizontal", "vertical"))
    if road != "none":
        canvas.road(road, 0.5 + rng.uniform(-0.2, 0.2), 0.07, dashed=False)
    oasis = _choice(rng, ("none", *_CELLS))
    if oasis != "none":
        x0, y0, x1, y1 = _cell_box(oasis)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        canvas.ellipse(cx, cy, 0.09, 0.07, canvas.colour("water"))
        for angle in (0.3, 2.4, 4.4):
            canvas.tree(cx + 0.12 * math.cos(angle), cy + 0.1 * math.sin(angle), "tree", 0.032)
    n_shrubs = int(rng.integers(0, 10))
    for cx, cy in _scatter(rng, (0.05, 0.05, 0.95, 0.95), n_shrubs):
        canvas.ellipse(cx, cy, 0.02 * canvas.style.scale, 0.02 * canvas.style.scale, canvas.colour("shrub"))
    facts = {"dunes": dunes, "road": None if road == "none" else road,
             "oasis_position": None if oasis == "none" else oasis, "counts": {"shrub": n_shrubs}}

    desert, sand = w.noun("desert"), w.noun("sand")
    shrubs = (f"{w.counted('shrub', n_shrubs)} are scattered on the {sand}" if n_shrubs
              else f"no {w.noun('shrub', 2)} grow on the bare {sand}")
    road_text = (f"a {w.noun('road')} crosses the {desert} {_DIRECTION_PHRASES[road]}" if road != "none"
                 else f"no {w.noun('road')} crosses the {desert}")
    oasis_text = (f"a {w.noun('lake')} with {w.noun('tree', 2)} lies {_POSITION_PHRASES[oasis]}" if oasis != "none"
                  else f"there is no water in the {desert}")
    pool = [
        f"a {desert} with {dunes} {w.noun('dune', 2)} and {w.counted('shrub', n_shrubs)}"
        + (f" and a small {w.noun('lake')} {_POSITION_PHRASES[oasis]}" if oasis != "none" else "")
        + (f" crossed by a {w.noun('road')} {_DIRECTION_PHRASES[road]}" if road != "none" else ""),
        shrubs if n_shrubs != 1 else f"one {w.noun('shrub')} grows on the {sand}", road_text, oasis_text,
        f"yellow {sand} shaped into {dunes} {w.noun('dune', 2)}",
        f"a dry {desert} covered with {sand}",
        f"wavy {w.noun('dune', 2)} cross the {desert}",
    ]
    return facts, pool


def _industrial(canvas: _Canvas, rng: np.random.Generator, w: _Words) -> tuple[dict, list[str]]:
    canvas.box((0, 0, 1, 1), canvas.colour("concrete"))
    orientation = _choice(rng, ("horizontal", "vertical"))
    canvas.road(orientation, 0.5, 0.09)
    factory_side = _choice(rng, ("left", "right") if orientation == "vertical" else ("top", "bottom"))
    roof = _choice(rng, ("white", "grey", "blue"))
    n_factories = int(rng.integers(1, 5))
    cols, rows = (1, 4) if orientation == "vertical" else (4, 1)
    for cx, cy in _slots(rng, _inner(_half_box(factory_side, 0.06), 0.02), n_factories, cols, rows):
        canvas.building(cx, cy, roof, 0.2)
    n_tanks = int(rng.integers(0, 7))
    tank_half = _half_box(_OPPOSITE[factory_side], 0.08)
    for cx, cy in _slots(rng, _inner(tank_half, 0.04), n_tanks, 3, 3):
        r = 0.05 * canvas.style.scale
        canvas.ellipse(cx + 0.01, cy + 0.01, r, r, canvas.colour("shadow", 4))
        canvas.ellipse(cx, cy, r, r, canvas.colour("tank", 6))
        canvas.ellipse(cx, cy, r * 0.45, r * 0.45, canvas.colour("tank", 6, 0.85))
    facts = {"road": orientation, "factory_side": factory_side, "roof_colour": roof,
             "counts": {"factory": n_factories, "tank": n_tanks}}

    factories, tanks = w.counted("factory", n_factories), w.counted("tank", n_tanks)
    tank_side = _POSITION_PHRASES[_OPPOSITE[factory_side]]
    pool = [
        f"{factories} with {roof} roofs {_POSITION_PHRASES[factory_side]} and {tanks} {tank_side}",
        f"an {w.noun('industrial')} with {factories} beside a {w.noun('road')}",
        f"{tanks} {'stands' if n_tanks == 1 else 'stand'} {_RELATIVE_PHRASES[_OPPOSITE[factory_side]]} the {w.noun('road')}"
        if n_tanks
        else f"there are no {w.noun('tank', 2)} in this {w.noun('industrial')}",
        f"large {roof} roofs of {factories}",
        f"a {w.noun('road')} runs {_DIRECTION_PHRASES[orientation]} between the {w.noun('factory', 2)}"
        f" and the {w.noun('tank', 2)}",
        f"{w.noun('factory', n_factories)} {_POSITION_PHRASES[factory_side]} on grey concrete",
        f"an {w.noun('industrial')} with {tanks}",
    ]
    return facts, pool


def _parking(canvas: _Canvas, rng: np.random.Generator, w: _Words) -> tuple[dict, list[str]]:
    canvas.box((0, 0, 1, 1), canvas.colour("grass"))
    lot_side = _choice(rng, _HALVES)
    lot = _half_box(lot_side, -0.1)
    canvas.box(lot, canvas.colour("asphalt", 6))
    vertical_rows = lot_side in ("top", "bottom")
    cols, rows = (8, 3) if vertical_rows else (3, 8)
    n_cars = int(rng.integers(2, 23))
    main_colour = _choice(rng, ("white", "red", "blue", "black", "yellow"))
    car_w, car_h = (0.045, 0.075) if vertical_rows else (0.075, 0.045)
    marking = canvas.colour("marking", 4)
    x0, y0, x1, y1 = _inner(lot, 0.03)
    for k in range(cols * rows):  # painted bays make the lot recognisable when nearly empty
        cx, cy = x0 + (k % cols + 0.5) * (x1 - x0) / cols, y0 + (k // cols + 0.5) * (y1 - y0) / rows
        if vertical_rows:
            canvas.line([(cx - (x1 - x0) / cols / 2, cy - car_h / 2), (cx - (x1 - x0) / cols / 2, cy + car_h / 2)],
                        0.006, marking)
        else:
            canvas.line([(cx - car_w / 2, cy - (y1 - y0) / rows / 2), (cx + car_w / 2, cy - (y1 - y0) / rows / 2)],
                        0.006, marking)
    chosen = rng.choice(cols * rows, size=n_cars, replace=False)
    n_main = 0
    for n, k in enumerate(sorted(chosen.tolist())):
        cx, cy = x0 + (k % cols + 0.5) * (x1 - x0) / cols, y0 + (k // cols + 0.5) * (y1 - y0) / rows
        colour = main_colour if n % 3 != 2 else _choice(rng, ("white", "red", "blue", "black", "grey"))
        n_main += colour == main_colour
        s = canvas.style.scale
        canvas.rect(cx, cy, car_w * s, car_h * s, canvas.colour(colour, 8))
    roof = _choice(rng, ("red", "white", "grey", "blue"))
    canvas.building(*_slots(rng, _inner(_half_box(_OPPOSITE[lot_side], 0.12), 0.05), 1, 1, 1)[0], roof, 0.2)
    facts = {"lot_side": lot_side, "car_colour": main_colour, "building_roof": roof,
             "counts": {"car": n_cars, "building": 1, f"{main_colour}_car": n_main}}

    lot_word, cars = w.noun("parking_lot"), w.counted("car", n_cars)
    where = _POSITION_PHRASES[lot_side]
    fullness = "almost empty" if n_cars <= 5 else ("half full" if n_cars < 15 else "nearly full")
    pool = [
        f"a {lot_word} {where} with {cars}, most of them {main_colour}",
        f"the {lot_word} is {fullness}",
        f"a {w.noun('building')} with a {roof} roof {_POSITION_PHRASES[_OPPOSITE[lot_side]]} next to a {lot_word}",
        f"{cars} are parked in rows",
        f"{main_colour} {w.noun('car', 2)} in a {lot_word} {where}",
        f"a {lot_word} beside a {roof} {w.noun('building')}",
        f"{count_word(n_cars)} {w.noun('car', n_cars)} {'is' if n_cars == 1 else 'are'} parked {where}",
    ]
    return facts, pool


def _airport(canvas: _Canvas, rng: np.random.Generator, w: _Words) -> tuple[dict, list[str]]:
    canvas.box((0, 0, 1, 1), canvas.colour("grass"))
    runway_side = _choice(rng, _HALVES)
    vertical = runway_side in ("left", "right")
    at = {"left": 0.2, "right": 0.8, "top": 0.2, "bottom": 0.8}[runway_side]
    canvas.road("vertical" if vertical else "horizontal", at, 0.14, key="asphalt")
    apron = _inner(_half_box(_OPPOSITE[runway_side], 0.0), 0.04)
    canvas.box(apron, canvas.colour("concrete"))
    terminal_roof = _choice(rng, ("white", "grey", "blue"))
    x0, y0, x1, y1 = apron
    far = _OPPOSITE[runway_side]
    if vertical:
        tx = x1 - 0.07 if far == "right" else x0 + 0.07
        canvas.rect(tx, (y0 + y1) / 2, 0.08, 0.7, canvas.colour(terminal_roof))
        stands = (min(x0, tx) + 0.04 if far == "right" else tx + 0.06, y0 + 0.04,
                  tx - 0.06 if far == "right" else x1 - 0.02, y1 - 0.04)
        cols, rows = 1, 4
    else:
        ty = y1 - 0.07 if far == "bottom" else y0 + 0.07
        canvas.rect((x0 + x1) / 2, ty, 0.7, 0.08, canvas.colour(terminal_roof))
        stands = (x0 + 0.04, y0 + 0.02 if far == "bottom" else ty + 0.06,
                  x1 - 0.04, ty - 0.06 if far == "bottom" else y1 - 0.02)
        cols, rows = 4, 1
    n_planes = int(rng.integers(1, 5))
    for cx, cy in _slots(rng, stands, n_planes, cols, rows):
        canvas.plane(cx, cy, vertical=not vertical)
    facts = {"runway_side": runway_side, "runway": "vertical" if vertical else "horizontal",
             "terminal_roof": terminal_roof, "counts": {"plane": n_planes, "runway": 1}}

    runway, planes = w.noun("runway"), w.counted("plane", n_planes)
    direction = _DIRECTION_PHRASES["vertical" if vertical else "horizontal"]
    pool = [
        f"an {w.noun('airport')} with {planes} near a {terminal_roof} {w.noun('terminal')} and a {runway} "
        f"{_POSITION_PHRASES[runway_side]}",
        f"a long {runway} runs {direction}",
        f"{planes} {'waits' if n_planes == 1 else 'wait'} near a {terminal_roof} {w.noun('terminal')}",
        f"a {terminal_roof} {w.noun('terminal')} {_POSITION_PHRASES[far]}",
        f"the {runway} is {_POSITION_PHRASES[runway_side]} of the {w.noun('airport')}",
        f"an {w.noun('airport')} with {count_word(n_planes)} white {w.noun('plane', n_planes)}",
        f"{w.noun('grass')} surrounds the {runway} and the {w.noun('terminal')}",
    ]
    return facts, pool


def _beach(canvas: _Canvas, rng: np.random.Generator, w: _Words) -> tuple[dict, list[str]]:
    canvas.box((0, 0, 1, 1), canvas.colour("grass"))
    sea_side = _choice(rng, _HALVES)
    sea_depth, sand_depth = rng.uniform(0.35, 0.45), rng.uniform(0.22, 0.3)
    phase = rng.uniform(0, 2 * math.pi)

    def shore(depth: float) -> list[tuple[float, float]]:
        line = [(t, depth + 0.025 * math.sin(7 * t + phase)) for t in np.linspace(-0.05, 1.05, 16)]
        mapping = {"top": lambda a, b: (a, b), "bottom": lambda a, b: (a, 1 - b),
                   "left": lambda a, b: (b, a), "right": lambda a, b: (1 - b, a)}[sea_side]
        return [mapping(a, b) for a, b in line]

    corner = {"top": [(1.05, -0.05), (-0.05, -0.05)], "bottom": [(1.05, 1.05), (-0.05, 1.05)],
              "left": [(-0.05, 1.05), (-0.05, -0.05)], "right": [(1.05, 1.05), (1.05, -0.05)]}[sea_side]
    sand_edge = shore(sea_depth + sand_depth)
    canvas.polygon(sand_edge + corner, canvas.colour("sand"))
    water_edge = shore(sea_depth)
    canvas.polygon(water_edge + corner, canvas.colour("sea"))
    canvas.line(water_edge, 0.02, canvas.colour("foam", 4))
    n_umbrellas = int(rng.integers(0, 10))
    umbrella_colour = _choice(rng, ("red", "yellow", "blue", "orange"))
    sand_band = {"top": (0.05, sea_depth + 0.05, 0.95, sea_depth + sand_depth - 0.04),
                 "bottom": (0.05, 1 - sea_depth - sand_depth + 0.04, 0.95, 1 - sea_depth - 0.05),
                 "left": (sea_depth + 0.05, 0.05, sea_depth + sand_depth - 0.04, 0.95),
                 "right": (1 - sea_depth - sand_depth + 0.04, 0.05, 1 - sea_depth - 0.05, 0.95)}[sea_side]
    for cx, cy in _scatter(rng, sand_band, n_umbrellas):
        r = 0.028 * canvas.style.scale
        canvas.ellipse(cx, cy, r, r, canvas.colour(umbrella_colour, 8))
    n_buildings = int(rng.integers(0, 4))
    land = _inner(_half_box(_OPPOSITE[sea_side], 0.5 - (1 - sea_depth - sand_depth) + 0.02), 0.03)
    cols, rows = (3, 1) if sea_side in ("top", "bottom") else (1, 3)
    for cx, cy in _slots(rng, land, n_buildings, cols, rows):
        canvas.building(cx, cy, "white", 0.09)
    facts = {"sea_side": sea_side, "umbrella_colour": umbrella_colour if n_umbrellas else None,
             "counts": {"umbrella": n_umbrellas, "building": n_buildings}}

    sea, beach = w.noun("sea"), w.noun("beach")
    umbrellas = (f"{w.counted('umbrella', n_umbrellas)} {'stands' if n_umbrellas == 1 else 'stand'} on the {beach}"
                 if n_umbrellas else f"the {beach} is empty")
    pool = [
        f"the {sea} is {_POSITION_PHRASES[sea_side]} and {count_word(n_umbrellas)} {umbrella_colour} "
        f"{w.noun('umbrella', n_umbrellas)} {'is' if n_umbrellas == 1 else 'are'} on the {beach}",
        umbrellas,
        f"a sandy {beach} between the {sea} and {w.noun('grass')}",
        f"white waves break on the {beach}",
        f"{w.counted('building', n_buildings)} behind the {beach}" if n_buildings
        else f"no {w.noun('building', 2)} stand behind the {beach}",
        f"a {beach} with the {sea} {_POSITION_PHRASES[sea_side]}",
        f"blue {sea} water {_POSITION_PHRASES[sea_side]} of a {beach}",
    ]
    return facts, pool


def _park(canvas: _Canvas, rng: np.random.Generator, w: _Words) -> tuple[dict, list[str]]:
    canvas.box((0, 0, 1, 1), canvas.colour("grass"))
    pond_cell = _choice(rng, _CELLS)
    x0, y0, x1, y1 = _cell_box(pond_cell)
    px, py = (x0 + x1) / 2, (y0 + y1) / 2
    n_paths = int(rng.integers(1, 3))
    path_rgb = canvas.colour("sand", 6, 0.95)
    for k in range(n_paths):
        phase, at = rng.uniform(0, 2 * math.pi), rng.uniform(0.35, 0.65)
        curve = [(t, at + 0.1 * math.sin(5 * t + phase)) for t in np.linspace(-0.05, 1.05, 20)]
        canvas.line(curve if k == 0 else [(y, x) for x, y in curve], 0.035, path_rgb)
    canvas.ellipse(px, py, 0.13, 0.1, canvas.colour("water"))
    court = _choice(rng, ("none", "red", "blue", "green"))
    court_cell = _choice(rng, [cell for cell in _CELLS if cell != pond_cell])
    if court != "none":
        cx0, cy0, cx1, cy1 = _cell_box(court_cell)
        cx, cy = (cx0 + cx1) / 2, (cy0 + cy1) / 2
        canvas.rect(cx, cy, 0.2 * canvas.style.scale, 0.13 * canvas.style.scale, canvas.colour(court))
        canvas.line([(cx, cy - 0.065 * canvas.style.scale), (cx, cy + 0.065 * canvas.style.scale)], 0.01,
                    canvas.colour("marking", 4))
    n_trees = int(rng.integers(3, 15))
    court_box = _cell_box(court_cell)

    def free(x: float, y: float) -> bool:
        in_pond = ((x - px) / 0.17) ** 2 + ((y - py) / 0.14) ** 2 < 1
        in_court = court != "none" and court_box[0] < x < court_box[2] and court_box[1] < y < court_box[3]
        return not in_pond and not in_court

    for cx, cy in _scatter(rng, (0.03, 0.03, 0.97, 0.97), n_trees, free):
        canvas.tree(cx, cy)
    facts = {"pond_position": pond_cell, "court_colour": None if court == "none" else court,
             "court_position": None if court == "none" else court_cell,
             "counts": {"tree": n_trees, "path": n_paths, "lake": 1}}

    park, lake, trees = w.noun("park"), w.noun("lake"), w.counted("tree", n_trees)
    paths = "a winding " + w.noun("path") if n_paths == 1 else "two crossing " + w.noun("path", 2)
    court_text = (f"a {court} {w.noun('playground')} {_POSITION_PHRASES[court_cell]}" if court != "none"
                  else f"the {park} has no {w.noun('playground')}")
    pool = [
        f"a {park} with a {lake} {_POSITION_PHRASES[pond_cell]}, {trees}"
        + (f" and a {court} {w.noun('playground')}" if court != "none" else f" and {paths}"),
        f"{paths} cross the green {w.noun('grass')}" if n_paths == 2 else f"{paths} crosses the {w.noun('grass')}",
        court_text,
        f"{trees} are scattered around the {park}",
        f"a small {lake} lies {_POSITION_PHRASES[pond_cell]} of the {park}",
        f"a green {park} with {paths} and a {lake}",
        f"{w.noun('grass')}, {w.noun('tree', 2)} and a {lake} in a {park}",
    ]
    return facts, pool


_COMPOSERS: Mapping[str, Callable[[_Canvas, np.random.Generator, _Words], tuple[dict, list[str]]]] = (
    MappingProxyType({
        "residential": _residential, "forest": _forest, "river": _river, "farmland": _farmland,
        "desert": _desert, "industrial": _industrial, "parking": _parking, "airport": _airport,
        "beach": _beach, "park": _park,
    })
)
_BACKGROUNDS = MappingProxyType({"forest": "forest_floor"})
MAX_CAPTIONS_PER_IMAGE = 7


# --------------------------------------------------------------------------- public API

@dataclass(frozen=True)
class SyntheticScene:
    """One generated scene: PIL RGB image (size x size), facts (JSON-able) and captions."""

    image: Image.Image
    label_name: str
    facts: dict
    captions: list[str]


def generate_scene(
    label_name: str,
    rng: np.random.Generator | int,
    style: str | SceneStyle = "source",
    image_size: int = 64,
    num_captions: int = 5,
) -> SyntheticScene:
    """Render one scene of ``label_name`` and caption it with ``num_captions`` different sentences.

    The first caption always states the scene's main facts (e.g. how many buildings with
    which roof colour on which side); the others are drawn from the rest of the pool.
    """
    if label_name not in _COMPOSERS:
        raise ValueError(f"unknown scene label {label_name!r}; choose from {list(LABEL_NAMES)}")
    if not 1 <= num_captions <= MAX_CAPTIONS_PER_IMAGE:
        raise ValueError(f"num_captions must be in 1..{MAX_CAPTIONS_PER_IMAGE}, got {num_captions}")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}")
    style = resolve_style(style)
    rng = np.random.default_rng(rng) if isinstance(rng, int) else rng
    # Drawing at twice the size and box-filtering gives anti-aliased edges at 32-64 px
    canvas = _Canvas(2 * image_size, style, rng, _BACKGROUNDS.get(label_name, "grass"))
    facts, pool = _COMPOSERS[label_name](canvas, rng, _Words(style.vocabulary))
    pixels = canvas.finish(image_size)
    captions = [_sentence(pool[0])]
    rest = [_sentence(text) for text in pool[1:]]
    for k in rng.permutation(len(rest)).tolist():
        if len(captions) == num_captions:
            break
        if rest[k] not in captions:
            captions.append(rest[k])
    if len(captions) < num_captions:
        raise RuntimeError(f"scene {label_name!r} produced only {len(captions)} distinct captions")
    return SyntheticScene(Image.fromarray(pixels), label_name, {"label_name": label_name, **facts}, captions)
