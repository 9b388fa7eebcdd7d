"""Several named adapter sets on one model: where each set lives, which one is active, switching,
deleting and removing them.

One backbone can carry any number of HarMA adapter sets, each under a name and each with its own
`HarmaConfig` (and its own shared MMS: an MMS is never shared across names). Exactly one set is
active in a forward pass; the others are bypassed and frozen.

Where a set lives in the model: the set named ``"default"`` (`DEFAULT_ADAPTER_NAME`) keeps the
reference parameter names ``<block>.harma_adapter.*`` (and ``<block>.harma_attention_adapter.*``);
a set named ``N`` lives under ``<block>.harma_adapters.N.*`` (and
``<block>.harma_attention_adapters.N.*``). Adapter files always hold the reference names, whatever
the set's name (`reference_adapter_key`), so a file saved from any set loads into any other.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import HarmaConfig
from .modules import MultimodalGatedAdapter

# The API (its page lists these, in this order); the other functions serve the package.
__all__ = [
    "set_adapter",
    "active_adapter",
    "list_adapters",
    "delete_adapter",
    "mixed_adapter_batch",
    "remove_harma_adapters",
]

DEFAULT_ADAPTER_NAME = "default"
"""The name of an adapter set when none is given; its parameters keep the reference names."""
BASE_MODEL_NAME = "__base__"
"""In `mixed_adapter_batch`, the name of rows that run through no adapter set (as in peft)."""
ADAPTER_ATTRIBUTE = "harma_adapter"
"""Block attribute of the default set's MGA after the MLP (the reference position)."""
ATTENTION_ADAPTER_ATTRIBUTE = "harma_attention_adapter"
"""Block attribute of the default set's MGA after the attention sublayer."""
POSITION_ATTRIBUTES = {"mlp": ADAPTER_ATTRIBUTE, "attention": ATTENTION_ADAPTER_ATTRIBUTE}
# A block's other sets sit in a ModuleDict per position, keyed by name: "harma_adapters" holds
# the MLP-position MGAs, "harma_attention_adapters" the attention-position ones.
POSITION_CONTAINERS = {position: attribute + "s" for position, attribute in POSITION_ATTRIBUTES.items()}
HOOK_HANDLE_ATTRIBUTE = "_harma_hook_handle"
_REGISTRY_ATTRIBUTE = "harma_adapter_registry"
_NAMED_KEY = re.compile(r"(^|\.)(harma_adapters|harma_attention_adapters)\.([^.]+)\.")
_DEFAULT_KEY = re.compile(r"(^|\.)(harma_adapter|harma_attention_adapter)\.")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
# A set's name is a key of a ModuleDict, which refuses its own attributes as keys.
_MODULE_DICT_ATTRIBUTES = frozenset(dir(nn.ModuleDict()))


@dataclass
class AdapterRegistry:
    """What a patched model records about its adapter sets (kept on the unwrapped model).

    Attributes:
        configs: each set's config, by name, in the order the sets were added.
        modules: each set's MGAs, by name.
        active: the name of the set that runs in the forward pass.
        inference_mode: whether the active set is frozen too (`set_adapter`'s ``inference_mode``).
        trainable_before: names of the parameters that required grad before the first set was
            added (restored when the last set is removed).
    """

    configs: dict[str, HarmaConfig] = field(default_factory=dict)
    modules: dict[str, list[MultimodalGatedAdapter]] = field(default_factory=dict)
    active: str = DEFAULT_ADAPTER_NAME
    inference_mode: bool = False
    trainable_before: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------
# Models and their wrappers


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside its wrappers: ``DistributedDataParallel``/``DataParallel`` (``.module``)
    and ``torch.compile``'s ``OptimizedModule`` (``._orig_mod``), in any nesting; ``model``
    itself when it is not wrapped. Adapters live on, and are saved from, the unwrapped model,
    so its parameter names carry no ``module.`` or ``_orig_mod.`` prefix."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif isinstance(model._modules.get("_orig_mod"), nn.Module) and type(model).__name__ == "OptimizedModule":
            model = model._modules["_orig_mod"]
        else:
            return model


def adapter_registry(model: nn.Module) -> AdapterRegistry | None:
    """The registry of ``model`` (or of the model inside its wrappers); None if it carries no adapters."""
    return getattr(unwrap_model(model), _REGISTRY_ATTRIBUTE, None)


def require_registry(model: nn.Module) -> AdapterRegistry:
    """`adapter_registry`, with a clear error for a model that carries no adapters."""
    registry = adapter_registry(model)
    if registry is None:
        raise ValueError(
            f"{type(model).__name__} carries no HarMA adapters; call harma.inject_harma_adapters first"
        )
    return registry


