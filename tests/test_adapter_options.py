"""The HarmaConfig options beyond the reference layout: ``placement`` (adapters after the attention
sublayer, the MLP, or both), ``adapter_mask`` (causal adapter attention in causal text towers, with
``causal_towers`` for pattern models), ``attention_passes`` (1 or 2 passes through the MGA's attention)
and ``attention_attribute``.

Checked for every supported family and for a small custom transformer found through
``target_modules``: identity at initialisation, what the options compute once the adapters are
trained, sharing of the mini adapter by every MGA of a layer, batch independence, adapter files
(format version 2, and version 1 files read as the defaults), removal, config validation, the peft
bridge and torch.compile.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tiny_models import (
    FAMILIES,
    encode,
    frozen_copy,
    images,
    perturb_adapters,
    tiny_hf_clip,
    tiny_open_clip,
    tokens,
)
from torch import nn

import harma
from harma.inject import adapters
from harma.modules import MiniAdapter, MultimodalGatedAdapter
from harma.named_adapters import is_adapter_parameter_name

NEW_FIELDS = ("placement", "adapter_mask", "attention_passes", "attention_attribute", "causal_towers")
POSITION_ATTRIBUTES = {"mlp": "harma_adapter", "attention": "harma_attention_adapter"}

OPTION_SETS = {
    "attention-masked-1pass": dict(placement="attention", adapter_mask="tower", attention_passes=1),
    "both-masked-1pass": dict(placement="attention+mlp", adapter_mask="tower", attention_passes=1),
    "both": dict(placement="attention+mlp"),
    "mlp-masked-1pass": dict(placement="mlp", adapter_mask="tower", attention_passes=1),
}


# --------------------------------------------------------------------------------------------
# A model of an "unknown" family, reached through target_modules


class PatternBlock(nn.Module):
    """Pre-norm transformer block; its attention module is called ``attention_name`` (None: none)."""

    def __init__(self, width: int, heads: int, attention_name: str | None) -> None:
        super().__init__()
        self.attention_name = attention_name
        self.ln1 = nn.LayerNorm(width)
        if attention_name is not None:
            setattr(self, attention_name, nn.MultiheadAttention(width, heads, batch_first=True))
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.attention_name is not None:
            y = self.ln1(x)
            x = x + getattr(self, self.attention_name)(y, y, y, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln2(x))


class PatternModel(nn.Module):
    """A stack of `PatternBlock` under ``blocks`` (tower name "blocks"), optionally causal."""

    def __init__(self, attention_name: str | None = "attn", causal: bool = False, width: int = 32,
                 depth: int = 2, heads: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.causal = causal
        self.blocks = nn.ModuleList(PatternBlock(width, heads, attention_name) for _ in range(depth))
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1) if self.causal else None
        for block in self.blocks:
            x = block(x, mask)
        return x


def pattern_config(**options) -> harma.HarmaConfig:
    return harma.HarmaConfig(target_modules=r"blocks\.\d+", bottleneck=16, heads=4, mini_bottleneck=8,
                             mini_heads=2, **options)


def pattern_inputs(batch: int = 3, length: int = 9, seed: int = 5) -> torch.Tensor:
    return torch.randn(batch, length, 32, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# Shared helpers


def build(family: str) -> nn.Module:
    """A fresh base model of ``family`` (FAMILIES plus "pattern", a causal PatternModel)."""
    return PatternModel(causal=True) if family == "pattern" else FAMILIES[family]()


def config_for(family: str, options: dict) -> harma.HarmaConfig:
    if family != "pattern":
        return harma.HarmaConfig(**options)
    causal = {"causal_towers": ("blocks",)} if options.get("adapter_mask") == "tower" else {}
    return pattern_config(**options, **causal)


def outputs(model: nn.Module) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        if isinstance(model, PatternModel):
            return (model(pattern_inputs()),)
        return encode(model, images(), tokens())


def max_difference(first, second) -> float:
    return max((a - b).abs().max().item() for a, b in zip(first, second, strict=True))


def assert_equal_outputs(first: nn.Module, second: nn.Module) -> None:
    for a, b in zip(outputs(first), outputs(second), strict=True):
        assert torch.equal(a, b)


def adapter_positions(model: nn.Module) -> set[str]:
    """Which block attributes carry MGAs (``harma_adapter``, ``harma_attention_adapter``)."""
    return {name.rpartition(".")[2] for name, _ in adapters(model)}


def text_embeddings(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return encode(model, images(len(ids)), ids)[1]


def ids_with_other_padding(eot: int = 999) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and a copy whose ids after the end-of-text token are other (non-EOT) ids."""
    ids = tokens(3)
    changed = ids.clone()
    generator = torch.Generator().manual_seed(11)
    for row in range(len(ids)):
        end = int((ids[row] == eot).nonzero()[0])
        assert end < ids.shape[1] - 1  # there is a padding region to change
        changed[row, end + 1:] = torch.randint(1, eot, (ids.shape[1] - end - 1,), generator=generator)
    assert not torch.equal(ids, changed)
    return ids, changed


