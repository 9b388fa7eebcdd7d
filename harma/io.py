"""The weights I/O layer: every file of weights harma reads or writes goes through here.

- writing: `atomic_write` (through a temporary file and a rename), `write_safetensors`;
- reading: `read_safetensors`, `read_torch_file`, with errors that name the file and the cause
  (`check_readable_file`);
- checking: `check_finite` refuses NaN and infinite tensors, naming them;
- matching: `match_tensors` checks a set of stored tensors against the tensors they are meant
  to fill (missing, unexpected and shape errors, each named) before anything is copied, and
  `load_tensors` then copies them, so a load either fully succeeds or changes nothing;
- adapters: `adapter_state_dict`, `match_adapter_tensors` (shared MMS aliases, peft prefixes),
  `architecture_fingerprint` / `check_fingerprint` and `check_layout`, the checks an adapter
  file makes of the model it is loaded into.

The adapter helpers build on `harma.inject` (which parameters are adapters, which towers a
model has); nothing here imports the training application. Which public function reads which
kind of file is listed on the "Files and loaders" page of the documentation (``docs/files.md``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import HarmaConfig
from .inject import adapter_named_parameters, find_towers, get_harma_config
from .named_adapters import reference_adapter_key, unwrap_model

LAYOUT_FIELDS = ("bottleneck", "heads", "mini_bottleneck", "mini_heads", "sharing", "towers", "layers",
                 "target_modules", "mlp_attribute", "placement", "adapter_mask", "attention_passes",
                 "attention_attribute", "causal_towers", "batch_first")
"""The `harma.HarmaConfig` fields that decide which adapter tensors exist, their shapes and what
they compute: a file and a patched model must agree on all of them."""

PEFT_KEY_PREFIX = "base_model.model."
"""The prefix peft's model wrapper adds to parameter names; stored adapter keys may carry it."""

WRAPPER_KEY_PREFIXES = ("module.", "_orig_mod.")
"""Prefixes that DDP/DataParallel (``module.``) and torch.compile (``_orig_mod.``) add to the
names of a wrapped model's parameters; adapter files of older versions may carry them."""

# --------------------------------------------------------------------------------------------
# Writing


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through a temporary file in the same folder and rename it into place, so
    an interrupted save never leaves a truncated file where a good one was."""
    path = Path(path)
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
    """`atomic_write` of a UTF-8 text."""
    atomic_write(Path(path), lambda target: target.write_text(text, encoding="utf-8"))


def copy_atomically(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` with `atomic_write`."""
    atomic_write(Path(target), lambda temporary: shutil.copyfile(source, temporary))


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Path:
    """Write ``tensors`` (copied to the CPU, contiguous) and the string ``metadata`` header as one
    safetensors file, atomically. Returns ``path``."""
    path = Path(path)
    cpu_tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
    atomic_write(path, lambda target: save_file(cpu_tensors, str(target), metadata=dict(metadata)))
    return path


# --------------------------------------------------------------------------------------------
# Reading