def set_registry(model: nn.Module, registry: AdapterRegistry | None) -> None:
    """Record ``registry`` on the unwrapped ``model`` (None: forget it)."""
    model = unwrap_model(model)
    if registry is None:
        model.__dict__.pop(_REGISTRY_ATTRIBUTE, None)
    else:
        setattr(model, _REGISTRY_ATTRIBUTE, registry)


def resolve_adapter_name(registry: AdapterRegistry, adapter_name: str | None) -> str:
    """``adapter_name``, or the active set's name when None; a `ValueError` naming the sets
    there are when the model has no set of that name."""
    name = registry.active if adapter_name is None else adapter_name
    if name not in registry.configs:
        raise ValueError(f"this model has no adapter named {name!r}; its adapters are {list(registry.configs)}")
    return name


def check_adapter_name(adapter_name: object) -> str:
    """``adapter_name`` if it can name an adapter set: letters, digits, ``_`` and ``-``, not
    starting with ``-``, not ``"__base__"`` (`mixed_adapter_batch`'s name for no set), and not an
    attribute of ``nn.ModuleDict`` (such as ``"keys"``)."""
    if not isinstance(adapter_name, str) or not _NAME.fullmatch(adapter_name) or adapter_name == BASE_MODEL_NAME or (
        adapter_name != DEFAULT_ADAPTER_NAME and adapter_name in _MODULE_DICT_ATTRIBUTES
    ):
        raise ValueError(
            f"adapter_name must be a string of letters, digits, '_' and '-' (not starting with '-') "
            f"that is neither {BASE_MODEL_NAME!r} nor an attribute of nn.ModuleDict, got {adapter_name!r}"
        )
    return adapter_name


# --------------------------------------------------------------------------------------------
# Parameter names


def adapter_name_of_key(key: str) -> str | None:
    """The name of the adapter set a parameter or state-dict key (model-relative, any prefix)
    belongs to; None for a key of the backbone."""
    named = _NAMED_KEY.search(key)
    if named:
        return named.group(3)
    return DEFAULT_ADAPTER_NAME if _DEFAULT_KEY.search(key) else None


def is_adapter_parameter_name(name: str) -> bool:
    """Whether a parameter or state-dict key (model-relative, any prefix) belongs to a HarMA
    adapter, of any set."""
    return adapter_name_of_key(name) is not None


def reference_adapter_key(key: str) -> str:
    """``key`` with its set's name taken out: ``<block>.harma_adapters.N.rest`` becomes
    ``<block>.harma_adapter.rest`` (and likewise at the attention position); a key of the
    default set, or of the backbone, is returned unchanged. Adapter files hold these names."""
    return _NAMED_KEY.sub(lambda match: f"{match.group(1)}{match.group(2)[:-1]}.", key, count=1)


# --------------------------------------------------------------------------------------------
# Attaching and detaching one set's MGAs


def attach_adapter(block: nn.Module, position: str, adapter_name: str, adapter: MultimodalGatedAdapter) -> None:
    """Register ``adapter`` on ``block`` where set ``adapter_name`` lives at ``position``."""
    if adapter_name == DEFAULT_ADAPTER_NAME:
        block.add_module(POSITION_ATTRIBUTES[position], adapter)
        return
    if POSITION_CONTAINERS["mlp"] not in block._modules:
        # Both containers, MLP first, whatever the position: a shared MMS then appears first
        # under the MLP-position MGA, as in a model holding that set alone.
        for container in POSITION_CONTAINERS.values():
            block.add_module(container, nn.ModuleDict())
    block._modules[POSITION_CONTAINERS[position]][adapter_name] = adapter


def _blocks_holding(model: nn.Module, adapter_name: str) -> Iterator[tuple[nn.Module, str]]:
    """``(block, position)`` of every MGA of set ``adapter_name`` in ``model``."""
    for block in model.modules():
        for position, attribute in POSITION_ATTRIBUTES.items():
            if adapter_name == DEFAULT_ADAPTER_NAME:
                if isinstance(block._modules.get(attribute), MultimodalGatedAdapter):
                    yield block, position
            else:
                container = block._modules.get(POSITION_CONTAINERS[position])
                if isinstance(container, nn.ModuleDict) and adapter_name in container:
                    yield block, position


