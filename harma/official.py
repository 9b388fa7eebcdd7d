"""The authors' reference checkpoints: their key names, and loading them into an open_clip CLIP."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import HarmaConfig
from .inject import inject_harma_adapters
from .io import check_state_dict_shapes, read_torch_file
from .named_adapters import (
    ADAPTER_ATTRIBUTE,
    DEFAULT_ADAPTER_NAME,
    adapter_name_of_key,
    is_adapter_parameter_name,
    list_adapters,
    undone_on_error,
    unwrap_model,
)

# The API (its page lists these, in this order); the other functions serve the package.
__all__ = [
    "load_official_checkpoint",
    "OfficialCheckpoint",
    "reference_key_to_harma",
]

_REFERENCE_BLOCK = re.compile(r"^(?P<block>(?:visual\.)?transformer\.resblocks\.\d+)\.(?P<rest>.+)$")
_REFERENCE_TO_OURS = (
    ("gate1", "block_gate"),
    ("mmadapter.img_proj_down.", "down."),
    ("mmadapter.img_proj_up.", "up."),
    ("mmadapter.multihead_attention.", "attn."),
    ("mmadapter.gate1", "gate"),
    ("mmadapter.BiShareAdapterxx.l1.", "mini_adapter.down."),
    ("mmadapter.BiShareAdapterxx.l2.", "mini_adapter.up."),
    ("mmadapter.BiShareAdapterxx.multihead_attention1.", "mini_adapter.attn."),
    ("mmadapter.BiShareAdapterxx.gate1", "mini_adapter.gate"),
)
# Dropped from the front of stored keys, in any order: DDP's and torch.compile's wrapper
# prefixes and the reference's ``model.``.
_KEY_PREFIXES = ("module.", "_orig_mod.", "model.")


def reference_key_to_harma(key: str) -> str:
    """Translate one reference state-dict key (without its ``model.`` prefix) to ours; base keys
    are returned unchanged."""
    match = _REFERENCE_BLOCK.match(key)
    if match is None:
        return key
    rest = match["rest"]
    for theirs, ours in _REFERENCE_TO_OURS:
        if rest == theirs or (theirs.endswith(".") and rest.startswith(theirs)):
            return f"{match['block']}.{ADAPTER_ATTRIBUTE}.{ours}{rest[len(theirs):]}"
    return key


@dataclass(frozen=True)
class OfficialCheckpoint:
    """What `load_official_checkpoint` found.

    Attributes:
        temperature: the contrastive temperature ``temp`` (a plain float), or None if absent.
        missing_keys: model keys the checkpoint had no tensor for (only with ``strict=False``).
        unexpected_keys: checkpoint keys with no place in the model (only with ``strict=False``).
        config: the training config stored beside the weights, if any.
    """

    temperature: float | None
    missing_keys: list[str]
    unexpected_keys: list[str]
    config: Any = None


def _translate(
    state: Mapping[str, torch.Tensor], temperature: Any
) -> tuple[dict[str, torch.Tensor], Any]:
    """Reference keys translated to ours (``module.``/``_orig_mod.``/``model.`` prefixes dropped),
    and the temperature taken out of the state when it is stored there as ``temp``."""
    translated: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "temp":
            temperature = value
            continue
        while key.startswith(_KEY_PREFIXES):
            key = key.split(".", 1)[1]
        translated[reference_key_to_harma(key)] = value
    return translated, temperature


def _key_report(
    model: nn.Module, translated: Mapping[str, torch.Tensor], has_adapters: bool
) -> tuple[list[str], list[str]]:
    """The model keys the checkpoint lacks and the checkpoint keys the model lacks."""
    # The checkpoint fills the "default" set; the model's other sets are not its business.
    expected = [key for key in model.state_dict() if adapter_name_of_key(key) in (None, DEFAULT_ADAPTER_NAME)]
    missing = [key for key in expected if key not in translated]
    if not has_adapters:
        # A plain backbone checkpoint (e.g. GeoRSCLIP) leaves the adapters as they are.
        missing = [key for key in missing if not is_adapter_parameter_name(key)]
    known = set(expected)
    return missing, [key for key in translated if key not in known]


def load_official_checkpoint(
    model: nn.Module,
    checkpoint: str | os.PathLike | Mapping[str, Any],
    *,
    strict: bool = True,
) -> OfficialCheckpoint:
    """Load a checkpoint of the authors' implementation into an open_clip CLIP.

    Accepts the reference ``checkpoint_best.pth`` layout (``{"model": state_dict, "config": ...}``
    with the CLIP under ``model.`` and the temperature as ``temp``), or a bare state dict in that
    or in plain open_clip naming. When the checkpoint holds adapter weights and ``model`` is
    has no adapter set named ``"default"`` yet, that set is added with the reference layout
    (`HarmaConfig.reference`). Base and adapter weights are then loaded; the adapter weights go
    into the ``"default"`` set, and the model's other named sets are left as they are.

    Args:
        model: an open_clip CLIP of the checkpoint's architecture (``ViT-B-32-quickgelu`` for
            the released GeoRSCLIP-based checkpoints), or a ``torch.compile``/``DataParallel``/
            ``DistributedDataParallel`` wrapper of one (loaded into the model inside).
        checkpoint: a path (read with ``torch.load(weights_only=True)``) or a loaded mapping.
        strict: raise on any missing or unexpected key (named); otherwise return them.

    Returns:
        An `OfficialCheckpoint` with the temperature and the key report.

    Raises:
        FileNotFoundError, IsADirectoryError, PermissionError, OSError: the file cannot be
            opened (the file and the cause are named).
        ValueError: a damaged file, one holding code, no dict or no tensors, a shape that
            differs, or (with ``strict``) missing or unexpected keys; nothing is loaded then.
    """
    model = unwrap_model(model)
    source = "the checkpoint"
    if not isinstance(checkpoint, Mapping):
        source = os.fspath(checkpoint)
        checkpoint = read_torch_file(checkpoint)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{source} holds a {type(checkpoint).__name__}, not a checkpoint dict or state dict")
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint.get("model"), Mapping) else checkpoint
    training_config = checkpoint.get("config") if state is not checkpoint else None
    if not all(isinstance(value, torch.Tensor) for value in state.values()):
        bad = [key for key, value in state.items() if not isinstance(value, torch.Tensor)][:5]
        raise ValueError(f"{source} is not a state dict: entries {bad} are not tensors")

    temperature = checkpoint.get("temp") if state is not checkpoint else None
    translated, temperature = _translate(state, temperature)
    has_adapters = any(is_adapter_parameter_name(key) for key in translated)
    # Everything is checked before the first tensor is copied: a strict load that fails leaves
    # the model exactly as it was (adapters patched in here are removed again).
    patched_here = has_adapters and DEFAULT_ADAPTER_NAME not in list_adapters(model)
    with undone_on_error(model, DEFAULT_ADAPTER_NAME, patched_here):
        if patched_here:
            inject_harma_adapters(model, HarmaConfig.reference(), adapter_name=DEFAULT_ADAPTER_NAME)
        check_state_dict_shapes(model, translated, source)
        missing, unexpected = _key_report(model, translated, has_adapters)
        if strict and (missing or unexpected):
            raise ValueError(
                f"{source} does not match the model: {len(missing)} missing key(s) {missing[:10]}, "
                f"{len(unexpected)} unexpected key(s) {unexpected[:10]}; pass strict=False to load "
                f"the rest and inspect the report"
            )
    model.load_state_dict(translated, strict=False)
    if isinstance(temperature, torch.Tensor):
        temperature = float(temperature.float().reshape(()))
    return OfficialCheckpoint(
        temperature=temperature, missing_keys=missing, unexpected_keys=unexpected, config=training_config
    )
