"""The command line of ``examples/train_rsitmd.py`` and friends: a JSON config file,
``--field value`` overrides (``--lr 1e-4``, ``--harma.sharing paper``), ``--resume`` and
``--overwrite``. The CPU demo has its own entry point, ``python -m harma.training.demo``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from ..config import LAYOUT_PRESETS, HarmaConfig
from .config import TrainConfig, read_config_file
from .options import BAD_INPUT, errors_named, exit_on_bad_input, integer_at_least, read_json_object
from .state import CONFIG_NAME
from .trainer import NonFiniteError, train

__all__ = ["ParsedArgs", "main", "parse_args"]


def _type_name(config_field: dataclasses.Field) -> str:
    return config_field.type if isinstance(config_field.type, str) else getattr(config_field.type, "__name__", "str")


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _parse_list(text: str) -> list[Any]:
    text = text.strip()
    if text.startswith("["):
        value = json.loads(text)
        if not isinstance(value, list):
            raise ValueError(f"expected a JSON list, got {text!r}")
        return value
    return [part.strip() for part in text.split(",") if part.strip()]


def _parse_field_value(type_name: str, text: str) -> Any:
    """Convert a command-line string to a config field's type (as written in its annotation)."""
    optional = type_name.endswith("| None")
    base = type_name.removesuffix("| None").strip()
    if optional and text.strip().lower() in ("none", "null"):
        return None
    if base == "bool":
        return _parse_bool(text)
    if base == "int":
        return int(text)
    if base == "float":
        return float(text)
    if base == "dict":
        return read_json_object(text)
    if base.startswith("tuple["):
        items = _parse_list(text)
        if text.strip().startswith("["):
            # JSON values keep their types: TrainConfig and HarmaConfig check them as they check a
            # config file's (no 1.7 -> 1, no true -> 1, no null -> "None").
            return tuple(items)
        if "int" in base:
            return tuple(int(item) for item in items)
        if "float" in base:
            return tuple(float(item) for item in items)
        return tuple(items)
    return text


def _metavar(type_name: str) -> str:
    base = type_name.removesuffix("| None").strip()
    if base.startswith("tuple["):
        return "LIST"
    return {"int": "N", "float": "X", "bool": "BOOL", "dict": "JSON"}.get(base, "TEXT")


def _config_fields() -> list[tuple[str, dataclasses.Field, bool]]:
    """``(command-line name, field, belongs to HarmaConfig)`` for every overridable field."""
    fields = [(f.name, f, False) for f in dataclasses.fields(TrainConfig) if f.name != "harma"]
    fields += [(f"harma.{f.name}", f, True) for f in dataclasses.fields(HarmaConfig)]
    return fields


class _OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose errors are one ``error:`` line: the usage of dozens of recipe
    options printed first would bury it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _build_parser(prog: str | None, description: str | None) -> argparse.ArgumentParser:
    parser = _OneLineErrorParser(
        prog=prog,
        allow_abbrev=False,
        description=description or "Train HarMA adapters (or LoRA / full fine-tuning) on an open_clip CLIP.",
        epilog="Values: lists are comma-separated or JSON; booleans true/false; 'none' clears an optional "
        "field. Example: --config examples/configs/rsitmd_vit.json --image_root /data/rsitmd --lr 2e-4 "
        "--harma.sharing paper",
    )
    parser.add_argument("--config", help="JSON file of TrainConfig fields (over the script's defaults)")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN",
                        help="continue a run: its folder or last_state.pt (default: output_dir)")
    parser.add_argument("--overwrite", action="store_true", help="start afresh in a non-empty output_dir")
    parser.add_argument("--stop-after-epoch", type=integer_at_least(1), default=None, metavar="N",
                        help="stop after N epochs as if interrupted (continue with --resume)")
    parser.add_argument("--print-config", action="store_true", help="print the merged config and exit")
    parser.add_argument("--harma", dest="harma_preset", choices=LAYOUT_PRESETS, default=None,
                        help="adapter layout preset (plus: the recommended layout for new runs; reference: "
                        "the authors'); --harma.FIELD values apply on top of it")
    group = parser.add_argument_group("recipe fields (override the config file)")
    for cli_name, config_field, _ in _config_fields():
        flags = [f"--{cli_name}"]
        if "_" in cli_name:
            flags.append(f"--{cli_name.replace('_', '-')}")
        type_name = _type_name(config_field)
        help_text = config_field.metadata.get("help", "HarmaConfig field (see harma.HarmaConfig)")
        group.add_argument(
            *flags, dest=f"field:{cli_name}", default=argparse.SUPPRESS, metavar=_metavar(type_name),
            nargs="?" if type_name == "bool" else None, const="true" if type_name == "bool" else None,
            help=f"{help_text} [{type_name}]",
        )
    return parser


def _defaults_dict(defaults: TrainConfig | Mapping[str, Any] | str | os.PathLike | None) -> dict[str, Any]:
    if defaults is None:
        return {}
    if isinstance(defaults, TrainConfig):
        return defaults.to_dict()
    if isinstance(defaults, Mapping):
        return dict(defaults)
    return read_config_file(defaults)


