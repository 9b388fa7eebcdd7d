"""Caption datasets of every common format, read into one internal form.

`read_caption_dataset` reads one split of an annotation file (or of a Hugging Face dataset) into
a `CaptionDataset`: a sequence of `CaptionedImage` (an image, its captions in file order, an
optional scene label, and where in the file each came from). `harma.training.data` turns that
form into training pairs and evaluation splits; archive search indexes it. Formats
(``format=``; detected from the file where that is unambiguous, see `detect_caption_format`):

- ``"rsitmd"``: the RSITMD/RSICD layout of the HarMA authors, one split per file: a JSON list
  of ``{"image", "caption": str, "image_id", "label", "label_name"}`` (train, one caption per
  entry) or of ``{"image", "caption": [str, ...]}`` (val/test, one entry per image).
- ``"karpathy"``: ``dataset_*.json`` of UCM-captions, Sydney-captions and the original RSICD
  release: ``{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw", ...}]}]}``;
  the image is ``filepath/filename``. Split ``train`` includes the entries marked
  ``restval`` (Karpathy's convention: the rest of the validation images train).
- ``"nwpu"``: NWPU-Captions, keyed by class: ``{"<class>": [{"filename", "split", "raw",
  "raw_1", ..., "raw_4"}]}``, images in ``<class>/<filename>``; the label is the class's
  position in the file, the label name the class.
- ``"csv"``: open_clip_train's CSV/TSV, one row per caption, columns ``csv_img_key``
  (``filepath``) and ``csv_caption_key`` (``title``); rows of one image are grouped.
- ``"hf"``: a Hugging Face ``datasets.Dataset`` or ``DatasetDict`` (an object, or a folder
  written by ``save_to_disk``): an image column of decoded images or of paths, a caption
  column of lists of strings or of one string per row (rows of one image grouped). Needs the
  optional ``datasets`` package.

Images listed again in one split are one image with the captions of both entries where each entry
holds one caption (CSV rows, RSITMD train entries); where an entry holds all of an image's captions
(RSITMD val/test, Karpathy, NWPU) a repeat is refused, naming both entries. Image
paths are relative to the image root (``image_root``, or the working directory without one,
as in open_clip_train). Captions are kept as written; preprocessing is the datasets' job.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import io
import json
import os
import posixpath
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

__all__ = [
    "CAPTION_FORMATS",
    "CaptionDataset",
    "CaptionedImage",
    "DatasetImage",
    "carve_split",
    "check_csv_separator",
    "dataset_image_table",
    "detect_caption_format",
    "load_annotations",
    "read_caption_dataset",
]

CAPTION_FORMATS: tuple[str, ...] = ("rsitmd", "karpathy", "nwpu", "csv", "hf")
"""The format names `read_caption_dataset` takes."""

# Split names as files write them; a split asked for by its name matches any of them.
_SPLIT_VALUES = {"train": ("train",), "val": ("val", "valid", "validation", "dev"), "test": ("test",)}
_KARPATHY_TRAIN = ("train", "restval")
_HF_IMAGE_KEYS = ("image", "filepath", "filename", "image_path", "path", "img")
_HF_CAPTION_KEYS = ("captions", "caption", "sentences", "text", "title")

PathLike = str | os.PathLike


# --------------------------------------------------------------------------- the internal form

class DatasetImage:
    """An image stored in a row of a Hugging Face dataset; decoded only when `open` is called.

    ``name`` (the stored file name, else the row's ``filename``/``filepath``/... column, else
    ``row i``) names it in messages and galleries. Pickles with its dataset, so DataLoader
    workers can read it.
    """

    def __init__(self, table: Any, row: int, column: str, name: str, image_root: Path | None = None) -> None:
        self.table, self.row, self.column, self.name, self.image_root = table, row, column, name, image_root

    def stored(self) -> dict[str, Any]:
        """The row's entry as the dataset stores it: ``{"bytes": encoded image or None, "path":
        file name or None}``."""
        return self.table[self.row][self.column] or {"bytes": None, "path": None}

    def open(self) -> Image.Image:
        """The image as PIL opened it (not converted); a path-only entry is read from the disk,
        relative to ``image_root``."""
        stored = self.stored()
        if stored.get("bytes") is not None:
            return Image.open(io.BytesIO(stored["bytes"]))
        return Image.open(Path(self.image_root or "") / stored["path"])

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"DatasetImage({self.name!r}, row={self.row})"


@dataclass(frozen=True)
class CaptionedImage:
    """One image of a split with its captions (the internal form of every format).

    Attributes:
        image: the image path as the file writes it (relative to the image root), or a
            `DatasetImage` for an image stored in a Hugging Face dataset.
        captions: the captions, in file order, as written (not preprocessed); at least one.
        label: the integer scene label, or None.
        label_name: the label's name, or None.
        where: where the image's first entry is in the file (``entry 3``, ``images[3]``,
            ``'airport'[2]``, ``line 5``, ``row 4``), for messages.
        caption_places: where each caption is, one per caption (``entry 3, 'caption'``,
            ``images[3].sentences[1]``, ``line 5, 'title'``, ...).
    """

    image: str | DatasetImage
    captions: tuple[str, ...]
    label: int | None = None
    label_name: str | None = None
    where: str = ""
    caption_places: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The image path, or the stored name of a `DatasetImage`."""
        return str(self.image)


