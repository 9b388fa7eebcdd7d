"""Drive HarMA adapters through peft's own API.

Importing this module registers HarMA as a peft method, so that ``get_peft_model``,
``PeftModel.save_pretrained`` and ``PeftModel.from_pretrained`` work with it:

```python
from peft import PeftModel, get_peft_model
from harma.integrations.peft import HarmaPeftConfig

peft_model = get_peft_model(model, HarmaPeftConfig())     # reference layout
peft_model.print_trainable_parameters()
...                                                       # train
peft_model.save_pretrained("adapters/")
loaded = PeftModel.from_pretrained(fresh_model, "adapters/")   # after importing this
```

The tuner delegates to ``harma.inject_harma_adapters``: the patched model is the same as
with the native API, so ``peft_model.get_base_model()`` can be passed to every harma function
(``harma.save_adapters``, ``harma.disable_adapters``, the losses and the evaluator).

Several adapters: each peft adapter is a harma adapter set of the same name
(``harma.named_adapters``). ``add_adapter``/``load_adapter`` add a set (inactive, frozen),
``set_adapter``/``delete_adapter`` are ``harma.set_adapter``/``harma.delete_adapter``, and the
files peft writes for any adapter hold the reference names (``<block>.harma_adapter.*``), so a
folder loads under any adapter name.

How it plugs into peft (0.21 or newer). peft's public hook, ``peft.utils.register_peft_method``,
only accepts names that are members of the closed enum ``peft.utils.PeftType``, which has no
``HARMA``. ``register_with_peft`` therefore writes the same entries that function writes
(``PEFT_TYPE_TO_CONFIG_MAPPING``, ``PEFT_TYPE_TO_TUNER_MAPPING``, ``PEFT_TYPE_TO_PREFIX_MAPPING``
in ``peft.mapping``) under the plain string ``"HARMA"``. ``PeftConfig.peft_type`` may be a
string, and ``PeftType`` is a ``str`` enum, so every lookup peft makes with the ``peft_type``
of a config or of an ``adapter_config.json`` finds them. Saving and loading go through the
tuner hooks ``BaseTuner._get_adapter_state_dict`` and ``_remap_adapter_state_dict_for_load``,
which peft 0.21 introduced; older peft versions refuse any ``peft_type`` outside ``PeftType``
in ``get_peft_model_state_dict``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import inspect
import os
import types
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _delete_auxiliary_adapter
from peft.utils.other import AuxiliaryTrainingWrapper, _set_adapter, set_additional_trainable_modules
from torch import nn

from ..checkpoint import FORMAT_NAME, FORMAT_VERSION, load_adapter_state
from ..config import HarmaConfig
from ..inject import adapter_named_parameters, add_adapter_set, is_patched
from ..inject import adapters as adapter_modules
from ..io import architecture_fingerprint, check_fingerprint, match_adapter_tensors
from ..modules import MultimodalGatedAdapter
from ..named_adapters import (
    BASE_MODEL_NAME,
    DEFAULT_ADAPTER_NAME,
    AdapterRegistry,
    adapter_name_of_key,
    adapter_registry,
    is_adapter_parameter_name,
    list_adapters,
    mixed_adapter_batch,
    reference_adapter_key,
    remove_harma_adapters,
    set_requires_grad,
    switch_active,
)
from ..named_adapters import delete_adapter as harma_delete_adapter
from ..named_adapters import set_adapter as harma_set_adapter

__all__ = [
    "PEFT_PREFIX",
    "PEFT_TYPE",
    "HarmaPeftConfig",
    "HarmaPeftType",
    "HarmaTuner",
    "HarmaTunerLayer",
    "load_peft_adapters",
    "register_with_peft",
]


class HarmaPeftType(str, enum.Enum):
    """The ``peft_type`` of HarMA, a string enum like peft's own ``PeftType`` (which cannot be
    extended): it equals, hashes and serialises as ``"HARMA"``, and has the ``.value`` that peft's
    messages and model cards format."""

    HARMA = "HARMA"


PEFT_TYPE = HarmaPeftType.HARMA
"""The ``peft_type`` of HarMA configs and of the ``adapter_config.json`` files peft writes for them."""

PEFT_PREFIX = "harma_"
"""peft's per-method prefix: every HarMA parameter name contains it (``...harma_adapter...``,
``...harma_attention_adapter...``)."""

_MERGE_ERROR = (
    "HarMA adapters cannot be merged into the base weights: they apply self-attention, GELU and gates to "
    "each block's MLP output. Keep the adapters, or call unload() to drop them"
)
# A config attribute (not a field, so never saved): its fingerprint was computed from a model by
# harma, not read from a saved folder.
_INFERRED_FINGERPRINT = "_harma_inferred_fingerprint"
_WEIGHTED_ERROR = (
    "HarMA adapters cannot be combined by weights (add_weighted_adapter): self-attention, GELU and gates make "
    "a weighted sum of two sets' parameters compute neither set's function. Run the sets in turn "
    "(set_adapter) or row by row in one batch (model(..., adapter_names=[...]), harma.mixed_adapter_batch)"
)
# The HarmaConfig fields a HarmaPeftConfig mirrors; freeze_backbone is not one of them, since peft
# always trains the adapters alone.
_MIRRORED_FIELDS = tuple(f.name for f in dataclasses.fields(HarmaConfig) if f.name != "freeze_backbone")


def _with_harma_fields(cls: type) -> type:
    """Give ``cls`` (before ``@dataclass``) every mirrored `HarmaConfig` field with its type and
    default, ahead of its own fields, so that the two configs cannot drift apart."""
    harma_fields = {f.name: f for f in dataclasses.fields(HarmaConfig)}
    own = inspect.get_annotations(cls)
    # peft writes the config as JSON, where HarmaConfig's tuples are lists (__post_init__ converts).
    mirrored = {name: str(harma_fields[name].type).replace("tuple[str, ...]", "list[str]")
                .replace("tuple[int, ...]", "list[int]") for name in _MIRRORED_FIELDS}
    cls.__annotations__ = {**mirrored, **own}
    for name in _MIRRORED_FIELDS:
        setattr(cls, name, field(default=harma_fields[name].default,
                                 metadata={"help": f"see harma.HarmaConfig.{name}"}))
    return cls


# --------------------------------------------------------------------------------------------
# The config


@dataclass
@_with_harma_fields
class HarmaPeftConfig(PeftConfig):
    """peft configuration of HarMA adapters: ``harma.HarmaConfig``'s layout fields as a
    ``PeftConfig``.

    The fields, their types and defaults are taken from ``harma.HarmaConfig`` itself (the reference layout
    of the authors' code; ``sharing="paper"`` for the paper's cross-modal sharing), except
    ``freeze_backbone``: through peft only the adapters are trained. Values are validated by
    ``harma.HarmaConfig`` when the config is created.

    Attributes:
        bottleneck: MGA bottleneck width.
        heads: attention heads of the MGA's self-attention.
        mini_bottleneck: MMS bottleneck width.
        mini_heads: attention heads of the MMS's self-attention.
        gate_init: initial logit of the MGA's gate.
        block_gate_init: initial logit of the per-block gate.
        mini_gate_init: initial logit of the MMS's gate.
        sharing: ``"reference"``, ``"paper"`` or ``"none"`` (see ``harma.HarmaConfig``).
        towers: names of the towers to patch, or None for all.
        layers: block indices to patch in each tower, or None for all.
        target_modules: a regular expression for the block names of models of unknown families.
            Unlike LoRA's ``target_modules`` it names transformer *blocks*, not linear layers.
        mlp_attribute: name of each block's MLP submodule.
        batch_first: sequence layout of blocks found through ``target_modules``.
        placement: ``"mlp"`` (reference), ``"attention"`` or ``"attention+mlp"``: which
            sublayer outputs get an adapter.
        adapter_mask: ``"none"`` (reference) or ``"tower"``: the adapters' self-attention is
            causal in causal text towers.
        attention_passes: ``2`` (reference) or ``1``: passes through the MGA's attention.
        attention_attribute: name of each block's attention submodule, or None to detect it.
        causal_towers: towers whose adapters attend causally with ``adapter_mask="tower"``, or
            None to detect them.
        fingerprint: each patched tower's name, depth and width. Filled in when the adapters are
            saved and written to ``adapter_config.json``; when read from a folder, loading checks
            that the model has this architecture. Leave it None.
        modules_to_save: names of modules of the model (matched as peft matches them, e.g.
            ``["visual_projection", "text_projection"]`` of a Hugging Face CLIP) to train and
            save beside the adapters, each as a copy per adapter that replaces the module while
            that adapter is active (peft's ``modules_to_save``). The modules must be
            ``nn.Module``s: open_clip keeps its projections as bare parameters, which peft cannot
            wrap. Only a ``PeftModel`` restores them; ``load_peft_adapters`` refuses such folders.
        init_weights: True (the default) starts every up-projection at zero, so that new adapters
            compute exactly what the backbone does; False initialises them as the down-projections
            are (peft's ``init_weights=False`` convention), for tests that need adapters which
            change the output from the start.

    Example:
        ```python
        from peft import get_peft_model
        from harma.integrations.peft import HarmaPeftConfig

        peft_model = get_peft_model(model, HarmaPeftConfig(sharing="paper"))
        ```
    """

    # Every HarmaConfig field but freeze_backbone is added by _with_harma_fields.
    fingerprint: list[dict[str, Any]] | None = field(
        default=None, metadata={"help": "architecture the adapters were made for (filled in by harma)"}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "modules trained and saved beside the adapters, as a copy per adapter"}
    )
    init_weights: bool = field(
        default=True, metadata={"help": "False: random up-projections, so that new adapters change the output"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if isinstance(self.towers, tuple):
            self.towers = list(self.towers)
        if isinstance(self.layers, tuple):
            self.layers = list(self.layers)
        if isinstance(self.causal_towers, tuple):
            self.causal_towers = list(self.causal_towers)
        if isinstance(self.modules_to_save, str | tuple):
            self.modules_to_save = [self.modules_to_save] if isinstance(self.modules_to_save, str) else list(
                self.modules_to_save)
        self.to_harma_config()  # validates every field, with HarmaConfig's messages

    def to_harma_config(self) -> HarmaConfig:
        """The equivalent ``harma.HarmaConfig`` (with ``freeze_backbone=True``)."""
        return HarmaConfig(**{name: getattr(self, name) for name in _MIRRORED_FIELDS}, freeze_backbone=True)

    @classmethod
    def from_harma_config(cls, config: HarmaConfig, **peft_fields: Any) -> HarmaPeftConfig:
        """A ``HarmaPeftConfig`` with the layout of ``config``.

        Args:
            config: the layout. Its ``freeze_backbone`` must be true: peft trains adapters only.
            **peft_fields: other ``PeftConfig`` fields, e.g. ``inference_mode=True``.

        Raises:
            ValueError: ``config.freeze_backbone`` is false.
        """
        if not config.freeze_backbone:
            raise ValueError(
                "HarmaConfig.freeze_backbone=False cannot be expressed through peft, which trains the "
                "adapters alone; use harma.inject_harma_adapters(model, config) directly"
            )
        data = config.to_dict()
        del data["freeze_backbone"]
        return cls(**data, **peft_fields)

    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict[str, Any]:
        """Called by ``PeftConfig.from_pretrained`` on the contents of ``adapter_config.json``.

        Also accepts the ``adapter_config.json`` of a folder written by
        ``harma.save_adapters`` (its layout is nested under ``"config"``), provided it names
        ``"peft_type": "HARMA"``.
        """
        if kwargs.get("format") != FORMAT_NAME:
            return super().check_kwargs(**kwargs)
        version = int(kwargs.get("format_version", 0))
        if version > FORMAT_VERSION:
            raise ValueError(
                f"the adapter folder has harma format version {version}; this harma reads up to "
                f"{FORMAT_VERSION}: upgrade harma"
            )
        own_fields = {f.name for f in dataclasses.fields(cls)}
        converted = {key: value for key, value in kwargs.items() if key in own_fields}
        layout = dict(kwargs.get("config") or {})
        if not layout.pop("freeze_backbone", True):
            raise ValueError("the adapter folder was saved with freeze_backbone=False, which peft cannot load")
        converted.update(layout)
        converted["peft_type"] = PEFT_TYPE
        converted["fingerprint"] = kwargs.get("fingerprint")
        if kwargs.get("base_model") and not converted.get("base_model_name_or_path"):
            converted["base_model_name_or_path"] = kwargs["base_model"]
        return converted


# --------------------------------------------------------------------------------------------
# The tuner


class HarmaTunerLayer(MultimodalGatedAdapter, BaseTunerLayer):
    """A HarMA MGA as peft sees it: the adapters of a ``PeftModel`` are of this class, so that
    peft's generic functions (layer and model status, ``get_base_model_state_dict``,
    ``set_requires_grad``, enabling and disabling) find them as tuner layers.

    Each MGA belongs to one adapter set (``harma_adapter_name``) and reads which set is active
    from harma's registry of the model's sets (``harma_registry``), so that peft's view cannot
    disagree with ``harma.set_adapter`` or ``harma.delete_adapter`` called on the base model.
    It computes exactly what a `harma.MultimodalGatedAdapter` computes.
    """

    adapter_layer_names: tuple[str, ...] = ("harma_set",)
    other_param_names: tuple[str, ...] = ()
    # Filled in by HarmaTuner.inject_adapter right after the set is added.
    harma_adapter_name: str = DEFAULT_ADAPTER_NAME
    harma_registry: AdapterRegistry | None = None

    @property
    def harma_set(self) -> nn.ModuleDict:
        """``{set name: this MGA}``: the per-adapter view of a layer's weights that peft reads
        (requires_grad and devices by adapter, ``set_requires_grad``)."""
        return nn.ModuleDict({self.harma_adapter_name: self})

    @property
    def active_adapter(self) -> str:
        return self.harma_registry.active

    @property
    def disable_adapters(self) -> bool:
        return not self.enabled

    def _get_available_adapters(self) -> set[str]:
        return {self.harma_adapter_name}

    def enable_adapters(self, enabled: bool) -> None:
        """Switch this MGA on or off; as peft's layers do, a disabled adapter is frozen, and an
        enabled one requires grad again if its set is active and not in inference mode."""
        self.enabled = enabled
        registry = self.harma_registry
        set_requires_grad(self, enabled and self.harma_adapter_name == registry.active and not registry.inference_mode)

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """Make set ``adapter_names`` the model's active set (`harma.set_adapter` on the registry)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if len(names) != 1:
            raise ValueError(f"HarMA runs one adapter set at a time; got {names}")
        switch_active(self.harma_registry, names[0], inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        """Nothing: ``HarmaTuner.delete_adapter`` removes whole sets through harma."""


def _initialise_away_from_identity(adapter: MultimodalGatedAdapter) -> None:
    """Initialise the up-projections of ``adapter`` (and of its MMS) as ``nn.Linear`` does, so that
    the adapter changes its block's output from the start."""
    for up in (adapter.up, getattr(adapter.mini_adapter, "up", None)):
        if up is not None:
            up.reset_parameters()


def _dropped_by_peft_filter(key: str, unwanted_adapter_names: Sequence[str]) -> bool:
    """Whether peft's ``get_peft_model_state_dict`` drops ``key`` before calling the tuner: it
    removes every key containing ``.<name>.`` (or ending in ``.<name>``) for the other adapters."""
    return any(f".{name}." in key or key.endswith(f".{name}") for name in unwanted_adapter_names)


class HarmaTuner(BaseTuner):
    """peft tuner ("model class") of the HarMA method; created by ``PeftModel``, not by users.

    It patches the wrapped model with ``harma.inject_harma_adapters``, so parameter names,
    sharing and the forward pass are exactly harma's. Each peft adapter is a harma adapter set of
    the same name (``harma.named_adapters``): ``add_adapter``/``load_adapter`` add a set,
    ``set_adapter`` and ``delete_adapter`` are ``harma.set_adapter`` and ``harma.delete_adapter``.
    One set runs at a time. HarMA adapters contain attention and non-linearities, so they cannot
    be merged into the base weights; ``unload()`` removes them.
    """

    prefix: str = PEFT_PREFIX
    tuner_layer_cls = HarmaTunerLayer
    target_module_mapping: Mapping[str, list[str]] = types.MappingProxyType({})

    # --- creation ---------------------------------------------------------------------------

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Add to ``model`` the adapter set ``adapter_name`` that ``self.peft_config[adapter_name]``
        describes.

        The first set is active, trainable unless the config's ``inference_mode``. A later set is
        added as peft's ``add_adapter`` adds one: inactive (bypassed) and frozen, every other
        parameter's ``requires_grad`` left as it was.

        Raises:
            TypeError: the config is not a ``HarmaPeftConfig``.
            ValueError: the model carries harma adapters peft does not manage, the name cannot name
                a harma set, no blocks match, or the config's fingerprint names another architecture.
        """
        config = self.peft_config[adapter_name]
        self._check_injectable(model, adapter_name, config, low_cpu_mem_usage)
        harma_config = config.to_harma_config()
        if config.fingerprint is not None and not getattr(config, _INFERRED_FINGERPRINT, False):
            # Read from a saved folder: the model must have the architecture the adapters were made for.
            check_fingerprint(config.fingerprint, architecture_fingerprint(model, harma_config),
                              f"the HarMA adapters {adapter_name!r}")
        first = not list_adapters(model)
        # A later set is added bypassed and frozen, every other flag as it was (peft's add_adapter).
        # Created in the backbone's dtype: peft then calls _cast_adapter_dtype with the user's choice.
        add_adapter_set(model, harma_config, adapter_name, autocast_adapter_dtype=False,
                        adapter_class=HarmaTunerLayer)
        registry = adapter_registry(model)
        for adapter in registry.modules[adapter_name]:
            adapter.harma_adapter_name = adapter_name
            adapter.harma_registry = registry
            if not config.init_weights:
                _initialise_away_from_identity(adapter)
        if first and config.inference_mode:
            # Through harma, so that its registry knows the active set is frozen.
            harma_set_adapter(model, adapter_name, inference_mode=True)
        self._update_targeted_module_names()
        # peft's own step for modules_to_save (a trainable copy per adapter of each named module).
        set_additional_trainable_modules(model=model, peft_config=config, model_config=BaseTuner.get_model_config(self),
                                         adapter_name=adapter_name, activate_adapter=first)

    def _check_injectable(
        self, model: nn.Module, adapter_name: str, config: PeftConfig, low_cpu_mem_usage: bool
    ) -> None:
        if not isinstance(config, HarmaPeftConfig):
            raise TypeError(f"HarmaTuner needs a HarmaPeftConfig, got {type(config).__name__}")
        # Sets added with harma.inject_harma_adapters would be invisible to peft (not saved, not
        # listed), and one named like the new adapter would clash with it.
        managed = set(self.peft_config) - {adapter_name}
        foreign = [name for name in list_adapters(model) if name not in managed]
        if foreign:
            raise ValueError(
                f"the model already carries HarMA adapters {foreign} that peft does not manage (added with "
                f"harma.inject_harma_adapters?); remove them (harma.remove_harma_adapters) and add adapter "
                f"{adapter_name!r} through peft, or load saved ones with PeftModel.load_adapter"
            )
        if low_cpu_mem_usage or nn.Linear(1, 1).weight.is_meta:
            # peft creates the tuner under accelerate's init_empty_weights() for this option.
            raise ValueError(
                "low_cpu_mem_usage=True is not supported for HarMA adapters (they are small: 24 MB for "
                "ViT-B/32); leave it False"
            )

    def _update_targeted_module_names(self) -> None:
        # The blocks carrying any set (peft's bookkeeping; a block with several sets is listed once).
        blocks: dict[str, None] = {}
        for name in list_adapters(self.model):
            for module_name, _ in adapter_modules(self.model, name):
                blocks[reference_adapter_key(module_name + ".").rstrip(".").rpartition(".")[0]] = None
        self.targeted_module_names[:] = list(blocks)

    def _create_and_replace(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("HarmaTuner patches whole blocks in inject_adapter, not module by module")

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        # The active set alone (an inactive set is bypassed, so it would get no gradient); the
        # copies of modules_to_save keep what peft's wrappers set.
        registry = adapter_registry(model)
        active = registry.active if registry else None
        wrapped = tuple(f"{name}." for name, module in model.named_modules()
                        if isinstance(module, AuxiliaryTrainingWrapper))
        for name, param in model.named_parameters():
            owner = adapter_name_of_key(name)
            if owner is None and name.startswith(wrapped):
                continue
            param.requires_grad_(owner is not None and owner == active)
        if active is not None:
            harma_set_adapter(model, active)  # harma's registry: the active set is trainable

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """peft's ``autocast_adapter_dtype``: set ``adapter_name``'s float16/bfloat16 adapters
        become float32 (`harma.inject_harma_adapters` does the same by default)."""
        if not autocast_adapter_dtype:
            return
        for adapter in adapter_registry(self.model).modules[adapter_name]:
            if adapter.up.weight.dtype in (torch.float16, torch.bfloat16):
                adapter.to(torch.float32)

    # --- switching and gradients ------------------------------------------------------------

    @property
    def active_adapter(self) -> str | list[str]:
        """The active set's name, read from harma's registry (so that it is right whoever switched);
        before the first set is added, and after the last is deleted, what peft last assigned."""
        model = self._modules.get("model")
        registry = adapter_registry(model) if model is not None else None
        return registry.active if registry else self.__dict__.get("_harma_active_adapter", [])

    @active_adapter.setter
    def active_adapter(self, value: str | list[str]) -> None:
        self.__dict__["_harma_active_adapter"] = value

    def _check_adapter_names(self, adapter_names: str | Sequence[str]) -> list[str]:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [name for name in names if name not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this model has {list(self.peft_config)}")
        return names

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Set ``requires_grad`` of the named sets' parameters (and of their ``modules_to_save``
        copies), active or not, as peft does. An inactive set is bypassed, so it gets no gradient
        until ``set_adapter`` selects it; a training switch then makes the new active set alone
        trainable again."""
        super().set_requires_grad(self._check_adapter_names(adapter_names), requires_grad)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Make set ``adapter_name`` the one that runs (``harma.set_adapter``): as in peft, it is
        trainable unless ``inference_mode``; every other set is bypassed and frozen.

        Raises:
            ValueError: an unknown name, or several names (HarMA runs one set at a time).
        """
        names = self._check_adapter_names(adapter_name)
        if len(names) != 1:
            raise ValueError(f"HarMA runs one adapter set at a time; got {names}")
        harma_set_adapter(self.model, names[0], inference_mode=inference_mode)
        _set_adapter(self.model, names[0], inference_mode=inference_mode)  # modules_to_save copies
        self.active_adapter = names[0]

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """``model(..., adapter_names=[...])``: row ``i`` of the batch through set ``adapter_names[i]``
        (``"__base__"``: none), as `harma.mixed_adapter_batch`; in eval mode only, as in peft."""
        adapter_names = kwargs.get("adapter_names")
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode (call .eval() first)")
        unknown = sorted({name for name in adapter_names if name != BASE_MODEL_NAME} - set(self.peft_config))
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}; this model has "
                             f"{list(self.peft_config)}")
        with mixed_adapter_batch(self.model, adapter_names):
            yield

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        """Not possible for HarMA adapters; raises ``ValueError`` naming the alternatives."""
        raise ValueError(_WEIGHTED_ERROR)

    # --- removal ----------------------------------------------------------------------------

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete set ``adapter_name`` (``harma.delete_adapter``).

        When it was active, the first remaining set (in the order the sets were added) becomes
        active, trainable unless its config's ``inference_mode`` (loaded for inference); the
        backbone's ``requires_grad`` stays as it was. Deleting the last set removes the adapters,
        restoring the ``requires_grad`` the model had before (``harma.remove_harma_adapters``).
        """
        self._check_adapter_names(adapter_name)
        was_active = adapter_name == self.active_adapter
        if adapter_name in list_adapters(self.model):
            harma_delete_adapter(self.model, adapter_name)
        del self.peft_config[adapter_name]
        remaining = list_adapters(self.model)
        _delete_auxiliary_adapter(self.model, adapter_name, new_active_adapters=[self.active_adapter] if remaining
                                  else None)
        if not remaining:
            self.active_adapter = []
            self.targeted_module_names.clear()
            return
        if was_active:
            new_active = self.active_adapter
            inference_mode = self.peft_config[new_active].inference_mode
            harma_set_adapter(self.model, new_active, inference_mode=inference_mode)
            # The warning peft's own adapter layers give (BaseTunerLayer.delete_adapter).
            warnings.warn(f"Adapter {adapter_name} was active which is now deleted. Setting active adapter "
                          f"to {new_active}.", stacklevel=2)
        self._update_targeted_module_names()

    def unload(self) -> nn.Module:
        """Remove every adapter set and return the base model, computing what it did before."""
        if is_patched(self.model):
            remove_harma_adapters(self.model)
        self.model.__dict__.pop("peft_config", None)
        return self.model

    def _check_merge_allowed(self) -> None:
        raise ValueError(_MERGE_ERROR)

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        """Not possible for HarMA adapters; raises ``ValueError`` (see ``unload``)."""
        raise ValueError(_MERGE_ERROR)

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        """Not possible for HarMA adapters; raises ``ValueError``."""
        raise ValueError(_MERGE_ERROR)

    # --- saving and loading (peft 0.21 tuner hooks) -----------------------------------------

    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: PeftConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, torch.Tensor]:
        # The parameters of set adapter_name under their names in the model, a shared MMS once
        # (under the first block that uses it), with peft's "base_model.model." prefix;
        # _remove_adapter_name_from_key then gives them the reference names.
        selected, missing = {}, []
        for name, param in adapter_named_parameters(model, adapter_name):
            if name in state_dict:
                selected[name] = state_dict[name]
            elif _dropped_by_peft_filter(name, unwanted_adapter_names):
                # Another adapter named like a module of this set's path ("0", "text") made peft
                # drop the tensor; the model holds it.
                selected[name] = param.detach()
            else:
                missing.append(name)
        if missing:
            raise ValueError(
                f"the state dict to save lacks {len(missing)} adapter tensor(s), e.g. {missing[:3]}"
            )
        # save_pretrained writes the config right after the weights: record the architecture they fit.
        # The config stays the user's object (peft's convention); the mark lets the same object go on
        # to a model of another architecture, where only a fingerprint read from a file is checked.
        base_model = model.get_base_model() if hasattr(model, "get_base_model") else model
        config.fingerprint = architecture_fingerprint(base_model, config.to_harma_config())
        setattr(config, _INFERRED_FINGERPRINT, True)
        return selected

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # Files hold the reference names whatever the set's name: "<block>.harma_adapters.<name>.x"
        # is saved as "<block>.harma_adapter.x", so a folder loads into a set of any name, and
        # into harma's native API. Keys of modules_to_save copies are peft's business.
        if is_adapter_parameter_name(key):
            return reference_adapter_key(key)
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls,
        model: nn.Module,
        config: PeftConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        # Keys of modules_to_save copies arrive already translated by peft; they pass through.
        others = {key: value for key, value in state_dict.items() if not is_adapter_parameter_name(key)}
        harma_tensors = {key: value for key, value in state_dict.items() if key not in others}
        matched = match_adapter_tensors(model, harma_tensors, f"the weights of HarMA adapter {adapter_name!r}",
                                        adapter_name)
        # Every name of a shared MMS gets the stored tensor, so peft's strict load finds each.
        parameters = dict(model.named_parameters(remove_duplicate=False))
        aliases = {id(param): [] for param in parameters.values()}
        for name, param in parameters.items():
            aliases[id(param)].append(name)
        return {alias: value for name, value in matched.items() for alias in aliases[id(parameters[name])]} | others


# --------------------------------------------------------------------------------------------
# Registration and loading without a PeftModel


def _same_entry(existing: Any, ours: Any) -> bool:
    if existing is ours or existing == ours:
        return True
    # The same class from a reloaded module.
    return isinstance(existing, type) and isinstance(ours, type) and (
        existing.__module__, existing.__qualname__) == (ours.__module__, ours.__qualname__)


def register_with_peft() -> str:
    """Make HarMA a peft method. Idempotent; importing this module already calls it.

    Registers ``HarmaPeftConfig`` and ``HarmaTuner`` under the ``peft_type``
    ``"HARMA"`` in peft's method tables (``peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING``,
    ``PEFT_TYPE_TO_TUNER_MAPPING``, ``PEFT_TYPE_TO_PREFIX_MAPPING``), the tables
    ``peft.utils.register_peft_method`` fills for peft's own methods.

    Returns:
        The peft type, ``"HARMA"``.

    Raises:
        ImportError: peft is older than 0.21 (it has no tuner hooks for saving and loading).
        RuntimeError: another method is already registered under ``"HARMA"`` or the prefix ``"harma_"``.
    """
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )

    if not hasattr(BaseTuner, "_remap_adapter_state_dict_for_load"):
        import peft

        raise ImportError(
            f"harma.integrations.peft needs peft >= 0.21 (found {peft.__version__}): older versions "
            f"cannot save or load methods outside peft.utils.PeftType"
        )
    entries = (
        (PEFT_TYPE_TO_CONFIG_MAPPING, HarmaPeftConfig),
        (PEFT_TYPE_TO_TUNER_MAPPING, HarmaTuner),
        (PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_PREFIX),
    )
    for table, ours in entries:
        existing = table.get(PEFT_TYPE)
        if existing is not None and not _same_entry(existing, ours):
            raise RuntimeError(
                f"peft already has a method registered as {PEFT_TYPE.value!r} ({existing!r}); harma cannot register "
                f"its own"
            )
    for peft_type, prefix in PEFT_TYPE_TO_PREFIX_MAPPING.items():
        if prefix == PEFT_PREFIX and peft_type != PEFT_TYPE:
            raise RuntimeError(f"peft method {getattr(peft_type, 'value', peft_type)!r} already uses the parameter prefix {PEFT_PREFIX!r}")
    for table, ours in entries:
        table[PEFT_TYPE] = ours
    return PEFT_TYPE


