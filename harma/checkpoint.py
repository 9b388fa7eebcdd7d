"""Adapter-only checkpoints (safetensors), peft-style folders, the Hugging Face Hub, and the
authors' reference checkpoints."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import __version__
from .config import HarmaConfig
from .inject import (
    ADAPTER_ATTRIBUTE,
    adapter_named_parameters,
    find_towers,
    get_harma_config,
    inject_harma_adapters,
    is_patched,
)

FORMAT_NAME = "harma.adapters"
# 2: the config records placement, adapter_mask, attention_passes, attention_attribute and
# causal_towers. Version 1 files lack them and load with their defaults (the reference layout).
FORMAT_VERSION = 2
# The config fields that decide which adapter tensors exist, their shapes and what they compute.
LAYOUT_FIELDS = ("bottleneck", "heads", "mini_bottleneck", "mini_heads", "sharing", "towers", "layers",
                 "target_modules", "mlp_attribute", "placement", "adapter_mask", "attention_passes",
                 "attention_attribute", "causal_towers", "batch_first")
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
MODEL_CARD_NAME = "README.md"


# --------------------------------------------------------------------------------------------
# Architecture fingerprint


def architecture_fingerprint(model: nn.Module, config: HarmaConfig) -> list[dict[str, Any]]:
    """What an adapter file needs of its base model: each patched tower's depth and width.

    Returns a JSON-compatible list, one ``{"name", "path", "blocks", "width"}`` per tower.
    """
    return [
        {"name": t.name, "path": t.path, "blocks": len(t.block_names), "width": t.width}
        for t in find_towers(model, config)
    ]


def _check_fingerprint(expected: list[dict[str, Any]], actual: list[dict[str, Any]], source: str) -> None:
    def describe(towers: list[dict[str, Any]]) -> str:
        return ", ".join(f"{t['name']} ({t['blocks']} blocks of width {t['width']})" for t in towers)

    if [(t["name"], t["blocks"], t["width"]) for t in expected] != [
        (t["name"], t["blocks"], t["width"]) for t in actual
    ]:
        raise ValueError(
            f"{source} holds adapters for a model with towers {describe(expected)}, "
            f"but this model has {describe(actual)}"
        )


# --------------------------------------------------------------------------------------------
# Atomic writes


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through a temporary file in the same folder and rename it into place, so
    an interrupted save never leaves a truncated file where a good one was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    temporary = Path(temporary_name)
    try:
        write(temporary)
        with open(temporary, "rb") as stream:
            os.fsync(stream.fileno())
        # mkstemp makes owner-only files; give the result the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda target: target.write_text(text, encoding="utf-8"))


# --------------------------------------------------------------------------------------------
# Saving and loading adapter files


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors of ``model`` by model-relative name; a shared MMS appears once."""
    get_harma_config(model)
    return {name: param.detach() for name, param in adapter_named_parameters(model)}


def _is_folder_target(path: Path) -> bool:
    return path.suffix != ".safetensors"


