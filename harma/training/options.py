"""Building blocks of harma's command lines (training, evaluation, archive search): argparse
value types that check what they read, the one way a command line ends on bad input (one
``error:`` line, exit status 2, no traceback), and the options that name a caption dataset
(`add_caption_arguments`, shared by ``examples/evaluate.py`` and ``python -m harma.search
index``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .captions import CAPTION_FORMATS
from .config import cuda_problem, is_device_name, read_config_file
from .data import ImageReadError

__all__ = [
    "BAD_INPUT",
    "READER_OPTIONS",
    "add_caption_arguments",
    "caption_reader_options",
    "check_device",
    "device_option",
    "errors_named",
    "exit_on_bad_input",
    "integer_at_least",
    "positive_number",
    "json_object_option",
    "read_json_object",
    "resolve_device",
]

BAD_INPUT = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError,
             ValueError)
"""Errors that are the user's to fix (a recipe, a path, an input file): the command line prints
one ``error:`` line and exits with status 2, no traceback."""


@contextlib.contextmanager
def exit_on_bad_input(also: tuple[type[Exception], ...] = ()) -> Iterator[None]:
    """Inside, an error that is the user's to fix (`BAD_INPUT`, and the types in ``also`` where
    a command line's library raises others: archive search names an unknown item with a
    `KeyError`, a missing optional extra with an `ImportError`) prints one ``error:`` line on
    stderr and exits with status 2, without a traceback; an image that a DataLoader worker could
    not read is named without the worker's traceback."""
    try:
        yield
    except (*BAD_INPUT, *also) as error:
        if isinstance(error, ImageReadError):
            error = ImageReadError.without_worker_traceback(error)
        message = error.args[0] if isinstance(error, KeyError) and error.args else error  # str() quotes a KeyError
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


@contextlib.contextmanager
def errors_named(prefix: str) -> Iterator[None]:
    """Inside, an error that is the user's to fix (`BAD_INPUT`) is raised again with ``prefix``
    (the option and its value, e.g. ``"--adapters runs/x"``) in front of its message, with its
    type where the type takes a message alone (`ValueError` otherwise)."""
    try:
        yield
    except BAD_INPUT as error:
        message = f"{prefix}: {error}"
        try:
            renamed = type(error)(message)
        except TypeError:  # e.g. json.JSONDecodeError, which needs more than a message
            renamed = ValueError(message)
        raise renamed from None


def integer_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: the integer a value gives, refused (naming it) below ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


def positive_number(text: str) -> float:
    """An argparse ``type``: a finite number above zero (``nan``, ``inf``, ``0`` are refused)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def check_device(text: str) -> str:
    """``text`` when it names a device this machine has: ``auto``, ``cpu``, ``cuda`` or
    ``cuda:N`` (CUDA, and device ``N``, present).

    Raises:
        ValueError: another name, or a CUDA device this machine lacks (the cause is named).
    """
    if not is_device_name(text):
        raise ValueError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    problem = cuda_problem(text)
    if problem:
        raise ValueError(problem)
    return text


def device_option(text: str) -> str:
    """An argparse ``type``: `check_device`, its errors as argument errors."""
    try:
        return check_device(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def resolve_device(text: str) -> torch.device:
    """The device ``--device`` names (`check_device`); ``auto`` is CUDA when available, else the
    CPU.

    Raises:
        ValueError: see `check_device` (the message starts with ``--device``).
    """
    with errors_named("--device"):
        check_device(text)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(text)


def _is_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except OSError:  # a name too long for the file system is no file
        return False


def read_json_object(text: str) -> dict[str, Any]:
    """A JSON object given as text, or as the path of a JSON file holding one.

    Raises:
        ValueError: neither a JSON file nor valid JSON, or JSON that is not an object (named).
    """
    # JSON text is no file name (a long object would make Path.is_file raise ENAMETOOLONG).
    if not text.lstrip().startswith("{") and _is_file(text):
        return read_config_file(text)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{text!r} is neither a JSON file nor valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got a {type(value).__name__}: {text!r}")
    return value


def json_object_option(text: str) -> dict[str, Any]:
    """An argparse ``type``: `read_json_object`, its errors as argument errors."""
    try:
        return read_json_object(text)
    except (OSError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None


READER_OPTIONS = ("csv_img_key", "csv_caption_key", "csv_separator", "hf_image_key", "hf_caption_key")
"""Options of `harma.training.captions.read_caption_dataset` that `add_caption_arguments` adds
(as ``--csv-img-key`` and so on), passed on only when given."""


def add_caption_arguments(parser: argparse.ArgumentParser, *, split_default: str | None, split_help: str) -> None:
    """The options that say how to read a caption dataset of any format (docs/data.md), in a
    group of their own: ``--format``, ``--split`` (``train``, ``val`` or ``test``; its default
    and help are the command's), ``--csv-img-key``, ``--csv-caption-key``, ``--csv-separator``,
    ``--hf-image-key``, ``--hf-caption-key``. `caption_reader_options` reads them back."""
    group = parser.add_argument_group("caption formats (docs/data.md)")
    group.add_argument("--format", choices=CAPTION_FORMATS, help="format of --annotation (default: detected)")
    group.add_argument("--split", choices=("test", "val", "train"), default=split_default, help=split_help)
    group.add_argument("--csv-img-key", dest="csv_img_key", help="CSV/TSV column of the image paths "
                       "(default filepath)")
    group.add_argument("--csv-caption-key", dest="csv_caption_key", help="CSV/TSV column of the captions "
                       "(default title)")
    group.add_argument("--csv-separator", dest="csv_separator", help="CSV/TSV separator (default: tab, or a "
                       "comma when the header line is comma-separated)")
    group.add_argument("--hf-image-key", dest="hf_image_key", help="image column of a Hugging Face dataset")
    group.add_argument("--hf-caption-key", dest="hf_caption_key", help="caption column of a Hugging Face dataset")


def caption_reader_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of `harma.training.captions.read_caption_dataset` that the
    `add_caption_arguments` options give: ``format``, ``split`` and those of `READER_OPTIONS`
    that were given."""
    options = {name: getattr(args, name) for name in READER_OPTIONS if getattr(args, name) is not None}
    return {"format": args.format, "split": args.split, **options}
