"""Scene classification sets, for zero-shot evaluation: three layouts, one dataset class.

- ``folders``: one folder per class, ``root/<class>/<image>`` (AID, RESISC45, UC Merced,
  EuroSAT, WHU-RS19, PatternNet as distributed; torchvision's ``ImageFolder``). Classes are
  the folder names in sorted order; images are found at any depth below their class folder.
  A ``classnames.txt`` in ``root``, one name per line in the sorted order of the folders,
  gives the names to use.
- ``csv``: a CSV (or ``.tsv``) file with a header holding ``filepath`` and ``label`` columns
  and a ``classnames.txt`` beside it (SkyScript's benchmark files). Integer labels index the
  lines of ``classnames.txt``; text labels are class names (listed in ``classnames.txt`` when
  it exists, else the sorted distinct labels). Paths are relative to the CSV's folder unless
  an image root is given.
- ``prefixed``: one flat folder of files named ``<class><number>.<ext>`` or
  ``<class>_<number>.<ext>`` (``baseballfield_12.jpg``, ``airplane001.tif``); classes are the
  sorted distinct prefixes.

``dataset[i]`` is ``(image, label)``; ``dataset.classes`` are the names in the data (turned
into readable names by the evaluator, `harma.prompts`); ``dataset.labels`` the label of every
image. Bad input raises an error naming the file and the entry: an empty class folder, a
missing or unreadable image, a label out of range or unknown, a ``classnames.txt`` whose count
does not match the class folders.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from .data import ImageTransform, _apply, _open_rgb, check_image_files

__all__ = [
    "CLASSNAMES_FILE",
    "IMAGE_SUFFIXES",
    "LAYOUTS",
    "ClassificationDataset",
    "detect_layout",
    "load_classification_dataset",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".ppm")
LAYOUTS = ("folders", "csv", "prefixed")
CLASSNAMES_FILE = "classnames.txt"
_TABLE_SUFFIXES = (".csv", ".tsv")
_PREFIX = re.compile(r"^(?P<prefix>.*?)[\s_\-]*\d+$")


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _visible(entries: Sequence[Path]) -> list[Path]:
    return sorted(entry for entry in entries if not entry.name.startswith("."))


def _read_classnames(path: Path) -> list[str]:
    names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    if not names:
        raise ValueError(f"class-name file '{path}' holds no name")
    return names


class ClassificationDataset(Dataset):
    """Images with one class label each.

    Args:
        image_paths: one path per image.
        labels: class index of each image, ``0 .. len(classes) - 1``.
        classes: the names in the data, in label order.
        transform: PIL image -> model input; ``None`` gives a float tensor ``(3, H, W)`` in [0, 1].
        source: the file or folder the set was read from (for messages and results).
        layout: one of `LAYOUTS`.
        entries: what to call each image in an error message (default: its class).

    Use `load_classification_dataset` (or the ``from_*`` constructors) to read a set.
    """

    def __init__(
        self,
        image_paths: Sequence[str | os.PathLike],
        labels: Sequence[int],
        classes: Sequence[str],
        transform: ImageTransform | None = None,
        source: str | os.PathLike = "<images>",
        layout: str = "folders",
        entries: Sequence[str] | None = None,
    ) -> None:
        if len(image_paths) != len(labels):
            raise ValueError(f"{len(image_paths)} image paths but {len(labels)} labels")
        if not image_paths:
            raise ValueError(f"'{source}' holds no image")
        self.image_paths = [Path(path) for path in image_paths]
        self.labels = [int(label) for label in labels]
        self.classes = list(classes)
        self.transform = transform
        self.source = Path(source)
        self.layout = layout
        self._entries = list(entries) if entries is not None else None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.image_paths)

    def _where(self, index: int) -> str:
        if self._entries is not None:
            return self._entries[index]
        return f"class '{self.classes[self.labels[index]]}' of '{self.source}'"

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = _open_rgb(self.image_paths[index], self._where(index))
        return _apply(self.transform, image), self.labels[index]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self)} images, {self.num_classes} classes, "
            f"layout={self.layout!r}, source='{self.source}')"
        )

    @classmethod
    def from_folders(cls, root: str | os.PathLike, transform: ImageTransform | None = None) -> ClassificationDataset:
        """``root/<class>/<image>``: see the module docstring."""
        root = Path(root)
        folders = [entry for entry in _visible(list(root.iterdir())) if entry.is_dir()]
        if not folders:
            raise ValueError(f"'{root}' holds no class folder")
        paths: list[Path] = []
        labels: list[int] = []
        for label, folder in enumerate(folders):
            images = sorted(path for path in folder.rglob("*") if _is_image(path))
            if not images:
                raise ValueError(
                    f"class folder '{folder}' holds no image (files ending in {', '.join(IMAGE_SUFFIXES)})"
                )
            paths.extend(images)
            labels.extend([label] * len(images))
        classes = [folder.name for folder in folders]
        names_file = root / CLASSNAMES_FILE
        if names_file.is_file():
            names = _read_classnames(names_file)
            if len(names) != len(classes):
                raise ValueError(
                    f"'{names_file}' lists {len(names)} class names but '{root}' has {len(classes)} class "
                    f"folders ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}); it must give "
                    "one name per folder, in the sorted order of the folder names"
                )
            classes = names
        return cls(paths, labels, classes, transform, source=root, layout="folders")

    @classmethod
    def from_prefixed_files(
        cls, root: str | os.PathLike, transform: ImageTransform | None = None
    ) -> ClassificationDataset:
        """One folder of ``<class>_<number>.<ext>`` files: see the module docstring."""
        root = Path(root)
        images = [path for path in _visible(list(root.iterdir())) if _is_image(path)]
        if not images:
            raise ValueError(f"'{root}' holds no image")
        prefixes = []
        for path in images:
            match = _PREFIX.match(path.stem)
            if match is None or not match.group("prefix"):
                raise ValueError(
                    f"image '{path}': its name does not read as <class><number> (like baseballfield_12.jpg), "
                    "so its class is unknown; put the images in one folder per class instead"
                )
            prefixes.append(match.group("prefix"))
        classes = sorted(set(prefixes))
        index = {name: label for label, name in enumerate(classes)}
        return cls(images, [index[prefix] for prefix in prefixes], classes, transform, source=root,
                   layout="prefixed")

    @classmethod
    def from_csv(
        cls,
        path: str | os.PathLike,
        classnames_file: str | os.PathLike | None = None,
        image_root: str | os.PathLike | None = None,
        transform: ImageTransform | None = None,
        image_key: str = "filepath",
        label_key: str = "label",
        check_files: bool = True,
    ) -> ClassificationDataset:
        """A CSV/TSV of ``filepath,label`` rows: see the module docstring.

        ``classnames_file`` defaults to ``classnames.txt`` beside the file and ``image_root``
        to the file's folder.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"classification file not found: '{path}'")
        rows = _read_table(path, image_key, label_key)
        names_path = Path(classnames_file) if classnames_file is not None else path.parent / CLASSNAMES_FILE
        names = _read_classnames(names_path) if names_path.is_file() else None
        if classnames_file is not None and names is None:
            raise FileNotFoundError(f"class-name file not found: '{names_path}'")
        labels, classes = _labels_of_rows(rows, names, path, names_path)
        root = Path(image_root) if image_root is not None else path.parent
        relative = [row[0] for row in rows]
        if check_files:
            check_image_files(relative, root, source=path)
        entries = [f"row {number} of '{path}'" for number in range(1, len(rows) + 1)]
        return cls([root / item for item in relative], labels, classes, transform, source=path, layout="csv",
                   entries=entries)


