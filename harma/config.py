"""The one configuration object of the library: which blocks get adapters and how they are shaped."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

SHARING_MODES = ("reference", "paper", "none")
PLACEMENTS = ("mlp", "attention", "attention+mlp")
ADAPTER_MASKS = ("none", "tower")
ATTENTION_PASSES = (1, 2)
LAYOUT_PRESETS = ("reference", "paper", "plus")
"""Names of the layouts `HarmaConfig.preset` builds (one classmethod each)."""


@dataclass(frozen=True)
class HarmaConfig:
    """How HarMA adapters are laid out in a model.

    The defaults reproduce the authors' released code (docs/adapters.md): a multimodal
    gated adapter (MGA, bottleneck 128, 8 heads) after the MLP of every transformer block of
    both towers, and one mini adapter (MMS, width 128, bottleneck 64, 8 heads) per layer index,
    used by the text tower's adapters only.

    Attributes:
        bottleneck: MGA bottleneck width (the down-projection's output features).
        heads: attention heads of the MGA's self-attention; must divide ``bottleneck``.
        mini_bottleneck: MMS bottleneck width.
        mini_heads: attention heads of the MMS's self-attention; must divide ``mini_bottleneck``.
        gate_init: initial logit of the MGA's gate between its bottleneck and attention paths.
        block_gate_init: initial logit of the per-block gate that mixes adapter and MLP output.
        mini_gate_init: initial logit of the MMS's gate.
        sharing: where the MMS of layer ``i`` is used. ``"reference"``: by the text tower's MGA
            of layer ``i`` only (the released code). ``"paper"``: by the MGAs of layer ``i`` of
            every patched tower (the paper's cross-modal sharing). ``"none"``: no MMS at all.
        towers: names of the towers to patch (``"vision"``, ``"text"`` for the known model
            families; the parent module path for ``target_modules`` matches). ``None`` patches
            every tower found.
        layers: block indices to patch within each tower (negative indices count from the end).
            ``None`` patches every block.
        target_modules: a regular expression matched (``re.fullmatch``) against module names to
            find blocks in models of unknown families. Each match must have an ``mlp`` submodule
            (or the attribute named by ``mlp_attribute``) whose output is ``(..., width)``.
        mlp_attribute: name of the block's MLP submodule whose output is adapted.
        batch_first: sequence layout of the blocks found through ``target_modules``
            (``True``: ``(batch, tokens, width)``; ``False``: ``(tokens, batch, width)``).
            Known families are detected automatically.
        freeze_backbone: set ``requires_grad=False`` on every parameter that is not an adapter's.
        placement: which sublayer outputs get an MGA. ``"mlp"``: after each block's MLP (the
            reference). ``"attention"``: after each block's attention sublayer instead.
            ``"attention+mlp"``: both, each position with its own MGA and block gate; the MMS of
            layer ``i`` is used by every MGA of layer ``i`` that the ``sharing`` rule gives one.
        adapter_mask: the adapters' own self-attention. ``"none"``: unmasked over every token,
            padding included (the reference). ``"tower"``: masked as the tower's own attention
            is, i.e. causal in CLIP-style text towers (open_clip text towers with a causal mask,
            Hugging Face ``CLIPTextModel``) and unmasked elsewhere (vision towers, SigLIP text).
        attention_passes: how often the MGA applies its self-attention: ``2`` (the reference:
            attention, MMS, the same attention again) or ``1`` (attention, then MMS).
        attention_attribute: name of each block's attention submodule, for ``placement`` with
            ``"attention"`` on blocks found through ``target_modules``. ``None`` takes the first
            of ``attn``, ``self_attn``, ``attention`` that the block has. Known families are
            detected automatically.
        causal_towers: with ``adapter_mask="tower"``, names of the towers whose adapters attend
            causally, replacing the automatic choice (needed for causal towers found through
            ``target_modules``, whose mask harma cannot see). ``None`` detects it.
    """

    bottleneck: int = 128
    heads: int = 8
    mini_bottleneck: int = 64
    mini_heads: int = 8
    gate_init: float = 0.6
    block_gate_init: float = 0.6
    mini_gate_init: float = 0.6
    sharing: str = "reference"
    towers: tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None
    target_modules: str | None = None
    mlp_attribute: str = "mlp"
    batch_first: bool = True
    freeze_backbone: bool = True
    placement: str = "mlp"
    adapter_mask: str = "none"
    attention_passes: int = 2
    attention_attribute: str | None = None
    causal_towers: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        # Lists from JSON or from users become tuples so that the config stays hashable.
        if self.towers is not None and not isinstance(self.towers, tuple):
            object.__setattr__(self, "towers", tuple(self._as_sequence("towers", self.towers)))
        if self.layers is not None and not isinstance(self.layers, tuple):
            object.__setattr__(self, "layers", tuple(self._as_sequence("layers", self.layers)))
        if self.causal_towers is not None and not isinstance(self.causal_towers, tuple):
            object.__setattr__(self, "causal_towers", tuple(self._as_sequence("causal_towers", self.causal_towers)))
        self._validate()

    @staticmethod
    def _as_sequence(name: str, value: Any) -> list:
        if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
            raise ValueError(f"HarmaConfig.{name} must be a list or tuple, got {value!r}")
        return list(value)

    def _validate(self) -> None:
        for name in ("bottleneck", "heads", "mini_bottleneck", "mini_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"HarmaConfig.{name} must be a positive integer, got {value!r}")
        if self.bottleneck % self.heads:
            raise ValueError(
                f"HarmaConfig.heads={self.heads} must divide bottleneck={self.bottleneck}"
            )
        if self.mini_bottleneck % self.mini_heads:
            raise ValueError(
                f"HarmaConfig.mini_heads={self.mini_heads} must divide "
                f"mini_bottleneck={self.mini_bottleneck}"
            )
        for name in ("gate_init", "block_gate_init", "mini_gate_init"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"HarmaConfig.{name} must be a finite number, got {value!r}")
        for name in ("batch_first", "freeze_backbone"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"HarmaConfig.{name} must be true or false (bool), got {getattr(self, name)!r}")
        if self.sharing not in SHARING_MODES:
            raise ValueError(
                f"HarmaConfig.sharing must be one of {SHARING_MODES}, got {self.sharing!r}"
            )
        if self.towers is not None:
            if not self.towers or not all(isinstance(t, str) and t for t in self.towers):
                raise ValueError(
                    f"HarmaConfig.towers must be None or non-empty tower names, got {self.towers!r}"
                )
        if self.layers is not None:
            if not self.layers or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in self.layers
            ):
                raise ValueError(
                    f"HarmaConfig.layers must be None or a non-empty list of integers, got {self.layers!r}"
                )
        if self.target_modules is not None:
            import re

            if not isinstance(self.target_modules, str):
                raise ValueError(f"HarmaConfig.target_modules must be None or a regular expression (str), "
                                 f"got {self.target_modules!r}")
            try:
                re.compile(self.target_modules)
            except re.error as error:
                raise ValueError(
                    f"HarmaConfig.target_modules is not a valid regular expression: {error}"
                ) from None
        if not isinstance(self.mlp_attribute, str) or not self.mlp_attribute.isidentifier():
            raise ValueError(
                f"HarmaConfig.mlp_attribute must be an attribute name, got {self.mlp_attribute!r}"
            )
        self._validate_options()

    def _validate_options(self) -> None:
        """The fields that go beyond the reference layout."""
        for name, allowed in (("placement", PLACEMENTS), ("adapter_mask", ADAPTER_MASKS),
                              ("attention_passes", ATTENTION_PASSES)):
            value = getattr(self, name)
            if type(value) is not type(allowed[0]) or value not in allowed:
                raise ValueError(f"HarmaConfig.{name} must be one of {allowed}, got {value!r}")
        if self.attention_attribute is not None and (
            not isinstance(self.attention_attribute, str) or not self.attention_attribute.isidentifier()
        ):
            raise ValueError(
                f"HarmaConfig.attention_attribute must be None or an attribute name, got {self.attention_attribute!r}"
            )
        if self.causal_towers is not None and not all(isinstance(t, str) and t for t in self.causal_towers):
            raise ValueError(
                f"HarmaConfig.causal_towers must be None or a list of tower names, got {self.causal_towers!r}"
            )

    @property
    def positions(self) -> tuple[str, ...]:
        """The sublayers adapted in each block, in the order the block runs them."""
        return ("attention", "mlp") if self.placement == "attention+mlp" else (self.placement,)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> HarmaConfig:
        """The named layout (`LAYOUT_PRESETS`: ``"reference"``, ``"paper"`` or ``"plus"``) with
        ``overrides`` applied, e.g. from a config file's ``"harma": "plus"``.

        Raises:
            ValueError: no preset of that name.
        """
        if name not in LAYOUT_PRESETS:
            raise ValueError(f"no HarMA layout preset named {name!r}; the presets are {LAYOUT_PRESETS}")
        return getattr(cls, name)(**overrides)

    @classmethod
    def reference(cls, **overrides: Any) -> HarmaConfig:
        """The layout of the authors' released code and checkpoints (the default)."""
        return cls(**{"sharing": "reference", **overrides})

    @classmethod
    def paper(cls, **overrides: Any) -> HarmaConfig:
        """The paper's layout: the MMS of layer ``i`` is shared by both towers' MGAs of layer ``i``."""
        return cls(**{"sharing": "paper", **overrides})

    @classmethod
    def plus(cls, **overrides: Any) -> HarmaConfig:
        """An MGA after the attention sublayer as well as after the MLP of every block, each
        with half the reference bottleneck (64 features, heads of 16) and an MMS of 32 features
        (heads of 8), so that it trains fewer parameters than the reference layout (4,865,772
        against 5,934,396 on ViT-B/32). The adapters' own attention is as in the reference
        (unmasked, applied twice).

        Chosen among five candidate layouts by validation mR on the offline transfer benchmark
        (synthetic data, a small CLIP; `docs/transfer_benchmark.md`). Its files do not load into
        the reference layout, nor the authors' checkpoints into it.
        """
        return cls(**{"placement": "attention+mlp", "bottleneck": 64, "heads": 4, "mini_bottleneck": 32,
                      "mini_heads": 4, **overrides})

    def replace(self, **changes: Any) -> HarmaConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict of every field."""
        data = dataclasses.asdict(self)
        for key in ("towers", "layers", "causal_towers"):
            if data[key] is not None:
                data[key] = list(data[key])
        return data

    def to_json(self, **dumps_kwargs: Any) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, **dumps_kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HarmaConfig:
        """Inverse of `to_dict`; unknown keys are an error naming them."""
        if not isinstance(data, dict):
            raise ValueError(f"a HarmaConfig must be read from a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown HarmaConfig field(s) {unknown}; known fields are {sorted(known)}"
            )
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> HarmaConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"HarmaConfig JSON is not valid JSON: {error}") from None
        return cls.from_dict(data)
