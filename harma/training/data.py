"""Image-text retrieval data: caption datasets, PyTorch datasets and image transforms.

Annotation files of every caption format (the RSITMD/RSICD layout of the HarMA authors,
Karpathy-style ``dataset_*.json``, NWPU-Captions, open_clip CSV/TSV, Hugging Face datasets) are
read by `harma.training.captions` into one form, a `CaptionDataset`; the datasets here turn it
into training pairs (`RetrievalTrainDataset`) and evaluation splits (`RetrievalEvalDataset`).

The RSITMD/RSICD layout:

- train files: a JSON list of ``{"caption": str, "image": path, "image_id": int, "label": int,
  "label_name": str}``, one caption per entry, several entries per image. ``image_id``,
  ``label`` and ``label_name`` are optional.
- val/test files: a JSON list of ``{"image": path, "caption": [str, ...]}``, one entry per image
  (five captions normally); ``label``/``label_name`` are optional.

Image paths are relative to an image root that the user supplies (images are downloaded
separately). See ``docs/data.md``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import string
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from .captions import (
    CaptionDataset,
    DatasetImage,
    carve_split,
    load_annotations,
    read_caption_dataset,
)
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
    "check_caption_images",
    "check_image_files",
    "load_annotations",
    "preprocess_caption",
    "read_run_split",
    "read_run_splits",
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

def _clean_caption(caption: str, max_words: int, dataset: CaptionDataset, place: str) -> str:
    cleaned = preprocess_caption(caption, max_words)
    if not cleaned:
        raise dataset.error(place, f"{caption!r} is empty after preprocessing")
    return cleaned


def check_image_files(
    paths: Sequence[PathLike],
    image_root: PathLike,
    source: PathLike = "<annotations>",
    max_examples: int = 5,
    places: Sequence[str] | None = None,
) -> list[Path]:
    """Verify that every image path exists under ``image_root``; return the joined paths.

    ``paths`` are the image fields of the annotation entries in order (repeats allowed; each
    distinct file is checked once), so a position in ``paths`` is an entry index of
    ``source``; ``places`` (one per path, such as ``images[3]`` or ``line 7``) names the entries
    otherwise. Raises FileNotFoundError naming ``source``, the image root, how many distinct
    files of how many are missing and the first ``max_examples`` missing ones with the
    first entry that uses them. When none exists, the message says the image root is
    probably wrong.
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
    lines.append("First missing (entry: annotation path -> looked up at):")
    lines.extend(
        f"  {places[index] if places is not None else f'entry {index}'}: '{paths[index]}' -> '{path}'"
        for index, path in missing[:max_examples]
    )
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


def check_caption_images(dataset: CaptionDataset) -> list[Path | DatasetImage]:
    """`check_image_files` for the images of a `CaptionDataset` (images stored in a Hugging Face
    dataset need no check); returns `CaptionDataset.image_paths`."""
    on_disk = [image for image in dataset.images if not isinstance(image.image, DatasetImage)]
    if on_disk:
        check_image_files([image.image for image in on_disk], dataset.image_root or Path(),
                          source=dataset.source, places=[image.where for image in on_disk])
    return dataset.image_paths()


def _as_caption_dataset(annotations: PathLike | CaptionDataset, image_root: PathLike | None,
                        split: str | None) -> CaptionDataset:
    """A `CaptionDataset` as given (taking ``image_root`` if it has none), or read from a file."""
    root = Path(image_root) if image_root not in (None, "") else None
    if not isinstance(annotations, CaptionDataset):
        return read_caption_dataset(annotations, split=split, image_root=root)
    if root is None or annotations.image_root == root:
        return annotations
    if annotations.image_root is not None:
        raise ValueError(f"two image roots for '{annotations.source}': '{annotations.image_root}' (read with it) "
                         f"and '{root}' (given to the dataset); give one")
    return dataclasses.replace(annotations, image_root=root)


