"""Image-text retrieval data: annotation files, datasets and image transforms.

Annotation layout (the RSITMD/RSICD files of the HarMA authors):

- train files: a JSON list of ``{"caption": str, "image": path, "image_id": int, "label": int,
  "label_name": str}``, one caption per entry, several entries per image. ``image_id``,
  ``label`` and ``label_name`` are optional.
- val/test files: a JSON list of ``{"image": path, "caption": [str, ...]}``, one entry per image
  (five captions normally); ``label``/``label_name`` are optional.

Image paths are relative to an image root that the user supplies (images are downloaded
separately). See ``docs/data.md``.
"""

from __future__ import annotations

import json
import math
import os
import string
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from .config import TrainConfig

__all__ = [
    "DEFAULT_CLIP_MEAN",
    "DEFAULT_CLIP_STD",
    "ImageReadError",
    "RANDOM_OPS",
    "RandomOps",
    "RetrievalEvalDataset",
    "RetrievalTrainDataset",
    "TokenizingCollate",
    "build_datasets",
    "check_image_files",
    "load_annotations",
    "preprocess_caption",
    "test_transform",
    "train_transform",
]

DEFAULT_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
DEFAULT_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

PathLike = str | os.PathLike
ImageTransform = Callable[[Image.Image], Any]


# --------------------------------------------------------------------------- captions

def _is_punctuation(char: str) -> bool:
    return char in string.punctuation or unicodedata.category(char).startswith("P")


# Characters that join two words ("tennis-court", "road/railway", "criss_crossing") become a
# space so the words stay apart; every other punctuation mark is deleted ("it's" -> "its").
_WORD_JOINERS = frozenset("-/_\\") | frozenset(
    chr(c) for c in range(0x2010, 0x2016)  # unicode hyphens and dashes
)


def preprocess_caption(text: str, max_words: int = 30) -> str:
    """Normalise a caption: lower-case, strip punctuation, collapse whitespace, truncate.

    Hyphens, slashes and underscores become spaces, all other punctuation (ASCII and Unicode)
    is removed, any run of whitespace (tabs and newlines included) becomes one space, and at
    most ``max_words`` words are kept. A caption made only of punctuation gives ``""``;
    the datasets reject such entries.
    """
    if not isinstance(text, str):
        raise TypeError(f"caption must be a string, got {type(text).__name__}: {text!r}")
    if max_words < 1:
        raise ValueError(f"max_words must be at least 1, got {max_words}")
    chars = []
    for char in text.lower():
        if char in _WORD_JOINERS:
            chars.append(" ")
        elif not _is_punctuation(char):
            chars.append(char)
    return " ".join("".join(chars).split()[:max_words])


# --------------------------------------------------------------------------- annotation files

