"""What peft expects of every tuner (its generic tests check these for each method), held by HarMA,
or refused with an error that names the reason."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import encode, frozen_copy, images, perturb_adapters, tiny_hf_clip, tiny_open_clip, tokens
from torch import nn

import harma
from harma.named_adapters import adapter_name_of_key

peft = pytest.importorskip("peft")
from peft import PeftModel, get_base_model_state_dict, get_peft_model, set_base_model_state_dict  # noqa: E402
from peft.utils.hotswap import hotswap_adapter  # noqa: E402

from harma.integrations.peft import PEFT_TYPE, HarmaPeftConfig, HarmaTunerLayer, load_peft_adapters  # noqa: E402

ROWS = ["other", "__base__", "default", "other"]


def outputs(model: nn.Module, batch: int = 3) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return encode(model, images(batch), tokens(batch))


def two_set_peft_model() -> PeftModel:
    """"default" (reference layout) and "other" (paper layout), both moved off identity, "default"
    active, in eval mode."""
    peft_model = get_peft_model(tiny_open_clip(), HarmaPeftConfig())
    perturb_adapters(peft_model.get_base_model(), seed=3)
    peft_model.add_adapter("other", HarmaPeftConfig(sharing="paper"))
    peft_model.set_adapter("other")
    perturb_adapters(peft_model.get_base_model(), seed=4)
    peft_model.set_adapter("default")
    return peft_model.eval()


def trainable_sets(model: nn.Module) -> set[str | None]:
    return {adapter_name_of_key(name) for name, p in model.named_parameters() if p.requires_grad}


def test_mixed_adapter_batches_run_each_row_through_its_adapter():
    peft_model = two_set_peft_model()
    with torch.no_grad():
        image_features, text_features, _ = peft_model(images(len(ROWS)), tokens(len(ROWS)), adapter_names=ROWS)
    base = frozen_copy(tiny_open_clip())
    for name in ("default", "other", "__base__"):
        rows = [i for i, row_name in enumerate(ROWS) if row_name == name]
        if name != "__base__":
            peft_model.set_adapter(name)
        reference = base if name == "__base__" else peft_model
        with torch.no_grad():
            alone = reference(images(len(ROWS))[rows], tokens(len(ROWS))[rows])
        # Each group alone runs the backbone at another batch size: 1e-5, not bitwise.
        torch.testing.assert_close(image_features[rows], alone[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(text_features[rows], alone[1], rtol=1e-5, atol=1e-5)
    peft_model.set_adapter("default")
    with torch.no_grad():
        plain = peft_model(images(len(ROWS)), tokens(len(ROWS)))
    assert (plain[0][0] - image_features[0]).abs().max() > 1e-3  # row 0 took "other", not the active set


def test_mixed_adapter_batches_refuse_unknown_names_and_training_mode():
    peft_model = two_set_peft_model()
    with pytest.raises(ValueError, match="non-existing adapter"):
        peft_model(images(2), tokens(2), adapter_names=["default", "typo"])
    peft_model.train()
    with pytest.raises(ValueError, match="training mode"):
        peft_model(images(2), tokens(2), adapter_names=["default", "other"])


def test_the_base_model_state_dict_holds_the_backbone_alone_and_loads_back():
    peft_model = two_set_peft_model()
    plain = tiny_open_clip(seed=5)
    base_state = get_base_model_state_dict(peft_model)
    assert base_state.keys() == plain.state_dict().keys()
    plain.load_state_dict(base_state)  # strict
    assert all(torch.equal(plain.state_dict()[key], value) for key, value in base_state.items())

    target = two_set_peft_model()
    other_backbone = tiny_open_clip(seed=6).state_dict()
    assert set_base_model_state_dict(target, other_backbone) == ([], [])
    assert all(torch.equal(value, other_backbone[key]) for key, value in get_base_model_state_dict(target).items())
    adapters = harma.io.adapter_state_dict(target.get_base_model(), "other")
    assert all(torch.equal(value, adapters[key])
               for key, value in harma.io.adapter_state_dict(peft_model.get_base_model(), "other").items())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adapters_on_a_half_precision_base_follow_autocast_adapter_dtype(dtype, tmp_path):
    peft_model = get_peft_model(tiny_open_clip().to(dtype), HarmaPeftConfig())
    assert {p.dtype for p in harma.adapter_parameters(peft_model.get_base_model())} == {torch.float32}
    peft_model.add_adapter("kept", HarmaPeftConfig(), autocast_adapter_dtype=False)
    assert {p.dtype for p in harma.adapter_parameters(peft_model.get_base_model(), "kept")} == {dtype}
    same = get_peft_model(tiny_open_clip().to(dtype), HarmaPeftConfig(), autocast_adapter_dtype=False)
    assert {p.dtype for p in harma.adapter_parameters(same.get_base_model())} == {dtype}
    perturb_adapters(peft_model.get_base_model())
    with torch.no_grad():
        result = peft_model(images().to(dtype), tokens())
    assert result[0].dtype == dtype and torch.isfinite(result[0]).all()
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_open_clip().to(dtype), tmp_path)
    assert {p.dtype for p in harma.adapter_parameters(loaded.get_base_model())} == {torch.float32}


def test_set_requires_grad_sets_any_adapter_and_a_training_switch_resets_it():
    peft_model = two_set_peft_model()
    base = peft_model.get_base_model()
    peft_model.set_requires_grad("other")
    assert trainable_sets(base) == {"default", "other"}
    peft_model.set_requires_grad(["default", "other"], False)
    assert trainable_sets(base) == set()
    with pytest.raises(ValueError, match="unknown adapter"):
        peft_model.set_requires_grad("typo")
    peft_model.set_adapter("other")
    assert trainable_sets(base) == {"other"}


def test_disable_adapter_freezes_the_adapters_inside_and_restores_them():
    peft_model = two_set_peft_model()
    base = peft_model.get_base_model()
    with peft_model.disable_adapter():
        assert trainable_sets(base) == set()
        assert not any(p.requires_grad for p in peft_model.parameters())
        assert peft_model.get_model_status().enabled is False
    assert trainable_sets(base) == {"default"}


def test_layer_and_model_status_describe_every_adapter():
    peft_model = two_set_peft_model()
    layers = peft_model.get_layer_status()
    adapters = [name for name, m in peft_model.get_base_model().named_modules() if isinstance(m, HarmaTunerLayer)]
    assert [layer.name.removeprefix("model.") for layer in layers] == adapters
    assert all(layer.active_adapters == ["default"] for layer in layers)
    status = peft_model.get_model_status()
    assert status.peft_types == {"default": "HARMA", "other": "HARMA"}
    assert status.available_adapters == ["default", "other"] and status.active_adapters == ["default"]
    assert status.requires_grad == {"default": True, "other": False}
    assert status.enabled is True and status.merged_adapters == []


def test_modules_to_save_are_trained_saved_and_restored_per_adapter(tmp_path):
    config = HarmaPeftConfig(modules_to_save=["visual_projection"])
    peft_model = get_peft_model(tiny_hf_clip(), config)
    assert any("visual_projection.modules_to_save.default" in name and p.requires_grad
               for name, p in peft_model.named_parameters())
    late = HarmaPeftConfig()
    late.modules_to_save = ["text_projection"]  # set after construction, as peft's configs allow
    peft_model.add_adapter("late", late)
    copy = peft_model.base_model.model.text_projection.modules_to_save["late"]
    perturb_adapters(peft_model.get_base_model())
    with torch.no_grad():
        copy.weight.add_(1.0)
    peft_model.set_adapter("late")
    expected = outputs(peft_model)
    peft_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="only a PeftModel can put back"):
        load_peft_adapters(tiny_hf_clip(), tmp_path / "late")
    loaded = PeftModel.from_pretrained(tiny_hf_clip(), tmp_path / "late", adapter_name="late")
    for a, b in zip(outputs(loaded), expected, strict=True):
        assert torch.equal(a, b)
    assert json.loads((tmp_path / "late" / "adapter_config.json").read_text())["modules_to_save"] == [
        "text_projection"]


def test_combining_mixing_and_hotswapping_are_refused_with_the_reason(tmp_path):
    peft_model = two_set_peft_model()
    with pytest.raises(ValueError, match="cannot be combined by weights"):
        peft_model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix")
    with pytest.raises(ValueError, match="'HARMA' is not compatible with the `PeftMixedModel`"):
        get_peft_model(tiny_open_clip(), HarmaPeftConfig(), mixed=True)
    peft_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Hotswapping only supports .* but HARMA was passed"):
        hotswap_adapter(peft_model, str(tmp_path), adapter_name="default", torch_device="cpu")


def test_the_peft_type_formats_like_peft_s_own():
    assert PEFT_TYPE == "HARMA" and PEFT_TYPE.value == "HARMA" and hash(PEFT_TYPE) == hash("HARMA")
    assert json.loads(json.dumps({"peft_type": PEFT_TYPE})) == {"peft_type": "HARMA"}
    assert HarmaPeftConfig().peft_type.value == "HARMA"
