"""Finding transformer blocks in each model family, patching them with HarMA adapters, freezing,
removing, and counting parameters."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import HarmaConfig
from .modules import MiniAdapter, MultimodalGatedAdapter, apply_adapter_hook, apply_attention_adapter_hook
from .named_adapters import (
    DEFAULT_ADAPTER_NAME,
    HOOK_HANDLE_ATTRIBUTE,
    AdapterRegistry,
    adapter_name_of_key,
    adapter_registry,
    apply_active,
    attach_adapter,
    bypass_and_freeze,
    check_adapter_name,
    is_adapter_parameter_name,
    list_adapters,
    require_registry,
    resolve_adapter_name,
    set_registry,
    unwrap_model,
)

# The API (its page lists these, in this order); the other functions serve the package.
__all__ = [
    "inject_harma_adapters",
    "adapter_parameters",
    "adapter_named_parameters",
    "disable_adapters",
    "count_parameters",
    "print_trainable_parameters",
    "ParameterCount",
    "find_towers",
    "Tower",
    "get_harma_config",
    "is_patched",
]

_POSITION_HOOKS = {"mlp": apply_adapter_hook, "attention": apply_attention_adapter_hook}
# Tried in order when HarmaConfig.attention_attribute is None: open_clip and timm blocks call
# theirs "attn", Hugging Face encoder layers "self_attn".
_ATTENTION_ATTRIBUTE_CANDIDATES = ("attn", "self_attn", "attention")


@dataclass(frozen=True)
class Tower:
    """A stack of transformer blocks found in a model.

    Attributes:
        name: ``"vision"`` or ``"text"`` for known families, the parent path otherwise.
        path: dotted module path of the block container (e.g. ``"visual.transformer.resblocks"``).
        block_names: dotted module paths of the blocks, in depth order.
        width: output features of the blocks' MLPs.
        batch_first: whether the blocks see ``(batch, tokens, width)``.
        causal: whether the tower's own attention is causal (CLIP-style text towers).
    """

    name: str
    path: str
    block_names: tuple[str, ...]
    width: int
    batch_first: bool
    causal: bool = False


# (tower name, container path, path of the module whose ``batch_first`` attribute tells the
# layout, or None where the family is always batch-first). Checked in order; every one found
# becomes a tower.
_KNOWN_TOWERS = (
    # open_clip CLIP (any ViT size, QuickGELU variants)
    ("vision", "visual.transformer.resblocks", "visual.transformer"),
    ("text", "transformer.resblocks", "transformer"),
    # open_clip CustomTextCLIP with open_clip's own text transformer
    ("text", "text.transformer.resblocks", "text.transformer"),
    # Hugging Face CLIPModel, SiglipModel, CLIPVisionModel, CLIPTextModel, ...
    ("vision", "vision_model.encoder.layers", None),
    ("text", "text_model.encoder.layers", None),
    # timm VisionTransformer and relatives, alone or as an open_clip vision trunk
    ("vision", "blocks", None),
    ("vision", "visual.trunk.blocks", None),
)


def _get_submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _output_width(module: nn.Module, name: str) -> int:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(
            f"{name} ({type(module).__name__}) has no nn.Linear, so its output width cannot be found"
        )
    return linears[-1].out_features


def _mlp_width(block: nn.Module, block_name: str, mlp_attribute: str) -> int:
    mlp = getattr(block, mlp_attribute, None)
    if not isinstance(mlp, nn.Module):
        raise ValueError(
            f"block {block_name!r} ({type(block).__name__}) has no submodule {mlp_attribute!r} "
            f"to adapt; set HarmaConfig.mlp_attribute to the name of its MLP"
        )
    return _output_width(mlp, f"the MLP {block_name}.{mlp_attribute}")


def _attention_module(block: nn.Module, block_name: str, config: HarmaConfig) -> nn.Module:
    """The attention submodule of ``block`` whose output an attention-position MGA adapts."""
    names = (config.attention_attribute,) if config.attention_attribute else _ATTENTION_ATTRIBUTE_CANDIDATES
    for name in names:
        module = getattr(block, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(
        f"block {block_name!r} ({type(block).__name__}) has no attention submodule named "
        f"{' or '.join(repr(n) for n in names)}; set HarmaConfig.attention_attribute to its name"
    )


def _text_tower_is_causal(model: nn.Module, path: str) -> bool:
    """Whether the known text tower at ``path`` runs causal self-attention."""
    if path.endswith("encoder.layers"):
        # Hugging Face: CLIP text transformers always apply a causal mask; SigLIP's do not.
        config = getattr(_get_submodule(model, path[: -len(".encoder.layers")]), "config", None)
        return str(getattr(config, "model_type", "")).startswith("clip")
    # open_clip: the module holding the text transformer keeps its causal mask as attn_mask
    # (None for text towers built without one).
    owner = _get_submodule(model, path[: -len("transformer.resblocks")].rstrip("."))
    return getattr(owner, "attn_mask", None) is not None


# open_clip 2.23 added ``Transformer.batch_first``: before it, blocks ran sequence-first with no
# attribute saying so; later versions dropped the attribute again, their blocks always batch-first.
OPEN_CLIP_BATCH_FIRST_SINCE = (2, 23)


@functools.lru_cache(maxsize=1)
def installed_open_clip_version() -> tuple[int, ...]:
    """``(major, minor, ...)`` of the installed ``open_clip_torch``; ``()`` if it is not installed."""
    try:
        text = importlib.metadata.version("open_clip_torch")
    except importlib.metadata.PackageNotFoundError:
        return ()
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def _open_clip_batch_first(transformer: nn.Module) -> bool:
    """Whether an open_clip ``Transformer`` runs its blocks batch-first: its ``batch_first``
    attribute where it has one, else what the installed open_clip does without it."""
    value = getattr(transformer, "batch_first", None)
    if value is not None:
        return bool(value)
    version = installed_open_clip_version()
    return not version or version >= OPEN_CLIP_BATCH_FIRST_SINCE


def _known_towers(model: nn.Module, config: HarmaConfig) -> list[Tower]:
    towers: list[Tower] = []
    taken: set[str] = set()
    for name, path, layout_path in _KNOWN_TOWERS:
        container = _get_submodule(model, path)
        if not isinstance(container, nn.ModuleList | nn.Sequential) or len(container) == 0:
            continue
        if name in taken:
            continue
        if not all(hasattr(block, config.mlp_attribute) for block in container):
            continue
        batch_first = True
        if layout_path is not None:
            batch_first = _open_clip_batch_first(model.get_submodule(layout_path))
        block_names = tuple(f"{path}.{i}" for i in range(len(container)))
        towers.append(
            Tower(
                name=name,
                path=path,
                block_names=block_names,
                width=_mlp_width(container[0], block_names[0], config.mlp_attribute),
                batch_first=batch_first,
                causal=name == "text" and _text_tower_is_causal(model, path),
            )
        )
        taken.add(name)
    return towers


def _pattern_towers(model: nn.Module, config: HarmaConfig) -> list[Tower]:
    pattern = re.compile(config.target_modules)
    by_parent: dict[str, list[str]] = {}
    for module_name, _ in model.named_modules():
        if module_name and pattern.fullmatch(module_name):
            parent = module_name.rpartition(".")[0]
            by_parent.setdefault(parent, []).append(module_name)
    towers = []
    for parent, names in by_parent.items():
        first = model.get_submodule(names[0])
        towers.append(
            Tower(
                name=parent or "root",
                path=parent,
                block_names=tuple(names),
                width=_mlp_width(first, names[0], config.mlp_attribute),
                batch_first=config.batch_first,
            )
        )
    return towers


def find_towers(model: nn.Module, config: HarmaConfig | None = None) -> list[Tower]:
    """The block stacks of ``model`` that ``config`` selects, in module order.

    Raises:
        ValueError: no blocks match, or ``config.towers`` names a tower the model lacks.
    """
    config = config or HarmaConfig()
    found = _pattern_towers(model, config) if config.target_modules else _known_towers(model, config)
    if not found:
        how = (
            f"no module name fully matches target_modules={config.target_modules!r}"
            if config.target_modules
            else "it is not an open_clip CLIP, a Hugging Face CLIP/SigLIP model or a timm ViT"
        )
        raise ValueError(
            f"no transformer blocks found in {type(model).__name__}: {how}. Pass "
            f"HarmaConfig(target_modules=r'...') with a regular expression matching the block "
            f"module names (e.g. r'encoder\\.layers\\.\\d+'), each having an "
            f"{config.mlp_attribute!r} submodule"
        )
    names = [t.name for t in found]
    for field_name in ("towers", "causal_towers"):
        missing = [t for t in getattr(config, field_name) or () if t not in names]
        if missing:
            raise ValueError(
                f"HarmaConfig.{field_name} asks for {missing}, but {type(model).__name__} has the towers {names}"
            )
    if config.causal_towers is not None:
        found = [dataclasses.replace(t, causal=t.name in config.causal_towers) for t in found]
    if config.towers is None:
        return found
    return [t for t in found if t.name in config.towers]


def _selected_layers(tower: Tower, layers: tuple[int, ...] | None) -> list[int]:
    depth = len(tower.block_names)
    if layers is None:
        return list(range(depth))
    selected = []
    for index in layers:
        if not -depth <= index < depth:
            raise ValueError(
                f"HarmaConfig.layers has {index}, but the {tower.name} tower has {depth} blocks"
            )
        selected.append(index % depth)
    return sorted(set(selected))


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` (or the model inside its wrappers) carries HarMA adapters."""
    return adapter_registry(model) is not None


