"""Several named adapter sets on one backbone (harma.named_adapters and the named forms of the
injection, saving and loading functions)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open
from tiny_models import FAMILIES, encode, frozen_copy, images, perturb_adapters, tiny_open_clip, tokens
from torch import nn

import harma
from harma.named_adapters import adapter_name_of_key, reference_adapter_key

REFERENCE = harma.HarmaConfig()
PLUS = harma.HarmaConfig.plus()


def outputs(model: nn.Module) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return encode(model, images(), tokens())


def assert_same_outputs(first: tuple[torch.Tensor, ...], second: tuple[torch.Tensor, ...]) -> None:
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def add_trained_set(model: nn.Module, name: str, config: harma.HarmaConfig, seed: int) -> nn.Module:
    """Add set ``name`` and move its parameters as training would, leaving the active set as it was."""
    active = harma.active_adapter(model) if harma.is_patched(model) else name
    harma.inject_harma_adapters(model, config, adapter_name=name)
    harma.set_adapter(model, name)
    perturb_adapters(model, seed=seed)
    return harma.set_adapter(model, active)


def two_set_model() -> nn.Module:
    model = add_trained_set(tiny_open_clip(), "a", REFERENCE, seed=3)
    return add_trained_set(model, "b", PLUS, seed=4)


def single_set_model(tmp_path, source: nn.Module, name: str) -> nn.Module:
    """A fresh backbone holding only set ``name`` of ``source`` (through a file, as "default")."""
    path = harma.save_adapters(source, tmp_path / f"{name}.safetensors", adapter_name=name)
    return harma.load_adapters(tiny_open_clip(), path)


def test_sets_active_in_turn_compute_what_one_set_models_compute(tmp_path):
    model = two_set_model()
    alone = {name: outputs(single_set_model(tmp_path, model, name)) for name in ("a", "b")}
    assert not torch.equal(alone["a"][0], alone["b"][0])
    for name in ("a", "b", "a"):
        harma.set_adapter(model, name)
        assert harma.active_adapter(model) == name
        assert_same_outputs(outputs(model), alone[name])
    with harma.disable_adapters(model):
        assert_same_outputs(outputs(model), outputs(frozen_copy(tiny_open_clip())))
    assert_same_outputs(outputs(model), alone["a"])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_switches_between_sets(tmp_path, family):
    model = FAMILIES[family]()
    add_trained_set(model, "default", REFERENCE, seed=5)
    add_trained_set(model, "other", REFERENCE, seed=6)
    first = outputs(model)
    harma.set_adapter(model, "other")
    second = outputs(model)
    assert not torch.equal(first[0], second[0])
    path = harma.save_adapters(model, tmp_path / "other.safetensors")
    alone = harma.load_adapters(FAMILIES[family](), path)
    assert_same_outputs(second, outputs(alone))


def test_a_single_default_set_keeps_the_reference_names_and_other_names_are_namespaced():
    model = harma.inject_harma_adapters(tiny_open_clip(), REFERENCE)
    default_keys = {k for k in model.state_dict() if ".harma_adapter." in k}
    assert default_keys and harma.list_adapters(model) == ["default"]
    harma.inject_harma_adapters(model, REFERENCE, adapter_name="rsicd")
    named = {k for k in model.state_dict() if adapter_name_of_key(k) == "rsicd"}
    assert all(".harma_adapters.rsicd." in k for k in named)
    assert {reference_adapter_key(k) for k in named} == default_keys
    assert {k for k in model.state_dict() if adapter_name_of_key(k) == "default"} == default_keys


def test_files_hold_reference_names_whatever_the_set_name(tmp_path):
    model = two_set_model()
    single = add_trained_set(tiny_open_clip(), "default", PLUS, seed=4)
    named_path = harma.save_adapters(model, tmp_path / "b.safetensors", adapter_name="b")
    single_path = harma.save_adapters(single, tmp_path / "single.safetensors")
    with safe_open(str(named_path), framework="pt") as named, safe_open(str(single_path), framework="pt") as alone:
        assert sorted(named.keys()) == sorted(alone.keys())
        assert named.metadata() == alone.metadata()
        assert all(named.get_slice(k).get_shape() == alone.get_slice(k).get_shape() for k in named.keys())


def test_only_the_active_set_is_trainable_and_the_backbone_stays_frozen():
    model = two_set_model()

    def trainable_sets() -> set[str | None]:
        return {adapter_name_of_key(n) for n, p in model.named_parameters() if p.requires_grad}

    assert trainable_sets() == {"a"}
    harma.set_adapter(model, "b")
    assert trainable_sets() == {"b"}
    assert list(harma.adapter_parameters(model)) == list(harma.adapter_parameters(model, "b"))
    counts = harma.count_parameters(model)
    assert counts.trainable == counts.per_adapter["b"] != counts.per_adapter["a"]
    assert counts.adapter == counts.per_adapter["a"] + counts.per_adapter["b"]
    assert "adapters: a " in str(counts) and ", b " in str(counts)


def test_a_second_set_is_added_inactive_and_never_shares_the_mini_adapter():
    model = harma.inject_harma_adapters(tiny_open_clip(), harma.HarmaConfig.paper(), adapter_name="a")
    before = outputs(model)
    harma.inject_harma_adapters(model, harma.HarmaConfig.paper(), adapter_name="b")
    harma.set_adapter(model, "b")
    perturb_adapters(model, seed=9)
    harma.set_adapter(model, "a")
    assert_same_outputs(outputs(model), before)
    minis = {name: {id(m.mini_adapter) for _, m in harma.inject.adapters(model, name)} for name in ("a", "b")}
    assert len(minis["a"]) == len(minis["b"]) == 2 and not minis["a"] & minis["b"]


def test_deleting_the_active_set_activates_the_first_remaining_and_the_last_restores_the_model():
    base = tiny_open_clip()
    base.logit_scale.requires_grad_(False)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    trainable = {n for n, p in base.named_parameters() if p.requires_grad}
    model = add_trained_set(add_trained_set(base, "a", REFERENCE, 3), "b", REFERENCE, 4)
    add_trained_set(model, "c", REFERENCE, 5)
    harma.set_adapter(model, "b")
    harma.delete_adapter(model, "b")
    assert harma.list_adapters(model) == ["a", "c"] and harma.active_adapter(model) == "a"
    assert not any(adapter_name_of_key(k) == "b" for k in model.state_dict())
    harma.delete_adapter(model, "a")
    assert harma.active_adapter(model) == "c"
    assert all(p.requires_grad for p in harma.adapter_parameters(model, "c"))
    harma.delete_adapter(model, "c")
    assert not harma.is_patched(model) and harma.list_adapters(model) == []
    assert model.state_dict().keys() == original.keys()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert not any(module._forward_hooks for module in model.modules())


def test_names_and_unknown_sets_give_clear_errors():
    model = harma.inject_harma_adapters(tiny_open_clip(), REFERENCE, adapter_name="a")
    with pytest.raises(ValueError, match="already carries HarMA adapters named 'a'"):
        harma.inject_harma_adapters(model, REFERENCE, adapter_name="a")
    for bad in ("", "x.y", "keys", "-a", 3):
        with pytest.raises(ValueError, match="adapter_name must be"):
            harma.inject_harma_adapters(model, REFERENCE, adapter_name=bad)
    for call in (harma.set_adapter, harma.delete_adapter, harma.get_harma_config):
        with pytest.raises(ValueError, match=r"no adapter named 'zz'; its adapters are \['a'\]"):
            call(model, "zz")
    with pytest.raises(ValueError, match="no adapter named 'zz'"):
        harma.save_adapters(model, "never-written.safetensors", adapter_name="zz")
    with pytest.raises(ValueError, match="carries no HarMA adapters"):
        harma.active_adapter(tiny_open_clip())
    assert harma.list_adapters(model) == ["a"]


def test_loading_into_a_new_name_adds_an_inactive_set_and_a_failed_load_leaves_the_model_as_it_was(tmp_path):
    donor = add_trained_set(tiny_open_clip(), "default", REFERENCE, seed=7)
    path = harma.save_adapters(donor, tmp_path / "donor.safetensors")
    model = add_trained_set(tiny_open_clip(), "default", PLUS, seed=8)
    before = outputs(model)
    harma.load_adapters(model, path, adapter_name="donor")
    assert harma.list_adapters(model) == ["default", "donor"] and harma.active_adapter(model) == "default"
    assert_same_outputs(outputs(model), before)
    harma.set_adapter(model, "donor")
    assert_same_outputs(outputs(model), outputs(donor))

    wrong = harma.save_adapters(add_trained_set(tiny_open_clip(layers=3), "default", REFERENCE, 1),
                                tmp_path / "wrong.safetensors")
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="towers"):
        harma.load_adapters(model, wrong, adapter_name="third")
    assert harma.list_adapters(model) == ["default", "donor"] and harma.active_adapter(model) == "donor"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    with pytest.raises(ValueError, match="another adapter layout"):
        harma.load_adapters(model, path, adapter_name="default")


def test_a_deep_copy_switches_independently():
    model = two_set_model()
    first = outputs(model)
    clone = copy.deepcopy(model)
    harma.set_adapter(clone, "b")
    harma.delete_adapter(clone, "a")
    assert harma.list_adapters(model) == ["a", "b"] and harma.active_adapter(model) == "a"
    assert_same_outputs(outputs(model), first)
    harma.set_adapter(model, "b")
    assert_same_outputs(outputs(model), outputs(clone))


def test_a_wrapped_model_switches_through_its_wrapper(tmp_path):
    model = two_set_model()
    wrapper = nn.DataParallel(model)
    harma.set_adapter(wrapper, "b")
    assert harma.active_adapter(model) == "b" and harma.list_adapters(wrapper) == ["a", "b"]
    path = harma.save_adapters(wrapper, tmp_path / "b.safetensors")
    assert_same_outputs(outputs(model), outputs(harma.load_adapters(tiny_open_clip(), path)))


def test_the_state_dict_of_a_model_with_several_sets_round_trips():
    model = two_set_model()
    twin = add_trained_set(add_trained_set(tiny_open_clip(), "a", REFERENCE, 11), "b", PLUS, 12)
    twin.load_state_dict(model.state_dict())
    for name in ("a", "b"):
        harma.set_adapter(model, name)
        harma.set_adapter(twin, name)
        assert_same_outputs(outputs(model), outputs(twin))


def test_inference_mode_freezes_every_set_and_switches_without_touching_gradients():
    model = two_set_model()
    harma.set_adapter(model, "b", inference_mode=True)
    assert not any(p.requires_grad for p in model.parameters())
    first = outputs(model)
    harma.set_adapter(model, "a", inference_mode=True)
    harma.set_adapter(model, "b", inference_mode=True)
    assert_same_outputs(outputs(model), first)
    assert not any(p.requires_grad for p in model.parameters())
    harma.set_adapter(model, "a")
    assert {adapter_name_of_key(n) for n, p in model.named_parameters() if p.requires_grad} == {"a"}


def test_switching_for_training_through_ddp_is_refused_and_inference_switching_is_not(tmp_path):
    from test_checkpoint import single_process_ddp

    ddp = single_process_ddp(two_set_model(), tmp_path)
    with pytest.raises(ValueError, match="switch the model before wrapping it"):
        harma.set_adapter(ddp, "b")
    assert harma.active_adapter(ddp) == "a"
    harma.set_adapter(ddp, "b", inference_mode=True)
    assert harma.active_adapter(ddp) == "b" and not any(p.requires_grad for p in ddp.parameters())


def test_a_training_switch_leaves_only_the_active_set_trainable_whatever_was_set_by_hand():
    model = add_trained_set(two_set_model(), "c", REFERENCE, seed=5)
    for param in harma.adapter_parameters(model, "c"):
        param.requires_grad_(True)
    harma.set_adapter(model, "b")
    assert {adapter_name_of_key(n) for n, p in model.named_parameters() if p.requires_grad} == {"b"}
    for call in (harma.set_adapter, harma.delete_adapter):
        with pytest.raises(ValueError, match="adapter_name must be"):
            call(model, None)
    assert harma.list_adapters(model) == ["a", "b", "c"] and harma.active_adapter(model) == "b"


def test_adapters_without_the_switch_attributes_still_run():
    # A whole model pickled by an earlier harma: its adapters' __dict__ lacks "active".
    model = two_set_model()
    expected = outputs(model)
    for _, adapter in harma.inject.adapters(model, "a"):
        del adapter.__dict__["active"]
    assert_same_outputs(outputs(model), expected)


def test_adding_or_deleting_an_inactive_set_changes_no_other_flag():
    model = two_set_model()
    model.ln_final.weight.requires_grad_(True)  # unfrozen by hand after the first set
    harma.set_adapter(model, "b", inference_mode=True)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    harma.inject_harma_adapters(model, REFERENCE, adapter_name="c")
    assert not any(p.requires_grad for p in harma.adapter_parameters(model, "c"))
    harma.delete_adapter(model, "c")
    harma.delete_adapter(model, "a")
    assert {name: p.requires_grad for name, p in model.named_parameters()} == {
        name: flag for name, flag in flags.items() if adapter_name_of_key(name) != "a"}


# --------------------------------------------------------------------------------------------
# Mixed adapter batches

ROWS = ["b", "__base__", "a", "b", "a", "__base__"]


def rows_of(batch: tuple[torch.Tensor, ...], rows: list[int]) -> tuple[torch.Tensor, ...]:
    return tuple(output[rows] for output in batch)


def assert_close_outputs(first: tuple[torch.Tensor, ...], second: tuple[torch.Tensor, ...]) -> None:
    # The backbone runs the whole mixed batch but each group alone at another batch size, and
    # PyTorch may block a matrix product differently by its row count: not bitwise, 1e-5 apart.
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_mixed_batch_runs_each_row_through_its_own_set(family):
    model = FAMILIES[family]()
    base = frozen_copy(model)
    add_trained_set(model, "a", REFERENCE, seed=5)
    add_trained_set(model, "b", PLUS, seed=6)
    harma.set_adapter(model, "b")
    batch = (images(len(ROWS)), tokens(len(ROWS)))
    with torch.no_grad(), harma.mixed_adapter_batch(model, ROWS):
        mixed = encode(model, *batch)
    for name in ("a", "b", "__base__"):
        reference = base if name == "__base__" else harma.set_adapter(model, name)
        rows = [i for i, row_name in enumerate(ROWS) if row_name == name]
        with torch.no_grad():
            whole = encode(reference, *batch)
            alone = encode(reference, *(part[rows] for part in batch))
        assert_close_outputs(rows_of(mixed, rows), alone)
        assert_close_outputs(rows_of(mixed, rows), rows_of(whole, rows))
        others = [i for i in range(len(ROWS)) if i not in rows]
        assert (mixed[0][others] - whole[0][others]).abs().max() > 1e-3  # the other rows took other sets
    assert_same_outputs(outputs(model), outputs(harma.set_adapter(model, "b")))  # nothing left behind


def test_mixed_batch_names_are_checked_and_the_batch_must_match():
    model = two_set_model()
    for bad, message in ((["a", "zz", "__base__"], r"names no adapter set \['zz'\]"), ([], "is empty")):
        with pytest.raises(ValueError, match=message), harma.mixed_adapter_batch(model, bad):
            pass
    with pytest.raises(TypeError, match="list of strings"), harma.mixed_adapter_batch(model, "a"):
        pass
    with harma.mixed_adapter_batch(model, ["a", "b"]):
        with pytest.raises(ValueError, match="do not nest"), harma.mixed_adapter_batch(model, ["a", "b"]):
            pass
        with pytest.raises(ValueError, match="adapter for each of 2 rows, but a batch of 3 rows"):
            outputs(model)
    with pytest.raises(ValueError, match="adapter_name must be"):
        harma.inject_harma_adapters(model, REFERENCE, adapter_name="__base__")
    assert_same_outputs(outputs(model), outputs(harma.set_adapter(two_set_model(), "a")))


def test_a_mixed_batch_trains_only_the_sets_that_require_grad():
    model = two_set_model()  # "a" active and trainable, "b" frozen
    with harma.mixed_adapter_batch(model, ["a", "b", "__base__"]):
        image_features, text_features = encode(model, images(3), tokens(3))
    (image_features.sum() + text_features.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in harma.adapter_parameters(model, "a"))
    assert all(p.grad is None for p in harma.adapter_parameters(model, "b"))
    with harma.disable_adapters(model), torch.no_grad(), harma.mixed_adapter_batch(model, ["a", "b", "a"]):
        assert_same_outputs(outputs(model), outputs(frozen_copy(tiny_open_clip())))
