"""What an index is built from: a list of items (an image, its key, optional captions and label)
read from a folder tree, an annotation file, or webdataset tar shards.

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

from ..training.data import load_annotations

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
    """

    key: str
    path: str
    member: str | None = None
    span: tuple[int, int] | None = None
    captions: tuple[str, ...] = ()
    label: str | None = None

    def metadata(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"key": self.key, "path": self.path}
        if self.member is not None:
            entry["member"] = self.member
            entry["span"] = list(self.span or ())
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


def folder_source(root: str | os.PathLike) -> ImageSource:
    """Every image file under ``root`` (by suffix, case-insensitive), sorted by relative path.

    A caption file beside an image (``x.txt`` for ``x.jpg``) gives its captions, one per line;
    the first folder level below ``root`` is the label (a class-per-folder tree). Files whose
    real path is outside ``root`` (symlinks out) are skipped and listed.
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
                skipped.append((relative, "its real path is outside the image folder (a symlink out)"))
                continue
            captions = _caption_file(path)
            label = relative.split("/")[0] if "/" in relative else None
            items.append(ImageItem(relative, relative, captions=captions, label=label))
    items.sort(key=lambda item: item.key)
    return ImageSource(items, root, "folder", {"images": str(root)}, skipped)


def _caption_file(image: Path) -> tuple[str, ...]:
    for suffix in TEXT_SUFFIXES:
        text_file = image.with_suffix(suffix)
        if text_file.is_file():
            lines = text_file.read_text(encoding="utf-8", errors="replace").splitlines()
            return tuple(line.strip() for line in lines if line.strip())
    return ()


def annotation_source(annotation: str | os.PathLike, image_root: str | os.PathLike | None = None) -> ImageSource:
    """The images of an annotation file in the RSITMD/RSICD layout (a JSON list of entries with
    ``image`` and ``caption``: a string per entry or a list per image), in order of first
    appearance; an image's captions are gathered from all its entries.

    ``image_root`` defaults to the annotation file's folder. Entries whose image lies outside it
    (absolute paths, ``..``) are skipped and listed.
    """
    annotation = Path(annotation)
    entries = load_annotations(annotation, required_keys=("image",))
    root = Path(image_root) if image_root is not None else annotation.parent
    order: dict[str, dict[str, Any]] = {}
    skipped = []
    for index, entry in enumerate(entries):
        image = entry["image"]
        if not isinstance(image, str) or not image:
            raise ValueError(f"annotation file '{annotation}', entry {index}: 'image' must be a non-empty "
                             f"path string, got {image!r}")
        if not _inside(root / image, root) or Path(image).is_absolute():
            skipped.append((image, f"entry {index}: outside the image root '{root}'"))
            continue
        gathered = order.setdefault(image, {"captions": [], "label": None})
        captions = entry.get("caption", [])
        gathered["captions"].extend([captions] if isinstance(captions, str) else list(captions))
        label = entry.get("label_name", entry.get("label"))
        if label is not None and gathered["label"] is None:
            gathered["label"] = str(label)
    items = [ImageItem(Path(image).as_posix(), Path(image).as_posix(), captions=tuple(map(str, value["captions"])),
                       label=value["label"]) for image, value in order.items()]
    return ImageSource(items, root, "annotation",
                       {"annotation": str(annotation), "image_root": str(root)}, skipped)


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


class ImageTooLargeError(ValueError):
    """An image has more pixels than allowed (refused before it is decoded)."""


def open_image(data: bytes | Path, max_pixels: int | None = None) -> Image.Image:
    """Decode an image as RGB; ``max_pixels`` refuses larger images before decoding them.

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
            return image.convert("RGB")
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
            data = read_item_bytes(self.source.root, item.path, item.span)
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