def get_harma_config(model: nn.Module, adapter_name: str | None = None) -> HarmaConfig:
    """The config adapter set ``adapter_name`` of ``model`` (or of the model inside its
    wrappers) was added with; the active set's when None.

    Raises:
        ValueError: ``model`` carries no adapters, or none of that name.
    """
    registry = require_registry(model)
    return registry.configs[resolve_adapter_name(registry, adapter_name)]


def _registration_order(config: HarmaConfig) -> list[str]:
    # The MLP adapter is registered first so that a shared MMS keeps its reference name
    # (``<block>.harma_adapter.mini_adapter.*``) whatever else the block carries.
    return sorted(config.positions, key=lambda position: position != "mlp")


def _adapted_module(model: nn.Module, tower: Tower, layer: int, position: str, config: HarmaConfig) -> nn.Module:
    block_name = tower.block_names[layer]
    block = model.get_submodule(block_name)
    if position == "mlp":
        return getattr(block, config.mlp_attribute)
    return _attention_module(block, block_name, config)


def _mini_adapter(
    cache: dict[int, MiniAdapter], layer: int, tower: Tower, config: HarmaConfig
) -> MiniAdapter | None:
    """The MMS of ``layer`` for an MGA of ``tower``, created on first use, or None where the
    sharing rule gives that tower none."""
    if config.sharing == "none" or (config.sharing == "reference" and tower.name != "text"):
        return None
    if layer not in cache:
        cache[layer] = MiniAdapter(
            config.bottleneck,
            config.mini_bottleneck,
            config.mini_heads,
            config.mini_gate_init,
            batch_first=tower.batch_first,
        )
    return cache[layer]