def check_readable_file(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` as a `Path` once it is known to be a file this process can open for reading.

    Raises:
        FileNotFoundError: nothing at ``path`` (``what`` says what was expected there).
        IsADirectoryError: ``path`` is a folder.
        PermissionError: the file (or a folder above it) may not be read.
        OSError: any other reason the file cannot be opened, with the system's cause.
    """
    path = Path(path)
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise FileNotFoundError(f"no {what} at '{path}'") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"'{path}' is a folder, not a {what}") from None
    except PermissionError as error:
        raise PermissionError(
            f"'{path}' cannot be read: {error.strerror} (check the permissions of the file and its folders)"
        ) from None
    except OSError as error:
        raise OSError(error.errno, f"'{path}' cannot be read: {error.strerror or error}") from None
    if path.is_dir():  # some systems open folders for reading
        raise IsADirectoryError(f"'{path}' is a folder, not a {what}")
    return path


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The header metadata and all tensors (on the CPU) of a safetensors file.

    Raises:
        FileNotFoundError, IsADirectoryError, PermissionError, OSError: the file cannot be
            opened (`check_readable_file`: the file and the cause are named).
        ValueError: the file is not a readable safetensors file (the file is named).
    """
    path = check_readable_file(path, "weights file")
    try:
        with safe_open(str(path), framework="pt") as reader:
            return dict(reader.metadata() or {}), {key: reader.get_tensor(key) for key in reader.keys()}
    except Exception as error:  # safetensors has its own error types for damaged headers
        raise ValueError(f"'{path}' is not a readable safetensors file: {error}") from None


def read_torch_file(path: str | os.PathLike) -> Any:
    """The content of a ``.pt``/``.pth`` file, read with ``torch.load(weights_only=True)`` onto the
    CPU: tensors and plain containers only, never code.

    Raises:
        FileNotFoundError, IsADirectoryError, PermissionError, OSError: the file cannot be
            opened (`check_readable_file`: the file and the cause are named).
        ValueError: the file is damaged or holds objects other than tensors and containers.
    """
    path = check_readable_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"'{path}' could not be read with torch.load(weights_only=True) ({error}). Files from "
            f"others are data, not code: harma never unpickles arbitrary objects. If you trust the "
            f"file, re-save its state dict of tensors alone and load that."
        ) from None


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict of tensors from a ``.safetensors`` file or a torch file (a bare state dict, or
    one under ``"state_dict"`` or ``"model"``), with DDP's ``module.`` prefixes removed.

    Raises:
        FileNotFoundError, IsADirectoryError, PermissionError, OSError: the file cannot be
            opened (the file and the cause are named).
        ValueError: damaged, or not a mapping of names to tensors (the file is named).
    """
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        return read_safetensors(path)[1]
    loaded = read_torch_file(path)
    if isinstance(loaded, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(f"'{path}' does not hold a state dict of tensors (found {type(loaded).__name__})")
    return {key.removeprefix("module."): value for key, value in loaded.items()}


# --------------------------------------------------------------------------------------------
# Checking


def nonfinite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point (or complex) ``tensors`` holding a NaN or an infinite value,
    in the mapping's order. One device synchronisation per device, not one per tensor."""
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in tensors.items():
        if (tensor.is_floating_point() or tensor.is_complex()) and not tensor.is_meta:
            by_device.setdefault(tensor.device, []).append((name, tensor))
    bad: set[str] = set()
    for entries in by_device.values():
        finite = torch.stack([torch.isfinite(tensor.detach()).all() for _, tensor in entries]).tolist()
        bad.update(name for (name, _), ok in zip(entries, finite, strict=True) if not ok)
    return [name for name in tensors if name in bad]


# What a loader that refuses a file holding NaN or infinite values adds to its message.
NONFINITE_FILE_HINT = "was the run that saved it diverging? Pass allow_nonfinite=True to load it anyway"
# What a writer that refuses such tensors adds.
NONFINITE_SAVE_HINT = "has training diverged? Pass allow_nonfinite=True to save them anyway"


def check_finite(tensors: Mapping[str, torch.Tensor], source: str, *, hint: str = "") -> None:
    """Raise a `ValueError` when any of ``tensors`` (read from or meant for ``source``, e.g. a
    quoted file name) holds a NaN or an infinite value, naming how many tensors do and the
    first ones, with their NaN and infinite counts; ``hint`` is appended to the message.

    Integer and boolean tensors are always finite. Costs one pass over the tensors.
    """
    bad = nonfinite_tensors(tensors)
    if not bad:
        return
    described = []
    for name in bad[:3]:
        tensor = tensors[name].detach()
        nans, total = int(torch.isnan(tensor).sum()), int((~torch.isfinite(tensor)).sum())
        described.append(f"{name!r} ({nans} NaN, {total - nans} infinite of {tensor.numel()} values)")
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    raise ValueError(
        f"{source} holds NaN or infinite values in {len(bad)} of {len(tensors)} tensor(s): "
        f"{', '.join(described)}{more}" + (f"; {hint}" if hint else "")
    )


# --------------------------------------------------------------------------------------------
# Matching and loading


def match_tensors(
    targets: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor], source: str, kind: str = ""
) -> None:
    """Check that ``tensors`` (read from ``source``) fill ``targets`` exactly: the same names and
    shapes. ``kind`` qualifies the tensors in messages (``"adapter"``).

    Raises:
        ValueError: naming the missing and unexpected names (a few of each, with counts) or the
            first tensor whose shape differs, and ``source``.
    """
    missing = sorted(set(targets) - set(tensors))
    unexpected = sorted(set(tensors) - set(targets))
    problems, kind = [], f"{kind} " if kind else ""
    if missing:
        problems.append(f"{len(missing)} {kind}tensor(s) missing from the file, e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) in the file have no place in the model, e.g. {unexpected[:3]}")
    if problems:
        raise ValueError(f"{source} does not fit this model: " + "; ".join(problems))
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(targets[name].shape):
            raise ValueError(
                f"{source}: tensor {name!r} has shape {tuple(tensor.shape)} in the file but "
                f"{tuple(targets[name].shape)} in the model"
            )


def load_tensors(
    targets: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor], source: str
) -> None:
    """`match_tensors`, then copy every tensor into its target; on a mismatch nothing is copied."""
    match_tensors(targets, tensors, source)
    with torch.no_grad():
        for name, tensor in tensors.items():
            targets[name].copy_(tensor)


def check_state_dict_shapes(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise a `ValueError` naming the first tensor of ``state`` whose shape differs from the
    model's tensor of the same key (keys the model lacks are left to the caller)."""
    expected = model.state_dict()
    for key, value in state.items():
        if key in expected and expected[key].shape != value.shape:
            raise ValueError(
                f"{source}: {key!r} has shape {tuple(value.shape)} in the file but "
                f"{tuple(expected[key].shape)} in the model (is it the right architecture?)"
            )


# --------------------------------------------------------------------------------------------
# Adapters


def adapter_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of adapter set ``adapter_name`` of a patched ``model`` (the active set when
    None) under their reference names (`reference_adapter_key`: the names the set would have
    alone, as ``"default"``); a shared MMS appears once. Names are those of the model inside any
    torch.compile or DDP wrapper (`unwrap_model`)."""
    model = unwrap_model(model)
    get_harma_config(model, adapter_name)
    return {reference_adapter_key(name): param.detach() for name, param in adapter_named_parameters(model, adapter_name)}


def _adapter_alias_groups(model: nn.Module, adapter_name: str | None) -> list[list[str]]:
    """Names of each parameter of set ``adapter_name``: first the one ``named_parameters()``
    reports, then the names under which a shared MMS is registered again (the paper layout)."""
    groups: dict[int, list[str]] = {}
    for name, param in adapter_named_parameters(model, adapter_name, remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return list(groups.values())


def match_adapter_tensors(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str, adapter_name: str | None = None
) -> dict[str, nn.Parameter | torch.Tensor]:
    """Map stored adapter tensors onto the parameters of ``model``'s adapter set
    ``adapter_name`` (the active set when None), strictly.

    Stored names are reference names (`reference_adapter_key`), whatever the set's name. They
    may carry peft's ``base_model.model.`` prefix or not, whatever the model's own naming, and
    the ``module.``/``_orig_mod.`` prefixes of DDP and torch.compile wrappers
    (`WRAPPER_KEY_PREFIXES`, files of older versions); a shared MMS may be stored under any of
    its names. Every parameter of the set must be found once with its shape, and no other tensor
    may be stored (`match_tensors`' errors). A wrapped ``model`` is unwrapped (`unwrap_model`).

    Returns:
        The stored tensor of each adapter parameter, keyed by the parameter's first name in the
        unwrapped model (`load_adapter_tensors` matches and copies in one call).
    """
    model = unwrap_model(model)
    groups = _adapter_alias_groups(model, adapter_name)
    parameters = dict(model.named_parameters(remove_duplicate=False))
    canonical: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for group in groups:
        bare = [reference_adapter_key(name.removeprefix(PEFT_KEY_PREFIX)) for name in group]
        canonical[bare[0]] = parameters[group[0]]
        aliases.update({alias: bare[0] for alias in bare})
    renamed = {_stored_name(key, aliases): value for key, value in tensors.items()}
    match_tensors(canonical, renamed, source, kind="adapter")
    return {name: renamed[bare] for name, bare in zip((g[0] for g in groups), canonical, strict=True)}


def _stored_name(key: str, aliases: Mapping[str, str]) -> str:
    """The adapter parameter a stored ``key`` names: the key itself, or the key with peft and
    wrapper prefixes taken off one by one until it names one; else the key, unchanged."""
    name = key
    while name not in aliases:
        prefix = next((p for p in (PEFT_KEY_PREFIX, *WRAPPER_KEY_PREFIXES) if name.startswith(p)), None)
        if prefix is None:
            return key
        name = name[len(prefix):]
    return aliases[name]


def load_adapter_tensors(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str, adapter_name: str | None = None
) -> None:
    """`match_adapter_tensors`, then copy into set ``adapter_name`` (the active set when None);
    on a mismatch the adapters are left as they were."""
    model = unwrap_model(model)
    matched = match_adapter_tensors(model, tensors, source, adapter_name)
    parameters = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, value in matched.items():
            parameters[name].copy_(value)


def architecture_fingerprint(model: nn.Module, config: HarmaConfig) -> list[dict[str, Any]]:
    """What an adapter file needs of its base model: each patched tower's depth and width.

    Returns:
        A JSON-compatible list, one ``{"name", "path", "blocks", "width"}`` per tower.
    """
    return [
        {"name": t.name, "path": t.path, "blocks": len(t.block_names), "width": t.width}
        for t in find_towers(unwrap_model(model), config)
    ]


def check_fingerprint(
    expected: Sequence[Mapping[str, Any]], actual: Sequence[Mapping[str, Any]], source: str
) -> None:
    """Raise a `ValueError` when two `architecture_fingerprint` lists differ in any tower's name,
    depth or width.

    Raises:
        ValueError: the towers differ (both are described), or ``expected`` is malformed.
    """
    def towers(fingerprint: Sequence[Mapping[str, Any]], whose: str) -> list[tuple[Any, Any, Any]]:
        try:
            return [(t["name"], t["blocks"], t["width"]) for t in fingerprint]
        except (KeyError, TypeError) as error:
            raise ValueError(f"{source} has a damaged architecture fingerprint ({whose}): {error!r}") from None

    def describe(listed: list[tuple[Any, Any, Any]]) -> str:
        return ", ".join(f"{name} ({blocks} blocks of width {width})" for name, blocks, width in listed)

    stored, current = towers(expected, "stored"), towers(actual, "model")
    if stored != current:
        raise ValueError(
            f"{source}: the adapters were made for a model with towers {describe(stored)}, "
            f"but this model has {describe(current)}"
        )


def check_layout(model_config: HarmaConfig, stored: HarmaConfig, source: str) -> None:
    """Raise a `ValueError` naming every `LAYOUT_FIELDS` entry in which ``stored`` (a file's
    layout) differs from ``model_config`` (the patched model's)."""
    differing = [name for name in LAYOUT_FIELDS if getattr(model_config, name) != getattr(stored, name)]
    if differing:
        raise ValueError(
            f"{source} was saved with another adapter layout than the model's: "
            + ", ".join(f"{name}={getattr(stored, name)!r} (model: {getattr(model_config, name)!r})"
                        for name in differing)
        )


def header_json(metadata: Mapping[str, str], key: str, source: str) -> Any:
    """The JSON value stored under ``key`` in a safetensors header, with an error naming the
    file and the key when it is absent or not JSON."""
    try:
        return json.loads(metadata[key])
    except KeyError:
        raise ValueError(f"{source} has a damaged header: no {key!r} entry") from None
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source} has a damaged header: {key!r} is not JSON ({error})") from None