def _read_table(path: Path, image_key: str, label_key: str) -> list[tuple[str, str]]:
    """``(filepath, label)`` of every data row; rows are numbered from 1 after the header."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        missing = [key for key in (image_key, label_key) if key not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"classification file '{path}' has no {', '.join(repr(key) for key in missing)} column; "
                f"its header is {reader.fieldnames}"
            )
        rows = []
        for number, row in enumerate(reader, start=1):
            image, label = (row.get(image_key) or "").strip(), (row.get(label_key) or "").strip()
            if not image or not label:
                raise ValueError(f"classification file '{path}', row {number}: empty {image_key!r} or {label_key!r}")
            rows.append((image, label))
    if not rows:
        raise ValueError(f"classification file '{path}' holds no row")
    return rows


def _labels_of_rows(
    rows: list[tuple[str, str]], names: list[str] | None, path: Path, names_path: Path
) -> tuple[list[int], list[str]]:
    """Integer labels index ``names``; text labels are class names."""
    if all(re.fullmatch(r"-?\d+", label) for _, label in rows):
        if names is None:
            raise ValueError(
                f"classification file '{path}' has integer labels but there is no '{names_path}' to name the classes"
            )
        labels = [int(label) for _, label in rows]
        for number, label in enumerate(labels, start=1):
            if not 0 <= label < len(names):
                raise ValueError(
                    f"classification file '{path}', row {number}: label {label} is out of range: "
                    f"'{names_path}' names {len(names)} classes (labels 0..{len(names) - 1})"
                )
        return labels, names
    classes = names if names is not None else sorted({label for _, label in rows})
    index = {name: label for label, name in enumerate(classes)}
    for number, (_, label) in enumerate(rows, start=1):
        if label not in index:
            raise ValueError(
                f"classification file '{path}', row {number}: label {label!r} is not a class of '{names_path}'"
            )
    return [index[label] for _, label in rows], classes


def _pick_table(root: Path, split: str) -> Path:
    tables = [path for path in _visible(list(root.iterdir())) if path.suffix.lower() in _TABLE_SUFFIXES]
    if len(tables) == 1:
        return tables[0]
    chosen = [path for path in tables if split in path.stem.lower()]
    if len(chosen) == 1:
        return chosen[0]
    raise ValueError(
        f"'{root}' holds {len(tables)} CSV files ({', '.join(path.name for path in tables)}) and "
        f"{'none' if not chosen else 'several'} of them has '{split}' in its name: give the file itself"
    )


def detect_layout(root: str | os.PathLike) -> str:
    """Which of `LAYOUTS` ``root`` is in.

    A CSV/TSV file, or a folder holding one, is ``csv``; a folder with class sub-folders is
    ``folders``; a folder with images only is ``prefixed``.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: class folders and loose images side by side, or nothing recognisable.
    """
    root = Path(root)
    if root.is_file():
        if root.suffix.lower() in _TABLE_SUFFIXES:
            return "csv"
        raise ValueError(f"'{root}' is a file but not a CSV/TSV of filepath,label rows")
    if not root.is_dir():
        raise FileNotFoundError(f"classification set not found: '{root}'")
    entries = _visible(list(root.iterdir()))
    if any(entry.suffix.lower() in _TABLE_SUFFIXES and entry.is_file() for entry in entries):
        return "csv"
    folders = [entry for entry in entries if entry.is_dir()]
    images = [entry for entry in entries if _is_image(entry)]
    if folders and images:
        raise ValueError(
            f"'{root}' holds class folders ({', '.join(f.name for f in folders[:3])}, ...) and {len(images)} "
            f"image(s) beside them ({images[0].name}, ...): move the loose images into their class folders"
        )
    if folders:
        return "folders"
    if images:
        return "prefixed"
    raise ValueError(f"'{root}' holds no class folder, no CSV file and no image")


def load_classification_dataset(
    root: str | os.PathLike,
    transform: ImageTransform | None = None,
    layout: str = "auto",
    split: str = "test",
) -> ClassificationDataset:
    """Read a classification set in any of `LAYOUTS`.

    Args:
        root: a class-folder tree, a flat folder of class-prefixed files, a CSV/TSV file, or a
            folder holding one (with several, the one with ``split`` in its name).
        transform: PIL image -> model input.
        layout: ``"auto"`` (`detect_layout`) or one of `LAYOUTS`.
        split: picks the CSV file of a folder holding several.

    Raises:
        FileNotFoundError, ValueError: naming the file and the entry at fault.
    """
    if layout == "auto":
        layout = detect_layout(root)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'auto' or one of {LAYOUTS}, got {layout!r}")
    path = Path(root)
    if not path.exists():
        raise FileNotFoundError(f"classification set not found: '{path}'")
    if layout == "csv":
        return ClassificationDataset.from_csv(path if path.is_file() else _pick_table(path, split), transform=transform)
    if layout == "folders":
        return ClassificationDataset.from_folders(path, transform)
    return ClassificationDataset.from_prefixed_files(path, transform)