def inject_harma_adapters(
    model: nn.Module,
    config: HarmaConfig | None = None,
    adapter_name: str = DEFAULT_ADAPTER_NAME,
    *,
    autocast_adapter_dtype: bool = True,
) -> nn.Module:
    """Patch every selected transformer block of ``model`` in place with a HarMA adapter.

    Each block's MLP output ``m`` becomes ``m + sigmoid(g_block) * W_up z`` (see
    `harma.modules.MultimodalGatedAdapter`), implemented as a forward hook on the MLP, so
    the base model's state-dict keys are unchanged; adapter parameters appear under
    ``<block>.harma_adapter.*``. With ``config.placement`` naming ``"attention"``, the
    attention sublayer's output gets its own adapter the same way, under
    ``<block>.harma_attention_adapter.*``. With ``config.freeze_backbone`` only adapter parameters require
    grad afterwards (decided when the first set is added). Until the adapters are trained the model computes exactly what it did before.

    A second call with another ``adapter_name`` adds another adapter set, possibly with
    another config, to the same blocks (`harma.named_adapters`). As with peft's
    ``add_adapter``, the new set is not made active: it is bypassed and frozen until
    `harma.set_adapter` selects it. The first set added is active.

    Args:
        model: an open_clip CLIP, Hugging Face ``CLIPModel``/SigLIP-style model, timm
            ``VisionTransformer``, or any model whose blocks ``config.target_modules`` matches.
            A ``torch.compile``, ``DataParallel`` or ``DistributedDataParallel`` wrapper is
            looked through (`unwrap_model`): the adapters go on the model inside. Patch before
            wrapping with ``DistributedDataParallel``, which only synchronises the parameters
            it saw when it was built.
        config: the layout; defaults to `HarmaConfig` (the reference layout).
        adapter_name: the name of the set; ``"default"`` keeps the reference parameter names,
            any other name ``N`` puts the set under ``<block>.harma_adapters.N.*``.
        autocast_adapter_dtype: on a float16 or bfloat16 backbone, create the adapters in
            float32 (as peft's option of the same name does): small trainable tensors keep
            their updates, and the adapters compute in float32 while the backbone stays in half
            precision (outside autocast, each adapter casts its input and its output). False
            creates them in the backbone's dtype. Float32 and float64 backbones are not affected.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: the model already has a set of that name, or no blocks match, or it has
            parameters on the meta device (adapters created there hold garbage after
            ``to_empty``): materialise the model first (``model.to_empty(device=...)`` and load
            its weights), then inject.
    """
    return add_adapter_set(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)


