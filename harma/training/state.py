"""The files of a run folder and the resume state: what is saved after each epoch so that a
resumed run equals an uninterrupted one."""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io import atomic_write, atomic_write_text, read_torch_file
from .config import RESUMABLE_CHANGES, TrainConfig

STATE_FORMAT = "harma.train_state"
STATE_VERSION = 1

CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"
LAST_WEIGHTS_NAME = "last.safetensors"
BEST_WEIGHTS_NAME = "best.safetensors"
STATE_NAME = "last_state.pt"
RESULTS_NAME = "results.json"
CURVES_NAME = "training_curves.png"
RUN_FILES = (
    CONFIG_NAME, METRICS_NAME, CURVES_NAME, LAST_WEIGHTS_NAME, BEST_WEIGHTS_NAME, STATE_NAME, RESULTS_NAME,
)


def check_output_dir(output_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to start a fresh run in a folder that holds files, unless ``overwrite`` or the
    files are those of a run that never saved a checkpoint."""
    if resume or not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise FileExistsError(f"output_dir '{output_dir}' exists and is not a folder")
    contents = sorted(p.name for p in output_dir.iterdir())
    if contents and not overwrite and not holds_no_checkpoint(output_dir):
        raise FileExistsError(
            f"output_dir '{output_dir}' is not empty ({', '.join(contents[:5])}"
            f"{', ...' if len(contents) > 5 else ''}); pass --resume to continue that run, "
            f"--overwrite to replace its files, or choose another --output_dir"
        )


def check_writable_folder(output_dir: Path, what: str = "output_dir") -> None:
    """Fail before anything is built when the run could not write its files: ``output_dir``
    (or, while it does not exist, the nearest folder above it, where it would be created) must
    be a folder this process may write into. Nothing is created here. ``what`` names the folder
    in messages.

    Raises:
        NotADirectoryError: a file stands where a folder of the path should be.
        PermissionError: the folder may not be written (permissions, a read-only file system).
    """
    existing = output_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{what} '{output_dir}' cannot be created: '{existing}' is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(
            f"{what} '{output_dir}' cannot be written: no permission to write in '{existing}' "
            f"(or a read-only file system)"
        )


def state_path(resume: bool | str | os.PathLike, output_dir: Path) -> Path:
    """The ``last_state.pt`` that ``resume`` (True, a run folder or the file) names."""
    if resume is True:
        return output_dir / STATE_NAME
    path = Path(resume)
    return path / STATE_NAME if path.is_dir() or path.suffix != ".pt" else path


def read_state(path: Path, config: TrainConfig) -> dict[str, Any]:
    """Read a resume state and check that ``config`` is the recipe it was saved with.

    Raises:
        FileNotFoundError: no state at ``path``.
        ValueError: not a harma training state, a newer version, or a different recipe.
    """
    if not path.is_file():
        raise FileNotFoundError(f"nothing to resume: no {STATE_NAME} at '{path}'")
    state = read_torch_file(path)
    if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT or state.get("version", 0) > STATE_VERSION:
        raise ValueError(f"'{path}' is not a harma training state (or a newer version)")
    changed = differing_fields(state["config"], config.to_dict())
    if changed:
        raise ValueError(
            f"cannot resume '{path.parent}' with a different recipe: {changed} differ from the "
            f"stored config.json (only {sorted(RESUMABLE_CHANGES)} may change); start a new run "
            f"in another output_dir instead"
        )
    return dict(state)


def differing_fields(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Recipe fields that differ, other than the `RESUMABLE_CHANGES`. A field the stored recipe
    lacks (it was added to `TrainConfig` later) counts as its default."""
    defaults = TrainConfig().to_dict()
    return sorted(
        key for key in set(stored) | set(current)
        if key not in RESUMABLE_CHANGES and stored.get(key, defaults.get(key)) != current.get(key)
    )


def rng_state() -> dict[str, Any]:
    """Python's, numpy's, torch's and CUDA's generator states, as tensors and plain types (so that
    ``torch.load(weights_only=True)`` reads them back)."""
    numpy_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
            "position": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state` saved."""
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    numpy_state = state["numpy"]
    np.random.set_state((
        "MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
        numpy_state["has_gauss"], numpy_state["cached_gaussian"],
    ))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(path: Path, state: Mapping[str, Any]) -> None:
    """Write a resume state atomically."""
    atomic_write(path, lambda target: torch.save(dict(state), target))


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None, so that it is valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as indented, valid JSON (non-finite numbers as null), atomically."""
    atomic_write_text(path, json.dumps(json_safe(value), indent=2, allow_nan=False) + "\n")


def write_metrics(path: Path, history: Sequence[Mapping[str, Any]]) -> None:
    """Rewrite ``metrics.jsonl``: one JSON line per entry of ``history`` (non-finite numbers as null)."""
    atomic_write_text(path, "".join(json.dumps(json_safe(line), allow_nan=False) + "\n" for line in history))


def leftover_temporary_files(output_dir: Path) -> list[Path]:
    """Temporary files an interrupted `harma.io.atomic_write` of a run file left behind."""
    if not output_dir.is_dir():
        return []
    return sorted(
        path for name in RUN_FILES for path in output_dir.glob(f".{name}.*.tmp") if path.is_file()
    )


def holds_no_checkpoint(output_dir: Path) -> bool:
    """Whether ``output_dir`` holds only files of a run that never saved a checkpoint (its
    ``config.json``, metrics, curves, temporary files), so that starting it again loses nothing."""
    keep = {CONFIG_NAME, METRICS_NAME, CURVES_NAME}
    leftovers = set(leftover_temporary_files(output_dir))
    return all(path.name in keep or path in leftovers for path in output_dir.iterdir())