@dataclass(frozen=True)
class CaptionDataset:
    """One split of a caption dataset: images with their captions, in file order.

    Attributes:
        images: the `CaptionedImage` entries, one per distinct image.
        source: the file (or folder) read, or a description of an in-memory dataset.
        format: the format name (one of `CAPTION_FORMATS`).
        split: the split that was asked for (``train``, ``val``, ``test``), or None.
        image_root: the folder image paths are relative to, or None (the working directory).
        carved: for a split carved off others (`carve_split`): ``{"from", "fraction",
            "seed"}``; None otherwise.
    """

    images: tuple[CaptionedImage, ...]
    source: str
    format: str
    split: str | None = None
    image_root: Path | None = None
    carved: Mapping[str, Any] | None = field(default=None, compare=False)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def name(self) -> str:
        """A short name for tables: the file's stem (``rsitmd_test``), ``<stem>-held-out-val`` for a
        carved split."""
        stem = Path(self.source.split(" + ")[0]).stem
        return f"{stem}-held-out-{self.split}" if self.carved is not None else stem

    @property
    def num_captions(self) -> int:
        return sum(len(image.captions) for image in self.images)

    def image_path(self, image: CaptionedImage) -> Path | DatasetImage:
        """The image's path joined to the image root, or its `DatasetImage`."""
        if isinstance(image.image, DatasetImage):
            return image.image
        return Path(self.image_root or "") / image.image

    def image_paths(self) -> list[Path | DatasetImage]:
        """`image_path` of every image, in order."""
        return [self.image_path(image) for image in self.images]

    def pairs(self) -> list[tuple[str | DatasetImage, str]]:
        """``(image, caption)`` for every caption, image by image, captions in file order."""
        return [(image.image, caption) for image in self.images for caption in image.captions]

    def describe(self) -> dict[str, Any]:
        """What was read, for run files: source, format, split, counts (and how it was carved)."""
        description = {"source": self.source, "format": self.format, "split": self.split,
                       "images": len(self), "captions": self.num_captions}
        if self.carved is not None:
            description["carved"] = dict(self.carved)
        return description

    def error(self, where: str | None, problem: str) -> ValueError:
        """A ValueError naming the source, the entry (``where``) and the problem."""
        return _Source(self.source, self.format).fail(where, problem)


class _Source:
    """Where entries come from, to name it in errors."""

    def __init__(self, source: str, format: str) -> None:
        self.source, self.format = source, format

    def fail(self, where: str | None, problem: str) -> ValueError:
        kind = "Hugging Face dataset" if self.format == "hf" else "annotation file"
        prefix = f"{kind} '{self.source}'"
        return ValueError(f"{prefix}, {where}: {problem}" if where else f"{prefix}: {problem}")


class _Grouper:
    """Collects captions image by image, in order of first appearance: in formats of one caption
    per entry (CSV rows, RSITMD train entries) an image listed again gets the captions of both
    entries. In formats whose entry holds all of an image's captions (``unique``), a repeat is
    refused: scored as a second gallery image it would change the recalls, and merging it
    silently could hide a broken file (one concatenated twice, two images under one name)."""

    def __init__(self, source: _Source) -> None:
        self.source = source
        self.images: dict[Any, dict[str, Any]] = {}

    def add(self, image: str | DatasetImage, captions: Iterable[str], places: Iterable[str], where: str,
            label: int | None = None, label_name: str | None = None, unique: bool = False) -> None:
        key = image if isinstance(image, DatasetImage) else posixpath.normpath(image.replace(os.sep, "/"))
        found = self.images.setdefault(key, {"image": image, "captions": [], "places": [], "where": where,
                                              "label": label, "label_name": label_name})
        if unique and found["where"] != where:
            raise self.source.fail(where, f"image '{image}' is listed again ({found['where']} lists "
                                          f"'{found['image']}'); each entry holds all of an image's captions: "
                                          f"merge the two entries' caption lists")
        if label is not None and found["label"] != label:
            if found["label"] is not None:
                raise self.source.fail(where, f"'{image}' has label {label!r} here but label {found['label']!r} at "
                                              f"{found['where']}")
            found["label"] = label
        found["label_name"] = found["label_name"] or label_name
        found["captions"].extend(captions)
        found["places"].extend(places)

    def result(self) -> tuple[CaptionedImage, ...]:
        return tuple(
            CaptionedImage(found["image"], tuple(found["captions"]), found["label"], found["label_name"],
                           found["where"], tuple(found["places"]))
            for found in self.images.values()
        )


