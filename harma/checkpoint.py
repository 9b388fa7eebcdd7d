"""Adapter-only files (safetensors), peft-style folders and the Hugging Face Hub."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._version import __version__
from .config import HarmaConfig
from .inject import get_harma_config, inject_harma_adapters
from .io import (
    NONFINITE_FILE_HINT,
    NONFINITE_SAVE_HINT,
    adapter_state_dict,
    architecture_fingerprint,
    atomic_write_text,
    check_fingerprint,
    check_finite,
    check_layout,
    check_readable_file,
    header_json,
    load_adapter_tensors,
    read_safetensors,
    write_safetensors,
)
from .named_adapters import (
    DEFAULT_ADAPTER_NAME,
    active_adapter,
    adapter_registry,
    check_adapter_name,
    undone_on_error,
    unwrap_model,
)

# The API (its page lists these, in this order); the other functions serve the package.
__all__ = [
    "save_adapters",
    "load_adapters",
    "push_adapters_to_hub",
    "read_adapter_file",
    "AdapterFile",
    "load_adapter_state",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ADAPTER_WEIGHTS_NAME",
    "ADAPTER_CONFIG_NAME",
    "MODEL_CARD_NAME",
]

FORMAT_NAME = "harma.adapters"
# 2: the config records placement, adapter_mask, attention_passes, attention_attribute and
# causal_towers. Version 1 files lack them and load with their defaults (the reference layout).
FORMAT_VERSION = 2
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
MODEL_CARD_NAME = "README.md"
# Suffixes of other weight formats: a save path ending in one is a mistake, not a folder name.
OTHER_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


# --------------------------------------------------------------------------------------------
# Saving and loading adapter files


def _is_folder_target(path: Path) -> bool:
    """Whether a save ``path`` is a folder: anything not ending in ``.safetensors`` (any case).

    Raises:
        ValueError: ``path`` ends in the suffix of another weight format (``.pt``, ...).
    """
    suffix = path.suffix.lower()
    if suffix in OTHER_WEIGHT_SUFFIXES:
        raise ValueError(
            f"cannot save adapters to '{path}': adapter files are safetensors, not {suffix} files; "
            f"use a name ending in .safetensors for one file, or a folder name"
        )
    return suffix != ".safetensors"


def save_adapters(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    adapter_name: str | None = None,
    base_model: str | None = None,
    metadata: Mapping[str, str] | None = None,
    allow_nonfinite: bool = False,
) -> Path:
    """Save only the adapter tensors of ``model``, with its config, in safetensors format.

    ``path`` ending in ``.safetensors`` (any case) writes that one file. Any other path is a
    folder in the peft layout: ``adapter_model.safetensors``, ``adapter_config.json`` and a
    model card ``README.md`` (an existing card is kept). Every file is written atomically.
    Tensor names are those of the unwrapped model: the same for a plain, a ``torch.compile``d
    and a ``DataParallel``/``DistributedDataParallel`` model, and the same for every adapter
    set (the reference names, whatever the set's name): one set is saved per file.

    Args:
        model: a model patched by `harma.inject_harma_adapters`, or a wrapper of one.
        path: the file or folder to write.
        adapter_name: the adapter set to save; the active set when None.
        base_model: name of the base weights (e.g. ``"ViT-B-32/laion2b_s34b_b79k"``), recorded
            in the metadata and the model card.
        metadata: extra string pairs for the safetensors header.
        allow_nonfinite: write adapters holding NaN or infinite values (the loaders refuse such
            a file unless told otherwise; a diverged run's tensors are rarely worth keeping).

    Returns:
        The path of the safetensors file written.

    Raises:
        ValueError: ``path`` ends in ``.pt``, ``.pth``, ``.bin`` or ``.ckpt``, the model has
            no adapter set ``adapter_name``, or an adapter tensor holds NaN or infinite values
            without ``allow_nonfinite`` (named; nothing is written).
    """
    model = unwrap_model(model)
    config = get_harma_config(model, adapter_name)
    path = Path(path)
    folder = _is_folder_target(path)
    tensors = adapter_state_dict(model, adapter_name)
    if not allow_nonfinite:
        _check_finite_adapters(model, adapter_name, tensors, f"save_adapters: adapter set {{}} (nothing written "
                                                             f"to '{path}')")
    header = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "harma_version": __version__,
        "config": config.to_json(),
        "fingerprint": json.dumps(architecture_fingerprint(model, config)),
        **({"base_model": base_model} if base_model else {}),
        **dict(metadata or {}),
    }
    weights_path = path / ADAPTER_WEIGHTS_NAME if folder else path
    write_safetensors(weights_path, tensors, header)
    if folder:
        _write_folder_files(path, config, json.loads(header["fingerprint"]), base_model,
                            sum(t.numel() for t in tensors.values()))
    return weights_path


def _write_folder_files(
    path: Path, config: HarmaConfig, fingerprint: list[dict[str, Any]], base_model: str | None, parameters: int
) -> None:
    """``adapter_config.json`` and (unless one exists) the model card of a peft-style folder."""
    adapter_config = {
        # peft_type lets peft's PeftModel.from_pretrained read the folder too, once
        # harma.integrations.peft is imported.
        "peft_type": "HARMA",
        "library": "harma",
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "harma_version": __version__,
        "base_model": base_model,
        "config": config.to_dict(),
        "fingerprint": fingerprint,
        "trainable_parameters": parameters,
    }
    atomic_write_text(path / ADAPTER_CONFIG_NAME, json.dumps(adapter_config, indent=2) + "\n")
    card = path / MODEL_CARD_NAME
    if not card.exists():
        atomic_write_text(card, _model_card(config, base_model, parameters))


def _model_card(config: HarmaConfig, base_model: str | None, parameters: int) -> str:
    base_line = f"base_model: {base_model}\n" if base_model else ""
    return (
        "---\n"
        f"{base_line}"
        "library_name: harma\n"
        "tags:\n- harma\n- clip\n- remote-sensing\n- image-text-retrieval\n- adapter\n"
        "---\n\n"
        "# HarMA adapters\n\n"
        f"Adapter-only weights ({parameters:,} parameters, layout `{config.sharing}`) for "
        f"{('`' + base_model + '`') if base_model else 'a CLIP-style model'}, trained with "
        "[harma](https://pypi.org/project/harma/).\n\n"
        "```python\n"
        "import harma\n\n"
        "model = ...  # the same base model, e.g. open_clip.create_model(...)\n"
        "harma.load_adapters(model, 'path/or/hub-id')\n"
        "```\n"
    )


@dataclass(frozen=True)
class AdapterFile:
    """The parsed content of a harma adapter file."""

    path: Path
    config: HarmaConfig
    fingerprint: list[dict[str, Any]]
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(repr=False)


def read_adapter_file(path: str | os.PathLike) -> AdapterFile:
    """Read and validate a harma adapter safetensors file (or a folder holding one).

    Raises:
        FileNotFoundError: nothing at ``path``.
        PermissionError, OSError: the file cannot be read (the file and the cause are named).
        ValueError: not a safetensors file, not a harma adapter file, or a newer format.
    """
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_WEIGHTS_NAME
    check_readable_file(path, "harma adapter file")
    metadata, tensors = read_safetensors(path)
    if metadata.get("format") != FORMAT_NAME:
        raise ValueError(
            f"{path} is not a harma adapter file (its metadata has format={metadata.get('format')!r}, "
            f"expected {FORMAT_NAME!r})" + _peft_folder_hint(path)
        )
    version = _format_version(metadata.get("format_version", "0"), str(path))
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has adapter format version {version}; this harma ({__version__}) reads up to "
            f"{FORMAT_VERSION}: upgrade harma"
        )
    try:
        config = HarmaConfig.from_dict(header_json(metadata, "config", str(path)))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path} has a damaged header: its 'config' is not a HarmaConfig ({error})") from None
    fingerprint = header_json(metadata, "fingerprint", str(path))
    return AdapterFile(path=path, config=config, fingerprint=fingerprint, tensors=tensors, metadata=metadata)


def _peft_folder_hint(weights: Path) -> str:
    """What to do with the weights of a folder peft's ``save_pretrained`` wrote for HarMA
    adapters (their header holds no harma layout; the folder's ``adapter_config.json`` does)."""
    try:
        peft_type = json.loads((weights.parent / ADAPTER_CONFIG_NAME).read_text(encoding="utf-8")).get("peft_type")
    except (OSError, ValueError, AttributeError):
        return ""
    if peft_type != "HARMA":
        return ""
    return (f"; {weights.parent} was written by peft's save_pretrained: load it with "
            f"harma.integrations.peft.load_peft_adapters(model, '{weights.parent}'), or peft's load_adapter")


def _format_version(text: Any, source: str) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        raise ValueError(f"{source} has a damaged header: format_version {text!r} is not an integer") from None


def _resolve_adapter_source(source: str | os.PathLike, revision: str | None, token: str | None) -> Path:
    """A local file or folder if one exists, else a Hugging Face Hub repository id."""
    text = os.fspath(source)
    local = Path(text)
    if local.exists():
        return local
    repo_id = text.removeprefix("hf-hub:")
    looks_like_file = local.suffix.lower() in (".safetensors", *OTHER_WEIGHT_SUFFIXES)
    if text.startswith("hf-hub:") or (re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id) and not looks_like_file):
        from huggingface_hub import snapshot_download

        # snapshot_download reads only the local cache when HF_HUB_OFFLINE is set.
        folder = snapshot_download(
            repo_id,
            revision=revision,
            token=token,
            allow_patterns=[ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME, MODEL_CARD_NAME],
        )
        return Path(folder)
    raise FileNotFoundError(f"no adapter file or folder at {local}, and {text!r} is no Hub repository id")


def load_adapters(
    model: nn.Module,
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | None = None,
    adapter_name: str | None = None,
    allow_nonfinite: bool = False,
) -> nn.Module:
    """Load adapter weights saved by `save_adapters` into ``model``.

    The weights go into adapter set ``adapter_name``: by default the active set, or
    ``"default"`` on a model without adapters. A set of that name that the model lacks is added
    first with the stored config (as peft's ``load_adapter``, it is active only if it is the
    model's first set; `harma.set_adapter` switches to it). The stored architecture must
    match the model's, and every stored tensor must find its parameter with the same shape;
    shared MMS tensors are loaded once and stay shared. All or nothing: on any error the model
    is left as it was. A ``torch.compile``d or ``DataParallel``/``DistributedDataParallel``
    model is loaded through its wrapper, and stored names with the ``module.``/``_orig_mod.``
    prefixes of such wrappers (files of older versions) are accepted.

    Args:
        model: the base model (patched or not), or a wrapper of one.
        source: a ``.safetensors`` file, a folder saved by `save_adapters`, or a Hugging
            Face Hub repository id (``"org/name"`` or ``"hf-hub:org/name"``); local paths win.
        revision: for the Hub.
        token: for the Hub.
        adapter_name: the adapter set to load into (see above).
        allow_nonfinite: load a file holding NaN or infinite values (e.g. to inspect a
            diverged run); by default such a file is refused.

    Returns:
        ``model``, patched and loaded.

    Raises:
        ValueError: a different architecture, config, key set or tensor shape (named), or NaN or
            infinite values (the file and the first tensors holding them are named) without
            ``allow_nonfinite``.
    """
    adapter_file = read_adapter_file(_resolve_adapter_source(source, revision, token))
    load_adapter_state(model, adapter_file.config, adapter_file.fingerprint, adapter_file.tensors,
                       str(adapter_file.path), adapter_name=adapter_name, allow_nonfinite=allow_nonfinite)
    return model


def load_adapter_state(
    model: nn.Module,
    config: HarmaConfig,
    fingerprint: list[dict[str, Any]] | None,
    tensors: Mapping[str, torch.Tensor],
    source: str,
    *,
    adapter_name: str | None = None,
    allow_nonfinite: bool = False,
) -> None:
    """Check a stored layout, fingerprint and tensors against adapter set ``adapter_name`` of
    ``model`` (unwrapped, `unwrap_model`; the active set when None, ``"default"`` on a model
    without adapters) and load them, adding the set with ``config`` first where the model lacks
    it. All or nothing: on any error the model is left as it was (a set added here is deleted
    again, and every ``requires_grad`` restored). Tensors holding NaN or infinite values are
    refused (`check_finite`) unless ``allow_nonfinite``."""
    model = unwrap_model(model)
    if not allow_nonfinite:
        check_finite(tensors, source, hint=NONFINITE_FILE_HINT)
    registry = adapter_registry(model)
    if adapter_name is None:
        adapter_name = registry.active if registry else DEFAULT_ADAPTER_NAME
    name = check_adapter_name(adapter_name)
    added_here = registry is None or name not in registry.configs
    if not added_here:
        check_layout(registry.configs[name], config, source)
    if fingerprint is not None:
        check_fingerprint(fingerprint, architecture_fingerprint(model, config), source)
    with undone_on_error(model, name, added_here):
        if added_here:
            inject_harma_adapters(model, config, name)
        load_adapter_tensors(model, tensors, source, name)


# --------------------------------------------------------------------------------------------
# Hugging Face Hub


def _check_finite_adapters(model: nn.Module, adapter_name: str | None, tensors: Mapping[str, torch.Tensor],
                           source: str) -> None:
    """`check_finite` of an adapter set's ``tensors``; ``source`` has ``{}`` for the set's name."""
    label = adapter_name if adapter_name is not None else active_adapter(model)
    check_finite(tensors, source.format(repr(label)), hint=NONFINITE_SAVE_HINT)


def push_adapters_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    adapter_name: str | None = None,
    base_model: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload HarMA adapters",
    allow_nonfinite: bool = False,
) -> str:
    """Save the adapters (set ``adapter_name``, the active set when None) as a peft-style folder
    and upload it to a Hub model repository (``"org/name"``; ``"hf-hub:org/name"`` as
    `load_adapters` reads it works too).

    Everything is checked, and the folder written, before the Hub is contacted: a bad
    repository id or adapter set creates no repository.

    Returns:
        The URL of the commit.

    Raises:
        ValueError: ``repo_id`` is not a repository id, the model has no adapter set
            ``adapter_name`` (named, with the sets it has), or its adapters hold NaN or infinite
            values without ``allow_nonfinite`` (as in `save_adapters`).
    """
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo_id = repo_id.removeprefix("hf-hub:") if isinstance(repo_id, str) else repo_id
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"push_adapters_to_hub: {repo_id!r} is not a Hub repository id (org/name): "
                         f"{error}") from None
    if not allow_nonfinite:
        unwrapped = unwrap_model(model)
        _check_finite_adapters(unwrapped, adapter_name, adapter_state_dict(unwrapped, adapter_name),
                               f"push_adapters_to_hub: adapter set {{}} (nothing uploaded to {repo_id!r})")
    with tempfile.TemporaryDirectory() as folder:
        save_adapters(model, folder, adapter_name=adapter_name, base_model=base_model, allow_nonfinite=True)
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
    return str(getattr(commit, "commit_url", commit))