def load_annotations(path: PathLike, required_keys: Iterable[str] = ("image", "caption")) -> list[dict]:
    """Read a JSON annotation file: a list of dicts, each holding at least ``required_keys``.

    Raises FileNotFoundError if the file is absent and ValueError (naming the file, and the
    entry index where one is at fault) if it is not JSON, not a list, or an entry is not an
    object or lacks a required key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: '{path}'")
    try:
        with path.open("r", encoding="utf-8") as handle:
            annotations = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"annotation file '{path}' is not valid JSON: {error}") from error
    if not isinstance(annotations, list):
        raise ValueError(
            f"annotation file '{path}' must hold a JSON list of entries, got {type(annotations).__name__}"
        )
    required = tuple(required_keys)
    for index, entry in enumerate(annotations):
        if not isinstance(entry, dict):
            raise ValueError(
                f"annotation file '{path}', entry {index}: expected an object, got {type(entry).__name__}"
            )
        missing = [key for key in required if key not in entry]
        if missing:
            raise ValueError(
                f"annotation file '{path}', entry {index}: missing key(s) {missing}; "
                f"the entry has {sorted(entry)}"
            )
    return annotations


def _malformed(source: PathLike, index: int, problem: str) -> ValueError:
    return ValueError(f"annotation file '{source}', entry {index}: {problem}")


def _check_image_field(entry: dict, source: PathLike, index: int) -> str:
    image = entry["image"]
    if not isinstance(image, str) or not image:
        raise _malformed(source, index, f"'image' must be a non-empty path string, got {image!r}")
    return image


def _check_unique_image(entry: dict, source: PathLike, index: int, first_entry: dict[str, int],
                        earlier: Sequence[str]) -> str:
    """The image field of an evaluation entry, refused when an earlier entry (index in
    ``first_entry``, by normalised path) lists the same image: the protocol scores each entry as
    one gallery image, so a repeat would be a second, identical image that counts as wrong for
    the other entry's captions and changes the recalls. Merging silently could hide a broken
    file (one concatenated twice, two images under one name), so the user decides."""
    image = _check_image_field(entry, source, index)
    first = first_entry.setdefault(os.path.normpath(image), index)
    if first != index:
        raise _malformed(
            source, index,
            f"image {image!r} is listed again (entry {first} lists {earlier[first]!r}); a val/test file "
            f"lists each image once with all its captions: merge the two entries' caption lists",
        )
    return image


def _clean_caption(caption: Any, max_words: int, source: PathLike, index: int, what: str = "'caption'") -> str:
    if not isinstance(caption, str):
        raise _malformed(source, index, f"{what} must be a string, got {type(caption).__name__}: {caption!r}")
    cleaned = preprocess_caption(caption, max_words)
    if not cleaned:
        raise _malformed(source, index, f"{what} {caption!r} is empty after preprocessing")
    return cleaned


def _optional_label(entry: dict, source: PathLike, index: int) -> int:
    label = entry.get("label", -1)
    # bool is an int subclass; a true/false label is a broken file, not class 1/0
    if isinstance(label, bool) or not isinstance(label, int):
        raise _malformed(source, index, f"'label' must be an integer, got {label!r}")
    return label


def check_image_files(
    paths: Sequence[PathLike],
    image_root: PathLike,
    source: PathLike = "<annotations>",
    max_examples: int = 5,
) -> list[Path]:
    """Verify that every image path exists under ``image_root``; return the joined paths.

    ``paths`` are the image fields of the annotation entries in order (repeats allowed; each
    distinct file is checked once), so a position in ``paths`` is an entry index of
    ``source``. Raises FileNotFoundError naming ``source``, the image root, how many distinct
    files of how many are missing and the first ``max_examples`` missing ones with the
    index of the first entry that uses them. When none exists, the message says the image
    root is probably wrong.
    """
    root = Path(image_root)
    full_paths = [root / path for path in paths]
    first_entry: dict[Path, int] = {}
    for index, full_path in enumerate(full_paths):
        first_entry.setdefault(full_path, index)
    missing = [(index, full_path) for full_path, index in first_entry.items() if not os.path.exists(full_path)]
    if not missing:
        return full_paths

    n_distinct = len(first_entry)
    referenced = f"referenced by {len(paths)} entries of" if len(paths) != n_distinct else "listed in"
    lines = [
        f"{len(missing)} of {n_distinct} image files {referenced} annotation file '{source}' "
        f"are missing under image root '{root}'."
    ]
    if not root.is_dir():
        lines.append(f"The image root '{root}' does not exist or is not a folder.")
    elif len(missing) == n_distinct:
        lines.append(
            "None of the images exists: the image root is probably wrong (annotation paths are "
            "relative to it)."
        )
        first_index, first_path = missing[0]
        flat_guess = root / Path(paths[first_index]).name
        if os.path.exists(flat_guess):
            lines.append(
                f"'{flat_guess}' exists, so the image root already contains the sub-folder written "
                f"in the annotations ('{paths[first_index]}'): pass its parent folder instead."
            )
    lines.append("First missing (entry index: annotation path -> looked up at):")
    lines.extend(f"  entry {index}: '{paths[index]}' -> '{path}'" for index, path in missing[:max_examples])
    if len(missing) > max_examples:
        lines.append(f"  ... and {len(missing) - max_examples} more")
    raise FileNotFoundError("\n".join(lines))


class ImageReadError(ValueError):
    """An image of a dataset could not be read; the message names the file and its annotation
    entry."""

    @classmethod
    def without_worker_traceback(cls, error: ImageReadError) -> ImageReadError:
        """The same error with only its own message: a DataLoader worker re-raises it in the main
        process wrapped in the worker's traceback."""
        text, marker = str(error), f"{cls.__name__}: "
        if "Original Traceback" in text and marker in text:
            text = text.rsplit(marker, 1)[1].strip()
        return cls(text)