# --------------------------------------------------------------------------- JSON files

def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: '{path}'")
    try:
        with path.open("r", encoding="utf-8-sig") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"annotation file '{path}' is not valid JSON: {error}") from error


def _check_entry_list(data: Any, path: PathLike, required: Sequence[str]) -> list[dict]:
    if not isinstance(data, list):
        raise ValueError(f"annotation file '{path}' must hold a JSON list of entries, got {type(data).__name__}")
    for index, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise ValueError(f"annotation file '{path}', entry {index}: expected an object, got {type(entry).__name__}")
        missing = [key for key in required if key not in entry]
        if missing:
            raise ValueError(
                f"annotation file '{path}', entry {index}: missing key(s) {missing}; the entry has {sorted(entry)}"
            )
    return data


def load_annotations(path: PathLike, required_keys: Iterable[str] = ("image", "caption")) -> list[dict]:
    """Read a JSON annotation file: a list of dicts, each holding at least ``required_keys``.

    Raises FileNotFoundError if the file is absent and ValueError (naming the file, and the
    entry index where one is at fault) if it is not JSON, not a list, or an entry is not an
    object or lacks a required key.
    """
    return _check_entry_list(_read_json(Path(path)), path, tuple(required_keys))


def _string(value: Any, source: _Source, where: str, what: str, allow_empty: bool = False,
            kind: str = "string") -> str:
    if not isinstance(value, str) or (not value and not allow_empty):
        expected = f"a {kind}" if allow_empty else f"a non-empty {kind}"
        raise source.fail(where, f"{what} must be {expected}, got {value!r}")
    return value


def _path(value: Any, source: _Source, where: str, what: str) -> str:
    return _string(value, source, where, what, kind="path string")


def _optional_label(entry: Mapping[str, Any], source: _Source, where: str) -> int | None:
    label = entry.get("label")
    # bool is an int subclass; a true/false label is a broken file, not class 1/0
    if label is not None and (isinstance(label, bool) or not isinstance(label, int)):
        raise source.fail(where, f"'label' must be an integer, got {label!r}")
    return label


def _rsitmd_form(captions: Any, split: str | None, source: _Source, where: str) -> str:
    """``train`` (one caption string) or ``eval`` (a list); refuses the form that contradicts
    ``split``: a train file read as val/test, or a val/test file read as train."""
    if isinstance(captions, str):
        if split in ("val", "test"):
            raise source.fail(where, "'caption' is a single string: this looks like a train file (use "
                                     "RetrievalTrainDataset, or split='train'); val/test entries hold a list of "
                                     "captions")
        return "train"
    if isinstance(captions, list):
        if split == "train":
            raise source.fail(where, "'caption' is a list: this looks like a val/test file (use "
                                     "RetrievalEvalDataset); train entries hold one caption string each")
        if not captions:
            raise source.fail(where, f"'caption' must be a non-empty list of strings, got {captions!r}")
        return "eval"
    raise source.fail(where, f"'caption' must be a string or a list of strings, got {captions!r}")


def _read_rsitmd(data: Any, path: Path, split: str | None) -> tuple[CaptionedImage, ...]:
    entries = _check_entry_list(data, path, ("image", "caption"))
    source = _Source(str(path), "rsitmd")
    if not entries:
        raise source.fail(None, "holds no entries")
    grouper, first_form = _Grouper(source), None
    image_of_id: dict[Any, tuple[str, int]] = {}
    for index, entry in enumerate(entries):
        where = f"entry {index}"
        image = _path(entry["image"], source, where, "'image'")
        form = _rsitmd_form(entry["caption"], split, source, where)
        first_form = first_form or form
        if form != first_form:
            raise source.fail(where, f"the entry holds {'a caption list' if form == 'eval' else 'one caption'} "
                                     f"but entry 0 {'a caption list' if first_form == 'eval' else 'one caption'}: "
                                     f"a file holds one split, in one layout")
        if form == "train":
            captions, places = [entry["caption"]], [f"{where}, 'caption'"]
            if "image_id" in entry:
                seen = image_of_id.setdefault(entry["image_id"], (image, index))
                if seen[0] != image:
                    raise source.fail(where, f"image_id {entry['image_id']!r} names '{image}' but entry "
                                             f"{seen[1]} gave it to '{seen[0]}'")
        else:
            captions = [_string(text, source, where, f"caption {k}", allow_empty=True)
                        for k, text in enumerate(entry["caption"])]
            places = [f"{where}, caption {k}" for k in range(len(captions))]
        label_name = entry.get("label_name") if isinstance(entry.get("label_name"), str) else None
        grouper.add(image, captions, places, where, _optional_label(entry, source, where), label_name,
                    unique=form == "eval")
    return grouper.result()


