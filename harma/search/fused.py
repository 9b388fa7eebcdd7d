"""A fused float16 dot-product kernel for single-query exact search, compiled by ``torch.compile``.

The plain exact search converts each block of float16 rows to float32, then multiplies it by
the query (BLAS): on one core the conversion costs more than reading the rows, and a single
query over 1,000,000 x 512 rows takes about 2.5 times the memory-bandwidth limit. The kernel
here reads each row once, converts and multiplies in registers, and reduces (about 1.5 times
the limit on the same machine; ``benchmarks/search.py``). It is compiled once per embedding
width with the number of rows symbolic, so one compiled loop scores every row, whatever the
size of the block it lies in (its score does not depend on the shards or segments), and only
for one query at a time: a batch of queries is a matrix product, which BLAS does well.

Compiling takes a few seconds (less when the inductor cache on disk has the kernel), so it pays
in a long-lived process (``serve``) or over many queries, not for one query from the command
line. It needs what ``torch.compile`` needs on the CPU (a C++ compiler); where compiling fails
the plain path is used and a warning says why, once per width.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable

import numpy as np
import torch

__all__ = ["fused_dots"]

Kernel = Callable[[np.ndarray, torch.Tensor], torch.Tensor]
_KERNELS: dict[int, Kernel | None] = {}
_LOCK = threading.Lock()


def _dots(rows: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    return (rows.float() * query).sum(dim=1)


def fused_dots(dim: int) -> Kernel | None:
    """The compiled kernel for embeddings of width ``dim``: ``kernel(rows, query)`` with ``rows``
    a float16 array ``(n, dim)`` (a memory map) and ``query`` float32 ``(dim,)`` returns the
    ``(n,)`` float32 dot products. Compiled (and checked) on the first call for a width; None
    when compiling failed (warned once per width).
    """
    with _LOCK:
        if dim not in _KERNELS:
            _KERNELS[dim] = _compile(dim)
        return _KERNELS[dim]


def _compile(dim: int) -> Kernel | None:
    compiled: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = _dots

    def kernel(rows: np.ndarray, query: torch.Tensor) -> torch.Tensor:
        # Normal tensors and one grad mode on every call, whatever the caller's mode or thread:
        # the compiled code's guards then always hold and nothing recompiles.
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a read-only memory map: nothing writes to it
            block = torch.from_numpy(np.asarray(rows))
            if len(block) < 2:  # one row would be specialised (a second compiled loop): pad it
                return compiled(_two_rows(block), query.clone())[: len(block)]
            torch._dynamo.mark_dynamic(block, 0)
            return compiled(block, query.clone())

    try:
        compiled = torch.compile(_dots, dynamic=False, fullgraph=True)
        rows = np.zeros((3, dim), dtype=np.float16)
        rows[1, 0] = 1.0
        if kernel(rows, torch.ones(dim)).tolist() != [0.0, 1.0, 0.0]:
            raise RuntimeError("the compiled kernel gave wrong dot products")
    except Exception as error:  # noqa: BLE001 - any compiler or backend failure means: use BLAS
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        warnings.warn(f"harma.search: the fused exact-search kernel could not be compiled "
                      f"({type(error).__name__}: {first_line}); exact search uses the plain float32 path",
                      RuntimeWarning, stacklevel=3)
        return None
    return kernel


def _two_rows(block: torch.Tensor) -> torch.Tensor:
    padded = torch.zeros(2, block.shape[1], dtype=block.dtype)
    padded[: len(block)] = block
    torch._dynamo.mark_dynamic(padded, 0)
    return padded