def add_adapter_set(
    model: nn.Module,
    config: HarmaConfig | None,
    adapter_name: str,
    *,
    autocast_adapter_dtype: bool = True,
    adapter_class: type[MultimodalGatedAdapter] = MultimodalGatedAdapter,
) -> nn.Module:
    """`inject_harma_adapters`, with the class of the MGAs to create (a subclass of
    `MultimodalGatedAdapter`; the peft bridge's adapters are peft tuner layers too)."""
    config = config or HarmaConfig()
    if not isinstance(config, HarmaConfig):
        raise TypeError(f"config must be a HarmaConfig, got {type(config).__name__}")
    check_adapter_name(adapter_name)
    wrapper, model = model, unwrap_model(model)
    _check_patchable(model, adapter_name)
    towers = find_towers(model, config)
    if config.sharing == "paper" and len({t.batch_first for t in towers}) > 1:
        raise ValueError(
            "sharing='paper' needs every tower to use the same sequence layout, but the towers "
            f"{[(t.name, t.batch_first) for t in towers]} differ"
        )
    targets = _adapter_targets(model, towers, config)
    registry = adapter_registry(model)
    first = registry is None
    if first:
        registry = AdapterRegistry(
            active=adapter_name, trainable_before=tuple(n for n, p in model.named_parameters() if p.requires_grad)
        )
    registry.modules[adapter_name] = _attach_adapters(
        model, targets, config, adapter_name, adapter_class, autocast_adapter_dtype
    )
    registry.configs[adapter_name] = config
    if not first:
        # A later set is added bypassed and frozen; no other flag changes.
        bypass_and_freeze(registry.modules[adapter_name])
        return wrapper
    set_registry(model, registry)
    if config.freeze_backbone:
        for name, param in model.named_parameters():
            if not is_adapter_parameter_name(name):
                param.requires_grad_(False)
    apply_active(registry)
    return wrapper