def _split_values(split: str, karpathy: bool = False) -> tuple[str, ...]:
    if karpathy and split == "train":
        return _KARPATHY_TRAIN
    return _SPLIT_VALUES.get(split, (split,))


def _split_error(source: _Source, split: str | None, found: Counter) -> ValueError:
    splits = ", ".join(f"{name} ({count})" for name, count in found.items())
    if split is None:
        return source.fail(None, f"the file holds the splits {splits} (images): name the one to read "
                                 f"(split='test', --split test)")
    return source.fail(None, f"no entry of split {split!r}; the file's splits are {splits} (images)")


def _karpathy_captions(entry: Mapping[str, Any], source: _Source, where: str) -> tuple[list[str], list[str]]:
    sentences = entry.get("sentences")
    if not isinstance(sentences, list) or not sentences:
        raise source.fail(where, f"'sentences' must be a non-empty list, got {sentences!r}")
    captions, places = [], []
    for k, sentence in enumerate(sentences):
        place = f"{where}.sentences[{k}]"
        if not isinstance(sentence, dict):
            raise source.fail(place, f"expected an object with 'raw', got {sentence!r}")
        raw = sentence.get("raw")
        tokens = sentence.get("tokens")
        if raw is None and isinstance(tokens, list) and all(isinstance(token, str) for token in tokens):
            raw = " ".join(tokens)  # copies without 'raw' keep the tokens
        captions.append(_string(raw, source, place, "'raw'", allow_empty=True))
        places.append(place)
    return captions, places


def _wanted_filename(entry: Any, source: _Source, where: str, wanted: Sequence[str], found: Counter) -> str | None:
    """The ``filename`` of a split-tagged entry (an object with ``split`` and ``filename``), or
    None when its split is not ``wanted``; every split seen is counted in ``found``."""
    if not isinstance(entry, dict):
        raise source.fail(where, f"expected an object, got {type(entry).__name__}")
    value = _string(entry.get("split"), source, where, "'split'")
    found[value] += 1
    if value not in wanted:
        return None
    return _path(entry.get("filename"), source, where, "'filename'")


def _read_karpathy(data: Any, path: Path, split: str | None) -> tuple[CaptionedImage, ...]:
    source = _Source(str(path), "karpathy")
    entries = data["images"]
    grouper, found = _Grouper(source), Counter()
    wanted = _split_values(split, karpathy=True) if split is not None else ()
    for index, entry in enumerate(entries):
        where = f"images[{index}]"
        filename = _wanted_filename(entry, source, where, wanted, found)
        if filename is None:
            continue
        filepath = entry.get("filepath")
        if filepath is not None:
            filename = posixpath.join(_string(filepath, source, where, "'filepath'", allow_empty=True), filename)
        grouper.add(filename, *_karpathy_captions(entry, source, where), where, unique=True)
    images = grouper.result()
    if not images:
        raise _split_error(source, split, found)
    return images


def _nwpu_captions(entry: Mapping[str, Any], source: _Source, where: str) -> tuple[list[str], list[str]]:
    # raw, raw_1, raw_2, ... in number order, all of them (a gap in the numbers drops none).
    numbered = sorted((int(key[4:]), key) for key in entry if re.fullmatch(r"raw_\d+", key))
    keys = ["raw", *(key for _, key in numbered)]
    if "raw" not in entry:
        raise source.fail(where, f"no caption: the entry has no 'raw' (it has {sorted(entry)})")
    captions = [_string(entry[key], source, where, f"'{key}'", allow_empty=True) for key in keys]
    return captions, [f"{where}.{key}" for key in keys]


def _read_nwpu(data: Any, path: Path, split: str | None) -> tuple[CaptionedImage, ...]:
    source = _Source(str(path), "nwpu")
    grouper, found = _Grouper(source), Counter()
    wanted = _split_values(split) if split is not None else ()
    for label, (class_name, entries) in enumerate(data.items()):
        if not isinstance(entries, list):
            raise source.fail(f"class '{class_name}'", f"must be a list of entries, got {type(entries).__name__}")
        for index, entry in enumerate(entries):
            where = f"'{class_name}'[{index}]"
            filename = _wanted_filename(entry, source, where, wanted, found)
            if filename is None:
                continue
            grouper.add(f"{class_name}/{filename}", *_nwpu_captions(entry, source, where), where,
                        label, class_name, unique=True)
    images = grouper.result()
    if not images:
        raise _split_error(source, split, found)
    return images


