"""What docs/serving.md says about optimizers and adapter sets: after `harma.set_adapter`, an
optimizer that holds the previous set's parameters keeps moving them when their gradients were
zeroed (``zero_grad(set_to_none=False)``), and leaves them alone when they are None (the default)
or when each set has its own optimizer."""

from __future__ import annotations

import pytest
import torch
from tiny_models import encode, images, tiny_open_clip, tokens

import harma

LAYOUT = harma.HarmaConfig(bottleneck=16, heads=4, mini_bottleneck=8, mini_heads=4)


def two_set_model() -> torch.nn.Module:
    model = tiny_open_clip()
    harma.inject_harma_adapters(model, LAYOUT, adapter_name="a")
    harma.inject_harma_adapters(model, LAYOUT, adapter_name="b")
    return model


def train_step(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], set_to_none: bool) -> None:
    image, text = encode(model, images(), tokens())
    (image.square().mean() + text.square().mean()).backward()
    for optimizer in optimizers:
        optimizer.step()
        optimizer.zero_grad(set_to_none=set_to_none)


def snapshot(model: torch.nn.Module, name: str) -> list[torch.Tensor]:
    return [p.detach().clone() for p in harma.adapter_parameters(model, name)]


def moved(model: torch.nn.Module, name: str, before: list[torch.Tensor]) -> bool:
    return any(not torch.equal(p, b) for p, b in zip(harma.adapter_parameters(model, name), before, strict=True))


@pytest.mark.parametrize("make_optimizer", [
    lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0),
], ids=["sgd_momentum", "adamw"])
@pytest.mark.parametrize(("set_to_none", "a_moves"), [(False, True), (True, False)])
def test_an_optimizer_of_one_set_keeps_moving_it_after_a_switch_only_with_zeroed_gradients(
        make_optimizer, set_to_none, a_moves):
    model = two_set_model()
    # One optimizer over both sets (as `model.parameters()` would give it), trained on "a" first.
    optimizer = make_optimizer([*harma.adapter_parameters(model, "a"), *harma.adapter_parameters(model, "b")])
    for _ in range(2):
        train_step(model, [optimizer], set_to_none)
    harma.set_adapter(model, "b")
    assert not any(p.requires_grad for p in harma.adapter_parameters(model, "a"))
    a_before, b_before = snapshot(model, "a"), snapshot(model, "b")
    train_step(model, [optimizer], set_to_none)
    assert moved(model, "b", b_before)
    # Zero gradients (not None) make the optimizer step "a" with its momentum although "a" is
    # inactive and frozen; None gradients make it skip "a".
    assert moved(model, "a", a_before) is a_moves


def test_one_optimizer_per_set_leaves_the_other_set_alone_whatever_zero_grad_does():
    model = two_set_model()
    optimizers = {name: torch.optim.SGD(harma.adapter_parameters(model, name), lr=0.1, momentum=0.9)
                  for name in ("a", "b")}
    for _ in range(2):
        train_step(model, [optimizers["a"]], set_to_none=False)
    harma.set_adapter(model, "b")
    a_before = snapshot(model, "a")
    train_step(model, [optimizers["b"]], set_to_none=False)
    assert not moved(model, "a", a_before)