def _open_rgb(path: Path, where: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as error:  # PIL raises many types for damaged files; each is the file's fault
        raise ImageReadError(
            f"image '{path}' ({where}) could not be read: {type(error).__name__}: {error}"
        ) from None


def _apply(transform: ImageTransform | None, image: Image.Image) -> Any:
    # Without a transform return a float tensor (3, H, W) in [0, 1] so default collation works
    return TF.to_tensor(image) if transform is None else transform(image)


# --------------------------------------------------------------------------- datasets

class RetrievalTrainDataset(Dataset):
    """Image-caption pairs for contrastive training, one item per annotation entry.

    ``__getitem__(i)`` returns ``(image, caption, image_index, label)``: the transformed image
    (with ``transform=None`` a float tensor ``(3, H, W)`` in [0, 1]), the preprocessed caption,
    a contiguous id ``0 .. num_images - 1`` of the entry's image (captions of one image share
    it; used for the contrastive soft targets) and the integer scene label (-1 if absent).

    Image identity is the image path: ids are given in order of first appearance over all
    annotation files, so equal ``image_id`` values in two different files do not merge two
    images. Within one file an ``image_id`` naming two different paths is an error.

    Attributes: ``entries`` (the annotation dicts, all files concatenated), ``captions``
    (preprocessed, per entry), ``image_indices`` (per entry), ``labels`` (per entry),
    ``image_paths`` (per distinct image, indexed by image index), ``num_images``,
    ``label_names`` (label -> name, from entries that carry both).
    """

    def __init__(
        self,
        annotation_files: PathLike | Sequence[PathLike],
        image_root: PathLike,
        transform: ImageTransform | None = None,
        max_words: int = 30,
        check_files: bool = True,
    ) -> None:
        if isinstance(annotation_files, (str, os.PathLike)):
            annotation_files = [annotation_files]
        if not annotation_files:
            raise ValueError("RetrievalTrainDataset needs at least one annotation file")
        self.annotation_files = [Path(path) for path in annotation_files]
        self.image_root = Path(image_root)
        self.transform = transform
        self.max_words = max_words

        self.entries: list[dict] = []
        # (annotation file, index in it) of every entry, for error messages
        self.entry_origins: list[tuple[Path, int]] = []
        self.captions: list[str] = []
        self.image_indices: list[int] = []
        self.labels: list[int] = []
        self.image_paths: list[Path] = []
        self.label_names: dict[int, str] = {}
        index_of_path: dict[Path, int] = {}

        for source in self.annotation_files:
            entries = load_annotations(source, required_keys=("image", "caption"))
            if not entries:
                raise ValueError(f"annotation file '{source}' holds no entries")
            relative_paths = []
            path_of_image_id: dict[Any, tuple[str, int]] = {}
            for index, entry in enumerate(entries):
                relative = _check_image_field(entry, source, index)
                if isinstance(entry["caption"], list):
                    raise _malformed(
                        source, index,
                        "'caption' is a list: this looks like a val/test file (use RetrievalEvalDataset); "
                        "train entries hold one caption string each",
                    )
                self.captions.append(_clean_caption(entry["caption"], max_words, source, index))
                label = _optional_label(entry, source, index)
                self.labels.append(label)
                if label >= 0 and isinstance(entry.get("label_name"), str):
                    self.label_names.setdefault(label, entry["label_name"])
                if "image_id" in entry:
                    seen = path_of_image_id.setdefault(entry["image_id"], (relative, index))
                    if seen[0] != relative:
                        raise _malformed(
                            source, index,
                            f"image_id {entry['image_id']!r} names '{relative}' but entry {seen[1]} "
                            f"gave it to '{seen[0]}'",
                        )
                full_path = self.image_root / relative
                if full_path not in index_of_path:
                    index_of_path[full_path] = len(self.image_paths)
                    self.image_paths.append(full_path)
                self.image_indices.append(index_of_path[full_path])
                relative_paths.append(relative)
            if check_files:
                check_image_files(relative_paths, self.image_root, source=source)
            self.entries.extend(entries)
            self.entry_origins.extend((source, index) for index in range(len(entries)))

    @property
    def num_images(self) -> int:
        return len(self.image_paths)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[Any, str, int, int]:
        image_index = self.image_indices[index]
        source, entry = self.entry_origins[index]
        image = _apply(self.transform, _open_rgb(self.image_paths[image_index], f"entry {entry} of '{source}'"))
        return image, self.captions[index], image_index, self.labels[index]

    def __repr__(self) -> str:
        files = ", ".join(str(path) for path in self.annotation_files)
        return (
            f"{type(self).__name__}({len(self)} pairs, {self.num_images} images, "
            f"files=[{files}], image_root='{self.image_root}')"
        )


class RetrievalEvalDataset(Dataset):
    """Evaluation split: iterates over images; the captions are held as attributes.

    ``__getitem__(i)`` returns ``(image, i)`` (image as in RetrievalTrainDataset). Captions of
    all images are flattened in file order: ``captions[j]`` is caption j, ``txt2img[j]`` its
    image index and ``img2txt[i]`` the caption indices of image i. ``labels`` is a list of
    ints (-1 where an entry has none) or None when no entry has a label. ``image_paths`` are
    the joined paths, one per entry. Each image is listed once: a file that lists one twice is
    refused (`ValueError` naming the image and both entries), since the repeat would count as
    a second gallery image and change the recalls.
    """

    def __init__(
        self,
        annotation_file: PathLike,
        image_root: PathLike,
        transform: ImageTransform | None = None,
        max_words: int = 30,
        check_files: bool = True,
    ) -> None:
        self.annotation_file = Path(annotation_file)
        self.image_root = Path(image_root)
        self.transform = transform
        self.max_words = max_words
        source = self.annotation_file

        self.entries: list[dict] = load_annotations(source, required_keys=("image", "caption"))
        if not self.entries:
            raise ValueError(f"annotation file '{source}' holds no entries")
        relative_paths: list[str] = []
        self.captions: list[str] = []
        self.txt2img: list[int] = []
        self.img2txt: list[list[int]] = []
        labels: list[int] = []
        first_entry: dict[str, int] = {}
        for image_index, entry in enumerate(self.entries):
            relative_paths.append(_check_unique_image(entry, source, image_index, first_entry, relative_paths))
            captions = entry["caption"]
            if isinstance(captions, str):
                raise _malformed(
                    source, image_index,
                    "'caption' is a single string: this looks like a train file (use RetrievalTrainDataset); "
                    "val/test entries hold a list of captions",
                )
            if not isinstance(captions, list) or not captions:
                raise _malformed(source, image_index, f"'caption' must be a non-empty list of strings, got {captions!r}")
            caption_indices = []
            for k, caption in enumerate(captions):
                caption_indices.append(len(self.captions))
                self.captions.append(_clean_caption(caption, max_words, source, image_index, f"caption {k}"))
                self.txt2img.append(image_index)
            self.img2txt.append(caption_indices)
            labels.append(_optional_label(entry, source, image_index))
        has_labels = any("label" in entry for entry in self.entries)
        self.labels: list[int] | None = labels if has_labels else None
        if check_files:
            self.image_paths = check_image_files(relative_paths, self.image_root, source=source)
        else:
            self.image_paths = [self.image_root / path for path in relative_paths]

    @property
    def num_images(self) -> int:
        return len(self.image_paths)

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        where = f"entry {index} of '{self.annotation_file}'"
        return _apply(self.transform, _open_rgb(self.image_paths[index], where)), index

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.num_images} images, {len(self.captions)} captions, "
            f"file='{self.annotation_file}', image_root='{self.image_root}')"
        )