def _json_candidates(data: Any) -> list[str]:
    """The JSON formats whose shape ``data`` has."""
    candidates = []
    if isinstance(data, list):
        candidates.append("rsitmd")
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        first = next(iter(data["images"]), None)
        if not isinstance(first, dict) or "sentences" in first or "raw" not in first:
            candidates.append("karpathy")
    if isinstance(data, dict) and data and all(isinstance(value, list) for value in data.values()):
        first = next((entries[0] for entries in data.values() if entries), None)
        if isinstance(first, dict) and "raw" in first:
            candidates.append("nwpu")
    return candidates


# --------------------------------------------------------------------------- CSV / TSV

_SEPARATOR_NAMES = {"\\t": "\t", "tab": "\t", "comma": ","}


def check_csv_separator(separator: str | None) -> str | None:
    """``separator`` as one character (``\\t`` as typed in a shell and ``tab`` are a tab), or None.

    Raises:
        ValueError: anything else.
    """
    separator = _SEPARATOR_NAMES.get(separator, separator) if isinstance(separator, str) else separator
    if separator is not None and (not isinstance(separator, str) or len(separator) != 1):
        raise ValueError(f"csv_separator must be one character (or tab), got {separator!r}")
    return separator


def _csv_separator(header: str, img_key: str, caption_key: str, separator: str | None) -> str:
    if separator is not None:
        return check_csv_separator(separator)
    fitting = [sep for sep in ("\t", ",") if {img_key, caption_key} <= set(header.rstrip("\r\n").split(sep))]
    return fitting[0] if fitting else "\t"


def _read_csv(path: Path, img_key: str, caption_key: str, separator: str | None) -> tuple[CaptionedImage, ...]:
    source = _Source(str(path), "csv")
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: '{path}'")
    with path.open("r", encoding="utf-8-sig", newline="") as handle:
        separator = _csv_separator(handle.readline(), img_key, caption_key, separator)
        handle.seek(0)
        rows = csv.reader(handle, delimiter=separator)
        header = next(rows, None)
        if not header:
            raise source.fail(None, "is empty: expected a header line naming the columns")
        missing = [key for key in (img_key, caption_key) if key not in header]
        if missing:
            raise source.fail("line 1", f"no column {missing} in the header {header} (separator {separator!r}); "
                                        f"name the columns with csv_img_key / csv_caption_key (--csv-img-key, "
                                        f"--csv-caption-key) or the separator with csv_separator")
        image_column, caption_column = header.index(img_key), header.index(caption_key)
        grouper = _Grouper(source)
        for row in rows:
            if not row:
                continue  # a blank line, as pandas skips it
            where = f"line {rows.line_num}"
            if len(row) != len(header):
                raise source.fail(where, f"{len(row)} fields but the header has {len(header)} "
                                         f"(separator {separator!r}; a caption holding it must be quoted)")
            image = _path(row[image_column], source, where, f"'{img_key}'")
            grouper.add(image, [row[caption_column]], [f"{where}, '{caption_key}'"], where)
    images = grouper.result()
    if not images:
        raise source.fail(None, "holds no rows")
    return images


# --------------------------------------------------------------------------- Hugging Face datasets

def _is_hf_object(value: Any) -> bool:
    return type(value).__module__.split(".")[0] == "datasets"


def _is_hf_folder(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in ("dataset_dict.json", "state.json"))


def _hf_split(datasets: Any, obj: Any, split: str | None, label: str) -> tuple[Any, str]:
    """The ``datasets.Dataset`` of ``split`` and a description of it (``label[split]``)."""
    if isinstance(obj, datasets.IterableDataset | datasets.IterableDatasetDict):
        raise ValueError(f"Hugging Face dataset '{label}': an iterable (streaming) dataset cannot be indexed; "
                         f"load it without streaming=True")
    if isinstance(obj, datasets.DatasetDict):
        names = list(obj)
        if split is None:
            raise ValueError(f"Hugging Face dataset '{label}' holds the splits {names}: name one (split=...)")
        matches = [name for name in names if name in _split_values(split)]
        if not matches:
            raise ValueError(f"Hugging Face dataset '{label}' has no split {split!r}; its splits are {names}")
        return obj[matches[0]], f"{label}[{matches[0]}]"
    if not isinstance(obj, datasets.Dataset):
        raise ValueError(f"expected a datasets.Dataset or DatasetDict, got {type(obj).__name__}")
    return obj, label


