"""Backbones of a run (harma.training.models): plain open_clip weight files, checked before loading."""

from __future__ import annotations

import re

import pytest
import torch

from harma.training.models import build_backbone, load_backbone_weights, tiny_clip_config


def tiny(seed: int):
    torch.manual_seed(seed)
    return build_backbone("tiny-clip", None, tiny_clip_config(image_size=32, width=64, layers=2), 32)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_backbone_weights_round_trip_without_the_logit_scale(tmp_path, suffix):
    source = tiny(0)
    state = {k: v for k, v in source.state_dict().items() if k not in ("logit_scale", "logit_bias")}
    path = tmp_path / f"backbone{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = tiny(1)
    load_backbone_weights(model, path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_a_backbone_file_that_does_not_fit_is_named_and_nothing_is_loaded(tmp_path):
    state = dict(tiny(0).state_dict())
    state["visual.class_embedding"] = torch.zeros(65)
    del state["positional_embedding"]
    path = tmp_path / "wrong.pt"
    torch.save(state, path)
    model = tiny(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"wrong\.pt' does not fit this model: 1 tensor\(s\) missing.*positional_embedding"):
        load_backbone_weights(model, path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    state["positional_embedding"] = before["positional_embedding"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"'visual.class_embedding' has shape \(65,\) in the file but \(64,\)"):
        load_backbone_weights(model, path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_a_lora_file_that_does_not_fit_leaves_the_model_without_lora(tmp_path):
    from harma.training import TrainConfig, load_trained_weights, save_trained_weights
    from harma.training.models import apply_lora

    config = TrainConfig(method="lora", lora_rank=4)
    trained = apply_lora(tiny(0), config)
    path = save_trained_weights(trained, tmp_path / "lora.safetensors", config)
    torch.manual_seed(2)
    other = build_backbone("tiny-clip", None, tiny_clip_config(image_size=32, width=96, layers=2), 32)
    keys = list(other.state_dict())
    flags = {name: p.requires_grad for name, p in other.named_parameters()}
    with pytest.raises(ValueError, match=r"lora\.safetensors.*has shape"):
        load_trained_weights(other, path)
    assert list(other.state_dict()) == keys  # no LoRA layer was injected
    assert {name: p.requires_grad for name, p in other.named_parameters()} == flags
    loaded = load_trained_weights(tiny(1), path)  # and a file that fits still loads
    assert all(torch.equal(dict(loaded.named_parameters())[name], p) for name, p in trained.named_parameters()
               if "lora_" in name)


@pytest.mark.parametrize("method", ["lora", "full", "harma"])
def test_a_trained_weights_file_holding_nan_is_refused_unless_allowed(tmp_path, method):
    import harma
    from harma.training import TrainConfig, build_model, load_trained_weights, save_trained_weights

    config = TrainConfig(method=method, lora_rank=4, model="tiny-clip", pretrained=None, image_size=32,
                         model_config=tiny_clip_config(image_size=32, width=64, layers=2),
                         harma=harma.HarmaConfig(bottleneck=16, heads=4, mini_bottleneck=8, mini_heads=4))
    torch.manual_seed(0)
    trained = build_model(config, load_weights=False)
    name, param = next((n, p) for n, p in trained.named_parameters() if p.requires_grad and p.dim() > 1)
    with torch.no_grad():
        param.view(-1)[:2] = torch.tensor([float("nan"), float("inf")])
    with pytest.raises(ValueError, match=r"NaN or infinite values.*allow_nonfinite=True to save"):
        save_trained_weights(trained, tmp_path / "refused.safetensors", config)
    assert not (tmp_path / "refused.safetensors").exists()
    path = save_trained_weights(trained, tmp_path / "diverged.safetensors", config, allow_nonfinite=True)

    model = tiny(1)
    keys, before = list(model.state_dict()), {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    stored = name.removeprefix("base_model.model.")
    with pytest.raises(ValueError, match=rf"diverged\.safetensors'? holds NaN or infinite values in 1 of \d+ "
                                         rf"tensor\(s\): '.*{re.escape(stored.split('.')[-1])}' \(1 NaN, 1 infinite "
                                         r".*allow_nonfinite=True"):
        load_trained_weights(model, path)
    assert list(model.state_dict()) == keys  # all or nothing: no LoRA layer, no adapter, no copied tensor
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    loaded = load_trained_weights(model, path, allow_nonfinite=True)
    values = dict(loaded.named_parameters())[name] if method != "harma" else None
    assert method == "harma" or (torch.isnan(values).sum() == 1 and torch.isinf(values).sum() == 1)
