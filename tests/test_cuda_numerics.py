"""CUDA numerics against a float32 reference: the adapters' fused attention
(``scaled_dot_product_attention``, taken on CUDA only) against the matrix-product path the CPU
takes, forward and backward; and a training step under bf16 and fp16 autocast against float32.

The GPU check (``benchmarks/gpu_check.py``) runs this file first. Every comparison also runs on
the CPU where the CPU can run it (its own attention path, bf16 and fp16 autocast), so that a
bound too tight for rounding, or a comparison that cannot fail, shows up without a GPU.

References run with TF32 off (``harma._precision.tf32_disabled``): the float32 figures are then
float32's, whatever the process set.

Errors are measured against the tensor's own scale, never elementwise: ``scale_error`` is
``max|got - expected| / max|expected|`` and ``norm_error`` is ``||got - expected|| / ||expected||``
(an elementwise relative error blows up on entries near zero).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from tiny_models import images, perturb_adapters, tiny_open_clip, tokens

import harma
from harma._precision import tf32_disabled
from harma.losses import HarmaLoss
from harma.modules import SelfAttention, _matmul_attention

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# float32 on two code paths (fused kernel vs matrix products, or CUDA vs CPU) differs by
# summation order: a few units of float32's 6e-8 rounding per reduction of <= a few hundred
# terms, about 1e-6 of the tensor's scale. 1e-4 leaves two orders of magnitude for that, while
# a wrong mask, layout, scale or head split moves outputs and gradients by O(1) of their scale.
FLOAT32_SCALE_ERROR = 1e-4
# Autocast bounds: norm errors of one training step of the tiny CLIP (loss, both embeddings, all
# adapter gradients) under autocast against float32. bf16 keeps 8 significant bits (relative
# rounding error up to 2**-8 = 3.9e-3), fp16 11 (4.9e-4); each layer rounds about ten times in a
# row. The CPU's own autocast measured, over four models: bf16 loss <= 3.1e-4, embeddings
# <= 9.3e-3, gradients <= 3.6e-2; fp16 <= 2.3e-4, 1.1e-3, 5.4e-3. The bounds are 3-6x those; a
# GPU's tensor-core products accumulate in float32 as the CPU's do and its fused attention keeps
# the scores in float32, so it rounds no worse. The loss bounds are tight enough to catch a loss
# that autocast lowers to bf16 (before the losses switched autocast off: 2.7e-3 to 4.9e-3 in bf16).
AUTOCAST_BOUNDS = {
    torch.bfloat16: {"loss": 2e-3, "image_embeds": 3e-2, "text_embeds": 3e-2, "adapter_grads": 0.12},
    torch.float16: {"loss": 1e-3, "image_embeds": 5e-3, "text_embeds": 5e-3, "adapter_grads": 2.5e-2},
}


def scale_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.detach().double().cpu()
    difference = (got.detach().double().cpu() - expected).abs().max()
    return (difference / expected.abs().max().clamp_min(1e-30)).item()


def norm_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.detach().double().cpu()
    return ((got.detach().double().cpu() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------- the fused attention


def matmul_attention(module: SelfAttention, x: torch.Tensor, causal: bool) -> torch.Tensor:
    """What ``SelfAttention`` computes on the CPU, on any device: the reference of the fused path."""
    batch_major = x if module.batch_first else x.transpose(0, 1)
    batch, tokens_, _ = batch_major.shape
    qkv = F.linear(batch_major, module.in_proj_weight, module.in_proj_bias)
    out = module.out_proj(_matmul_attention(qkv, module.heads, causal).reshape(batch, tokens_, module.dim))
    return out if module.batch_first else out.transpose(0, 1)


def attention_errors(device: str, shape: tuple[int, int, int, int], causal: bool, batch_first: bool,
                     reference_causal: bool | None = None) -> dict[str, float]:
    """Scale errors of ``SelfAttention`` on ``device`` against `matmul_attention` on the same
    device: the output, the input's gradient and each parameter's gradient.
    ``shape``: (batch, tokens, dim, heads). ``reference_causal`` (default ``causal``) lets a test
    give the reference a wrong mask on purpose."""
    batch, tokens_, dim, heads = shape
    generator = torch.Generator().manual_seed(sum(shape))
    torch.manual_seed(sum(shape))
    module = SelfAttention(dim, heads, batch_first).to(device)
    with torch.no_grad():  # biases off zero, so that their gradients and effects are tested too
        module.in_proj_bias.normal_(0, 0.1, generator=generator)
    layout = (batch, tokens_, dim) if batch_first else (tokens_, batch, dim)
    x = torch.randn(layout, generator=generator).to(device)
    upstream = torch.randn(layout, generator=generator).to(device)  # a gradient that is not uniform
    results = []
    for forward in (lambda leaf: module(leaf, causal),
                    lambda leaf: matmul_attention(module, leaf, causal if reference_causal is None else reference_causal)):
        module.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_(True)
        with tf32_disabled():
            out = forward(leaf)
            (out * upstream).sum().backward()
        results.append([out, leaf.grad, *(p.grad for p in module.parameters())])
    names = ["output", "input_grad", *(name + "_grad" for name, _ in module.named_parameters())]
    return {name: scale_error(got, expected) for name, got, expected in zip(names, *results, strict=True)}


ATTENTION_SHAPES = [(4, 50, 128, 8), (2, 77, 128, 8), (3, 7, 64, 8), (2, 5, 24, 2)]  # ViT-B-32 image, text; odd


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "tokens_first"])
def test_cuda_fused_attention_matches_the_matmul_path_forward_and_backward(shape, causal, batch_first):
    errors = attention_errors("cuda", shape, causal, batch_first)
    assert max(errors.values()) <= FLOAT32_SCALE_ERROR, errors


def test_the_attention_comparison_is_exact_on_one_path_and_catches_a_wrong_mask():
    # On the CPU both sides take the matrix-product path: the comparison itself adds no error,
    assert max(attention_errors("cpu", (2, 7, 32, 4), True, True).values()) == 0.0
    # and a causal mask where none belongs is far outside the bound.
    wrong = attention_errors("cpu", (2, 7, 32, 4), True, True, reference_causal=False)
    assert wrong["output"] > 100 * FLOAT32_SCALE_ERROR and wrong["input_grad"] > 100 * FLOAT32_SCALE_ERROR


# --------------------------------------------------------------------- a training step


def patched_clip(seed: int = 0) -> torch.nn.Module:
    model = harma.inject_harma_adapters(tiny_open_clip(seed=seed))
    perturb_adapters(model, seed=seed + 3, scale=0.1)
    return model.train()


def training_step(model: torch.nn.Module, device: str, autocast: torch.dtype | None, batch: int = 8) -> dict:
    """One forward and backward of the HarMA loss: the loss, both embeddings and the adapters'
    gradients (float32, on the CPU)."""
    criterion = HarmaLoss().to(device)
    for param in harma.adapter_parameters(model):
        param.grad = None
    context = torch.autocast(device, dtype=autocast) if autocast else contextlib.nullcontext()
    with context:
        image_embeds, text_embeds, _ = model(images(batch).to(device), tokens(batch).to(device))
        loss = criterion(image_embeds, text_embeds, torch.arange(batch, device=device) // 2).loss
    loss.backward()
    grads = torch.cat([p.grad.float().flatten() for p in harma.adapter_parameters(model)])
    return {"loss": loss.detach().float().cpu(), "image_embeds": image_embeds.detach().float().cpu(),
            "text_embeds": text_embeds.detach().float().cpu(), "adapter_grads": grads.cpu()}


def autocast_errors(device: str, dtype: torch.dtype, seed: int = 0) -> dict[str, float]:
    """Norm errors of a step under ``dtype`` autocast against the float32 step (TF32 off)."""
    model = patched_clip(seed).to(device)
    with tf32_disabled():
        expected = training_step(model, device, None)
    got = training_step(model, device, dtype)
    return {key: norm_error(got[key], expected[key]) for key in expected}


def assert_within(errors: dict[str, float], bounds: dict[str, float]) -> None:
    assert all(errors[key] <= bounds[key] for key in bounds), f"errors {errors} beyond bounds {bounds}"


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cuda_autocast_step_matches_float32(dtype):
    errors = autocast_errors("cuda", dtype)
    assert_within(errors, AUTOCAST_BOUNDS[dtype])
    assert errors["image_embeds"] > 0  # autocast lowered the products (else nothing was compared)


@pytest.mark.gpu
@needs_cuda
def test_cuda_step_matches_the_cpu_step_in_float32():
    """The whole patched model (fused attention in the adapters, cuDNN's patch embedding, the
    loss), forward and backward, on CUDA against the CPU, TF32 off."""
    model = patched_clip(1)
    with tf32_disabled():
        expected = training_step(copy.deepcopy(model), "cpu", None)
        got = training_step(model.cuda(), "cuda", None)
    errors = {key: scale_error(got[key], expected[key]) for key in expected}
    assert max(errors.values()) <= FLOAT32_SCALE_ERROR, errors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_bounds_hold_for_the_cpu_autocast(dtype):
    """The GPU test's comparison on the CPU's own autocast: within its bounds, and not trivially
    (the errors are those of real rounding, a fair fraction of each bound)."""
    errors = autocast_errors("cpu", dtype)
    assert_within(errors, AUTOCAST_BOUNDS[dtype])
    assert errors["image_embeds"] > AUTOCAST_BOUNDS[dtype]["image_embeds"] / 100