def save_adapters(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    base_model: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Save only the adapter tensors of ``model``, with its config, in safetensors format.

    ``path`` ending in ``.safetensors`` writes that one file. Any other path is a folder in the
    peft layout: ``adapter_model.safetensors``, ``adapter_config.json`` and a model card
    ``README.md`` (an existing card is kept). Every file is written atomically.

    Args:
        model: a model patched by `harma.inject_harma_adapters`.
        path: the file or folder to write.
        base_model: name of the base weights (e.g. ``"ViT-B-32/laion2b_s34b_b79k"``), recorded
            in the metadata and the model card.
        metadata: extra string pairs for the safetensors header.

    Returns:
        The path of the safetensors file written.
    """
    config = get_harma_config(model)
    path = Path(path)
    tensors = {
        name: tensor.to("cpu", copy=True).contiguous() for name, tensor in adapter_state_dict(model).items()
    }
    header = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "harma_version": __version__,
        "config": config.to_json(),
        "fingerprint": json.dumps(architecture_fingerprint(model, config)),
        **({"base_model": base_model} if base_model else {}),
        **dict(metadata or {}),
    }
    weights_path = path / ADAPTER_WEIGHTS_NAME if _is_folder_target(path) else path
    atomic_write(weights_path, lambda target: save_file(tensors, str(target), metadata=header))
    if _is_folder_target(path):
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
            "fingerprint": json.loads(header["fingerprint"]),
            "trainable_parameters": sum(t.numel() for t in tensors.values()),
        }
        atomic_write_text(path / ADAPTER_CONFIG_NAME, json.dumps(adapter_config, indent=2) + "\n")
        card = path / MODEL_CARD_NAME
        if not card.exists():
            atomic_write_text(card, _model_card(config, base_model, adapter_config["trainable_parameters"]))
    return weights_path


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
        ValueError: not a safetensors file, not a harma adapter file, or a newer format.
    """
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no harma adapter file at {path}")
    try:
        with safe_open(str(path), framework="pt") as reader:
            metadata = dict(reader.metadata() or {})
            tensors = {key: reader.get_tensor(key) for key in reader.keys()}
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from None
    if metadata.get("format") != FORMAT_NAME:
        raise ValueError(
            f"{path} is not a harma adapter file (its metadata has format={metadata.get('format')!r}, "
            f"expected {FORMAT_NAME!r})"
        )
    version = int(metadata.get("format_version", "0"))
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has adapter format version {version}; this harma ({__version__}) reads up to "
            f"{FORMAT_VERSION}: upgrade harma"
        )
    try:
        config = HarmaConfig.from_json(metadata["config"])
        fingerprint = json.loads(metadata["fingerprint"])
    except (KeyError, ValueError) as error:
        raise ValueError(f"{path} has a damaged harma header: {error}") from None
    return AdapterFile(path=path, config=config, fingerprint=fingerprint, tensors=tensors, metadata=metadata)


def _resolve_adapter_source(source: str | os.PathLike, revision: str | None, token: str | None) -> Path:
    """A local file or folder if one exists, else a Hugging Face Hub repository id."""
    text = os.fspath(source)
    local = Path(text)
    if local.exists():
        return local
    repo_id = text.removeprefix("hf-hub:")
    looks_like_file = local.suffix in (".safetensors", ".pt", ".pth", ".bin")
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
) -> nn.Module:
    """Load adapter weights saved by `save_adapters` into ``model``.

    An unpatched model is patched first with the stored config. The stored architecture must
    match the model's, and every stored tensor must find its parameter with the same shape;
    shared MMS tensors are loaded once and stay shared.

    Args:
        model: the base model (patched or not).
        source: a ``.safetensors`` file, a folder saved by `save_adapters`, or a Hugging
            Face Hub repository id (``"org/name"`` or ``"hf-hub:org/name"``); local paths win.
        revision: for the Hub.
        token: for the Hub.

    Returns:
        ``model``, patched and loaded.

    Raises:
        ValueError: a different architecture, config, key set or tensor shape (named).
    """
    adapter_file = read_adapter_file(_resolve_adapter_source(source, revision, token))
    if is_patched(model):
        config = get_harma_config(model)
        differing = [name for name in LAYOUT_FIELDS if getattr(config, name) != getattr(adapter_file.config, name)]
        if differing:
            raise ValueError(
                f"{adapter_file.path} was saved with another adapter layout than the model's: "
                + ", ".join(f"{name}={getattr(adapter_file.config, name)!r} (model: {getattr(config, name)!r})"
                            for name in differing)
            )
    else:
        config = adapter_file.config
    _check_fingerprint(
        adapter_file.fingerprint, architecture_fingerprint(model, config), str(adapter_file.path)
    )
    if not is_patched(model):
        inject_harma_adapters(model, config)
    _copy_into(model, adapter_file.tensors, str(adapter_file.path))
    return model