# --------------------------------------------------------------------------- transforms

# The ops of the reference's train augmentation (the authors' recipe).
RANDOM_OPS: tuple[str, ...] = (
    "identity", "autocontrast", "equalize", "brightness", "sharpness",
    "shear_x", "shear_y", "translate_x", "translate_y", "rotate",
)


class RandomOps:
    """Apply ``num_ops`` operations drawn (with replacement) from ``ops``, each with probability ``p``.

    Strengths follow the reference's mapping of a magnitude m on a 0-10 scale:

    - brightness, sharpness: enhancement factor ``0.1 + 1.8 * m / 10`` (1.36 at m=7, always
      brighter / sharper, as in the reference)
    - shear x/y: shear coefficient ``0.3 * m / 10`` (0.21, about 11.9 degrees), random sign,
      sheared about the top-left corner like the reference
    - translate x/y: ``10 * m / 10`` pixels at 224 px (7 px), here a fraction ``m / 224`` of
      the image side so smaller images move proportionally, random sign
    - rotate: ``30 * m / 10`` degrees (21), random sign, about the centre
    - identity, autocontrast, equalize: no strength

    Geometric ops interpolate bilinearly and fill uncovered pixels with grey (128, 128, 128).
    Input: a PIL image or a uint8 tensor ``(3, H, W)``; the output has the same type and size.
    Randomness comes from torch's global generator, so ``torch.manual_seed`` reproduces a draw
    and DataLoader workers get different draws.
    """

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: float = 7,
        ops: Sequence[str] = RANDOM_OPS,
        p: float = 0.5,
        fill: tuple[int, int, int] = (128, 128, 128),
    ) -> None:
        unknown = sorted(set(ops) - set(RANDOM_OPS))
        if unknown:
            raise ValueError(f"unknown ops {unknown}; choose from {list(RANDOM_OPS)}")
        if not ops:
            raise ValueError("ops must not be empty")
        if not 0 <= magnitude <= 10:
            raise ValueError(f"magnitude is on a 0-10 scale, got {magnitude}")
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.ops = tuple(ops)
        self.p = p
        self.fill = [float(value) for value in fill]

    def _random_sign(self) -> float:
        return -1.0 if torch.rand(()).item() < 0.5 else 1.0

    def _apply_op(self, image: Any, op: str) -> Any:
        level = self.magnitude / 10
        bilinear = InterpolationMode.BILINEAR
        if op == "identity":
            return image
        if op == "autocontrast":
            return TF.autocontrast(image)
        if op == "equalize":
            return TF.equalize(image)
        if op == "brightness":
            return TF.adjust_brightness(image, 0.1 + 1.8 * level)
        if op == "sharpness":
            return TF.adjust_sharpness(image, 0.1 + 1.8 * level)
        if op in ("shear_x", "shear_y"):
            degrees = self._random_sign() * math.degrees(math.atan(0.3 * level))
            shear = [degrees, 0.0] if op == "shear_x" else [0.0, degrees]
            return TF.affine(image, angle=0.0, translate=[0, 0], scale=1.0, shear=shear,
                             interpolation=bilinear, fill=self.fill, center=[0, 0])
        if op in ("translate_x", "translate_y"):
            width, height = TF.get_image_size(image)
            side = width if op == "translate_x" else height
            pixels = int(round(self._random_sign() * side * self.magnitude / 224))
            translate = [pixels, 0] if op == "translate_x" else [0, pixels]
            return TF.affine(image, angle=0.0, translate=translate, scale=1.0, shear=[0.0, 0.0],
                             interpolation=bilinear, fill=self.fill)
        if op == "rotate":
            return TF.rotate(image, self._random_sign() * 30 * level, interpolation=bilinear, fill=self.fill)
        raise ValueError(f"unknown op {op!r}")

    def __call__(self, image: Any) -> Any:
        chosen = torch.randint(len(self.ops), (self.num_ops,)).tolist()
        for op_index in chosen:
            if torch.rand(()).item() < self.p:
                image = self._apply_op(image, self.ops[op_index])
        return image

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_ops={self.num_ops}, magnitude={self.magnitude}, p={self.p}, ops={list(self.ops)})"