def text_block(model: nn.Module, index: int = 0) -> nn.Module:
    """Block ``index`` of the text tower of a tiny open_clip or Hugging Face CLIP."""
    if hasattr(model, "text_model"):
        return model.text_model.encoder.layers[index]
    return model.transformer.resblocks[index]


def attention_of(block: nn.Module) -> nn.Module:
    return block.self_attn if hasattr(block, "self_attn") else block.attn


def record_outputs(module: nn.Module) -> tuple[list[torch.Tensor], torch.utils.hooks.RemovableHandle]:
    """Register (last) a hook keeping the sequence ``module`` returns, after harma's hooks ran."""
    seen: list[torch.Tensor] = []

    def hook(mod, args, output):
        seen.append((output[0] if isinstance(output, tuple) else output).detach().clone())

    return seen, module.register_forward_hook(hook)


def train_a_few_steps(model: nn.Module, steps: int = 3) -> None:
    optimizer = torch.optim.Adam(list(harma.adapter_parameters(model)), lr=1e-2)
    for _ in range(steps):
        loss = sum(embedding.square().mean() for embedding in encode(model, images(), tokens()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


# --------------------------------------------------------------------------------------------
# 1. Identity at initialisation


@pytest.mark.parametrize("options", OPTION_SETS)
@pytest.mark.parametrize("family", [*FAMILIES, "pattern"])
def test_every_option_set_is_the_identity_at_initialisation(family, options):
    model = build(family)
    base = frozen_copy(model)
    config = config_for(family, OPTION_SETS[options])
    harma.inject_harma_adapters(model, config)
    assert adapter_positions(model) == {POSITION_ATTRIBUTES[p] for p in config.positions}
    assert max_difference(outputs(model), outputs(base)) < 1e-5
    perturb_adapters(model)  # the hooks are live: the identity is the adapters', not a no-op's
    assert max_difference(outputs(model), outputs(base)) > 1e-4


# --------------------------------------------------------------------------------------------
# 2. Placement after attention


@pytest.mark.parametrize("family", ["open_clip", "hf_clip"])
def test_adapter_after_attention_changes_the_attention_output_once_trained(family):
    model = FAMILIES[family]()
    base = frozen_copy(model)
    harma.inject_harma_adapters(model, harma.HarmaConfig(placement="attention"))
    train_a_few_steps(model)
    assert text_block(model).harma_attention_adapter.up.weight.abs().max() > 0
    patched_seen, _ = record_outputs(attention_of(text_block(model)))
    base_seen, _ = record_outputs(attention_of(text_block(base)))
    ids = tokens()
    text_embeddings(model, ids)
    text_embeddings(base, ids)
    assert (patched_seen[-1] - base_seen[-1]).abs().max().item() > 1e-4
    with harma.disable_adapters(model):
        text_embeddings(model, ids)
    torch.testing.assert_close(patched_seen[-1], base_seen[-1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("placement, present, absent", [
    ("attention", ["harma_attention_adapter"], ["harma_adapter"]),
    ("attention+mlp", ["harma_attention_adapter", "harma_adapter"], []),
    ("mlp", ["harma_adapter"], ["harma_attention_adapter"]),
])
def test_adapter_names_follow_the_placement(placement, present, absent):
    model = harma.inject_harma_adapters(tiny_open_clip(), harma.HarmaConfig(placement=placement))
    for tower in (model.visual.transformer, model.transformer):
        for block in tower.resblocks:
            assert all(isinstance(getattr(block, name, None), MultimodalGatedAdapter) for name in present)
            assert not any(hasattr(block, name) for name in absent)
    keys = list(model.state_dict())
    assert {key.split(".")[-3] for key in keys if ".harma" in key and key.endswith(".up.weight")
            and ".mini_adapter." not in key} == set(present)


def test_is_adapter_parameter_name_marks_exactly_the_adapter_parameters():
    model = tiny_open_clip()
    base_keys = set(model.state_dict())
    harma.inject_harma_adapters(model, harma.HarmaConfig(placement="attention+mlp", sharing="paper"))
    added = set(model.state_dict()) - base_keys
    assert any(".harma_attention_adapter." in key for key in added)
    assert all(is_adapter_parameter_name(key) for key in added)
    assert not any(is_adapter_parameter_name(key) for key in base_keys)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if is_adapter_parameter_name(n)
    }
    assert is_adapter_parameter_name("harma_attention_adapter.up.weight")
    assert is_adapter_parameter_name("base_model.model.blocks.0.harma_attention_adapter.mini_adapter.gate")
    for name in ("blocks.0.harma_attention_adapterx.up.weight", "blocks.0.my_harma_adapter.up.weight",
                 "blocks.0.harma_attention_adapter", "blocks.0.attn.out_proj.weight"):
        assert not is_adapter_parameter_name(name), name


# --------------------------------------------------------------------------------------------
# 3. Causal adapter attention


@pytest.mark.parametrize("family", ["open_clip", "hf_clip"])
@pytest.mark.parametrize("placement", ["mlp", "attention+mlp"])
def test_tower_mask_makes_text_embeddings_ignore_the_padding(family, placement):
    ids, changed = ids_with_other_padding()
    for mask, independent in (("tower", True), ("none", False)):
        model = harma.inject_harma_adapters(
            FAMILIES[family](), harma.HarmaConfig(placement=placement, adapter_mask=mask))
        perturb_adapters(model)
        difference = (text_embeddings(model, ids) - text_embeddings(model, changed)).abs().max().item()
        assert (difference < 1e-5) == independent, (mask, difference)


@pytest.mark.parametrize("family", ["open_clip", "hf_clip", "hf_siglip", "timm_vit"])
def test_tower_mask_leaves_vision_towers_and_siglip_text_unmasked(family):
    # Same adapter weights with either mask: only causal towers may compute differently.
    unmasked = harma.inject_harma_adapters(FAMILIES[family](), harma.HarmaConfig(placement="attention+mlp"))
    perturb_adapters(unmasked)
    masked = harma.inject_harma_adapters(
        FAMILIES[family](), harma.HarmaConfig(placement="attention+mlp", adapter_mask="tower"))
    masked.load_state_dict(unmasked.state_dict())
    first, second = outputs(unmasked), outputs(masked)
    assert torch.equal(first[0], second[0])  # images
    if family == "hf_siglip":
        assert torch.equal(first[1], second[1])
    elif family != "timm_vit":
        assert (first[1] - second[1]).abs().max().item() > 1e-4


@pytest.mark.parametrize("family, causal", [
    ("open_clip", {"vision": False, "text": True}),
    ("hf_clip", {"vision": False, "text": True}),
    ("hf_siglip", {"vision": False, "text": False}),
    ("timm_vit", {"vision": False}),
])
def test_find_towers_reports_which_towers_are_causal(family, causal):
    config = harma.HarmaConfig(adapter_mask="tower")
    assert {tower.name: tower.causal for tower in harma.find_towers(FAMILIES[family](), config)} == causal


def test_causal_towers_makes_the_adapters_of_a_pattern_model_causal():
    x = pattern_inputs(batch=1)
    changed = x.clone()
    changed[:, 5:] += torch.randn(changed[:, 5:].shape, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():  # the backbone itself is causal
        assert torch.equal(PatternModel(causal=True)(x)[:, :5], PatternModel(causal=True)(changed)[:, :5])
    for causal_towers, independent in ((("blocks",), True), (None, False)):
        config = pattern_config(adapter_mask="tower", placement="attention+mlp", causal_towers=causal_towers)
        assert [tower.causal for tower in harma.find_towers(PatternModel(causal=True), config)] == [independent]
        model = harma.inject_harma_adapters(PatternModel(causal=True), config)
        perturb_adapters(model)
        with torch.no_grad():
            difference = (model(x)[:, :5] - model(changed)[:, :5]).abs().max().item()
        assert (difference < 1e-5) == independent, (causal_towers, difference)
    with pytest.raises(ValueError, match=r"HarmaConfig\.causal_towers asks for \['text'\].*\['blocks'\]"):
        harma.inject_harma_adapters(PatternModel(), pattern_config(adapter_mask="tower", causal_towers=["text"]))


# --------------------------------------------------------------------------------------------
# 4. attention_passes


def perturbed_adapter(attention_passes: int, causal: bool) -> MultimodalGatedAdapter:
    torch.manual_seed(21)
    adapter = MultimodalGatedAdapter(12, 8, 2, 0.6, 0.6, mini_adapter=MiniAdapter(8, 4, 2, 0.6),
                                     attention_passes=attention_passes, causal=causal)
    with torch.no_grad():
        for param in adapter.parameters():
            param.add_(torch.randn(param.shape) * 0.3)
    return adapter


def reference_attention(module: nn.Module, x: torch.Tensor, causal: bool) -> torch.Tensor:
    """``module`` (a harma SelfAttention) recomputed with torch.nn.MultiheadAttention."""
    attention = nn.MultiheadAttention(module.dim, module.heads, batch_first=True)
    attention.load_state_dict(module.state_dict())
    mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1) if causal else None
    return attention(x, x, x, need_weights=False, attn_mask=mask)[0]


@pytest.mark.parametrize("causal", [False, True])
def test_one_attention_pass_is_attention_then_mini_adapter(causal):
    adapter = perturbed_adapter(attention_passes=1, causal=causal)
    mini = adapter.mini_adapter
    m = torch.randn(2, 6, 12, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        h = F.gelu(adapter.down(m))
        attended = reference_attention(adapter.attn, h, causal)
        u = mini.down(attended)
        mini_gate = torch.sigmoid(mini.gate)
        a = attended + mini.up(mini_gate * reference_attention(mini.attn, u, causal) + (1 - mini_gate) * u)
        g = torch.sigmoid(adapter.gate)
        expected = m + torch.sigmoid(adapter.block_gate) * adapter.up(g * h + (1 - g) * a)
        torch.testing.assert_close(adapter(m), expected, rtol=1e-5, atol=1e-5)

        two_passes = perturbed_adapter(attention_passes=2, causal=causal)
        assert torch.equal(two_passes.down.weight, adapter.down.weight)  # the same parameters
        second = reference_attention(adapter.attn, a, causal)
        expected_two = m + torch.sigmoid(adapter.block_gate) * adapter.up(g * h + (1 - g) * second)
        torch.testing.assert_close(two_passes(m), expected_two, rtol=1e-5, atol=1e-5)
        assert (two_passes(m) - adapter(m)).abs().max().item() > 1e-3


# --------------------------------------------------------------------------------------------
# 5. Sharing of the mini adapter


@pytest.mark.parametrize("sharing, shared_by", [
    ("reference", {"text"}),
    ("paper", {"vision", "text"}),
    ("none", set()),
])
def test_mini_adapter_of_a_layer_is_shared_by_every_mga_the_sharing_rule_gives_one(sharing, shared_by):
    model = harma.inject_harma_adapters(tiny_open_clip(),
                                        harma.HarmaConfig(placement="attention+mlp", sharing=sharing))
    towers = {"vision": model.visual.transformer.resblocks, "text": model.transformer.resblocks}
    per_layer = []
    for layer in range(2):
        minis = {(tower, position): getattr(towers[tower][layer], attribute).mini_adapter
                 for tower in towers for position, attribute in POSITION_ATTRIBUTES.items()}
        used = {mini for (tower, _), mini in minis.items() if tower in shared_by}
        assert all(mini is None for (tower, _), mini in minis.items() if tower not in shared_by)
        if shared_by:
            assert len(used) == 1 and isinstance(next(iter(used)), MiniAdapter)
            per_layer.append(next(iter(used)))
    assert len({id(mini) for mini in per_layer}) == len(per_layer)  # one MMS per layer index

    unique = {id(p): p.numel() for _, adapter in adapters(model) for p in adapter.parameters()}
    assert harma.count_parameters(model).adapter == sum(unique.values())
    own = sum(p.numel() for _, adapter in adapters(model) for name, p in adapter.named_parameters()
              if not name.startswith("mini_adapter."))
    mini_size = sum(p.numel() for p in MiniAdapter(128, 64, 8, 0.6).parameters())
    assert harma.count_parameters(model).adapter == own + len(per_layer) * mini_size


# --------------------------------------------------------------------------------------------
# 6. Batch independence


def test_each_sample_is_computed_as_if_alone_in_its_batch():
    config = harma.HarmaConfig(placement="attention+mlp", adapter_mask="tower")
    model = harma.inject_harma_adapters(tiny_open_clip(), config)
    perturb_adapters(model, scale=0.2)
    with torch.no_grad():
        batched = encode(model, images(3), tokens(3))
        alone = [encode(model, images(3)[i: i + 1], tokens(3)[i: i + 1]) for i in range(3)]
    for output, *single in zip(batched, *alone, strict=True):
        assert (output - torch.cat(single)).abs().max().item() < 1e-4


# --------------------------------------------------------------------------------------------
# 7. Adapter files


ROUND_TRIP_CASES = {
    **{name: ("open_clip", harma.HarmaConfig(**options)) for name, options in OPTION_SETS.items()},
    "paper-attention-only": ("open_clip", harma.HarmaConfig(placement="attention", sharing="paper")),
    "pattern-mixer-causal": ("pattern_mixer", pattern_config(
        placement="attention+mlp", adapter_mask="tower", attention_passes=1, attention_attribute="mixer",
        causal_towers=["blocks"], sharing="paper")),
}


def round_trip_model(kind: str) -> nn.Module:
    return PatternModel(attention_name="mixer", causal=True) if kind == "pattern_mixer" else tiny_open_clip()


@pytest.mark.parametrize("case", ROUND_TRIP_CASES)
def test_adapter_files_round_trip_every_option(tmp_path, case):
    kind, config = ROUND_TRIP_CASES[case]
    model = harma.inject_harma_adapters(round_trip_model(kind), config)
    perturb_adapters(model)
    for target in (tmp_path / "adapters.safetensors", tmp_path / "folder"):
        path = harma.save_adapters(model, target)
        stored = json.loads(harma.read_adapter_file(path).metadata["config"])
        assert {field: stored[field] for field in NEW_FIELDS} == {
            field: json.loads(config.to_json())[field] for field in NEW_FIELDS}
        loaded = harma.load_adapters(round_trip_model(kind), target)
        assert harma.get_harma_config(loaded) == config
        assert adapter_positions(loaded) == adapter_positions(model)
        assert_equal_outputs(loaded, model)


@pytest.mark.parametrize("saved, patched, field", [
    (dict(placement="attention+mlp"), dict(placement="mlp"), "placement"),
    (dict(placement="attention"), dict(placement="attention+mlp"), "placement"),
    (dict(attention_passes=1), dict(attention_passes=2), "attention_passes"),
    (dict(adapter_mask="tower"), dict(adapter_mask="none"), "adapter_mask"),
])
def test_loading_into_a_model_patched_with_other_options_names_the_field(tmp_path, saved, patched, field):
    model = harma.inject_harma_adapters(tiny_open_clip(), harma.HarmaConfig(**saved))
    path = harma.save_adapters(model, tmp_path / "a.safetensors")
    target = harma.inject_harma_adapters(tiny_open_clip(), harma.HarmaConfig(**patched))
    expected = re.escape(f"{field}={saved[field]!r} (model: {patched[field]!r})")
    with pytest.raises(ValueError, match=f"another adapter layout.*{expected}"):
        harma.load_adapters(target, path)


def test_version_1_files_load_as_the_default_layout(tmp_path):
    model = harma.inject_harma_adapters(tiny_open_clip())
    perturb_adapters(model)
    current = harma.read_adapter_file(harma.save_adapters(model, tmp_path / "v2.safetensors"))
    assert current.metadata["format_version"] == "2"
    old_config = {k: v for k, v in json.loads(current.metadata["config"]).items() if k not in NEW_FIELDS}
    assert len(old_config) == len(json.loads(current.metadata["config"])) - len(NEW_FIELDS)
    save_file(dict(current.tensors), str(tmp_path / "v1.safetensors"),
              metadata={**current.metadata, "format_version": "1", "config": json.dumps(old_config)})

    loaded = harma.load_adapters(tiny_open_clip(), tmp_path / "v1.safetensors")
    assert harma.get_harma_config(loaded) == harma.HarmaConfig()
    assert_equal_outputs(loaded, model)
    into_patched = harma.inject_harma_adapters(tiny_open_clip(), harma.HarmaConfig())
    assert_equal_outputs(harma.load_adapters(into_patched, tmp_path / "v1.safetensors"), model)
    with pytest.raises(ValueError, match=re.escape("placement='mlp' (model: 'attention')")):
        harma.load_adapters(harma.inject_harma_adapters(tiny_open_clip(), harma.HarmaConfig(placement="attention")),
                            tmp_path / "v1.safetensors")


# --------------------------------------------------------------------------------------------
# 8. Removal


@pytest.mark.parametrize("kind", ["open_clip", "hf_clip", "pattern_mixer"])
def test_remove_restores_outputs_and_every_hook(kind):
    model = {"open_clip": tiny_open_clip, "hf_clip": tiny_hf_clip,
             "pattern_mixer": lambda: PatternModel(attention_name="mixer", causal=True)}[kind]()
    config = (pattern_config(placement="attention+mlp", attention_attribute="mixer")
              if kind == "pattern_mixer" else harma.HarmaConfig(placement="attention+mlp", adapter_mask="tower"))
    hooks_before = {name: list(module._forward_hooks) for name, module in model.named_modules()}
    keys_before = list(model.state_dict())
    before = outputs(frozen_copy(model))

    harma.inject_harma_adapters(model, config)
    hooked = {name for name, module in model.named_modules() if len(module._forward_hooks) > len(
        hooks_before.get(name, []))}
    assert len(hooked) == 2 * sum(len(tower.block_names) for tower in harma.find_towers(model, config))
    perturb_adapters(model)
    assert max_difference(outputs(model), before) > 1e-4

    harma.remove_harma_adapters(model)
    assert {name: list(module._forward_hooks) for name, module in model.named_modules()} == hooks_before
    assert list(model.state_dict()) == keys_before
    model.requires_grad_(False)
    assert max_difference(outputs(model), before) == 0
    harma.inject_harma_adapters(model, config)  # and it can be patched again
    assert max_difference(outputs(model), before) < 1e-5


# --------------------------------------------------------------------------------------------
# 9. Config validation


@pytest.mark.parametrize("field, value", [
    ("placement", "mlp+attention"),
    ("placement", None),
    ("adapter_mask", "causal"),
    ("attention_passes", 3),
    ("attention_passes", 0),
    ("attention_passes", True),
    ("attention_passes", "2"),
    ("attention_passes", 2.0),
    ("attention_attribute", "not valid"),
    ("attention_attribute", 3),
    ("causal_towers", "text"),
    ("causal_towers", ["text", ""]),
])
def test_invalid_option_values_are_errors_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"HarmaConfig\.{field} must be"):
        harma.HarmaConfig(**{field: value})


def test_from_dict_round_trips_the_new_fields():
    config = harma.HarmaConfig(placement="attention+mlp", adapter_mask="tower", attention_passes=1,
                               attention_attribute="mixer", causal_towers=["text", "vision"])
    assert all(getattr(config, field) != getattr(harma.HarmaConfig(), field) for field in NEW_FIELDS)
    data = json.loads(config.to_json())
    assert data["causal_towers"] == ["text", "vision"]
    for restored in (harma.HarmaConfig.from_dict(data), harma.HarmaConfig.from_json(config.to_json())):
        assert restored == config and hash(restored) == hash(config)
        assert restored.causal_towers == ("text", "vision")
    assert harma.HarmaConfig(**{**config.to_dict(), "causal_towers": ("text", "vision")}) == config
    assert config.positions == ("attention", "mlp")
    assert harma.HarmaConfig(placement="attention").positions == ("attention",)


@pytest.mark.parametrize("placement", ["attention", "attention+mlp"])
def test_pattern_blocks_without_an_attention_submodule_name_attention_attribute(placement):
    with pytest.raises(ValueError, match=r"no attention submodule named 'attn' or 'self_attn' or 'attention'"
                                         r".*HarmaConfig\.attention_attribute"):
        harma.inject_harma_adapters(PatternModel(attention_name=None), pattern_config(placement=placement))
    with pytest.raises(ValueError, match=r"named 'mixer'.*HarmaConfig\.attention_attribute"):
        harma.inject_harma_adapters(PatternModel(attention_name=None),
                                    pattern_config(placement=placement, attention_attribute="mixer"))
    with pytest.raises(ValueError, match="attention_attribute"):  # not found under the usual names
        harma.inject_harma_adapters(PatternModel(attention_name="mixer"), pattern_config(placement=placement))
    model = harma.inject_harma_adapters(PatternModel(attention_name="mixer"),
                                        pattern_config(placement=placement, attention_attribute="mixer"))
    assert model.blocks[0].mixer._forward_hooks
    # the MLP alone needs no attention submodule
    harma.inject_harma_adapters(PatternModel(attention_name=None), pattern_config(placement="mlp"))


# --------------------------------------------------------------------------------------------
# 10. The peft bridge


def test_peft_config_with_the_options_patches_like_harma_and_round_trips(tmp_path):
    pytest.importorskip("peft")
    from peft import get_peft_model

    from harma.integrations.peft import HarmaPeftConfig, load_peft_adapters

    options = dict(placement="attention+mlp", adapter_mask="tower", attention_passes=1)
    model = tiny_open_clip()
    base = frozen_copy(model)
    peft_model = get_peft_model(model, HarmaPeftConfig(**options))
    native = harma.inject_harma_adapters(tiny_open_clip(), harma.HarmaConfig(**options))
    assert harma.get_harma_config(peft_model.get_base_model()) == harma.get_harma_config(native)
    trainable = {name.removeprefix("base_model.model."): tuple(p.shape)
                 for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable == {name: tuple(p.shape) for name, p in native.named_parameters() if p.requires_grad}
    assert any(".harma_attention_adapter." in name for name in trainable)
    assert max_difference(outputs(peft_model), outputs(base)) < 1e-5

    perturb_adapters(peft_model.get_base_model())
    peft_model.save_pretrained(tmp_path)
    loaded = load_peft_adapters(tiny_open_clip(), tmp_path)
    assert harma.get_harma_config(loaded) == harma.HarmaConfig(**options)
    assert_equal_outputs(loaded, peft_model)
    assert max_difference(outputs(loaded), outputs(base)) > 1e-4


# --------------------------------------------------------------------------------------------
# 11. torch.compile


def test_torch_compile_matches_eager_with_adapters_after_attention_and_mlp():
    model = harma.inject_harma_adapters(
        tiny_open_clip(), harma.HarmaConfig(placement="attention+mlp", adapter_mask="tower", attention_passes=1))
    perturb_adapters(model)
    with torch.no_grad():
        expected = (model.encode_image(images()), model.encode_text(tokens()))
        compiled = (torch.compile(model.encode_image, backend="eager", fullgraph=True),
                    torch.compile(model.encode_text, backend="eager", fullgraph=True))
        got = (compiled[0](images()), compiled[1](tokens()))
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        with harma.disable_adapters(model):  # a guard on `enabled` recompiles
            plain = model.encode_text(tokens())
            torch.testing.assert_close(compiled[1](tokens()), plain, rtol=1e-5, atol=1e-5)
        assert (plain - expected[1]).abs().max().item() > 1e-4


def test_a_block_that_cannot_be_adapted_leaves_the_model_untouched():
    # The second block's attention has no nn.Linear, so its output width is unknown: the error
    # must come before any adapter or hook is attached to the first block.
    class NoLinearAttention(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(width, width) * 0.1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(x @ x.transpose(1, 2), -1) @ x @ self.weight

    model = PatternModel(depth=2)
    model.blocks[1].attn = NoLinearAttention(32)
    hooks_before = {name: dict(m._forward_hooks) for name, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"blocks\.1\.attention .*no nn\.Linear"):
        harma.inject_harma_adapters(model, pattern_config(placement="attention+mlp"))
    assert not harma.is_patched(model)
    assert not any(isinstance(m, MultimodalGatedAdapter) for m in model.modules())
    assert {name: dict(m._forward_hooks) for name, m in model.named_modules()} == hooks_before
    harma.inject_harma_adapters(model, pattern_config(placement="mlp"))  # still patchable
