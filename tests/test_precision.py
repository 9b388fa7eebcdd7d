"""TF32 switches (harma._precision) and the numeric settings of a run (apply_precision): retrieval
scores are computed without TF32 whatever the process set, and every switch is put back."""

from __future__ import annotations

import pytest
import torch

from harma import _precision, retrieval
from harma.training import apply_precision


@pytest.fixture(autouse=True)
def restore_switches():
    saved = _precision._read()
    yield
    _precision._write(*saved)


@pytest.mark.parametrize("enabled", [True, False])
def test_tf32_disabled_turns_both_switches_off_and_restores_them(enabled):
    _precision.set_tf32(enabled)
    with _precision.tf32_disabled():
        assert _precision._read() == (False, False)
    assert _precision._read() == (enabled, enabled)
    # The old flags read what the new settings say (a mix of the two APIs raises on PyTorch >= 2.9).
    assert torch.backends.cuda.matmul.allow_tf32 is enabled


def test_a_setting_made_through_the_new_api_alone_is_restored_readably():
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("this PyTorch has only the allow_tf32 flags")
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    with _precision.tf32_disabled():
        assert not _precision.tf32_enabled()
    assert _precision.tf32_enabled() and torch.backends.cuda.matmul.allow_tf32


def test_retrieval_scores_are_computed_with_tf32_off(monkeypatch):
    seen = []
    score_ranks = retrieval._score_ranks

    def spy(*args, **kwargs):
        seen.append(_precision.tf32_enabled())
        return score_ranks(*args, **kwargs)

    monkeypatch.setattr(retrieval, "_score_ranks", spy)
    _precision.set_tf32(True)
    generator = torch.Generator().manual_seed(0)
    images, texts = torch.randn(4, 8, generator=generator), torch.randn(8, 8, generator=generator)
    tiled = retrieval.retrieval_metrics_from_embeddings(images, texts, [0, 0, 1, 1, 2, 2, 3, 3], chunk_size=2)
    whole = retrieval.retrieval_metrics_from_embeddings(images, texts, [0, 0, 1, 1, 2, 2, 3, 3])
    assert seen == [False, False] and _precision.tf32_enabled()
    assert tiled == whole


def test_apply_precision_gives_the_autocast_dtype_and_sets_tf32_on_cuda_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [apply_precision(p, None, cpu) for p in ("fp32", "bf16", "fp16")] == [None, torch.bfloat16, torch.float16]
    _precision.set_tf32(True)
    apply_precision("fp32", False, cpu)
    assert _precision._read() == (True, True)  # not a CUDA run: the process's switches stay
    apply_precision("bf16", False, cuda)  # the switches need no GPU to be set
    assert _precision._read() == (False, False)
    apply_precision("fp32", None, cuda)
    assert _precision._read() == (False, False)
    with pytest.raises(ValueError, match=r"precision must be one of \('fp32', 'bf16', 'fp16'\), got 'fp64'"):
        apply_precision("fp64", None, cpu)