def _hf_column(dataset: Any, names: Sequence[str], given: str | None, what: str, option: str,
               label: str) -> str:
    columns = list(dataset.column_names)
    if given is not None:
        if given not in columns:
            raise ValueError(f"Hugging Face dataset '{label}': no {what} column {given!r}; its columns are "
                             f"{columns}")
        return given
    found = next((name for name in names if name in columns), None)
    if found is None:
        raise ValueError(f"Hugging Face dataset '{label}': no {what} column among {columns} (looked for "
                         f"{list(names)}); name it with {option}")
    return found


def _hf_names(dataset: Any, column: str) -> list[str]:
    """A name per row for images stored without a path: a file-name column's value, or ``row i``."""
    others = [name for name in _HF_IMAGE_KEYS if name != column and name in dataset.column_names]
    values = list(dataset[others[0]]) if others else []
    return [value if isinstance(value, str) and value else f"row {row}"
            for row, value in enumerate(values or [None] * len(dataset))]


def _hf_images(datasets: Any, dataset: Any, column: str, image_root: Path | None,
               grouped: bool) -> tuple[list[str | DatasetImage], list[Any]]:
    """Each row's image (a path, or a `DatasetImage`) and the key that groups rows of one image:
    the path, or for a stored image its bytes' SHA-256 (stored names need not be unique)."""
    if not isinstance(dataset.features[column], datasets.Image):
        values = list(dataset[column])
        return values, values
    table = _encoded_images(datasets, dataset, column)
    names = _hf_names(dataset, column)
    if not grouped:  # one row per image: nothing to read now
        return [DatasetImage(table, row, column, names[row], image_root) for row in range(len(table))], \
            list(range(len(table)))
    images, keys = [], []
    for batch in table.iter(batch_size=256):
        for stored in batch[column]:
            row, stored = len(images), stored or {}
            path, data = stored.get("path"), stored.get("bytes")
            images.append(DatasetImage(table, row, column, path or names[row], image_root))
            keys.append(hashlib.sha256(data).hexdigest() if data else path or row)
    return images, keys


def _read_hf_rows(captions_column: list[Any], image_column: str, caption_column: str, source: _Source,
                  images: list[Any], keys: list[Any]) -> tuple[CaptionedImage, ...]:
    grouper = _Grouper(source)
    first_of_key: dict[Any, str | DatasetImage] = {}
    for row, captions in enumerate(captions_column):
        where = f"row {row}"
        image = first_of_key.setdefault(keys[row], images[row])
        if not isinstance(image, DatasetImage):
            image = _path(image, source, where, f"'{image_column}'")
        if isinstance(captions, str):
            grouper.add(image, [captions], [f"{where}, '{caption_column}'"], where)
        elif isinstance(captions, list) and captions:
            texts = [_string(text, source, where, f"'{caption_column}'[{k}]", allow_empty=True)
                     for k, text in enumerate(captions)]
            grouper.add(image, texts, [f"{where}, '{caption_column}'[{k}]" for k in range(len(texts))], where)
        else:
            raise source.fail(where, f"'{caption_column}' must be a string or a non-empty list of strings, "
                                     f"got {captions!r}")
    if not grouper.images:
        raise source.fail(None, "holds no rows")
    return grouper.result()


def _encoded_images(datasets: Any, dataset: Any, column: str) -> Any:
    """The image column alone, its images left encoded (``{"bytes", "path"}`` per row)."""
    return dataset.select_columns([column]).cast_column(column, datasets.Image(decode=False))


def _open_hf(obj: Any, split: str | None) -> tuple[Any, Any, str]:
    """``(the datasets module, the datasets.Dataset of split, its label)`` of a dataset or of
    the folder ``save_to_disk`` wrote."""
    try:
        datasets = importlib.import_module("datasets")
    except ImportError as error:
        raise ImportError("reading a Hugging Face dataset needs the datasets package: "
                          "pip install 'harma[datasets]'") from error
    label = "<in memory>"
    if isinstance(obj, str | os.PathLike):
        label = str(obj)
        obj = datasets.load_from_disk(str(obj))
    dataset, label = _hf_split(datasets, obj, split, label)
    return datasets, dataset, label


