"""A fused float16 dot-product kernel for single-query exact search, compiled by ``torch.compile``.

The plain exact search converts each block of float16 rows to float32, then multiplies it by
the query (BLAS): on one core the conversion costs more than reading the rows, and a single
query over 1,000,000 x 512 rows takes about 2.5 times the memory-bandwidth limit. The kernel
here reads each row once, converts and multiplies in registers, and reduces (about 1.5 times
the limit on the same machine; ``benchmarks/search.py``). It is compiled once per embedding
width with the number of rows symbolic, so one compiled loop scores every row, whatever the
size of the block it lies in (its score does not depend on the shards or segments), and only
for one query at a time: a batch of queries is a matrix product, which BLAS does well. It
takes C-contiguous float16 rows only (what an index holds); other arrays go through BLAS.

Compiling takes a few seconds (less when the inductor cache on disk has the kernel), so it pays
in a long-lived process (``serve``) or over many queries, not for one query from the command
line. The compiled code is specialised to the process's global settings (the number of
threads, deterministic algorithms, autocast...): changing one recompiles it (about a second,
during a query), and past ``torch._dynamo``'s recompile limit the width falls back to BLAS.
Wherever the kernel cannot be had (no C++ compiler, ``torch.compile`` disabled or failing), a
warning says why, once per width, and the plain path is used.
"""

from __future__ import annotations

import os
import threading
import types
import warnings
from collections.abc import Callable

import numpy as np
import torch

__all__ = ["FusedKernelUnavailable", "fused_dots"]

Kernel = Callable[[np.ndarray, torch.Tensor], torch.Tensor]
_KERNELS: dict[int, Kernel | None] = {}
_WIDTH_LOCKS: dict[int, threading.Lock] = {}
_LOCK = threading.Lock()


class FusedKernelUnavailable(RuntimeError):
    """The fused kernel failed at a query (e.g. past the recompile limit): use BLAS. The width's
    kernel is dropped and a warning was given."""


def _dots(rows: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    return (rows.float() * query).sum(dim=1)


def fused_dots(dim: int) -> Kernel | None:
    """The compiled kernel for embeddings of width ``dim``: ``kernel(rows, query)`` with ``rows``
    a C-contiguous float16 array ``(n, dim)`` (a memory map) and ``query`` float32 ``(dim,)``
    returns the ``(n,)`` float32 dot products. Compiled (and checked) on the first call for a
    width; None when it cannot be had (warned once per width).

    The kernel raises `FusedKernelUnavailable` when a call fails (then warned, and None from
    here on for that width).
    """
    with _LOCK:
        if dim in _KERNELS:
            return _KERNELS[dim]
        width_lock = _WIDTH_LOCKS.setdefault(dim, threading.Lock())
    with width_lock:  # compiling one width does not hold up the queries of another
        if dim not in _KERNELS:
            kernel = _compile(dim)
            with _LOCK:
                _KERNELS[dim] = kernel
    return _KERNELS[dim]


def _unavailable(dim: int, why: str) -> None:
    warnings.warn(f"harma.search: the fused exact-search kernel for width {dim} is not available ({why}); "
                  f"exact search uses the plain float32 path", RuntimeWarning, stacklevel=4)


def _describe(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _compile(dim: int) -> Kernel | None:
    if torch._dynamo.config.disable or os.environ.get("TORCHDYNAMO_DISABLE", "") not in ("", "0"):
        _unavailable(dim, "torch.compile is disabled in this process")  # it would run uncompiled, slowly
        return None
    # A code object of its own per width: each width has its own budget of recompiles.
    code = _dots.__code__.replace(co_name=f"_dots_width_{dim}")
    function = types.FunctionType(code, _dots.__globals__, code.co_name)
    try:
        compiled = torch.compile(function, dynamic=False, fullgraph=True)
    except Exception as error:  # noqa: BLE001 - any compiler or backend failure means: use BLAS
        _unavailable(dim, _describe(error))
        return None

    def kernel(rows: np.ndarray, query: torch.Tensor) -> torch.Tensor:
        # Normal tensors and one grad mode on every call, whatever the caller's mode or thread:
        # the compiled code's guards then hold and nothing recompiles for those.
        try:
            with torch.inference_mode(False), torch.no_grad():
                block = torch.from_numpy(rows)
                if len(block) < 2:  # one row would be specialised (a second compiled loop): pad it
                    return compiled(_two_rows(block), query.clone())[: len(block)]
                torch._dynamo.mark_dynamic(block, 0)
                return compiled(block, query.clone())
        except Exception as error:  # noqa: BLE001 - e.g. the recompile limit: fall back, say why
            with _LOCK:
                dropped = _KERNELS.get(dim) is not None
                _KERNELS[dim] = None
            if dropped:
                _unavailable(dim, _describe(error))
            raise FusedKernelUnavailable(_describe(error)) from error

    try:
        rows = np.zeros((3, dim), dtype=np.float16)
        rows[1, 0] = 1.0
        if kernel(rows, torch.ones(dim)).tolist() != [0.0, 1.0, 0.0]:
            raise RuntimeError("the compiled kernel gave wrong dot products")
    except FusedKernelUnavailable as error:
        _unavailable(dim, str(error))
        return None
    except Exception as error:  # noqa: BLE001
        _unavailable(dim, _describe(error))
        return None
    return kernel


def _two_rows(block: torch.Tensor) -> torch.Tensor:
    padded = torch.zeros(2, block.shape[1], dtype=block.dtype)
    padded[: len(block)] = block
    torch._dynamo.mark_dynamic(padded, 0)
    return padded