def _open_rgb(path: Path | DatasetImage, where: str) -> Image.Image:
    try:
        with path.open() if isinstance(path, DatasetImage) else Image.open(path) as image:
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
    """Image-caption pairs for contrastive training, one item per caption.

    ``annotation_files``: one or several annotation files of any caption format (read as
    their ``train`` split, `harma.training.captions.read_caption_dataset`) or `CaptionDataset`
    objects already read. Each image gives one pair per caption, image by image, captions in
    file order (for the RSITMD layout: the file's entry order).

    ``__getitem__(i)`` returns ``(image, caption, image_index, label)``: the transformed image
    (with ``transform=None`` a float tensor ``(3, H, W)`` in [0, 1]), the preprocessed caption,
    a contiguous id ``0 .. num_images - 1`` of the pair's image (captions of one image share
    it; used for the contrastive soft targets) and the integer scene label (-1 if absent).

    Image identity is the image path joined to its root: ids are given in order of first
    appearance over all files, so equal ``image_id`` values in two different files do not merge
    two images. Within one file an ``image_id`` naming two different paths is an error.

    Attributes: ``caption_datasets`` (what was read, one per file), ``captions`` (preprocessed,
    per pair), ``image_indices`` (per pair), ``labels`` (per pair), ``image_paths`` (per
    distinct image, indexed by image index: a path, or a `DatasetImage`), ``num_images``,
    ``label_names`` (label -> name, from entries that carry both).
    """

    def __init__(
        self,
        annotation_files: PathLike | CaptionDataset | Sequence[PathLike | CaptionDataset],
        image_root: PathLike | None = None,
        transform: ImageTransform | None = None,
        max_words: int = 30,
        check_files: bool = True,
    ) -> None:
        if isinstance(annotation_files, str | os.PathLike | CaptionDataset):
            annotation_files = [annotation_files]
        if not annotation_files:
            raise ValueError("RetrievalTrainDataset needs at least one annotation file")
        self.caption_datasets = [_as_caption_dataset(item, image_root, "train") for item in annotation_files]
        self.annotation_files = [Path(dataset.source) for dataset in self.caption_datasets]
        self.image_root = Path(image_root) if image_root not in (None, "") else None
        self.transform = transform
        self.max_words = max_words

        self.captions: list[str] = []
        self.image_indices: list[int] = []
        self.labels: list[int] = []
        self.image_paths: list[Path | DatasetImage] = []
        self.label_names: dict[int, str] = {}
        # where each distinct image is first listed ("entry 3 of 'file.json'"), for error messages
        self.image_places: list[str] = []
        for dataset in self.caption_datasets:
            self._add(dataset, check_files)

    def _add(self, dataset: CaptionDataset, check_files: bool) -> None:
        paths = check_caption_images(dataset) if check_files else dataset.image_paths()
        index_of_path = {path: index for index, path in enumerate(self.image_paths)}
        for image, path in zip(dataset.images, paths, strict=True):
            if path not in index_of_path:
                index_of_path[path] = len(self.image_paths)
                self.image_paths.append(path)
                self.image_places.append(f"{image.where} of '{dataset.source}'")
            label = -1 if image.label is None else image.label
            if label >= 0 and image.label_name is not None:
                self.label_names.setdefault(label, image.label_name)
            for caption, place in zip(image.captions, image.caption_places, strict=True):
                self.captions.append(_clean_caption(caption, self.max_words, dataset, place))
                self.image_indices.append(index_of_path[path])
                self.labels.append(label)

    @property
    def num_images(self) -> int:
        return len(self.image_paths)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> tuple[Any, str, int, int]:
        image_index = self.image_indices[index]
        image = _apply(self.transform, _open_rgb(self.image_paths[image_index], self.image_places[image_index]))
        return image, self.captions[index], image_index, self.labels[index]

    def describe(self) -> dict[str, Any]:
        """What the split was read from and its size, for run files."""
        return {"sources": [dataset.describe() for dataset in self.caption_datasets],
                "images": self.num_images, "pairs": len(self)}

    def __repr__(self) -> str:
        files = ", ".join(str(path) for path in self.annotation_files)
        return (
            f"{type(self).__name__}({len(self)} pairs, {self.num_images} images, "
            f"files=[{files}], image_root='{self.image_root}')"
        )


