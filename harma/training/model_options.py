"""The model options of the command lines that run a trained model (evaluation, archive search):
which backbone, which weights, which device, in one place.

``--model``, ``--pretrained``, ``--model_config``, ``--image_size`` name the backbone
(`harma.training.models.build_backbone`); ``--adapters`` names what was trained on it: one file
written by harma (HarMA adapters, LoRA or full fine-tuning, `load_trained_weights`), or several
HarMA adapter files as named sets of one backbone (``--adapters NAME=PATH``, repeatable).
``--batch_size``, ``--num_workers`` and ``--device`` say how to run it.

`ModelSpec` is what the options name, `build_from_spec` builds it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..checkpoint import load_adapters
from ..named_adapters import check_adapter_name
from .models import build_backbone, looks_like_path, native_image_size
from .options import device_option, errors_named, integer_at_least, json_object_option, read_json_object
from .weights import load_trained_weights

__all__ = [
    "ModelSpec",
    "add_model_arguments",
    "add_runtime_arguments",
    "build_from_spec",
    "file_sha256",
    "load_adapter_weights",
    "load_named_adapters",
    "parse_adapters",
    "read_model_config",
    "resolve_image_size",
    "spec_from_args",
    "split_adapter_argument",
]

Adapters = str | dict[str, str] | None


def add_model_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--model``, ``--pretrained``, ``--model_config`` (read into a dict), ``--image_size``,
    ``--adapters`` (the raw values: `parse_adapters` reads them)."""
    parser.add_argument("--model", help="open_clip architecture, e.g. ViT-B-32 or ViT-B-32-quickgelu")
    parser.add_argument("--pretrained", help="open_clip tag or local weights file of the backbone")
    parser.add_argument("--model_config", type=json_object_option,
                        help="open_clip.CLIP arguments as JSON (or a JSON file)")
    parser.add_argument("--image_size", type=integer_at_least(1), help="input side in pixels (default: the model's)")
    parser.add_argument("--adapters", action="append", default=[], metavar="[NAME=]PATH",
                        help="a .safetensors file written by harma (adapters, LoRA or full); or NAME=PATH, "
                        "repeatable: HarMA adapter files loaded as named sets of one backbone")


def add_runtime_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *,
                          batch_size: int = 128, num_workers: int = 4) -> None:
    """``--batch_size``, ``--num_workers``, ``--device`` (checked: `harma.training.options`)."""
    parser.add_argument("--batch_size", type=integer_at_least(1), default=batch_size)
    parser.add_argument("--num_workers", type=integer_at_least(0), default=num_workers)
    parser.add_argument("--device", type=device_option, default="auto", help="auto | cuda | cuda:N | cpu")


def split_adapter_argument(text: str) -> tuple[str | None, str]:
    """``(NAME, PATH)`` of an ``--adapters NAME=PATH`` value, ``(None, PATH)`` of a bare path.

    The text before the first ``=`` is a name only when it holds no path separator, so
    ``runs/lr=1e-4/best.safetensors`` stays a path.
    """
    name, equals, path = text.partition("=")
    if not equals or "/" in name or os.sep in name:
        return None, text
    return name, path


def parse_adapters(values: list[str]) -> Adapters:
    """The ``--adapters`` values: None (none given), one bare path (a str), or ``{name: path}``
    (several, or any named: HarMA adapter sets on one backbone).

    Raises:
        ValueError: a value without a name among several, an invalid or repeated name, or a
            name without a file.
    """
    if not values:
        return None
    pairs = [split_adapter_argument(value) for value in values]
    if len(pairs) == 1 and pairs[0][0] is None:
        return pairs[0][1]
    named: dict[str, str] = {}
    for value, (name, path) in zip(values, pairs, strict=True):
        if name is None:
            raise ValueError(f"--adapters {value}: give each of several adapter files as NAME=PATH")
        try:
            check_adapter_name(name)
        except ValueError as error:
            raise ValueError(f"--adapters {value}: {name!r} cannot name an adapter set: {error}") from None
        if not path:
            raise ValueError(f"--adapters {value}: no file after '{name}='")
        if name in named:
            raise ValueError(f"--adapters: the name {name!r} is given twice ({named[name]} and {path})")
        named[name] = path
    return named


def read_model_config(text: str | None) -> dict[str, Any] | None:
    """``--model_config``: a JSON object as text, or the path of a JSON file holding one
    (`harma.training.options.read_json_object`).

    Raises:
        ValueError: neither a JSON file nor JSON text, or not an object (``--model_config: ``
            and the cause).
    """
    if text is None:
        return None
    with errors_named("--model_config"):
        return read_json_object(text)