def detach_adapter(model: nn.Module, adapter_name: str, adapters: list[MultimodalGatedAdapter]) -> None:
    """Remove the hooks of ``adapters`` and unregister set ``adapter_name``'s MGAs from ``model``."""
    for adapter in adapters:
        handle = getattr(adapter, HOOK_HANDLE_ATTRIBUTE, None)
        if handle is not None:
            handle.remove()
    for block, position in list(_blocks_holding(model, adapter_name)):
        if adapter_name == DEFAULT_ADAPTER_NAME:
            delattr(block, POSITION_ATTRIBUTES[position])
            continue
        del block._modules[POSITION_CONTAINERS[position]][adapter_name]
        if not any(len(block._modules[container]) for container in POSITION_CONTAINERS.values()):
            for container in POSITION_CONTAINERS.values():
                delattr(block, container)


@contextlib.contextmanager
def undone_on_error(model: nn.Module, adapter_name: str, adding: bool) -> Iterator[None]:
    """Context in which set ``adapter_name`` is added (when ``adding``) and filled: if it raises,
    the set is deleted again, which leaves the model as it was (a later set is added without
    changing any other flag, and removing the first restores the flags it changed)."""
    try:
        yield
    except BaseException:
        if adding and adapter_name in list_adapters(model):
            delete_adapter(model, adapter_name)
        raise


# --------------------------------------------------------------------------------------------
# The public API: listing, switching, deleting, removing


def list_adapters(model: nn.Module) -> list[str]:
    """The names of the adapter sets ``model`` carries, in the order they were added (empty
    for a model without adapters)."""
    registry = adapter_registry(model)
    return list(registry.configs) if registry else []


def active_adapter(model: nn.Module) -> str:
    """The name of the adapter set that runs in ``model``'s forward pass.

    Raises:
        ValueError: ``model`` carries no adapters.
    """
    return require_registry(model).active


def apply_active(registry: AdapterRegistry, previous: tuple[str, bool] | None = None) -> None:
    """Make only the active set run, and only it require grad (none in inference mode); every
    other set is bypassed and frozen. ``previous`` is the ``(active, inference_mode)`` before a
    switch, None to apply everything to every set.

    A switch writes the run flag of the previous and the new set only. For training, every
    set's ``requires_grad`` is written, so that only the active set trains whatever was set by
    hand; in inference mode only a set that was trainable is frozen, so switching between
    frozen sets writes one flag per adapter and no ``requires_grad``."""
    trainable = None if registry.inference_mode else registry.active
    if previous is None:
        flagged = changed = list(registry.modules)
    else:
        flagged = list(dict.fromkeys((previous[0], registry.active)))
        if trainable is not None:
            changed = list(registry.modules)
        else:
            changed = [] if previous[1] else [previous[0]]
    for name in flagged:
        for adapter in registry.modules[name]:
            # Straight into the instance dict: the attribute nn.Module.__setattr__ would write,
            # without its checks, which are most of a switch's cost.
            adapter.__dict__["active"] = name == registry.active
    for name in changed:
        for adapter in registry.modules[name]:
            set_requires_grad(adapter, name == trainable)


def bypass_and_freeze(adapters: list[MultimodalGatedAdapter]) -> None:
    """Make ``adapters`` (a set just added next to others) bypassed and frozen."""
    for adapter in adapters:
        adapter.__dict__["active"] = False
        set_requires_grad(adapter, False)


def set_requires_grad(module: nn.Module, requires_grad: bool) -> None:
    """``requires_grad`` of every parameter of ``module`` and its submodules. Reads the module
    tree on every call (Parameter objects can be replaced, e.g. by ``load_state_dict(assign=True)``),
    but without ``parameters()``' generators and duplicate tracking, which cost ten times more."""
    stack = [module]
    while stack:
        current = stack.pop()
        for param in current._parameters.values():
            if param is not None:
                param.requires_grad_(requires_grad)
        stack.extend(child for child in current._modules.values() if child is not None)


def set_adapter(model: nn.Module, adapter_name: str, *, inference_mode: bool = False) -> nn.Module:
    """Make set ``adapter_name`` the one that runs in ``model``'s forward pass (as peft's
    ``set_adapter``). Its parameters require grad (none do with ``inference_mode``), every other
    set's do not, and the backbone's are left as they are. Nothing is copied.

    A switch writes one flag per adapter of the previous and the new set; for training it also
    writes ``requires_grad`` of every set's parameters. With ``inference_mode`` (every set
    frozen), switching between sets writes no ``requires_grad`` at all, which makes it tens
    of times cheaper (docs/serving.md); a set made trainable by hand is then not re-read.

    Switch a model before wrapping it in ``DistributedDataParallel`` (or wrap it again):
    DDP synchronises only the parameters that required grad when it was built, so a set
    switched to for training inside it would train differently on every rank.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: ``model`` has no set of that name (the names it has are listed), or it is a
            ``DistributedDataParallel`` wrapper and ``inference_mode`` is false.
    """
    if not isinstance(adapter_name, str):  # the names a model holds were checked when added
        check_adapter_name(adapter_name)
    if isinstance(model, nn.parallel.DistributedDataParallel) and not inference_mode:
        raise ValueError(
            "set_adapter for training through DistributedDataParallel would leave the new set's "
            "gradients unsynchronised across ranks (DDP syncs the parameters that required grad when "
            "it was built): switch the model before wrapping it, or pass inference_mode=True"
        )
    switch_active(require_registry(model), adapter_name, inference_mode)
    return model