class RetrievalEvalDataset(Dataset):
    """Evaluation split: iterates over images; the captions are held as attributes.

    ``annotation_file``: an annotation file of any caption format (its ``split``, `test` by
    default; a file of one split is read whole) or a `CaptionDataset` already read. Images may
    have any number of captions (at least one).

    ``__getitem__(i)`` returns ``(image, i)`` (image as in RetrievalTrainDataset). Captions of
    all images are flattened in file order: ``captions[j]`` is caption j, ``txt2img[j]`` its
    image index and ``img2txt[i]`` the caption indices of image i. ``labels`` is a list of
    ints (-1 where an image has none) or None when no image has a label. ``image_paths`` are
    the joined paths (or `DatasetImage` objects), one per image; ``caption_dataset`` is what
    was read.
    """

    def __init__(
        self,
        annotation_file: PathLike | CaptionDataset,
        image_root: PathLike | None = None,
        transform: ImageTransform | None = None,
        max_words: int = 30,
        check_files: bool = True,
        split: str | None = "test",
    ) -> None:
        dataset = self.caption_dataset = _as_caption_dataset(annotation_file, image_root, split)
        self.annotation_file = Path(dataset.source)
        self.image_root = dataset.image_root
        self.transform = transform
        self.max_words = max_words

        self.captions: list[str] = []
        self.txt2img: list[int] = []
        self.img2txt: list[list[int]] = []
        for image_index, image in enumerate(dataset.images):
            self.img2txt.append(list(range(len(self.captions), len(self.captions) + len(image.captions))))
            for caption, place in zip(image.captions, image.caption_places, strict=True):
                self.captions.append(_clean_caption(caption, max_words, dataset, place))
                self.txt2img.append(image_index)
        has_labels = any(image.label is not None for image in dataset.images)
        self.labels: list[int] | None = [-1 if image.label is None else image.label
                                         for image in dataset.images] if has_labels else None
        self.image_paths = check_caption_images(dataset) if check_files else dataset.image_paths()

    @property
    def num_images(self) -> int:
        return len(self.image_paths)

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        where = f"{self.caption_dataset.images[index].where} of '{self.caption_dataset.source}'"
        return _apply(self.transform, _open_rgb(self.image_paths[index], where)), index

    def describe(self) -> dict[str, Any]:
        """What the split was read from (and how it was carved) and its size, for run files."""
        return self.caption_dataset.describe()

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


def _reader_options(config: TrainConfig) -> dict[str, Any]:
    return {"format": config.data_format, "image_root": config.image_root or None,
            "csv_img_key": config.csv_img_key, "csv_caption_key": config.csv_caption_key,
            "csv_separator": config.csv_separator, "hf_image_key": config.hf_image_key,
            "hf_caption_key": config.hf_caption_key}


def read_run_splits(
    config: TrainConfig,
) -> tuple[list[CaptionDataset], CaptionDataset | None, CaptionDataset | None]:
    """The caption splits of a run: the train split of each of ``train_files``, the validation
    split (the ``val`` split of ``val_file``, or ``val_fraction`` of the training images held out
    with ``val_seed``, `carve_split`) and the ``test`` split of ``test_file`` (None where absent).

    A held-out validation split is the same wherever it is read again (``examples/evaluate.py
    --run RUN --split val``): it depends on the files, the fraction and the seed only.
    """
    if not config.train_files:
        raise ValueError("TrainConfig.train_files is empty: give the training annotation file(s)")
    train = [read_caption_dataset(path, split="train", **_reader_options(config)) for path in config.train_files]
    if config.val_fraction:
        train, val = carve_split(train, config.val_fraction, config.val_seed, split="val")
    else:
        val = read_run_split(config, "val")
    return train, val, read_run_split(config, "test")


def read_run_split(config: TrainConfig, split: str) -> CaptionDataset | None:
    """The ``val`` or ``test`` split of a run's recipe (see `read_run_splits`), None where the
    recipe has none; a held-out validation split is carved again from the training files."""
    if split not in ("val", "test"):
        raise ValueError(f"a run's evaluation split is val or test, not {split!r}")
    options = _reader_options(config)
    if split == "val" and config.val_fraction:
        if not config.train_files:
            raise ValueError("TrainConfig.train_files is empty: the validation images are held out of them")
        train = [read_caption_dataset(path, split="train", **options) for path in config.train_files]
        return carve_split(train, config.val_fraction, config.val_seed, split="val")[1]
    path = config.val_file if split == "val" else config.test_file
    return read_caption_dataset(path, split=split, **options) if path else None


def build_datasets(
    config: TrainConfig,
) -> tuple[RetrievalTrainDataset, RetrievalEvalDataset | None, RetrievalEvalDataset | None]:
    """Train, validation and test datasets of a run (`read_run_splits`); every image path is
    checked here, before any model is built, so a wrong image root fails in seconds."""
    train, val, test = read_run_splits(config)
    augment = train_transform if config.augment else test_transform
    train_set = RetrievalTrainDataset(train, transform=augment(config.image_size), max_words=config.max_words)
    eval_sets = [
        RetrievalEvalDataset(split, transform=test_transform(config.image_size), max_words=config.max_words)
        if split is not None else None
        for split in (val, test)
    ]
    return train_set, eval_sets[0], eval_sets[1]