def dataset_image_table(source: PathLike, split: str | None, column: str) -> Any:
    """The images of one split of a saved Hugging Face dataset, left encoded: the table that the
    split's `DatasetImage` entries read (``DatasetImage(table, row, column, name)``), opened
    again later from the folder (archive search serves the images it indexed from it).

    Raises:
        FileNotFoundError: no dataset in the folder.
        ValueError: no such split, or no image column ``column`` (the columns are named).
        ImportError: without the ``datasets`` package.
    """
    datasets, dataset, label = _open_hf(source, split)
    if not isinstance(dataset.features.get(column), datasets.Image):
        raise ValueError(f"Hugging Face dataset '{label}': no image column {column!r}; its columns are "
                         f"{list(dataset.column_names)}")
    return _encoded_images(datasets, dataset, column)


def _read_hf(obj: Any, split: str | None, image_root: Path | None, image_key: str | None,
             caption_key: str | None) -> tuple[tuple[CaptionedImage, ...], str]:
    datasets, dataset, label = _open_hf(obj, split)
    image_column = _hf_column(dataset, _HF_IMAGE_KEYS, image_key, "image", "hf_image_key", label)
    caption_column = _hf_column(dataset, _HF_CAPTION_KEYS, caption_key, "caption", "hf_caption_key", label)
    captions = list(dataset[caption_column])
    grouped = any(isinstance(value, str) for value in captions)
    images, keys = _hf_images(datasets, dataset, image_column, image_root, grouped)
    return _read_hf_rows(captions, image_column, caption_column, _Source(label, "hf"), images, keys), label


# --------------------------------------------------------------------------- detection and reading

def _detect(source: Any) -> tuple[str, Any]:
    """The format of ``source`` and, for a JSON file, its parsed content."""
    if _is_hf_object(source):
        return "hf", None
    path = Path(source)
    if _is_hf_folder(path):
        return "hf", None
    if path.is_dir():
        raise ValueError(f"'{path}' is a folder but not one written by a Hugging Face dataset's save_to_disk")
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: '{path}'")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return "csv", None
    if suffix != ".json":
        raise ValueError(f"cannot tell the caption format of '{path}' from its name: name it (format=, "
                         f"--format), one of {', '.join(CAPTION_FORMATS)}")
    data = _read_json(path)
    candidates = _json_candidates(data)
    if len(candidates) == 1:
        return candidates[0], data
    shape = f"a JSON object with keys {sorted(data)[:8]}" if isinstance(data, dict) else \
        f"a JSON {type(data).__name__}"
    if not candidates:
        raise ValueError(f"annotation file '{path}' ({shape}) is in none of the caption formats "
                         f"{', '.join(CAPTION_FORMATS)}; see docs/data.md")
    raise ValueError(f"annotation file '{path}' ({shape}) could be any of the caption formats "
                     f"{', '.join(candidates)}: name one (format=..., --format ...)")


def detect_caption_format(source: PathLike | Any) -> str:
    """The format name of an annotation file, a saved or in-memory Hugging Face dataset.

    ``.csv``/``.tsv`` files are ``csv``; a JSON list is ``rsitmd``; a JSON object with an
    ``images`` list is ``karpathy``; a JSON object of lists of entries with ``raw`` is ``nwpu``;
    a folder written by ``save_to_disk`` or a ``datasets`` object is ``hf``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the format cannot be told (another suffix, a JSON of another shape), or
            the file fits several formats; the message lists the candidates.
    """
    return _detect(source)[0]


def _check_format(format: str | None) -> None:
    if format is not None and format not in CAPTION_FORMATS:
        raise ValueError(f"unknown caption format {format!r}; the formats are {', '.join(CAPTION_FORMATS)}")


def _check_split(split: str | None) -> None:
    if split is not None and (not isinstance(split, str) or not split):
        raise ValueError(f"split must be a split name (train, val, test) or None, got {split!r}")