def train_transform(
    image_size: int = 224,
    mean: Sequence[float] = DEFAULT_CLIP_MEAN,
    std: Sequence[float] = DEFAULT_CLIP_STD,
) -> transforms.Compose:
    """Training augmentation of the reference: PIL image -> float (3, S, S).

    RandomResizedCrop(S, scale 0.5-1, bicubic), horizontal flip, RandomOps(2 ops, magnitude 7),
    ToTensor, normalise with CLIP mean/std. Seed with ``torch.manual_seed`` to reproduce.
    """
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(0.5, 1.0), interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        RandomOps(num_ops=2, magnitude=7),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def test_transform(
    image_size: int = 224,
    mean: Sequence[float] = DEFAULT_CLIP_MEAN,
    std: Sequence[float] = DEFAULT_CLIP_STD,
) -> transforms.Compose:
    """Evaluation transform: resize to (S, S) bicubic (no crop), ToTensor, CLIP normalisation."""
    return transforms.Compose([
        transforms.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


test_transform.__test__ = False  # a name starting with "test" must not look like a test to pytest


class TokenizingCollate:
    """Batches ``(image, caption, image_index, label)`` items into tensors, tokenising the
    captions in the loader's worker processes."""

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor]) -> None:
        self.tokenizer = tokenizer

    def __call__(self, items: list[tuple[Any, str, int, int]]) -> tuple[torch.Tensor, ...]:
        images, captions, image_indices, labels = zip(*items, strict=True)
        return (
            torch.stack(list(images)),
            self.tokenizer(list(captions)),
            torch.tensor(image_indices, dtype=torch.long),
            torch.tensor(labels, dtype=torch.long),
        )


def build_datasets(
    config: TrainConfig,
) -> tuple[RetrievalTrainDataset, RetrievalEvalDataset | None, RetrievalEvalDataset | None]:
    """Train, validation and test datasets; every image path is checked here, before any model
    is built, so a wrong image root fails in seconds."""
    if not config.train_files:
        raise ValueError("TrainConfig.train_files is empty: give the training annotation file(s)")
    if not config.image_root:
        raise ValueError("TrainConfig.image_root is empty: give the folder the annotation image paths are relative to")
    augment = train_transform if config.augment else test_transform
    train_set = RetrievalTrainDataset(
        list(config.train_files), config.image_root, transform=augment(config.image_size), max_words=config.max_words
    )
    eval_sets = [
        RetrievalEvalDataset(path, config.image_root, transform=test_transform(config.image_size),
                             max_words=config.max_words) if path else None
        for path in (config.val_file, config.test_file)
    ]
    return train_set, eval_sets[0], eval_sets[1]