def load_peft_adapters(
    model: nn.Module,
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | None = None,
    adapter_name: str | None = None,
    allow_nonfinite: bool = False,
) -> nn.Module:
    """Load HarMA adapters saved by ``PeftModel.save_pretrained`` into a plain model, without
    a ``PeftModel`` wrapper.

    The mirror of ``harma.load_adapters`` for peft's folders: the weights go into adapter set
    ``adapter_name`` (the active set; ``"default"`` on a model without adapters), which is added
    with the stored layout first where the model lacks it (inactive, unless it is the model's first
    set); the stored architecture and every tensor must fit. The adapters stay trainable. To turn a
    peft folder into a harma file, follow this with ``harma.save_adapters`` (which, like this
    loader, refuses NaN or infinite values unless given ``allow_nonfinite=True``).

    Args:
        model: the base model (patched or not).
        source: a folder written by ``PeftModel.save_pretrained``, or a Hub repository id
            (``HF_HUB_OFFLINE=1`` reads the local cache only).
        revision: the Hub revision (branch, tag or commit) to read.
        token: a Hub access token, for private repositories.
        adapter_name: the adapter set to load into (see above). peft saves a non-default adapter
            ``N`` in the subfolder ``N`` of the folder it is given.
        allow_nonfinite: load tensors holding NaN or infinite values too (refused by default,
            as by ``harma.load_adapters``).

    Returns:
        ``model``, patched and loaded.

    Raises:
        ValueError: not a HarMA folder, another layout or architecture, or tensors that do not fit.
    """
    from peft.utils import load_peft_weights

    register_with_peft()
    name = os.fspath(source)
    hub_kwargs = {key: value for key, value in (("revision", revision), ("token", token)) if value is not None}
    config = PeftConfig.from_pretrained(name, **hub_kwargs)
    if not isinstance(config, HarmaPeftConfig):
        kind = getattr(config.peft_type, "value", config.peft_type)
        raise ValueError(f"{name} holds {kind} adapters, not HarMA adapters")
    tensors = load_peft_weights(name, device="cpu", **hub_kwargs)
    if config.modules_to_save or not all(is_adapter_parameter_name(key) for key in tensors):
        kept = config.modules_to_save or sorted(key for key in tensors if not is_adapter_parameter_name(key))[:3]
        raise ValueError(
            f"{name} also holds trained copies of modules_to_save ({kept}), which only a PeftModel can put back: "
            f"load it with peft.PeftModel.from_pretrained(model, {name!r})"
        )
    load_adapter_state(model, config.to_harma_config(), config.fingerprint, tensors, name,
                       adapter_name=adapter_name, allow_nonfinite=allow_nonfinite)
    return model

register_with_peft()
