"""The weight files of a training run: what each method trained, as one safetensors file.

``harma`` runs write `harma.save_adapters` files; ``lora`` runs the LoRA tensors with the LoRA
settings in the header; ``full`` runs the whole state dict. `load_trained_weights` reads any of
the three back.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import ADAPTER_WEIGHTS_NAME, load_adapters, save_adapters
from ..checkpoint import FORMAT_NAME as HARMA_FORMAT
from ..io import (
    NONFINITE_FILE_HINT,
    NONFINITE_SAVE_HINT,
    check_finite,
    header_json,
    load_tensors,
    match_tensors,
    read_safetensors,
    write_safetensors,
)
from .config import TrainConfig
from .models import apply_lora, is_lora_parameter
from .state import CONFIG_NAME

LORA_FORMAT = "harma.train.lora"
FULL_FORMAT = "harma.train.full"


def _base_model_label(config: TrainConfig) -> str:
    if config.pretrained:
        return f"{config.model}/{Path(config.pretrained).name if os.sep in config.pretrained else config.pretrained}"
    return config.model


def save_trained_weights(
    model: nn.Module,
    path: str | os.PathLike,
    config: TrainConfig,
    temperature: float | None = None,
    extra_metadata: Mapping[str, str] | None = None,
    *,
    allow_nonfinite: bool = False,
) -> Path:
    """Write what the method trained as one safetensors file, atomically.

    ``harma``: `harma.save_adapters` (adapter tensors and the layout). ``lora``: the LoRA
    tensors, with the LoRA settings in the header. ``full``: the whole state dict (it is all
    trained). The loss temperature goes into the header (it does not affect retrieval).

    Returns:
        The path written.

    Raises:
        ValueError: a tensor holds NaN or infinite values and ``allow_nonfinite`` is False
            (named; nothing is written), as `load_trained_weights` would refuse the file.
    """
    path = Path(path)
    metadata = {
        "method": config.method,
        "train_config": json.dumps(config.to_dict()),
        **({"temperature": repr(float(temperature))} if temperature is not None else {}),
        **dict(extra_metadata or {}),
    }
    if config.method == "harma":
        return save_adapters(model, path, base_model=_base_model_label(config), metadata=metadata,
                             allow_nonfinite=allow_nonfinite)
    if config.method == "lora":
        tensors = {name: p for name, p in model.named_parameters() if p.requires_grad}
        metadata["format"] = LORA_FORMAT
        metadata["lora"] = json.dumps({
            "rank": config.lora_rank, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
            "targets": list(config.lora_targets),
        })
    else:
        tensors = dict(model.state_dict())
        metadata["format"] = FULL_FORMAT
    if not allow_nonfinite:
        check_finite(tensors, f"save_trained_weights: the {config.method} weights (nothing written to '{path}')",
                     hint=NONFINITE_SAVE_HINT)
    return write_safetensors(path, tensors, metadata)


def _load_lora(model: nn.Module, metadata: Mapping[str, str], tensors: Mapping[str, torch.Tensor],
               source: str) -> nn.Module:
    lora = header_json(metadata, "lora", source)
    if not isinstance(lora, dict) or not {"rank", "alpha", "dropout", "targets"} <= set(lora):
        raise ValueError(f"{source} has a damaged header: 'lora' must give rank, alpha, dropout and targets")
    if not any(is_lora_parameter(name) for name, _ in model.named_parameters()):
        stored = TrainConfig(
            method="lora", lora_rank=lora["rank"], lora_alpha=lora["alpha"],
            lora_dropout=lora["dropout"], lora_targets=tuple(lora["targets"]),
        )
        # LoRA changes the model in place and cannot be taken out exactly again, so the file is
        # first matched against LoRA on a copy of the model without memory (meta device): a
        # file that does not fit leaves the model as it was.
        shadow = apply_lora(_meta_copy(model), stored)
        match_tensors({n: p for n, p in shadow.named_parameters() if is_lora_parameter(n)}, tensors, source)
        model = apply_lora(model, stored)
    targets = {name: p for name, p in model.named_parameters() if is_lora_parameter(name)}
    load_tensors(targets, tensors, source)
    return model


def _meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are on the meta device: the same
    modules, names, shapes and ``requires_grad`` flags, without copying any tensor data."""
    memo: dict[int, object] = {}
    for param in model.parameters():
        memo[id(param)] = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
    for buffer in model.buffers():
        memo[id(buffer)] = buffer.detach().to("meta")
    return copy.deepcopy(model, memo)


def load_trained_weights(model: nn.Module, path: str | os.PathLike, *, allow_nonfinite: bool = False) -> nn.Module:
    """Load a file written by `save_trained_weights` into a base model (or into a model that
    already carries the same method). All or nothing: on any error the model is left as it was.

    Args:
        model: the base model.
        path: the file, or a folder that `harma.save_adapters` wrote (HarMA adapters).
        allow_nonfinite: load a file holding NaN or infinite values (e.g. to inspect a
            diverged run); by default such a file is refused, as by `harma.load_adapters`.

    Returns:
        The model, possibly wrapped (LoRA).

    Raises:
        IsADirectoryError: a folder without ``adapter_model.safetensors`` (a training run's
            folder is named as one).
        ValueError: an unknown file format, tensors that do not fit the model, or NaN or
            infinite values without ``allow_nonfinite`` (named).
    """
    path = Path(path)
    if path.is_dir():
        return _load_folder(model, path, allow_nonfinite)
    metadata, tensors = read_safetensors(path)
    file_format = metadata.get("format")
    source = f"'{path}'"
    if file_format == HARMA_FORMAT:
        return load_adapters(model, path, allow_nonfinite=allow_nonfinite)
    if file_format not in (FULL_FORMAT, LORA_FORMAT):
        raise ValueError(
            f"'{path}' is not a harma training output (its header has format={file_format!r}; expected "
            f"{HARMA_FORMAT!r}, {LORA_FORMAT!r} or {FULL_FORMAT!r})"
        )
    if not allow_nonfinite:
        check_finite(tensors, source, hint=NONFINITE_FILE_HINT)
    if file_format == FULL_FORMAT:
        load_tensors(model.state_dict(), tensors, source)
        return model
    return _load_lora(model, metadata, tensors, source)


def _load_folder(model: nn.Module, folder: Path, allow_nonfinite: bool) -> nn.Module:
    """A folder `harma.save_adapters` wrote holds HarMA adapters; any other folder is named."""
    if (folder / ADAPTER_WEIGHTS_NAME).is_file():
        return load_adapters(model, folder, allow_nonfinite=allow_nonfinite)
    hint = ("it holds a training run; give its best.safetensors or last.safetensors"
            if (folder / CONFIG_NAME).is_file() else "give a weights file (.safetensors) or a folder "
            "that harma.save_adapters wrote")
    raise IsADirectoryError(f"'{folder}' is a folder without {ADAPTER_WEIGHTS_NAME}: {hint}")


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the parameters that require grad, by name (what a resume state stores)."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy a `trainable_state` back into ``model``; all or nothing."""
    load_tensors({name: p for name, p in model.named_parameters() if p.requires_grad}, state, source)