def read_caption_dataset(
    source: PathLike | Any,
    format: str | None = None,
    *,
    split: str | None = None,
    image_root: PathLike | None = None,
    csv_img_key: str = "filepath",
    csv_caption_key: str = "title",
    csv_separator: str | None = None,
    hf_image_key: str | None = None,
    hf_caption_key: str | None = None,
) -> CaptionDataset:
    """Read one split of a caption dataset of any format into a `CaptionDataset`.

    Args:
        source: an annotation file (``.json``, ``.csv``, ``.tsv``), a folder written by a
            Hugging Face dataset's ``save_to_disk``, or a ``datasets.Dataset``/``DatasetDict``.
        format: one of `CAPTION_FORMATS`; None detects it (`detect_caption_format`).
        split: ``train``, ``val`` or ``test`` (``validation``, ``valid`` and ``dev`` match
            ``val``; Karpathy's ``train`` includes ``restval``). Required for a source that
            holds several splits (Karpathy, NWPU, a ``DatasetDict``). A file of one split (RSITMD
            layout, CSV, a ``Dataset``) is read whole; for the RSITMD layout, ``train`` asks for
            one caption per entry and ``val``/``test`` for caption lists, so that a test file
            given as training data is refused.
        image_root: the folder image paths are relative to (None: the working directory).
        csv_img_key: the CSV column of the image paths (open_clip_train's ``--csv-img-key``).
        csv_caption_key: the CSV column of the captions (``--csv-caption-key``).
        csv_separator: the CSV separator (None: tab, as open_clip_train, or a comma when the
            header line is comma-separated; ``\\t`` and ``tab`` are a tab).
        hf_image_key: the Hugging Face dataset's image column (None: the first of ``image``,
            ``filepath``, ``filename``, ``image_path``, ``path``, ``img`` that exists).
        hf_caption_key: its caption column (None: the first of ``captions``, ``caption``,
            ``sentences``, ``text``, ``title`` that exists).

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unknown or undetectable format, a missing split (the message lists
            the file's splits), or a bad entry (naming the file, the entry and the fault).
        ImportError: a Hugging Face dataset without the ``datasets`` package.
    """
    _check_format(format)
    _check_split(split)
    root = Path(image_root) if image_root not in (None, "") else None
    data = None
    if format is None:
        format, data = _detect(source)
    if format == "hf":
        images, label = _read_hf(source, split, root, hf_image_key, hf_caption_key)
        return CaptionDataset(images, label, "hf", split, root)
    path = Path(source)
    if format == "csv":
        images = _read_csv(path, csv_img_key, csv_caption_key, csv_separator)
    else:
        data = _read_json(path) if data is None else data
        if format != "rsitmd" and not isinstance(data, dict):
            raise ValueError(f"annotation file '{path}' is no {format} file: expected a JSON object, "
                             f"got a {type(data).__name__}")
        if format == "karpathy" and not isinstance(data.get("images"), list):
            raise ValueError(f"annotation file '{path}' is no karpathy file: it has no 'images' list "
                             f"(keys {sorted(data)[:8]})")
        reader = {"rsitmd": _read_rsitmd, "karpathy": _read_karpathy, "nwpu": _read_nwpu}[format]
        images = reader(data, path, split)
    return CaptionDataset(images, str(path), format, split, root)


# --------------------------------------------------------------------------- carving a split off

def _carve_rank(seed: int, image: CaptionedImage) -> str:
    return hashlib.sha256(f"{seed}:{image.name}".encode()).hexdigest()


def carve_split(
    datasets: Sequence[CaptionDataset], fraction: float, seed: int = 0, split: str = "val"
) -> tuple[list[CaptionDataset], CaptionDataset]:
    """Hold out a fraction of the images of ``datasets`` (all captions of an image together).

    The held-out images are the ``round(fraction * n)`` images (at least one) with the
    smallest SHA-256 of ``"<seed>:<image path>"``: the same on every machine and Python
    version, whatever the file order. An image found in several datasets is held out from
    all of them.

    Returns:
        The datasets without the held-out images (a dataset left empty is dropped), and the
        held-out images as one dataset named ``split``, in file order, whose ``carved`` records
        the sources, ``fraction`` and ``seed``.

    Raises:
        ValueError: ``fraction`` outside (0, 1), or too few images to leave some on each side.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"the fraction of images to hold out must be in (0, 1), got {fraction!r}")
    keyed = [(dataset, image, dataset.image_path(image)) for dataset in datasets for image in dataset.images]
    distinct = list(dict.fromkeys(key for _, _, key in keyed))
    count = max(1, round(fraction * len(distinct)))
    if count >= len(distinct):
        raise ValueError(f"cannot hold out {fraction:.0%} of {len(distinct)} image(s) as the {split} split and "
                         f"keep images to train on; give a {split} file instead")
    name_of = {key: image for _, image, key in keyed}
    held = set(sorted(distinct, key=lambda key: _carve_rank(seed, name_of[key]))[:count])
    kept = [replace(dataset, images=tuple(image for image in dataset.images if dataset.image_path(image) not in held))
            for dataset in datasets]
    several = len(datasets) > 1
    grouper = _Grouper(_Source(" + ".join(dataset.source for dataset in datasets), datasets[0].format))
    for dataset, image, key in keyed:
        if key in held:
            of = f" of '{dataset.source}'" if several else ""
            grouper.add(image.image if isinstance(image.image, DatasetImage) else str(key), image.captions,
                        [place + of for place in image.caption_places], image.where + of, image.label,
                        image.label_name)
    carved = {"from": [dataset.source for dataset in datasets], "fraction": fraction, "seed": seed}
    held_out = CaptionDataset(grouper.result(), grouper.source.source, datasets[0].format, split, None, carved)
    return [dataset for dataset in kept if len(dataset)], held_out