_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _attach_adapters(
    model: nn.Module,
    targets: list[tuple[Tower, int, str, nn.Module, int]],
    config: HarmaConfig,
    adapter_name: str,
    adapter_class: type[MultimodalGatedAdapter],
    autocast_adapter_dtype: bool,
) -> list[MultimodalGatedAdapter]:
    """Create an MGA for every target (on the adapted module's device, in its dtype or float32 for
    half precision with ``autocast_adapter_dtype``), register it where set ``adapter_name``
    lives, and hook it to the adapted module's output."""
    mini_adapters: dict[int, MiniAdapter] = {}
    created = []
    for tower, layer, position, module, width in targets:
        reference_param = next(module.parameters())
        dtype = reference_param.dtype
        if autocast_adapter_dtype and dtype in _HALF_DTYPES:
            dtype = torch.float32
        adapter = adapter_class(
            width,
            config.bottleneck,
            config.heads,
            config.gate_init,
            config.block_gate_init,
            mini_adapter=_mini_adapter(mini_adapters, layer, tower, config),
            batch_first=tower.batch_first,
            attention_passes=config.attention_passes,
            causal=config.adapter_mask == "tower" and tower.causal,
        ).to(device=reference_param.device, dtype=dtype)
        attach_adapter(model.get_submodule(tower.block_names[layer]), position, adapter_name, adapter)
        handle = module.register_forward_hook(functools.partial(_POSITION_HOOKS[position], adapter))
        # Kept on the adapter: deepcopy and pickle carry the handle with the copied hook dict.
        setattr(adapter, HOOK_HANDLE_ATTRIBUTE, handle)
        created.append(adapter)
    return created


def _adapter_targets(
    model: nn.Module, towers: list[Tower], config: HarmaConfig
) -> list[tuple[Tower, int, str, nn.Module, int]]:
    """``(tower, layer, position, adapted module, width)`` of every adapter to attach. Every
    module and width is resolved before anything is attached, so a block that cannot be
    adapted leaves the model untouched."""
    targets = []
    for tower in towers:
        for layer in _selected_layers(tower, config.layers):
            for position in _registration_order(config):
                module = _adapted_module(model, tower, layer, position, config)
                width = _output_width(module, f"{tower.block_names[layer]}.{position}")
                targets.append((tower, layer, position, module, width))
    return targets


def _check_patchable(model: nn.Module, adapter_name: str) -> None:
    """Refuse a second set of the same name, adapters the registry does not know (a model
    patched by hand or by an older harma), and parameters on the meta device: the adapters would
    be created there too, and ``to_empty`` would leave them uninitialised memory instead of
    their initial values."""
    registry = adapter_registry(model)
    if registry is not None and adapter_name in registry.configs:
        raise ValueError(
            f"{type(model).__name__} already carries HarMA adapters named {adapter_name!r} (its adapters: "
            f"{list(registry.configs)}); pass another adapter_name to add a set, or call "
            f"harma.delete_adapter(model, {adapter_name!r}) (or harma.remove_harma_adapters(model)) first"
        )
    if registry is None and any(isinstance(m, MultimodalGatedAdapter) for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} already carries HarMA adapters that harma did not record "
            f"(patched by hand?); remove them before patching it"
        )
    meta = [name for name, param in model.named_parameters() if param.is_meta]
    if meta:
        raise ValueError(
            f"{type(model).__name__} has {len(meta)} parameter(s) on the meta device (e.g. {meta[0]!r}): "
            f"adapters injected now would be created on meta too, and after model.to_empty(...) they "
            f"would hold uninitialised memory (garbage), not their initial values. Materialise the "
            f"model first: model.to_empty(device=...) and load its weights (e.g. "
            f"model.load_state_dict(state, assign=True)), then call inject_harma_adapters"
        )


