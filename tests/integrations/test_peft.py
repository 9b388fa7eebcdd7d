"""HarMA through peft's own API: get_peft_model, save_pretrained, PeftModel.from_pretrained."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
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

peft = pytest.importorskip("peft")
from peft import PeftModel, get_peft_model  # noqa: E402
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING  # noqa: E402

from harma.integrations import peft as harma_peft  # noqa: E402
from harma.integrations.peft import HarmaPeftConfig, load_peft_adapters, register_with_peft  # noqa: E402

LAYOUTS = {
    "reference": HarmaPeftConfig,
    "paper": lambda: HarmaPeftConfig(sharing="paper"),
    "none_last_layer": lambda: HarmaPeftConfig(sharing="none", layers=[-1]),
}



def outputs(model: nn.Module) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return encode(model, images(), tokens())


def assert_same(first: tuple[torch.Tensor, ...], second: tuple[torch.Tensor, ...]) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def trained_peft_model(config: HarmaPeftConfig | None = None) -> PeftModel:
    model = get_peft_model(tiny_open_clip(), config or HarmaPeftConfig())
    perturb_adapters(model.get_base_model())
    return model


# --------------------------------------------------------------------------------------------
# Creating


@pytest.mark.parametrize("family", FAMILIES)
def test_get_peft_model_is_the_identity_at_initialisation(family):
    model = FAMILIES[family]()
    reference = frozen_copy(model)
    peft_model = get_peft_model(model, HarmaPeftConfig())
    assert isinstance(peft_model, PeftModel)
    assert harma.is_patched(peft_model.get_base_model())
    assert_same(outputs(peft_model), outputs(reference))


def test_open_clip_forward_with_image_and_text_goes_through_the_peft_wrapper():
    model = tiny_open_clip()
    reference = frozen_copy(model)
    peft_model = get_peft_model(model, HarmaPeftConfig())
    with torch.no_grad():
        got = peft_model(images(), tokens())
        want = reference(images(), tokens())
    assert_same(got, want)  # (image features, text features, logit scale)
    perturb_adapters(peft_model.get_base_model())
    with torch.no_grad():
        moved = peft_model(images(), tokens())
    assert not torch.equal(moved[0], want[0]) and not torch.equal(moved[1], want[1])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_only_adapters_are_trainable_and_peft_counts_agree_with_harma(layout, capsys):
    peft_model = get_peft_model(tiny_open_clip(), LAYOUTS[layout]())
    base = peft_model.get_base_model()
    trainable = {name for name, p in base.named_parameters() if p.requires_grad}
    adapters = {name for name, _ in harma.inject.adapter_named_parameters(base)}
    assert trainable == adapters and trainable
    assert all(".harma_adapter." in name for name in trainable)

    counts = harma.count_parameters(base)
    assert peft_model.get_nb_trainable_parameters() == (counts.trainable, counts.all)
    assert counts.trainable == counts.adapter
    peft_model.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == str(counts)


def test_the_parameter_count_on_vit_b_32_is_the_papers_total():
    import open_clip

    peft_model = get_peft_model(open_clip.create_model("ViT-B-32"), HarmaPeftConfig())
    assert peft_model.get_nb_trainable_parameters()[0] == 5_934_396


def test_a_training_step_through_peft_moves_only_the_adapters():
    peft_model = get_peft_model(tiny_open_clip(), HarmaPeftConfig(sharing="paper"))
    before = {name: p.detach().clone() for name, p in peft_model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    image_features, text_features, _ = peft_model(images(), tokens())
    loss = -torch.nn.functional.cosine_similarity(image_features, text_features).sum()
    loss.backward()
    optimizer.step()
    changed = {name for name, p in peft_model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(".harma_adapter." in name for name in changed)


def test_the_model_keeps_the_users_config_and_saved_folders_record_the_architecture(tmp_path):
    config = HarmaPeftConfig()
    peft_model = get_peft_model(tiny_open_clip(), config)
    assert peft_model.peft_config["default"] is config  # peft's convention
    peft_model.save_pretrained(tmp_path / "two")
    assert json.loads((tmp_path / "two" / "adapter_config.json").read_text())["fingerprint"] == [
        {"name": "vision", "path": "visual.transformer.resblocks", "blocks": 2, "width": 64},
        {"name": "text", "path": "transformer.resblocks", "blocks": 2, "width": 64},
    ]
    # The same config object goes on to a model of another size, even after saving.
    other = get_peft_model(tiny_open_clip(layers=3), config)
    other.save_pretrained(tmp_path / "three")
    assert json.loads((tmp_path / "three" / "adapter_config.json").read_text())["fingerprint"][0]["blocks"] == 3
    with pytest.raises(ValueError, match="blocks"):
        PeftModel.from_pretrained(tiny_open_clip(), tmp_path / "three")


# --------------------------------------------------------------------------------------------
# Saving and loading


@pytest.mark.parametrize("layout", LAYOUTS)
def test_save_pretrained_from_pretrained_round_trip_reproduces_outputs_exactly(tmp_path, layout):
    peft_model = trained_peft_model(LAYOUTS[layout]())
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_open_clip(), tmp_path)
    assert_same(outputs(loaded), outputs(peft_model))
    assert harma.get_harma_config(loaded.get_base_model()) == harma.get_harma_config(peft_model.get_base_model())
    # peft's default: loaded for inference, adapters frozen, eval mode.
    assert not any(p.requires_grad for p in loaded.parameters())
    assert not loaded.training
    trainable = PeftModel.from_pretrained(tiny_open_clip(), tmp_path, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        n for n, p in peft_model.named_parameters() if p.requires_grad
    }


@pytest.mark.parametrize("family", ["hf_clip", "hf_siglip", "timm_vit", "timm_vit_by_pattern"])
def test_round_trip_for_other_model_families(tmp_path, family):
    if family == "timm_vit_by_pattern":  # a model of an "unknown" family, found through target_modules
        family, config = "timm_vit", HarmaPeftConfig(sharing="paper", target_modules=r"blocks\.\d+")
    else:
        config = HarmaPeftConfig(sharing="paper")
    peft_model = get_peft_model(FAMILIES[family](), config)
    perturb_adapters(peft_model.get_base_model())
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(FAMILIES[family](), tmp_path)
    assert_same(outputs(loaded), outputs(peft_model))
    assert_same(outputs(load_peft_adapters(FAMILIES[family](), tmp_path)), outputs(peft_model))


def test_the_saved_folder_holds_the_adapters_once_with_the_harma_names(tmp_path):
    peft_model = trained_peft_model(HarmaPeftConfig(sharing="paper"))
    peft_model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "HARMA" and config["sharing"] == "paper"
    assert config["fingerprint"][1] == {"name": "text", "path": "transformer.resblocks", "blocks": 2, "width": 64}
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as reader:
        keys = set(reader.keys())
    harma_file = harma.save_adapters(peft_model.get_base_model(), tmp_path / "native.safetensors")
    with safe_open(str(harma_file), framework="pt") as reader:
        native_keys = set(reader.keys())
    # The same tensors as a harma file (a shared MMS once), with peft's prefix.
    assert keys == {f"base_model.model.{key}" for key in native_keys}


def test_peft_folders_load_into_plain_models_and_convert_to_harma_files(tmp_path):
    peft_model = trained_peft_model(HarmaPeftConfig(sharing="paper"))
    peft_model.save_pretrained(tmp_path / "peft")
    plain = load_peft_adapters(tiny_open_clip(), tmp_path / "peft")
    assert not isinstance(plain, PeftModel)
    assert_same(outputs(plain), outputs(peft_model))
    vision_mms = plain.visual.transformer.resblocks[0].harma_adapter.mini_adapter
    assert vision_mms is plain.transformer.resblocks[0].harma_adapter.mini_adapter  # still shared
    harma.save_adapters(plain, tmp_path / "native.safetensors")
    assert_same(outputs(harma.load_adapters(tiny_open_clip(), tmp_path / "native.safetensors")), outputs(peft_model))
    # Into an already patched model of the same layout, too.
    patched = harma.inject_harma_adapters(tiny_open_clip(), harma.HarmaConfig.paper())
    assert_same(outputs(load_peft_adapters(patched, tmp_path / "peft")), outputs(peft_model))
    # harma.load_adapters cannot read peft's header, and says which loader can.
    with pytest.raises(ValueError, match=r"written by peft's save_pretrained: load it with .*load_peft_adapters"):
        harma.load_adapters(tiny_open_clip(), tmp_path / "peft")


def test_harma_models_go_into_peft_and_back(tmp_path):
    # A model trained with the native API, saved as a harma file ...
    native = harma.inject_harma_adapters(tiny_open_clip(), harma.HarmaConfig.paper())
    perturb_adapters(native)
    path = harma.save_adapters(native, tmp_path / "a.safetensors")
    # ... loads into a peft-wrapped model with harma.load_adapters on its base model.
    peft_model = get_peft_model(tiny_open_clip(), HarmaPeftConfig.from_harma_config(harma.HarmaConfig.paper()))
    harma.load_adapters(peft_model.get_base_model(), path)
    assert_same(outputs(peft_model), outputs(native))


def test_a_harma_folder_loads_with_peft(tmp_path):
    native = harma.inject_harma_adapters(tiny_open_clip(), harma.HarmaConfig.paper())
    perturb_adapters(native)
    harma.save_adapters(native, tmp_path, base_model="tiny")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "HARMA"
    loaded = PeftModel.from_pretrained(tiny_open_clip(), tmp_path)
    assert loaded.peft_config["default"].sharing == "paper"
    assert loaded.peft_config["default"].base_model_name_or_path == "tiny"
    assert_same(outputs(loaded), outputs(native))


def test_another_architecture_is_named_before_anything_is_loaded(tmp_path):
    trained_peft_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"towers vision \(2 blocks of width 64\).*vision \(3 blocks of width 64\)"):
        PeftModel.from_pretrained(tiny_open_clip(layers=3), tmp_path)
    with pytest.raises(ValueError, match=r"3 blocks"):
        load_peft_adapters(tiny_open_clip(layers=3), tmp_path)


def test_missing_extra_and_misshapen_tensors_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    trained_peft_model().save_pretrained(tmp_path)
    weights_path = tmp_path / "adapter_model.safetensors"
    weights = load_file(str(weights_path))
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "fingerprint": None}))  # reach the tensor checks
    dropped = "base_model.model.visual.transformer.resblocks.1.harma_adapter.gate"

    save_file({k: v for k, v in weights.items() if k != dropped}, str(weights_path))
    with pytest.raises(ValueError, match=r"1 adapter tensor\(s\) missing .*resblocks\.1\.harma_adapter\.gate"):
        PeftModel.from_pretrained(tiny_open_clip(), tmp_path)

    save_file({**weights, "base_model.model.extra.harma_adapter.x": torch.zeros(1)}, str(weights_path))
    with pytest.raises(ValueError, match=r"no place in the model.*extra\.harma_adapter\.x"):
        PeftModel.from_pretrained(tiny_open_clip(), tmp_path)

    save_file({**weights, dropped: torch.zeros(2)}, str(weights_path))
    with pytest.raises(ValueError, match=r"has shape \(2,\) in the file but \(\) in the model"):
        PeftModel.from_pretrained(tiny_open_clip(), tmp_path)
    plain = tiny_open_clip()
    with pytest.raises(ValueError, match=r"has shape \(2,\)"):
        load_peft_adapters(plain, tmp_path)
    assert not harma.is_patched(plain)  # a failed load leaves the model as it was


def test_other_peft_methods_and_other_layouts_are_refused_by_load_peft_adapters(tmp_path):
    from peft import LoraConfig

    lora = get_peft_model(tiny_open_clip(), LoraConfig(target_modules=["c_fc"], r=2))
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match="holds LORA adapters, not HarMA adapters"):
        load_peft_adapters(tiny_open_clip(), tmp_path / "lora")
    trained_peft_model(HarmaPeftConfig(sharing="paper")).save_pretrained(tmp_path / "paper")
    with pytest.raises(ValueError, match=r"another adapter layout.*sharing='paper' \(model: 'reference'\)"):
        load_peft_adapters(harma.inject_harma_adapters(tiny_open_clip()), tmp_path / "paper")


def test_hub_ids_resolve_from_the_local_cache_when_offline(tmp_path):
    peft_model = trained_peft_model()
    cache = tmp_path / "hub"
    repo = cache / "models--someone--harma-peft-tiny"
    peft_model.save_pretrained(repo / "snapshots" / ("b" * 40))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("b" * 40)
    expected = tmp_path / "expected.pt"
    torch.save(outputs(peft_model), expected)
    script = (
        "import sys, torch; sys.path.insert(0, 'tests')\n"
        "from peft import PeftModel\n"
        "from harma.integrations.peft import load_peft_adapters\n"
        "from tiny_models import tiny_open_clip, encode, images, tokens\n"
        f"want = torch.load({str(expected)!r})\n"
        "for model in (PeftModel.from_pretrained(tiny_open_clip(), 'someone/harma-peft-tiny'),\n"
        "              load_peft_adapters(tiny_open_clip(), 'someone/harma-peft-tiny')):\n"
        "    with torch.no_grad(): got = encode(model, images(), tokens())\n"
        "    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))\n"
        "print('ok')\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


# --------------------------------------------------------------------------------------------
# Switching, removing, the limits


def test_disable_adapter_gives_the_backbone_and_restores_the_adapters():
    model = tiny_open_clip()
    reference = frozen_copy(model)
    peft_model = get_peft_model(model, HarmaPeftConfig())
    perturb_adapters(peft_model.get_base_model())
    adapted = outputs(peft_model)
    with peft_model.disable_adapter():
        assert_same(outputs(peft_model), outputs(reference))
    assert_same(outputs(peft_model), adapted)
    status = peft_model.get_model_status()
    assert status.enabled is True and status.active_adapters == ["default"]
    assert status.trainable_params == harma.count_parameters(model).trainable


def test_unload_returns_the_backbone_and_merging_is_refused():
    model = tiny_open_clip()
    reference = frozen_copy(model)
    peft_model = trained_peft_model()
    with pytest.raises(ValueError, match="cannot be merged"):
        peft_model.merge_and_unload()
    peft_model = get_peft_model(model, HarmaPeftConfig())
    perturb_adapters(model)
    base = peft_model.unload()
    assert base is model and not harma.is_patched(base)
    assert not hasattr(base, "peft_config")
    assert all(p.requires_grad for p in base.parameters())  # trainability as before patching
    base.requires_grad_(False)
    assert_same(outputs(base), outputs(reference))


def test_a_model_patched_by_harma_itself_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match=r"HarMA adapters \['default'\] that peft does not manage"):
        get_peft_model(harma.inject_harma_adapters(tiny_open_clip()), HarmaPeftConfig())


def test_low_cpu_mem_usage_is_refused_with_a_clear_error(tmp_path):
    trained_peft_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="low_cpu_mem_usage=True is not supported"):
        PeftModel.from_pretrained(tiny_open_clip(), tmp_path, low_cpu_mem_usage=True)
    with pytest.raises(ValueError, match="low_cpu_mem_usage=True is not supported"):
        get_peft_model(tiny_open_clip(), HarmaPeftConfig(), low_cpu_mem_usage=True)


def test_set_adapter_and_set_requires_grad_switch_training():
    peft_model = get_peft_model(tiny_open_clip(), HarmaPeftConfig())
    peft_model.set_requires_grad("default", False)
    assert not any(p.requires_grad for p in peft_model.parameters())
    peft_model.set_adapter("default")
    assert any(p.requires_grad for p in peft_model.parameters())
    with pytest.raises(ValueError, match="unknown adapter"):
        peft_model.base_model.set_adapter("other")


# --------------------------------------------------------------------------------------------
# Several adapters on one model

B_CONFIG = {"sharing": "paper", "layers": [-1]}  # another layout than "default", a shared MMS


def perturb_set(model: nn.Module, adapter_name: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in harma.adapter_parameters(model, adapter_name):
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)


def two_adapter_model() -> PeftModel:
    """"default" (reference layout) and "b" (B_CONFIG), both trained, "default" active."""
    peft_model = trained_peft_model()
    peft_model.add_adapter("b", HarmaPeftConfig(**B_CONFIG))
    perturb_set(peft_model.get_base_model(), "b", seed=4)
    return peft_model


def single_adapter_copy(peft_model: PeftModel, adapter_name: str, config: HarmaPeftConfig) -> PeftModel:
    """A fresh model holding only a copy of set ``adapter_name`` of ``peft_model``, under that name."""
    single = get_peft_model(tiny_open_clip(), config, adapter_name=adapter_name)
    tensors = harma.io.adapter_state_dict(peft_model.get_base_model(), adapter_name)
    harma.io.load_adapter_tensors(single.get_base_model(), tensors, "test", adapter_name)
    return single


def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def set_names(model: nn.Module, adapter_name: str) -> set[str]:
    return {name for name, _ in harma.inject.adapter_named_parameters(model, adapter_name)}


def test_two_adapters_active_in_turn_compute_what_two_single_adapter_models_compute():
    peft_model = trained_peft_model()
    before = outputs(peft_model)
    peft_model.add_adapter("b", HarmaPeftConfig(**B_CONFIG))
    perturb_set(peft_model.get_base_model(), "b", seed=4)
    base = peft_model.get_base_model()
    # peft's add_adapter: the new adapter is neither active nor trainable.
    assert peft_model.active_adapters == ["default"] and harma.list_adapters(base) == ["default", "b"]
    assert trainable_names(base) == set_names(base, "default")
    assert_same(outputs(peft_model), before)
    assert any(".harma_adapters.b." in name for name in set_names(base, "b"))

    want_default = outputs(single_adapter_copy(peft_model, "default", HarmaPeftConfig()))
    want_b = outputs(single_adapter_copy(peft_model, "b", HarmaPeftConfig(**B_CONFIG)))
    assert not torch.equal(want_default[0], want_b[0])
    assert_same(outputs(peft_model), want_default)
    peft_model.set_adapter("b")
    assert peft_model.active_adapters == ["b"] and harma.active_adapter(base) == "b"
    assert_same(outputs(peft_model), want_b)
    assert trainable_names(base) == set_names(base, "b")
    counts = harma.count_parameters(base)
    assert peft_model.get_nb_trainable_parameters() == (counts.per_adapter["b"], counts.all)
    with peft_model.disable_adapter():
        assert_same(outputs(peft_model), outputs(frozen_copy(tiny_open_clip())))
    assert_same(outputs(peft_model), want_b)
    status = peft_model.get_model_status()
    assert status.available_adapters == ["b", "default"] and status.active_adapters == ["b"]
    peft_model.base_model._mark_only_adapters_as_trainable(base)
    assert trainable_names(base) == set_names(base, "b")  # never an inactive set
    peft_model.set_adapter("default", inference_mode=True)
    assert_same(outputs(peft_model), want_default)
    assert not trainable_names(base)


def test_two_adapters_save_pretrained_and_load_adapter_round_trip(tmp_path):
    peft_model = two_adapter_model()
    want_default = outputs(peft_model)
    peft_model.set_adapter("b")
    want_b = outputs(peft_model)
    peft_model.save_pretrained(tmp_path)  # "default" in tmp_path, "b" in tmp_path / "b" (peft's layout)
    with safe_open(str(tmp_path / "b" / "adapter_model.safetensors"), framework="pt") as reader:
        keys = set(reader.keys())
    native = harma.save_adapters(peft_model.get_base_model(), tmp_path / "b.safetensors", adapter_name="b")
    with safe_open(str(native), framework="pt") as reader:
        assert keys == {f"base_model.model.{key}" for key in reader.keys()}
    assert all(".harma_adapter." in key for key in keys)  # the reference names
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["layers"] == [-1]

    loaded = PeftModel.from_pretrained(tiny_open_clip(), tmp_path)
    loaded.load_adapter(tmp_path / "b", adapter_name="b")
    assert loaded.active_adapters == ["default"]
    assert not any(p.requires_grad for p in loaded.parameters())  # both loaded for inference
    assert_same(outputs(loaded), want_default)
    loaded.set_adapter("b", inference_mode=True)
    assert_same(outputs(loaded), want_b)
    assert harma.get_harma_config(loaded.get_base_model(), "b") == harma.get_harma_config(
        peft_model.get_base_model(), "b")
    # Trainable on request, as in peft: load_adapter(is_trainable=True) makes the inactive set
    # trainable too (peft's set_requires_grad); a training switch leaves the new active set alone.
    again = PeftModel.from_pretrained(tiny_open_clip(), tmp_path, is_trainable=True)
    again.load_adapter(tmp_path / "b", adapter_name="b", is_trainable=True)
    base = again.get_base_model()
    assert trainable_names(base) == set_names(base, "default") | set_names(base, "b")
    again.set_adapter("b")
    assert trainable_names(base) == set_names(base, "b")


def test_a_peft_saved_non_default_adapter_loads_with_harma_and_back(tmp_path):
    peft_model = two_adapter_model()
    peft_model.set_adapter("b")
    want_b = outputs(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    # peft's folder of "b" into a harma model as its set "b", next to a native "default" set.
    native = harma.inject_harma_adapters(tiny_open_clip())
    load_peft_adapters(native, tmp_path / "peft" / "b", adapter_name="b")
    assert harma.list_adapters(native) == ["default", "b"] and harma.active_adapter(native) == "default"
    assert_same(outputs(harma.set_adapter(native, "b")), want_b)
    # A harma folder of set "b" loads with harma and with peft's load_adapter, under any name.
    harma.save_adapters(native, tmp_path / "native", adapter_name="b")
    loaded = harma.load_adapters(harma.inject_harma_adapters(tiny_open_clip()), tmp_path / "native",
                                 adapter_name="b")
    assert_same(outputs(harma.set_adapter(loaded, "b")), want_b)
    fresh = get_peft_model(tiny_open_clip(), HarmaPeftConfig())
    fresh.load_adapter(tmp_path / "native", adapter_name="other")
    fresh.set_adapter("other")
    assert_same(outputs(fresh), want_b)


def test_adapter_names_that_are_also_module_names_save_every_tensor(tmp_path):
    # peft drops every key containing ".<other adapter>." before the tuner selects the tensors to
    # save: an adapter named "0" would take "resblocks.0.harma_adapter.*" of "default" with it.
    peft_model = trained_peft_model()
    peft_model.add_adapter("0", HarmaPeftConfig())
    perturb_set(peft_model.get_base_model(), "0", seed=5)
    want_default = outputs(peft_model)
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_open_clip(), tmp_path)
    loaded.load_adapter(tmp_path / "0", adapter_name="0")
    assert_same(outputs(loaded), want_default)
    peft_model.set_adapter("0")
    loaded.set_adapter("0")
    assert_same(outputs(loaded), outputs(peft_model))


def test_deleting_the_active_adapter_switches_to_the_remaining_one():
    peft_model = two_adapter_model()
    want_default = outputs(peft_model)
    base = peft_model.get_base_model()
    peft_model.set_adapter("b")
    with pytest.warns(UserWarning, match="Adapter b was active which is now deleted. Setting active adapter to "
                                         "default"):
        peft_model.delete_adapter("b")
    assert peft_model.active_adapter == "default" and peft_model.active_adapters == ["default"]
    assert list(peft_model.peft_config) == ["default"] and harma.list_adapters(base) == ["default"]
    assert not any(".harma_adapters." in name for name, _ in base.named_parameters())
    assert trainable_names(base) == set_names(base, "default")
    assert_same(outputs(peft_model), want_default)
    # Deleting an inactive adapter leaves the active one as the user set it (here: frozen).
    peft_model.add_adapter("c", HarmaPeftConfig())
    peft_model.set_requires_grad("default", False)
    peft_model.delete_adapter("c")
    assert not trainable_names(base) and peft_model.active_adapters == ["default"]
    # Deleting the last one removes the adapters.
    peft_model.delete_adapter("default")
    assert not harma.is_patched(base) and peft_model.active_adapters == []
    base.requires_grad_(False)
    assert_same(outputs(base), outputs(frozen_copy(tiny_open_clip())))


def test_an_adapter_loaded_for_inference_stays_frozen_when_it_becomes_active(tmp_path):
    two_adapter_model().save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_open_clip(), tmp_path, is_trainable=True)
    loaded.load_adapter(tmp_path / "b", adapter_name="b")  # is_trainable=False
    with pytest.warns(UserWarning, match="Setting active adapter to b"):
        loaded.delete_adapter("default")
    assert loaded.active_adapters == ["b"] and not trainable_names(loaded)


def test_unknown_and_invalid_adapter_names_give_clear_errors(tmp_path):
    peft_model = two_adapter_model()
    tuner = peft_model.base_model
    for call in (lambda: tuner.set_adapter("nope"), lambda: tuner.delete_adapter("nope"),
                 lambda: peft_model.set_requires_grad("nope")):
        with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]; this model has "
                                             r"\['default', 'b'\]"):
            call()
    with pytest.raises(ValueError, match="Adapter nope not found"):
        peft_model.set_adapter("nope")
    with pytest.raises(ValueError, match="one adapter set at a time"):
        tuner.set_adapter(["default", "b"])
    for name in ("keys", "a.b"):
        with pytest.raises(ValueError, match="adapter_name must be a string of letters"):
            peft_model.add_adapter(name, HarmaPeftConfig())
    # A failed add leaves the model as it was (peft rolls back its config, harma adds nothing).
    get_peft_model(tiny_open_clip(layers=3), HarmaPeftConfig()).save_pretrained(tmp_path / "big")
    with pytest.raises(ValueError, match=r"3 blocks"):
        peft_model.load_adapter(tmp_path / "big", adapter_name="c")
    assert list(peft_model.peft_config) == ["default", "b"]
    assert harma.list_adapters(peft_model.get_base_model()) == ["default", "b"]
    assert peft_model.active_adapters == ["default"]


# --------------------------------------------------------------------------------------------
# The config and the registration


def test_config_fields_mirror_harma_config():
    ours = {f.name: f.default for f in dataclasses.fields(HarmaPeftConfig)}
    for harma_field in dataclasses.fields(harma.HarmaConfig):
        if harma_field.name != "freeze_backbone":
            assert ours[harma_field.name] == harma_field.default, harma_field.name
    config = harma.HarmaConfig(sharing="paper", towers=("text",), layers=(-2, -1), bottleneck=64)
    assert HarmaPeftConfig.from_harma_config(config).to_harma_config() == config
    with pytest.raises(ValueError, match="freeze_backbone=False"):
        HarmaPeftConfig.from_harma_config(config.replace(freeze_backbone=False))


def test_invalid_configs_fail_with_harma_config_messages():
    with pytest.raises(ValueError, match="sharing must be one of"):
        HarmaPeftConfig(sharing="both")
    with pytest.raises(ValueError, match="heads=3 must divide bottleneck=128"):
        HarmaPeftConfig(heads=3)


def test_registration_is_idempotent_and_refuses_a_foreign_harma_method(monkeypatch):
    assert register_with_peft() == "HARMA"
    assert register_with_peft() == "HARMA"
    assert PEFT_TYPE_TO_TUNER_MAPPING["HARMA"] is harma_peft.HarmaTuner
    monkeypatch.setitem(PEFT_TYPE_TO_TUNER_MAPPING, "HARMA", object)
    with pytest.raises(RuntimeError, match="already has a method registered as 'HARMA'"):
        register_with_peft()


def test_importing_harma_does_not_import_peft():
    script = "import sys, harma; print('peft' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"
