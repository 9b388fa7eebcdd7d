"""Finding transformer blocks in each model family, patching them with HarMA adapters, freezing,
removing, and counting parameters."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import re
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from .config import HarmaConfig
from .modules import MiniAdapter, MultimodalGatedAdapter, apply_adapter_hook, apply_attention_adapter_hook

ADAPTER_ATTRIBUTE = "harma_adapter"
"""Block attribute of the MGA after the MLP (the reference position): ``<block>.harma_adapter.*``."""
ATTENTION_ADAPTER_ATTRIBUTE = "harma_attention_adapter"
"""Block attribute of the MGA after the attention sublayer (``placement`` with ``"attention"``)."""
_POSITION_ATTRIBUTES = {"mlp": ADAPTER_ATTRIBUTE, "attention": ATTENTION_ADAPTER_ATTRIBUTE}
_POSITION_HOOKS = {"mlp": apply_adapter_hook, "attention": apply_attention_adapter_hook}
# Tried in order when HarmaConfig.attention_attribute is None: open_clip and timm blocks call
# theirs "attn", Hugging Face encoder layers "self_attn".
_ATTENTION_ATTRIBUTE_CANDIDATES = ("attn", "self_attn", "attention")
_CONFIG_ATTRIBUTE = "harma_config"
_TRAINABLE_BEFORE_ATTRIBUTE = "_harma_trainable_before"
_HOOK_HANDLE_ATTRIBUTE = "_harma_hook_handle"


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


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` (or the model inside its wrappers) carries HarMA adapters."""
    return getattr(unwrap_model(model), _CONFIG_ATTRIBUTE, None) is not None


def get_harma_config(model: nn.Module) -> HarmaConfig:
    """The config ``model`` (or the model inside its wrappers) was patched with; a clear error
    if it carries no adapters."""
    config = getattr(unwrap_model(model), _CONFIG_ATTRIBUTE, None)
    if config is None:
        raise ValueError(
            f"{type(model).__name__} carries no HarMA adapters; call harma.inject_harma_adapters first"
        )
    return config


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


def inject_harma_adapters(model: nn.Module, config: HarmaConfig | None = None) -> nn.Module:
    """Patch every selected transformer block of ``model`` in place with a HarMA adapter.

    Each block's MLP output ``m`` becomes ``m + sigmoid(g_block) * W_up z`` (see
    `harma.modules.MultimodalGatedAdapter`), implemented as a forward hook on the MLP, so
    the base model's state-dict keys are unchanged; adapter parameters appear under
    ``<block>.harma_adapter.*``. With ``config.placement`` naming ``"attention"``, the
    attention sublayer's output gets its own adapter the same way, under
    ``<block>.harma_attention_adapter.*``. With ``config.freeze_backbone`` only adapter parameters require
    grad afterwards. Until the adapters are trained the model computes exactly what it did before.

    Args:
        model: an open_clip CLIP, Hugging Face ``CLIPModel``/SigLIP-style model, timm
            ``VisionTransformer``, or any model whose blocks ``config.target_modules`` matches.
            A ``torch.compile``, ``DataParallel`` or ``DistributedDataParallel`` wrapper is
            looked through (`unwrap_model`): the adapters go on the model inside. Patch before
            wrapping with ``DistributedDataParallel``, which only synchronises the parameters
            it saw when it was built.
        config: the layout; defaults to `HarmaConfig` (the reference layout).

    Returns:
        ``model`` itself.

    Raises:
        ValueError: the model is already patched, or no blocks match, or it has parameters on
            the meta device (adapters created there hold garbage after ``to_empty``):
            materialise the model first (``model.to_empty(device=...)`` and load its weights),
            then inject.
    """
    config = config or HarmaConfig()
    if not isinstance(config, HarmaConfig):
        raise TypeError(f"config must be a HarmaConfig, got {type(config).__name__}")
    wrapper, model = model, unwrap_model(model)
    _check_patchable(model)
    towers = find_towers(model, config)
    if config.sharing == "paper" and len({t.batch_first for t in towers}) > 1:
        raise ValueError(
            "sharing='paper' needs every tower to use the same sequence layout, but the towers "
            f"{[(t.name, t.batch_first) for t in towers]} differ"
        )
    trainable_before = tuple(n for n, p in model.named_parameters() if p.requires_grad)
    targets = _adapter_targets(model, towers, config)
    mini_adapters: dict[int, MiniAdapter] = {}
    for tower, layer, position, module, width in targets:
        reference_param = next(module.parameters())
        adapter = MultimodalGatedAdapter(
            width,
            config.bottleneck,
            config.heads,
            config.gate_init,
            config.block_gate_init,
            mini_adapter=_mini_adapter(mini_adapters, layer, tower, config),
            batch_first=tower.batch_first,
            attention_passes=config.attention_passes,
            causal=config.adapter_mask == "tower" and tower.causal,
        ).to(device=reference_param.device, dtype=reference_param.dtype)
        model.get_submodule(tower.block_names[layer]).add_module(_POSITION_ATTRIBUTES[position], adapter)
        handle = module.register_forward_hook(functools.partial(_POSITION_HOOKS[position], adapter))
        # Kept on the adapter: deepcopy and pickle carry the handle with the copied hook dict.
        setattr(adapter, _HOOK_HANDLE_ATTRIBUTE, handle)

    if config.freeze_backbone:
        for name, param in model.named_parameters():
            param.requires_grad_(is_adapter_parameter_name(name))
    else:
        for param in adapter_parameters(model):
            param.requires_grad_(True)
    setattr(model, _CONFIG_ATTRIBUTE, config)
    setattr(model, _TRAINABLE_BEFORE_ATTRIBUTE, trainable_before)
    return wrapper


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


