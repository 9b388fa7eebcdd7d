"""torch.compile and harma: a compiled patched model, and compiled adapters
(`harma.modules.compile_adapters`), compute what the eager model computes, forward and backward."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from tiny_models import images, perturb_adapters, tiny_open_clip, tokens
from torch import nn

import harma
from harma.modules import MultimodalGatedAdapter, compile_adapters


def inductor_unavailable() -> str | None:
    """Why torch.compile's default backend (inductor, which builds C++ on the CPU) cannot run
    here, or None."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # another torch layout: the compile itself will tell
        return None
    try:
        get_cpp_compiler()
    except Exception as error:  # InvalidCxxCompiler and whatever a platform raises instead
        return f"torch.compile's inductor backend finds no C++ compiler: {error}"
    return None


def patched(config: harma.HarmaConfig) -> nn.Module:
    # One block per tower: what compiling a block proves holds for every block, at half the compile time.
    model = harma.inject_harma_adapters(tiny_open_clip(layers=1), config)
    perturb_adapters(model)
    return model.train()


def step(model: nn.Module, device: str = "cpu", autocast: torch.dtype | None = None,
         ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Embeddings of one forward of both towers and the adapter gradients of a loss on them,
    all as float32 on the CPU."""
    for param in harma.adapter_parameters(model):
        param.grad = None
    with torch.autocast(device, dtype=autocast) if autocast else contextlib.nullcontext():
        image_embeds, text_embeds, _ = model(images().to(device), tokens().to(device))
        loss = (image_embeds.float() @ text_embeds.float().T).square().sum()
    loss.backward()
    embeds = [image_embeds.detach().float().cpu(), text_embeds.detach().float().cpu()]
    return embeds, [p.grad.float().cpu() for p in harma.adapter_parameters(model)]


def assert_same_step(got, expected, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    for a, b in zip(got[0] + got[1], expected[0] + expected[1], strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.slow
def test_compiled_patched_model_trains_like_the_eager_model():
    model = patched(harma.HarmaConfig())
    eager = copy.deepcopy(model)
    # aot_eager traces the forward and the backward as torch.compile does, without building C++.
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    assert_same_step(step(compiled), step(eager))
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_compile_adapters_compiles_each_adapter_and_keeps_what_it_computes():
    model = patched(harma.HarmaConfig())
    eager = copy.deepcopy(model)
    assert compile_adapters(model, backend="aot_eager") is model
    adapters = [m for m in model.modules() if isinstance(m, MultimodalGatedAdapter)]
    assert len(adapters) == 2 and all(a._compiled_call_impl is not None for a in adapters)
    assert_same_step(step(model), step(eager))
    assert_same_step(step(model), step(eager))  # the compiled code again, not a first-call path
    with torch.no_grad(), harma.disable_adapters(model), harma.disable_adapters(eager):
        torch.testing.assert_close(model.encode_text(tokens()), eager.encode_text(tokens()))


@pytest.mark.slow
def test_compiled_adapters_survive_a_whole_model_compile():
    model = patched(harma.HarmaConfig.plus(adapter_mask="tower"))
    eager = copy.deepcopy(model)
    compiled = torch.compile(compile_adapters(model, backend="aot_eager"), backend="aot_eager")
    assert_same_step(step(compiled), step(eager))


@pytest.mark.slow
def test_inductor_compiled_patched_model_matches_eager():
    reason = inductor_unavailable()
    if reason:
        pytest.skip(reason)
    model = patched(harma.HarmaConfig()).eval()
    with torch.no_grad():
        expected = model(images(), tokens())
        # The default backend: C++ kernels for the CPU. Forward only, to keep the compile short.
        got = torch.compile(model)(images(), tokens())
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_compiled_adapters_train_in_bf16_like_the_eager_ones():
    model = patched(harma.HarmaConfig()).cuda()
    eager = copy.deepcopy(model)
    compile_adapters(model)  # the default backend: Triton kernels around the fused attention
    # Fused and separate kernels round differently in bf16.
    assert_same_step(step(model, "cuda", torch.bfloat16), step(eager, "cuda", torch.bfloat16), rtol=5e-2, atol=5e-2)


def test_a_compiled_model_follows_set_adapter():
    model = patched(harma.HarmaConfig())
    harma.inject_harma_adapters(model, harma.HarmaConfig(), adapter_name="other")
    harma.set_adapter(model, "other")
    perturb_adapters(model, seed=8)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    for name in ("default", "other", "default"):
        harma.set_adapter(model, name)
        harma.set_adapter(eager, name)
        assert_same_step(step(compiled), step(eager))  # a guard on the flag recompiles, no stale code
