"""What an index is built from: a list of items (an image, its key, optional captions and label)
read from a folder tree, a caption dataset of any format (`harma.training.captions`), or
webdataset tar shards.

Every reader returns an `ImageSource`: the items in a fixed order (the same order on every run
and every process, so a resumed or distributed run splits the same list), and the folder the
image paths are relative to (the server serves nothing outside it).
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..training.captions import CaptionedImage, DatasetImage, dataset_image_table, read_caption_dataset

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageItem",
    "ImageTooLargeError",
    "ImageSource",
    "ItemDataset",
    "folder_source",
    "annotation_source",
    "webdataset_source",
    "open_image",
    "read_item_bytes",
    "read_stored_image",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif")
TEXT_SUFFIXES = (".txt", ".caption")


@dataclass(frozen=True)
class ImageItem:
    """One image to index.

    Attributes:
        key: a name unique in the source (the relative path, or the webdataset key).
        path: the image file relative to the source's root; for a webdataset sample, the tar
            file relative to the root.
        member: the image's member name in the tar file (webdataset), else None.
        span: ``(offset, size)`` in bytes of that member's data in the tar file.
        captions: captions that came with the image (possibly none).
        label: class name or label, or None.
        stored: for an image stored in a Hugging Face dataset, its row (`DatasetImage`); the
            item's ``path`` is then the image's name, and its metadata holds the ``row``.
    """

    key: str
    path: str
    member: str | None = None
    span: tuple[int, int] | None = None
    captions: tuple[str, ...] = ()
    label: str | None = None
    stored: DatasetImage | None = field(default=None, compare=False, repr=False)

    def metadata(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"key": self.key, "path": self.path}
        if self.member is not None:
            entry["member"] = self.member
            entry["span"] = list(self.span or ())
        if self.stored is not None:
            entry["row"] = self.stored.row
        if self.captions:
            entry["captions"] = list(self.captions)
        if self.label is not None:
            entry["label"] = self.label
        return entry


@dataclass
class ImageSource:
    """Items in index order, the folder their paths are relative to, and how they were found.

    ``skipped`` lists ``(key, reason)`` of entries left out while listing (a file outside the
    root, a webdataset sample without an image)."""

    items: list[ImageItem]
    root: Path
    kind: str
    description: dict[str, Any]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path``, symlinks resolved, lies under ``root`` (resolved)."""
    try:
        Path(os.path.realpath(path)).relative_to(os.path.realpath(root))
        return True
    except ValueError:
        return False


_OUTSIDE = "its real path is outside the image folder (a symlink out)"