def _copy_into(model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    parameters = dict(adapter_named_parameters(model))
    missing = sorted(set(parameters) - set(tensors))
    unexpected = sorted(set(tensors) - set(parameters))
    problems = []
    if missing:
        problems.append(f"{len(missing)} adapter tensor(s) missing from the file, e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) in the file have no place in the model, e.g. {unexpected[:3]}")
    if problems:
        raise ValueError(f"{source} does not fit this model: " + "; ".join(problems))
    for name, tensor in tensors.items():
        if tensor.shape != parameters[name].shape:
            raise ValueError(
                f"{source}: tensor {name!r} has shape {tuple(tensor.shape)} in the file but "
                f"{tuple(parameters[name].shape)} in the model"
            )
    with torch.no_grad():
        for name, tensor in tensors.items():
            parameters[name].copy_(tensor)


# --------------------------------------------------------------------------------------------
# Hugging Face Hub


def push_adapters_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    base_model: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload HarMA adapters",
) -> str:
    """Save the adapters as a peft-style folder and upload it to a Hub model repository.

    Returns:
        The URL of the commit.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory() as folder:
        save_adapters(model, folder, base_model=base_model)
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
    return str(getattr(commit, "commit_url", commit))


# --------------------------------------------------------------------------------------------
# The authors' reference checkpoints

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


def _load_reference_file(path: Path) -> Mapping[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"{path} could not be read with torch.load(weights_only=True) ({error}). Checkpoints "
            f"from others are data, not code: harma never unpickles arbitrary objects. If you trust "
            f"the file, re-save its 'model' state dict alone and load that."
        ) from None


def check_state_dict_shapes(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise a `ValueError` naming the first tensor of `state` whose shape differs from the
    model's tensor of the same key (keys the model lacks are left to the caller)."""
    expected = model.state_dict()
    for key, value in state.items():
        if key in expected and expected[key].shape != value.shape:
            raise ValueError(
                f"{source}: {key!r} has shape {tuple(value.shape)} in the checkpoint but "
                f"{tuple(expected[key].shape)} in the model (is it the right architecture?)"
            )


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
    not patched yet, it is patched with the reference layout (`HarmaConfig.reference`).
    Base and adapter weights are then loaded.

    Args:
        model: an open_clip CLIP of the checkpoint's architecture (``ViT-B-32-quickgelu`` for
            the released GeoRSCLIP-based checkpoints).
        checkpoint: a path (read with ``torch.load(weights_only=True)``) or a loaded mapping.
        strict: raise on any missing or unexpected key (named); otherwise return them.

    Returns:
        An `OfficialCheckpoint` with the temperature and the key report.
    """
    source = "the checkpoint"
    if not isinstance(checkpoint, Mapping):
        source = os.fspath(checkpoint)
        checkpoint = _load_reference_file(Path(checkpoint))
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint.get("model"), Mapping) else checkpoint
    training_config = checkpoint.get("config") if state is not checkpoint else None
    if not all(isinstance(value, torch.Tensor) for value in state.values()):
        bad = [key for key, value in state.items() if not isinstance(value, torch.Tensor)][:5]
        raise ValueError(f"{source} is not a state dict: entries {bad} are not tensors")

    temperature = checkpoint.get("temp") if state is not checkpoint else None
    translated: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "temp":
            temperature = value
            continue
        for prefix in ("module.", "model."):
            key = key.removeprefix(prefix)
        translated[reference_key_to_harma(key)] = value

    has_adapters = any(f".{ADAPTER_ATTRIBUTE}." in key for key in translated)
    if has_adapters and not is_patched(model):
        inject_harma_adapters(model, HarmaConfig.reference())

    check_state_dict_shapes(model, translated, source)
    result = model.load_state_dict(translated, strict=False)
    missing = list(result.missing_keys)
    if not has_adapters:
        # A plain backbone checkpoint (e.g. GeoRSCLIP) leaves the adapters as they are.
        missing = [key for key in missing if f".{ADAPTER_ATTRIBUTE}." not in key]
    unexpected = list(result.unexpected_keys)
    if strict and (missing or unexpected):
        raise ValueError(
            f"{source} does not match the model: {len(missing)} missing key(s) {missing[:10]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:10]}; pass strict=False to load "
            f"the rest and inspect the report"
        )
    if isinstance(temperature, torch.Tensor):
        temperature = float(temperature.float().reshape(()))
    return OfficialCheckpoint(
        temperature=temperature, missing_keys=missing, unexpected_keys=unexpected, config=training_config
    )