def switch_active(registry: AdapterRegistry, adapter_name: str, inference_mode: bool) -> None:
    """`set_adapter` on a model's registry: record the new active set and apply it."""
    previous = (registry.active, registry.inference_mode)
    registry.active = resolve_adapter_name(registry, adapter_name)
    registry.inference_mode = bool(inference_mode)
    apply_active(registry, previous)


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove set ``adapter_name`` (its MGAs, hooks and config) from ``model``.

    When it was the active set, the first remaining set (in the order they were added) becomes
    active (trainable unless in inference mode); otherwise no other flag changes. Deleting the
    last set is `remove_harma_adapters`.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: ``model`` has no set of that name.
    """
    registry = require_registry(model)
    name = resolve_adapter_name(registry, check_adapter_name(adapter_name))
    if len(registry.configs) == 1:
        return remove_harma_adapters(model)
    detach_adapter(unwrap_model(model), name, registry.modules.pop(name))
    del registry.configs[name]
    if registry.active == name:
        registry.active = next(iter(registry.configs))
        apply_active(registry)
    return model


def remove_harma_adapters(model: nn.Module) -> nn.Module:
    """Undo `harma.inject_harma_adapters` for every adapter set: drop hooks and adapters and
    restore ``requires_grad``.

    Returns:
        ``model`` itself, computing and holding exactly what it did before patching.
    """
    registry = require_registry(model)
    inner = unwrap_model(model)
    for name, adapters in registry.modules.items():
        detach_adapter(inner, name, adapters)
    trainable_before = set(registry.trainable_before)
    for name, param in inner.named_parameters():
        param.requires_grad_(name in trainable_before)
    set_registry(inner, None)
    return model


@contextlib.contextmanager
def mixed_adapter_batch(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[nn.Module]:
    """Context in which row ``i`` of every batch runs through adapter set ``adapter_names[i]``
    (``"__base__"``: through none, as the frozen backbone), whichever set is active: one forward
    pass serves several tasks at once, like peft's ``model(..., adapter_names=[...])``.

    Each set sees exactly its own rows, so a row gets what it gets in a batch of its group alone
    (up to the backbone's own rounding at another batch size). Every tower's batch must have
    ``len(adapter_names)`` rows: with a CLIP, the images and the texts of one call. Gradients
    reach only sets that require grad; ``harma.disable_adapters`` inside bypasses every set.
    Not under ``DataParallel``, which would split the batch (refused with an error); under
    ``DistributedDataParallel`` each rank names its own rows.

    Example:

        with harma.mixed_adapter_batch(model, ["rsitmd", "rsicd", "__base__"]):
            embeddings = model.encode_image(images)          # 3 images, one per name

    Raises:
        ValueError: a name that is no set of ``model`` (its sets are listed), an empty list, or
            a call inside another ``mixed_adapter_batch`` of the same model.
        TypeError: ``adapter_names`` is a single string.
    """
    registry = require_registry(model)
    if isinstance(adapter_names, str) or not all(isinstance(name, str) for name in adapter_names):
        raise TypeError(f"adapter_names must be a list of strings (one per row), got {adapter_names!r}")
    names = list(adapter_names)
    unknown = sorted({name for name in names if name != BASE_MODEL_NAME and name not in registry.configs})
    if unknown or not names:
        raise ValueError(
            f"adapter_names {'is empty' if not names else f'names no adapter set {unknown}'}: each row needs "
            f"one of this model's sets {list(registry.configs)} or {BASE_MODEL_NAME!r} (no adapter)"
        )
    adapters = [adapter for group in registry.modules.values() for adapter in group]
    if any(adapter.rows is not None for adapter in adapters):
        raise ValueError("this model is already inside a harma.mixed_adapter_batch; they do not nest")
    for set_name, group in registry.modules.items():
        rows = (torch.tensor([i for i, name in enumerate(names) if name == set_name], dtype=torch.long), len(names))
        for adapter in group:
            adapter.__dict__["rows"] = rows
    try:
        yield model
    finally:
        for adapter in adapters:
            adapter.__dict__.pop("rows", None)