def folder_source(root: str | os.PathLike) -> ImageSource:
    """Every image file under ``root`` (by suffix, case-insensitive), sorted by relative path.

    A caption file beside an image (``x.txt`` for ``x.jpg``) gives its captions, one per line;
    the first folder level below ``root`` is the label (a class-per-folder tree). Files whose
    real path is outside ``root`` (symlinks out), images and caption files alike, are skipped
    and listed (the image of such a caption file is indexed without captions).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--images: no folder at '{root}'")
    items, skipped = [], []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder) / name
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            relative = path.relative_to(root).as_posix()
            if not _inside(path, root):
                skipped.append((relative, _OUTSIDE))
                continue
            captions = _caption_file(path, root, skipped)
            label = relative.split("/")[0] if "/" in relative else None
            items.append(ImageItem(relative, relative, captions=captions, label=label))
    items.sort(key=lambda item: item.key)
    return ImageSource(items, root, "folder", {"images": str(root)}, skipped)


def _caption_file(image: Path, root: Path, skipped: list[tuple[str, str]]) -> tuple[str, ...]:
    """The captions of the first caption file beside ``image``; one whose real path is outside
    ``root`` is not read but listed in ``skipped``."""
    for suffix in TEXT_SUFFIXES:
        text_file = image.with_suffix(suffix)
        if text_file.is_file():
            if not _inside(text_file, root):
                skipped.append((text_file.relative_to(root).as_posix(), _OUTSIDE))
                return ()
            lines = text_file.read_text(encoding="utf-8", errors="replace").splitlines()
            return tuple(line.strip() for line in lines if line.strip())
    return ()


def annotation_source(annotation: str | os.PathLike, image_root: str | os.PathLike | None = None,
                      format: str | None = None, *, split: str | None = None, **reader_options: Any) -> ImageSource:
    """The images of a caption dataset in any format `harma.training.captions.read_caption_dataset`
    reads (the RSITMD/RSICD layout, Karpathy, NWPU-Captions, CSV/TSV, or a folder a Hugging Face
    dataset's ``save_to_disk`` wrote), in file order, each with all its captions and its label
    (the label's name where the file gives one).

    ``format``, ``split`` and ``reader_options`` (``csv_img_key``, ``csv_caption_key``,
    ``csv_separator``, ``hf_image_key``, ``hf_caption_key``) are those of `read_caption_dataset`;
    ``split`` names the split of a file holding several (None reads a file of one split whole).
    ``image_root`` defaults to the annotation's folder. Entries whose image lies outside it
    (absolute paths, ``..``) are skipped and listed. Images stored in the dataset itself are
    items of their row (key ``row N``), read from the dataset's folder when indexed and served.

    Raises:
        TypeError: ``annotation`` is no path (an in-memory dataset: save it with
            ``save_to_disk`` and give the folder, from which its images are served).
        FileNotFoundError, ValueError, ImportError: as `read_caption_dataset` (naming the file,
            the entry and the fault).
    """
    if not isinstance(annotation, str | os.PathLike):
        raise TypeError(f"annotation_source reads a file or a folder, not a {type(annotation).__name__}: save a "
                        f"Hugging Face dataset with save_to_disk and give the folder (its images are served from it)")
    annotation = Path(annotation)
    root = Path(image_root) if image_root is not None else annotation.parent
    dataset = read_caption_dataset(annotation, format, split=split, image_root=root, **reader_options)
    items, skipped = [], []
    for image in dataset.images:
        item = _caption_item(image, root)
        if item is None:
            skipped.append((image.name, f"{image.where}: outside the image root '{root}'"))
        else:
            items.append(item)
    description = {"annotation": str(annotation), "image_root": str(root), "format": dataset.format,
                   "split": split, **{name: value for name, value in reader_options.items() if value is not None}}
    stored = next((item.stored for item in items if item.stored is not None), None)
    if stored is not None:
        description["hf_image_key"] = stored.column  # the column the images are served from
    return ImageSource(items, root, "annotation", description, skipped)


def _caption_item(image: CaptionedImage, root: Path) -> ImageItem | None:
    """The item of a caption dataset's image; None for a path outside ``root``."""
    label = image.label_name if image.label_name is not None else None if image.label is None else str(image.label)
    if isinstance(image.image, DatasetImage):
        return ImageItem(f"row {image.image.row}", image.name, captions=image.captions, label=label,
                         stored=image.image)
    path = Path(image.image)
    if path.is_absolute() or not _inside(root / path, root):
        return None
    return ImageItem(path.as_posix(), path.as_posix(), captions=image.captions, label=label)


def webdataset_source(shards: str | os.PathLike | Sequence[str | os.PathLike]) -> ImageSource:
    """The samples of webdataset tar shards: ``key.jpg`` (or another image suffix) with an
    optional ``key.txt`` caption and ``key.cls`` label, read with the standard library.

    ``shards``: a folder (every ``*.tar`` in it, sorted) or a list of tar files in one folder.
    """
    tars = _tar_files(shards)
    root = tars[0].parent
    items, skipped = [], []
    for tar_path in tars:
        relative = tar_path.relative_to(root).as_posix() if _inside(tar_path, root) else None
        if relative is None:
            raise ValueError(f"--webdataset: the tar files must be in one folder; '{tar_path}' is not in '{root}'")
        samples = _read_tar_samples(tar_path)
        for key in sorted(samples):
            sample = samples[key]
            if "image" not in sample:
                skipped.append((f"{relative}:{key}", "no image member in the sample"))
                continue
            member, offset, size = sample["image"]
            items.append(ImageItem(f"{relative}:{key}", relative, member=member, span=(offset, size),
                                   captions=sample.get("captions", ()), label=sample.get("label")))
    return ImageSource(items, root, "webdataset", {"webdataset": [str(path) for path in tars]}, skipped)


def _tar_files(shards: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(shards, (str, os.PathLike)):
        path = Path(shards)
        if path.is_dir():
            found = sorted(path.glob("*.tar"))
            if not found:
                raise FileNotFoundError(f"--webdataset: no .tar file in '{path}'")
            return found
        shards = [path]
    tars = [Path(shard) for shard in shards]
    for tar_path in tars:
        if not tar_path.is_file():
            raise FileNotFoundError(f"--webdataset: no tar file at '{tar_path}'")
    return tars


def _read_tar_samples(tar_path: Path) -> dict[str, dict[str, Any]]:
    """``{key: {"image": member, "captions": (...), "label": str}}`` of one tar shard."""
    samples: dict[str, dict[str, Any]] = {}
    try:
        with tarfile.open(tar_path, "r:") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                directory, _, base = member.name.rpartition("/")
                stem, dot, suffix = base.partition(".")
                key = f"{directory}/{stem}" if directory else stem
                suffix = "." + suffix.lower() if dot else ""
                sample = samples.setdefault(key, {})
                if suffix in IMAGE_SUFFIXES and "image" not in sample:
                    sample["image"] = (member.name, member.offset_data, member.size)
                elif suffix in (".txt", ".cls"):
                    text = archive.extractfile(member).read().decode("utf-8", errors="replace").strip()
                    if suffix == ".txt":
                        sample["captions"] = tuple(line for line in text.splitlines() if line.strip())
                    else:
                        sample["label"] = text
    except tarfile.TarError as error:
        raise ValueError(f"--webdataset: '{tar_path}' is not a readable tar file: {error}") from None
    return samples


def read_item_bytes(root: Path, item_path: str, span: Sequence[int] | None = None) -> bytes:
    """The encoded image bytes of an item: a file under ``root``, or the ``(offset, size)``
    span of a member of a tar file under it (read directly, without scanning the tar).

    Raises:
        FileNotFoundError: the file is absent, is no regular file, or lies outside ``root``
            (symlinks resolved; absolute paths and ``..`` are outside).
        ValueError: the span runs past the end of the tar file.
    """
    path = root / item_path
    if Path(item_path).is_absolute() or not _inside(path, root) or not path.is_file():
        raise FileNotFoundError(f"'{item_path}' is not a file under the image root")
    if span is None:
        return path.read_bytes()
    offset, size = (int(value) for value in span)
    with open(path, "rb") as handle:
        handle.seek(offset)
        data = handle.read(size)
    if len(data) != size:
        raise ValueError(f"'{item_path}' ends before its member at offset {offset} ({size} bytes)")
    return data


def read_stored_image(image: DatasetImage, root: Path) -> bytes:
    """The encoded bytes of an image stored in a Hugging Face dataset's row; a row that holds
    only a file name is read from under ``root`` (`read_item_bytes`).

    Raises:
        FileNotFoundError: the row holds no image, or its file is not under ``root``.
    """
    stored = image.stored()
    if stored.get("bytes") is not None:
        return stored["bytes"]
    if stored.get("path"):
        return read_item_bytes(root, stored["path"])
    raise FileNotFoundError(f"row {image.row} of the dataset holds no image")


def stored_image_table(description: dict[str, Any]) -> Any:
    """The encoded image column of the Hugging Face dataset that an `annotation_source`
    ``description`` (as a manifest records it) names, opened again from its folder."""
    return dataset_image_table(description["annotation"], description.get("split"), description["hf_image_key"])


def read_source_item(root: Path, item: ImageItem) -> bytes:
    """The encoded image of an item: `read_stored_image` or `read_item_bytes`."""
    if item.stored is not None:
        return read_stored_image(item.stored, root)
    return read_item_bytes(root, item.path, item.span)


class ImageTooLargeError(ValueError):
    """An image has more pixels than allowed (refused before it is decoded)."""


def open_image(data: bytes | Path, max_pixels: int | None = None, *, fit: int | None = None) -> Image.Image:
    """Decode an image as RGB; ``max_pixels`` refuses larger images before decoding them.

    With ``fit``, a thumbnail no larger than ``fit x fit`` (the aspect ratio kept): a JPEG is
    decoded at the smallest of 1/2, 1/4 or 1/8 scale that keeps twice that size, and the
    decoded image is reduced by whole factors before it is resampled, so a large image is not
    resampled, nor (a JPEG) decoded, at full size.

    Raises:
        ValueError: not an image PIL can read, or larger than ``max_pixels`` (says both sizes).
    """
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        with Image.open(source) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageTooLargeError(f"the image is {width}x{height} = {width * height:,} pixels; the limit is "
                                 f"{max_pixels:,}")
            if fit is None:
                return image.convert("RGB")
            if image.format in ("JPEG", "MPO"):  # thumbnail() sets the decoder's scale (draft)
                image.thumbnail((fit, fit))
                return image.convert("RGB")
            # Others are decoded whole; RGB first: a palette image would be resampled by nearest.
            thumbnail = image.convert("RGB")
            thumbnail.thumbnail((fit, fit))
            return thumbnail
    except ImageTooLargeError:
        raise
    except Exception as error:  # PIL raises many types for damaged files; each is the file's fault
        raise ValueError(f"not a readable image ({type(error).__name__}: {error})") from None


class ItemDataset(Dataset):
    """The images of a source as model inputs, for a DataLoader with worker processes.

    ``dataset[i]`` is ``(image, i, None)`` or, when the image cannot be read, ``(None, i,
    reason)``: the indexer lists it and goes on (or stops, when told to).
    """

    def __init__(self, source: ImageSource, positions: Sequence[int], transform: Callable[[Image.Image], Any],
                 max_pixels: int | None = None) -> None:
        self.source = source
        self.positions = list(positions)
        self.transform = transform
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int) -> tuple[Any, int, str | None]:
        position = self.positions[index]
        item = self.source.items[position]
        try:
            data = read_source_item(self.source.root, item)
            return self.transform(open_image(data, self.max_pixels)), position, None
        except (OSError, ValueError) as error:
            return None, position, str(error)


def collate_items(batch: list[tuple[Any, int, str | None]]) -> tuple[torch.Tensor | None, list[int],
                                                                       list[tuple[int, str]]]:
    """``(images (n, 3, S, S) or None, their positions, [(position, reason) of unreadable ones])``."""
    good = [(image, position) for image, position, error in batch if error is None]
    failed = [(position, error) for _, position, error in batch if error is not None]
    images = torch.stack([image for image, _ in good]) if good else None
    return images, [position for _, position in good], failed