def resolve_image_size(model: str, model_config: Mapping[str, Any] | None, image_size: int | None) -> int:
    """The input side in pixels: ``image_size``, else the configuration's or the named model's
    (`harma.training.models.native_image_size`).

    Raises:
        ValueError: no ``image_size`` and none known (an unknown model, a configuration without
            ``vision_cfg.image_size``).
    """
    if image_size is not None:
        return image_size
    size = native_image_size(model, model_config)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (the fingerprint of a weights file)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


@dataclass(frozen=True)
class ModelSpec:
    """A backbone and the trained weights on it, as the model options name them.

    Attributes:
        model: open_clip architecture name (a label only with ``model_config``).
        pretrained: open_clip tag, local weights file, or None (random initialisation).
        model_config: ``open_clip.CLIP`` keyword arguments, or None.
        image_size: input side in pixels (resolved: never None).
        adapters: None, one file written by harma, or ``{name: HarMA adapter file}``.
    """

    model: str
    pretrained: str | None
    model_config: dict[str, Any] | None
    image_size: int
    adapters: Adapters = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def backbone_fingerprint(self) -> dict[str, Any]:
        """What identifies the backbone: the options, and the SHA-256 of a local weights file."""
        pretrained_sha = None
        if self.pretrained and looks_like_path(self.pretrained) and Path(self.pretrained).expanduser().is_file():
            pretrained_sha = file_sha256(Path(self.pretrained).expanduser())
        return {"model": self.model, "pretrained": self.pretrained, "pretrained_sha256": pretrained_sha,
                "model_config": self.model_config, "image_size": self.image_size}


def spec_from_args(args: argparse.Namespace) -> ModelSpec:
    """The `ModelSpec` of parsed `add_model_arguments` options (``args.adapters`` either the raw
    list or already parsed).

    Raises:
        ValueError: no ``--model``, a bad ``--model_config`` or ``--adapters`` value.
    """
    if not args.model:
        raise ValueError("give --model (an open_clip architecture name, or a label with --model_config)")
    model_config = read_model_config(args.model_config) if isinstance(args.model_config, str) else args.model_config
    adapters = parse_adapters(args.adapters) if isinstance(args.adapters, list) else args.adapters
    image_size = resolve_image_size(args.model, model_config, args.image_size)
    return ModelSpec(args.model, args.pretrained, model_config, image_size, adapters)


def load_named_adapters(model: nn.Module, named: Mapping[str, str]) -> None:
    """Load each HarMA adapter file into ``model`` as the set of its name; errors name the file."""
    for name, path in named.items():
        # A local path only: harma.load_adapters would read a missing "org/name" as a Hub id.
        if not Path(path).exists():
            raise FileNotFoundError(f"--adapters {name}={path}: no harma adapter file or folder at '{path}'")
        try:
            load_adapters(model, path, adapter_name=name)
        except ValueError as error:
            raise ValueError(f"--adapters {name}={path}: {error} (named adapters must be HarMA adapter "
                             f"files; a LoRA or full fine-tuning file is used alone, as a bare --adapters "
                             f"PATH)") from None


def load_adapter_weights(model: nn.Module, adapters: Adapters) -> nn.Module:
    """``model`` with the ``--adapters`` weights in it: named HarMA adapter sets
    (`load_named_adapters`), or one file harma wrote (`load_trained_weights`: HarMA adapters,
    LoRA or full fine-tuning; errors start with ``--adapters PATH``); unchanged without any."""
    if isinstance(adapters, dict):
        load_named_adapters(model, adapters)
    elif adapters:
        with errors_named(f"--adapters {adapters}"):
            return load_trained_weights(model, adapters)
    return model


def build_from_spec(spec: ModelSpec) -> nn.Module:
    """The backbone of ``spec`` with its trained weights loaded, in float32 on the CPU, eval mode.

    Raises:
        FileNotFoundError: a weights or adapter file is missing (named).
        ValueError: a file that does not fit the backbone (named).
    """
    if isinstance(spec.adapters, str) and not Path(spec.adapters).exists():
        raise FileNotFoundError(f"--adapters: no file at '{spec.adapters}'")
    model = build_backbone(spec.model, spec.pretrained, spec.model_config, spec.image_size)
    return load_adapter_weights(model, spec.adapters).eval()