def _selected_set(model: nn.Module, adapter_name: str | None) -> str | None:
    """The set ``adapter_name`` names (the active one for None); None means every set, for a
    model whose registry is out of reach (e.g. inside a wrapper harma does not know)."""
    registry = adapter_registry(model)
    if registry is None:
        return adapter_name
    return resolve_adapter_name(registry, adapter_name)


def adapters(model: nn.Module, adapter_name: str | None = None) -> Iterator[tuple[str, MultimodalGatedAdapter]]:
    """``(module name, adapter)`` of every MGA of set ``adapter_name`` (the active set when None),
    e.g. ``"transformer.resblocks.0.harma_adapter"``, in module order."""
    selected = _selected_set(model, adapter_name)
    for name, module in model.named_modules():
        if isinstance(module, MultimodalGatedAdapter) and selected in (None, adapter_name_of_key(name + ".")):
            yield name, module


def adapter_named_parameters(
    model: nn.Module, adapter_name: str | None = None, *, remove_duplicate: bool = True
) -> Iterator[tuple[str, nn.Parameter]]:
    """Parameters of adapter set ``adapter_name`` (the active set when None) with their
    model-relative names; a shared MMS appears once, under the first block that uses it (every
    time, under each of its names, with ``remove_duplicate=False``)."""
    selected = _selected_set(model, adapter_name)
    for name, param in model.named_parameters(remove_duplicate=remove_duplicate):
        owner = adapter_name_of_key(name)
        if owner is not None and selected in (None, owner):
            yield name, param


def adapter_parameters(model: nn.Module, adapter_name: str | None = None) -> Iterator[nn.Parameter]:
    """Parameters of adapter set ``adapter_name`` (the active set when None), each once (for an
    optimizer)."""
    for _, param in adapter_named_parameters(model, adapter_name):
        yield param


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Context in which ``model`` computes as the plain backbone, every adapter set bypassed.

    Example:

        with harma.disable_adapters(model):
            frozen_embeddings = model.encode_image(images)
    """
    get_harma_config(model)
    touched = [m for m in model.modules() if isinstance(m, MultimodalGatedAdapter) and m.enabled]
    for adapter in touched:
        adapter.enabled = False
    try:
        yield model
    finally:
        for adapter in touched:
            adapter.enabled = True


@dataclass(frozen=True)
class ParameterCount:
    """Parameter numbers of a model; ``all`` counts shared tensors once.

    Attributes:
        trainable: parameters that require grad.
        all: every parameter.
        adapter: parameters of every adapter set.
        per_adapter: parameters of each adapter set, by name, in the order the sets were added.
    """

    trainable: int
    all: int
    adapter: int
    per_adapter: Mapping[str, int] = field(default_factory=dict)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.all if self.all else 0.0

    def __str__(self) -> str:
        text = (
            f"trainable params: {self.trainable:,} || all params: {self.all:,} || "
            f"trainable%: {self.trainable_percent:.4f}"
        )
        if len(self.per_adapter) > 1:
            text += " || adapters: " + ", ".join(f"{name} {count:,}" for name, count in self.per_adapter.items())
        return text


def count_parameters(model: nn.Module) -> ParameterCount:
    """Trainable, total and adapter parameter counts of ``model`` (shared tensors once), with
    each adapter set's count."""
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    per_adapter = {name: sum(p.numel() for p in adapter_parameters(model, name)) for name in list_adapters(model)}
    adapter = sum(per_adapter.values()) if per_adapter else sum(
        p.numel() for _, p in adapter_named_parameters(model)
    )
    return ParameterCount(trainable=trainable, all=total, adapter=adapter, per_adapter=per_adapter)


def print_trainable_parameters(model: nn.Module) -> ParameterCount:
    """Print (and return) the counts in the style of peft's ``print_trainable_parameters``."""
    counts = count_parameters(model)
    print(counts)
    return counts