def _merge_overrides(base: dict[str, Any], namespace: argparse.Namespace) -> dict[str, Any]:
    merged = dict(base)
    stored = merged.get("harma")
    if getattr(namespace, "harma_preset", None) is not None:
        stored = namespace.harma_preset
    if isinstance(stored, str) and stored in LAYOUT_PRESETS:
        stored = HarmaConfig.preset(stored)
    # Anything else (e.g. "harma": 5) is left for TrainConfig to name.
    harma_fields = stored.to_dict() if isinstance(stored, HarmaConfig) else (
        dict(stored or {}) if isinstance(stored, Mapping | None) else None)
    types = {cli_name: (_type_name(f), is_harma) for cli_name, f, is_harma in _config_fields()}
    for key, text in vars(namespace).items():
        if not key.startswith("field:"):
            continue
        cli_name = key.removeprefix("field:")
        type_name, is_harma = types[cli_name]
        try:
            value = _parse_field_value(type_name, text)
        except (ValueError, json.JSONDecodeError) as error:
            raise ValueError(f"--{cli_name}: {error}") from None
        if is_harma:
            if harma_fields is not None:
                harma_fields[cli_name.removeprefix("harma.")] = value
        else:
            merged[cli_name] = value
    if harma_fields:
        merged["harma"] = harma_fields
    return merged


def _check_resume_folder(parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                         config: TrainConfig) -> None:
    """``--resume RUN`` continues the run in RUN's folder; an ``--output_dir`` naming another
    folder would be ignored, so it is an error."""
    if not isinstance(namespace.resume, str) or "field:output_dir" not in vars(namespace):
        return
    run = Path(namespace.resume)
    run_dir = run.parent if run.suffix == ".pt" else run
    if run_dir.resolve() != Path(config.output_dir).resolve():
        parser.error(
            f"--resume {namespace.resume} continues the run in '{run_dir}', but --output_dir names "
            f"'{config.output_dir}': drop --output_dir (a run is resumed where it is)"
        )


def _base_recipe(defaults: TrainConfig | Mapping[str, Any] | str | os.PathLike | None,
                 namespace: argparse.Namespace) -> dict[str, Any]:
    """The recipe the ``--field`` overrides apply to: ``defaults`` updated by the ``--config``
    file or, with ``--resume`` alone, the run's stored ``config.json`` (when there is one)."""
    base = _defaults_dict(defaults)
    if namespace.config:
        with errors_named("--config"):
            base.update(read_config_file(namespace.config))
    elif namespace.resume:
        run = Path(namespace.resume) if isinstance(namespace.resume, str) else Path(
            _merge_overrides(base, namespace).get("output_dir") or TrainConfig.output_dir
        )
        run_dir = run.parent if run.suffix == ".pt" else run
        if (run_dir / CONFIG_NAME).is_file():
            base = read_config_file(run_dir / CONFIG_NAME)
    return base


@dataclass(frozen=True)
class ParsedArgs:
    """What `parse_args` found: the merged recipe and the run options."""

    config: TrainConfig
    resume: bool | str
    overwrite: bool
    stop_after_epoch: int | None
    print_config: bool
    overridden: tuple[str, ...] = ()


def parse_args(
    argv: Sequence[str] | None = None,
    defaults: TrainConfig | Mapping[str, Any] | str | os.PathLike | None = None,
    prog: str | None = None,
    description: str | None = None,
) -> ParsedArgs:
    """Merge, in order: ``defaults``, the ``--config`` file, then ``--field value`` overrides.

    With ``--resume RUN`` and no ``--config``, the run's stored ``config.json`` is the base, so
    ``--resume runs/x`` alone continues that run.
    """
    parser = _build_parser(prog, description)
    arguments = list(argv) if argv is not None else sys.argv[1:]
    if "--demo" in arguments:
        parser.error("--demo has its own entry point now: python examples/demo.py (or python -m harma.training.demo)")
    namespace = parser.parse_args(arguments)
    try:
        config = TrainConfig.from_dict(_merge_overrides(_base_recipe(defaults, namespace), namespace))
    except BAD_INPUT as error:
        parser.error(str(error))
    _check_resume_folder(parser, namespace, config)
    return ParsedArgs(
        config=config,
        resume=namespace.resume,
        overwrite=namespace.overwrite,
        stop_after_epoch=namespace.stop_after_epoch,
        print_config=namespace.print_config,
        overridden=tuple(key.removeprefix("field:") for key in vars(namespace) if key.startswith("field:")),
    )


def main(
    argv: Sequence[str] | None = None,
    defaults: TrainConfig | Mapping[str, Any] | str | os.PathLike | None = None,
    prog: str | None = None,
    description: str | None = None,
) -> dict[str, Any]:
    """Command line of the example scripts; see `parse_args` and ``docs/training.md``.

    Exits with status 2 (one ``error:`` line naming the cause) on a bad recipe, path or input
    file, and 3 when the run diverged (`harma.training.trainer.NonFiniteError`); any other
    failure raises (status 1).
    """
    args = parse_args(argv, defaults, prog=prog, description=description)
    if args.print_config:
        print(json.dumps(args.config.to_dict(), indent=2))
        return {}
    with exit_on_bad_input():
        try:
            return train(args.config, resume=args.resume, overwrite=args.overwrite,
                         stop_after_epoch=args.stop_after_epoch)
        except NonFiniteError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(3) from None
