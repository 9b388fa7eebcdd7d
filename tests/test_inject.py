"""Patching models with HarMA adapters: identity at init, freezing, removal, sharing, and the
PyTorch features a patched model must keep working with."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from tiny_models import (
    FAMILIES,
    encode,
    frozen_copy,
    images,
    perturb_adapters,
    tiny_open_clip,
    tokens,
)
from torch import nn

import harma
from harma import inject as inject_module
from harma._precision import tf32_disabled
from harma.modules import MiniAdapter, MultimodalGatedAdapter


def max_difference(first, second) -> float:
    return max((a - b).abs().max().item() for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_model_computes_exactly_what_the_frozen_model_computed(family):
    model = FAMILIES[family]()
    unfrozen = copy.deepcopy(model)
    base = frozen_copy(model)
    harma.inject_harma_adapters(model)
    with torch.no_grad():
        patched = encode(model, images(), tokens())
        assert all(torch.equal(a, b) for a, b in zip(patched, encode(base, images(), tokens()), strict=True))
        # The unfrozen backbone may run other kernels on some CPUs (tiny_models.frozen_copy).
        assert max_difference(patched, encode(unfrozen, images(), tokens())) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_trained_adapters_change_the_output_and_disabling_restores_it(family):
    model = FAMILIES[family]()
    base = frozen_copy(model)
    harma.inject_harma_adapters(model)
    perturb_adapters(model)
    with torch.no_grad():
        reference = encode(base, images(), tokens())
        assert max_difference(encode(model, images(), tokens()), reference) > 1e-3
        with harma.disable_adapters(model):
            assert max_difference(encode(model, images(), tokens()), reference) == 0
        assert max_difference(encode(model, images(), tokens()), reference) > 1e-3


def assert_trained_adapters_keep_samples_apart(model: nn.Module) -> None:
    """Patch ``model`` (paper layout), move its adapters off identity, and check that each sample
    of a batch gets the output it gets alone."""
    harma.inject_harma_adapters(model, harma.HarmaConfig.paper())
    perturb_adapters(model, scale=0.2)
    with torch.no_grad():
        batched = encode(model, images(3), tokens(3))
        alone = [encode(model, images(3)[i : i + 1], tokens(3)[i : i + 1]) for i in range(3)]
    for output, *single in zip(batched, *alone, strict=True):
        assert (output - torch.cat(single)).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_adapters_attend_over_tokens_never_across_the_batch(family):
    # Identity at init cannot tell the token axis from the batch axis (the adapters add zero);
    # trained adapters attending across the batch would make a sample depend on its neighbours.
    model = FAMILIES[family]()
    assert_trained_adapters_keep_samples_apart(model)
    # and the perturbed adapters do mix tokens: changing one token changes another's output.
    block = next(m for m in model.modules() if isinstance(m, MultimodalGatedAdapter))
    features = torch.randn(1, 5, block.width, generator=torch.Generator().manual_seed(4))
    changed = features.clone()
    changed[0, 4] += 1.0
    with torch.no_grad():
        assert (block(features)[0, 0] - block(changed)[0, 0]).abs().max().item() > 1e-4


def _drop_batch_first_attribute(transformer: nn.Module) -> None:
    """Make an open_clip ``Transformer`` look like one from an open_clip without the
    ``batch_first`` attribute: no attribute, blocks always run batch-first."""

    class AttributelessTransformer(type(transformer)):
        def forward(self, x, attn_mask=None):
            for block in self.resblocks:
                x = block(x, attn_mask=attn_mask)
            return x

    assert transformer.batch_first is True
    del transformer.batch_first
    transformer.__class__ = AttributelessTransformer


def test_open_clip_without_a_batch_first_attribute_is_batch_first(monkeypatch):
    model = tiny_open_clip()
    with torch.no_grad():
        reference = encode(model, images(3), tokens(3))
    for transformer in (model.transformer, model.visual.transformer):
        _drop_batch_first_attribute(transformer)
    with torch.no_grad():
        assert max_difference(encode(model, images(3), tokens(3)), reference) == 0  # same model
    assert [tower.batch_first for tower in harma.find_towers(model)] == [True, True]
    assert_trained_adapters_keep_samples_apart(model)


def test_open_clip_before_the_attribute_existed_is_sequence_first(monkeypatch):
    model = tiny_open_clip()
    del model.transformer.batch_first
    monkeypatch.setattr(inject_module, "installed_open_clip_version", lambda: (2, 20, 0))
    towers = {tower.name: tower.batch_first for tower in harma.find_towers(model)}
    assert towers == {"vision": True, "text": False}
    monkeypatch.setattr(inject_module, "installed_open_clip_version", lambda: (3, 9, 0))
    assert all(tower.batch_first for tower in harma.find_towers(model))


def test_every_block_of_both_towers_is_patched_after_its_mlp():
    model = harma.inject_harma_adapters(tiny_open_clip(layers=3))
    patched = [name for name, module in model.named_modules() if isinstance(module, MultimodalGatedAdapter)]
    assert patched == [f"visual.transformer.resblocks.{i}.harma_adapter" for i in range(3)] + [
        f"transformer.resblocks.{i}.harma_adapter" for i in range(3)
    ]
    assert not any("attn" in name and "harma" in name for name in patched)


def test_only_adapter_parameters_require_grad_and_receive_gradients():
    model = harma.inject_harma_adapters(tiny_open_clip())
    perturb_adapters(model)
    image_embeds, text_embeds = encode(model, images(), tokens())
    (image_embeds.sum() + text_embeds.square().sum()).backward()
    for name, param in model.named_parameters():
        if ".harma_adapter." in name:
            assert param.requires_grad, name
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert not param.requires_grad, name
            assert param.grad is None, name


def test_base_state_dict_keys_are_unchanged_and_base_checkpoints_load():
    model = tiny_open_clip()
    base_state = model.state_dict()
    harma.inject_harma_adapters(model)
    keys = set(model.state_dict())
    assert set(base_state) <= keys
    assert all(".harma_adapter." in key for key in keys - set(base_state))
    result = model.load_state_dict(base_state, strict=False)
    assert result.unexpected_keys == []
    assert all(".harma_adapter." in key for key in result.missing_keys)


def test_remove_restores_the_original_model():
    model = tiny_open_clip()
    model.visual.proj.requires_grad_(False)  # the user's own freezing must come back too
    before_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    before_keys = list(model.state_dict())
    with torch.no_grad():
        before = encode(model, images(), tokens())
    harma.inject_harma_adapters(model)
    perturb_adapters(model)
    harma.remove_harma_adapters(model)
    assert list(model.state_dict()) == before_keys
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before_grad
    assert not harma.is_patched(model)
    assert not any(isinstance(m, MultimodalGatedAdapter) for m in model.modules())
    with torch.no_grad():
        assert max_difference(encode(model, images(), tokens()), before) == 0
    harma.inject_harma_adapters(model)  # and it can be patched again


def test_removing_from_a_copy_leaves_the_original_patched():
    model = harma.inject_harma_adapters(tiny_open_clip())
    perturb_adapters(model)
    with torch.no_grad():
        patched = encode(model, images(), tokens())
    clone = harma.remove_harma_adapters(copy.deepcopy(model))
    assert harma.is_patched(model) and not harma.is_patched(clone)
    hooks = [hook for module in model.modules() for hook in module._forward_hooks.values()]
    assert len(hooks) == len(list(harma.inject.adapters(model)))
    assert not any(module._forward_hooks for module in clone.modules())
    with torch.no_grad():
        assert max_difference(encode(model, images(), tokens()), patched) == 0


def test_patching_twice_is_a_clear_error():
    model = harma.inject_harma_adapters(tiny_open_clip())
    with pytest.raises(ValueError, match="already carries HarMA adapters"):
        harma.inject_harma_adapters(model)


def test_model_without_blocks_is_a_clear_error():
    with pytest.raises(ValueError, match="no transformer blocks found in Sequential.*target_modules"):
        harma.inject_harma_adapters(nn.Sequential(nn.Linear(4, 4)))


def test_unknown_tower_and_layer_are_clear_errors():
    with pytest.raises(ValueError, match=r"asks for \['audio'\].*\['vision', 'text'\]"):
        harma.inject_harma_adapters(tiny_open_clip(), harma.HarmaConfig(towers=["audio"]))
    with pytest.raises(ValueError, match="layers has 5, but the vision tower has 2 blocks"):
        harma.inject_harma_adapters(tiny_open_clip(), harma.HarmaConfig(layers=[5]))


def test_choice_of_towers_and_layers():
    model = harma.inject_harma_adapters(tiny_open_clip(layers=4), harma.HarmaConfig(towers=["text"], layers=[0, -1]))
    patched = [name for name, _ in harma.inject.adapters(model)]
    assert patched == ["transformer.resblocks.0.harma_adapter", "transformer.resblocks.3.harma_adapter"]


def test_pattern_reaches_other_models():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ffn = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))

        def forward(self, x):
            return x + self.ffn(x)

    model = nn.Sequential(*[Block() for _ in range(3)])
    x = torch.randn(2, 5, 16)
    expected = frozen_copy(model)(x)
    config = harma.HarmaConfig(target_modules=r"[02]", mlp_attribute="ffn", bottleneck=8, heads=2,
                               mini_bottleneck=4, mini_heads=2)
    harma.inject_harma_adapters(model, config)
    assert [name for name, _ in harma.inject.adapters(model)] == ["0.harma_adapter", "2.harma_adapter"]
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="has no submodule 'mlp'"):
        harma.inject_harma_adapters(nn.Sequential(Block()), harma.HarmaConfig(target_modules=r"0"))


def test_reference_layout_shares_one_mini_adapter_per_layer_with_the_text_tower_only():
    model = harma.inject_harma_adapters(tiny_open_clip())
    for i in range(2):
        assert model.visual.transformer.resblocks[i].harma_adapter.mini_adapter is None
        assert isinstance(model.transformer.resblocks[i].harma_adapter.mini_adapter, MiniAdapter)
    assert model.transformer.resblocks[0].harma_adapter.mini_adapter is not (
        model.transformer.resblocks[1].harma_adapter.mini_adapter
    )


def test_paper_layout_shares_the_mini_adapter_of_layer_i_across_towers():
    model = harma.inject_harma_adapters(tiny_open_clip(vision_width=96), harma.HarmaConfig.paper())
    for i in range(2):
        vision = model.visual.transformer.resblocks[i].harma_adapter.mini_adapter
        text = model.transformer.resblocks[i].harma_adapter.mini_adapter
        assert vision is text and vision is not None
    none = harma.inject_harma_adapters(tiny_open_clip(), harma.HarmaConfig(sharing="none"))
    assert all(adapter.mini_adapter is None for _, adapter in harma.inject.adapters(none))


def test_vit_b32_reference_layout_has_the_published_parameter_count(capsys):
    import open_clip

    model = open_clip.create_model("ViT-B-32")
    assert harma.count_parameters(model).all == 151_277_313
    harma.inject_harma_adapters(model)
    counts = harma.print_trainable_parameters(model)
    assert counts.trainable == counts.adapter == 5_934_396
    assert counts.all == 151_277_313 + 5_934_396
    assert "trainable params: 5,934,396 || all params: 157,211,709 || trainable%: 3.7748" in capsys.readouterr().out
    per_layer_image = sum(p.numel() for p in model.visual.transformer.resblocks[0].harma_adapter.parameters())
    assert per_layer_image == 263_553 + 1  # MGA + its block gate


def test_deepcopy_and_pickle_keep_adapters_independent_and_shared_where_they_were():
    model = harma.inject_harma_adapters(tiny_open_clip(), harma.HarmaConfig.paper())
    perturb_adapters(model)
    with torch.no_grad():
        expected = encode(model, images(), tokens())
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert harma.is_patched(clone)
        with torch.no_grad():
            assert max_difference(encode(clone, images(), tokens()), expected) == 0
        vision = clone.visual.transformer.resblocks[0].harma_adapter
        text = clone.transformer.resblocks[0].harma_adapter
        assert vision.mini_adapter is text.mini_adapter
        assert vision is not model.visual.transformer.resblocks[0].harma_adapter
        with torch.no_grad():  # the clone's hooks use the clone's adapters, not the original's
            vision.up.bias.add_(torch.randn(vision.up.bias.shape))
            assert max_difference(encode(clone, images(), tokens()), expected) > 1e-3
            assert max_difference(encode(model, images(), tokens()), expected) == 0
        harma.remove_harma_adapters(clone)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_casting_to_half_precision(dtype):
    model = tiny_open_clip()
    harma.inject_harma_adapters(model)
    perturb_adapters(model)
    with torch.no_grad():
        expected = encode(model, images(), tokens())
    model.to(dtype)
    assert all(p.dtype == dtype for p in harma.adapter_parameters(model))
    with torch.no_grad():
        result = encode(model, images().to(dtype), tokens())
    assert all(r.dtype == dtype and torch.isfinite(r).all() for r in result)
    assert max_difference([r.float() for r in result], expected) < 0.1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adapters_on_a_half_precision_backbone_are_float32_unless_asked_otherwise(dtype, tmp_path):
    model = tiny_open_clip().to(dtype)
    base = frozen_copy(model)
    harma.inject_harma_adapters(model)
    assert all(p.dtype == torch.float32 for p in harma.adapter_parameters(model))
    assert all(p.dtype == dtype for n, p in model.named_parameters() if "harma" not in n)
    with torch.no_grad():
        assert max_difference(encode(model, images().to(dtype), tokens()),
                              encode(base, images().to(dtype), tokens())) == 0
    perturb_adapters(model)
    reference = tiny_open_clip()
    harma.load_adapters(reference, harma.save_adapters(model, tmp_path / "a.safetensors"))
    with torch.no_grad():
        result = encode(model, images().to(dtype), tokens())
        expected = encode(reference, images(), tokens())
    assert all(r.dtype == dtype for r in result)
    # Half-precision backbone against a float32 one: the backbone's rounding, not the adapters'.
    assert max_difference([r.float() for r in result], expected) < 0.1
    half = harma.inject_harma_adapters(tiny_open_clip().to(dtype), autocast_adapter_dtype=False)
    assert all(p.dtype == dtype for p in harma.adapter_parameters(half))
    harma.load_adapters(half, tmp_path / "a.safetensors")
    with torch.no_grad():
        assert max_difference([r.float() for r in encode(half, images().to(dtype), tokens())], expected) < 0.1


def test_autocast_forward_and_backward():
    model = harma.inject_harma_adapters(tiny_open_clip())
    perturb_adapters(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        image_embeds, text_embeds = encode(model, images(), tokens())
    assert image_embeds.dtype == torch.bfloat16
    (image_embeds.float().sum() + text_embeds.float().sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in harma.adapter_parameters(model))


def test_gradient_checkpointing_gives_the_same_gradients():
    def gradients(checkpointing: bool) -> list[torch.Tensor]:
        model = harma.inject_harma_adapters(tiny_open_clip())
        perturb_adapters(model)
        model.set_grad_checkpointing(checkpointing)
        model.train()
        image_embeds, text_embeds = encode(model, images(), tokens())
        (image_embeds.square().sum() + text_embeds.square().sum()).backward()
        return [p.grad.clone() for p in harma.adapter_parameters(model)]

    for with_checkpointing, without in zip(gradients(True), gradients(False), strict=True):
        torch.testing.assert_close(with_checkpointing, without)


def test_torch_compile_runs_the_adapters():
    model = harma.inject_harma_adapters(tiny_open_clip())
    perturb_adapters(model)
    with torch.no_grad():
        expected = model.encode_image(images())
    compiled = torch.compile(model.encode_image, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(images()), expected, rtol=1e-5, atol=1e-5)
        with harma.disable_adapters(model):  # a guard on `enabled` recompiles, not stale output
            plain = model.encode_image(images())
            torch.testing.assert_close(compiled(images()), plain, rtol=1e-5, atol=1e-5)


def test_config_validation_and_json_round_trip():
    config = harma.HarmaConfig(sharing="paper", towers=["text"], layers=[0, -1], bottleneck=64)
    assert harma.HarmaConfig.from_json(config.to_json()) == config
    assert json.loads(config.to_json())["layers"] == [0, -1]
    with pytest.raises(ValueError, match="heads=6 must divide bottleneck=128"):
        harma.HarmaConfig(heads=6)
    with pytest.raises(ValueError, match="sharing must be one of"):
        harma.HarmaConfig(sharing="both")
    with pytest.raises(ValueError, match="bottleneck must be a positive integer"):
        harma.HarmaConfig(bottleneck=0)
    with pytest.raises(ValueError, match="gate_init must be a finite number"):
        harma.HarmaConfig(gate_init="high")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        harma.HarmaConfig(target_modules="(")
    with pytest.raises(ValueError, match=r"unknown HarmaConfig field\(s\) \['bottle_neck'\]"):
        harma.HarmaConfig.from_dict({"bottle_neck": 3})
    with pytest.raises(ValueError, match="towers must be a list"):
        harma.HarmaConfig(towers="text")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_forward_matches_the_cpu_forward():
    model = harma.inject_harma_adapters(tiny_open_clip())
    perturb_adapters(model)
    # TF32 off: float32 on both sides, whatever the process set (cuDNN's default convolutions
    # are TF32, 10 mantissa bits, which alone takes the patch embedding to the edge of 1e-4).
    with torch.no_grad(), tf32_disabled():
        expected = encode(model, images(), tokens())
        model.cuda()
        got = encode(model, images().cuda(), tokens().cuda())  # the fused attention kernel path
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4)


def test_a_meta_device_model_is_refused_with_what_to_do():
    with torch.device("meta"):
        model = tiny_open_clip()
    with pytest.raises(ValueError, match=r"on the meta device.*to_empty.*garbage.*Materialise the model first: "
                                         r"model\.to_empty\(device=\.\.\.\) and load its weights"):
        harma.inject_harma_adapters(model)
    assert not harma.is_patched(model) and not any(m._forward_hooks for m in model.modules())
    model.to_empty(device="cpu")
    model.load_state_dict(tiny_open_clip().state_dict())
    reference = tiny_open_clip()
    for patched in (model, reference):
        torch.manual_seed(3)
        harma.inject_harma_adapters(patched)
    expected = dict(inject_module.adapter_named_parameters(reference))
    for name, param in inject_module.adapter_named_parameters(model):  # their initial values, not garbage
        assert param.device.type == "cpu" and torch.equal(param, expected[name])


@pytest.mark.parametrize("wrap", [torch.compile, nn.DataParallel, lambda m: nn.DataParallel(torch.compile(m))],
                         ids=["compile", "data_parallel", "both"])
def test_wrappers_are_looked_through(wrap):
    model = tiny_open_clip()
    wrapped = wrap(model)
    assert inject_module.unwrap_model(wrapped) is model
    assert harma.inject_harma_adapters(wrapped) is wrapped
    assert harma.is_patched(model) and harma.is_patched(wrapped)
    assert harma.get_harma_config(wrapped) is harma.get_harma_config(model)
    assert all(not name.startswith(("module.", "_orig_mod.")) for name, _ in
               inject_module.adapter_named_parameters(inject_module.unwrap_model(wrapped)))
    harma.remove_harma_adapters(wrapped)
    assert not harma.is_patched(model) and all(p.requires_grad for p in model.parameters())
