"""The optimizer and learning-rate schedule of the reference recipe."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .config import TrainConfig


class LinearWarmupDecay:
    """Learning-rate factor for ``LambdaLR``: 0 -> 1 linearly over ``warmup_steps``, then
    linearly down to 0 at ``total_steps`` (the reference's schedule, stepped once per
    optimizer step). A class rather than a closure so that ``LambdaLR.state_dict`` stores its
    two integers and a resumed scheduler checks against them.
    """

    def __init__(self, warmup_steps: int, total_steps: int) -> None:
        if total_steps < 1 or not 0 <= warmup_steps < max(total_steps, 1):
            raise ValueError(f"need 0 <= warmup_steps < total_steps, got {warmup_steps}, {total_steps}")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps

    @classmethod
    def from_fraction(cls, warmup_fraction: float, total_steps: int) -> LinearWarmupDecay:
        """Warm-up over ``int(warmup_fraction * total_steps)`` steps (floored, as the reference)."""
        return cls(int(total_steps * warmup_fraction), total_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        return max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.warmup_steps))


# ---------------------------------------------------------------------------- optimisation


def _no_weight_decay(name: str, param: torch.Tensor) -> bool:
    # Biases, norm scales, gate logits, class/temperature scalars are 0-D or 1-D. Decaying them
    # is not regularisation: it pulls gates towards sigmoid(0) = 0.5 and the temperature
    # towards 0. The reference exempts only names containing "bias".
    return param.ndim < 2 or name.endswith("bias")


def parameter_groups(
    named_parameters: Iterator[tuple[str, nn.Parameter]] | Sequence[tuple[str, nn.Parameter]],
    weight_decay: float,
) -> list[dict[str, Any]]:
    """AdamW parameter groups: ``weight_decay`` for >=2-D weights, none for the rest.

    Frozen parameters are skipped and a parameter reached under two names (a shared tensor)
    appears once. Each group carries the parameters' names under ``"names"``.

    Returns:
        Two AdamW groups, each a dict with the keys ``"params"``, ``"names"`` and
        ``"weight_decay"`` (``weight_decay`` in the first, 0.0 in the second); empty groups are
        left out.
    """
    decay: dict[str, list] = {"params": [], "names": []}
    no_decay: dict[str, list] = {"params": [], "names": []}
    seen: set[int] = set()
    for name, param in named_parameters:
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        group = no_decay if _no_weight_decay(name, param) else decay
        group["params"].append(param)
        group["names"].append(name)
    groups = [{**decay, "weight_decay": weight_decay}, {**no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def build_optimizer(model: nn.Module, loss: nn.Module | None, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``model`` and the loss temperature, grouped by
    `parameter_groups`, with the recipe's lr, betas, eps and weight decay."""
    named = list(model.named_parameters())
    if loss is not None:
        named += [(f"loss.{name}", param) for name, param in loss.named_parameters()]
    # One multi-tensor kernel per group: on the CPU the default per-tensor loop is ~3x slower.
    return torch.optim.AdamW(
        parameter_groups(named, config.weight_decay), lr=config.lr, betas=tuple(config.betas), eps=config.eps,
        foreach=True,
    )