def _check_patchable(model: nn.Module) -> None:
    """Refuse a model that already carries adapters, or has parameters on the meta device: the
    adapters would be created there too, and ``to_empty`` would leave them uninitialised memory
    instead of their initial values."""
    if is_patched(model) or any(isinstance(m, MultimodalGatedAdapter) for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} already carries HarMA adapters; call "
            f"harma.remove_harma_adapters(model) before patching it again"
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


def is_adapter_parameter_name(name: str) -> bool:
    """Whether a parameter or state-dict key (model-relative, any prefix) belongs to a HarMA adapter."""
    dotted = f".{name}"
    return any(f".{attribute}." in dotted for attribute in _POSITION_ATTRIBUTES.values())


def _patched_blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if any(isinstance(getattr(module, attribute, None), MultimodalGatedAdapter)
               for attribute in _POSITION_ATTRIBUTES.values()):
            yield name, module


def remove_harma_adapters(model: nn.Module) -> nn.Module:
    """Undo `inject_harma_adapters`: drop hooks and adapters and restore ``requires_grad``.

    Returns ``model`` itself, computing and holding exactly what it did before patching.
    """
    wrapper, model = model, unwrap_model(model)
    get_harma_config(model)
    for _, block in list(_patched_blocks(model)):
        for attribute in _POSITION_ATTRIBUTES.values():
            adapter = getattr(block, attribute, None)
            if adapter is None:
                continue
            handle = getattr(adapter, _HOOK_HANDLE_ATTRIBUTE, None)
            if handle is not None:
                handle.remove()
            delattr(block, attribute)
    trainable_before = set(getattr(model, _TRAINABLE_BEFORE_ATTRIBUTE, ()))
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable_before)
    delattr(model, _CONFIG_ATTRIBUTE)
    delattr(model, _TRAINABLE_BEFORE_ATTRIBUTE)
    return wrapper


def adapters(model: nn.Module) -> Iterator[tuple[str, MultimodalGatedAdapter]]:
    """``(module name, adapter)`` of every MGA (e.g. ``"transformer.resblocks.0.harma_adapter"``),
    in module order."""
    for name, module in model.named_modules():
        if isinstance(module, MultimodalGatedAdapter):
            yield name, module


def adapter_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Adapter parameters with their model-relative names; a shared MMS appears once, under
    the first block that uses it."""
    for name, param in model.named_parameters():
        if is_adapter_parameter_name(name):
            yield name, param


def adapter_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Adapter parameters, each once (for an optimizer)."""
    for _, param in adapter_named_parameters(model):
        yield param


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Context in which ``model`` computes as the plain backbone, adapters bypassed.

    Example:

        with harma.disable_adapters(model):
            frozen_embeddings = model.encode_image(images)
    """
    get_harma_config(model)
    touched = [adapter for _, adapter in adapters(model) if adapter.enabled]
    for adapter in touched:
        adapter.enabled = False
    try:
        yield model
    finally:
        for adapter in touched:
            adapter.enabled = True


@dataclass(frozen=True)
class ParameterCount:
    """Parameter numbers of a model; ``all`` counts shared tensors once."""

    trainable: int
    all: int
    adapter: int

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.all if self.all else 0.0

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.all:,} || "
            f"trainable%: {self.trainable_percent:.4f}"
        )


def count_parameters(model: nn.Module) -> ParameterCount:
    """Trainable, total and adapter parameter counts of ``model`` (shared tensors once)."""
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    adapter = sum(p.numel() for p in adapter_parameters(model))
    return ParameterCount(trainable=trainable, all=total, adapter=adapter)


def print_trainable_parameters(model: nn.Module) -> ParameterCount:
    """Print (and return) the counts in the style of peft's ``print_trainable_parameters``."""
    counts = count_parameters(model)
    print(counts)
    return counts
