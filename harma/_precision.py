"""TF32 switches of CUDA matrix products and convolutions, on every PyTorch harma supports.

PyTorch 2.9 added per-backend ``fp32_precision`` settings beside the ``allow_tf32`` flags. Once
the two disagree (someone set only the new one), reading an ``allow_tf32`` flag raises a
RuntimeError, while the new settings can always be read and setting an ``allow_tf32`` flag
updates both. So harma reads the new settings where they exist and always writes the flags.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def _read() -> tuple[bool, bool]:
    """Whether TF32 is allowed now for (matrix products, convolutions)."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision") and hasattr(cudnn, "conv"):
        return matmul.fp32_precision == "tf32", cudnn.conv.fp32_precision == "tf32"
    return bool(matmul.allow_tf32), bool(cudnn.allow_tf32)


def _write(matmul: bool, convolution: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = matmul
    torch.backends.cudnn.allow_tf32 = convolution


def set_tf32(enabled: bool) -> None:
    """Let float32 matrix products (cuBLAS) and convolutions (cuDNN) on CUDA run in TF32
    (``enabled``) or in full float32. A process-wide switch, like PyTorch's own."""
    _write(enabled, enabled)


def tf32_enabled() -> bool:
    """Whether float32 matrix products on CUDA may run in TF32 now."""
    return _read()[0]


@contextlib.contextmanager
def tf32_disabled() -> Iterator[None]:
    """Full float32 matrix products and convolutions on CUDA inside the block; both switches
    are put back as they were afterwards."""
    saved = _read()
    set_tf32(False)
    try:
        yield
    finally:
        _write(*saved)
