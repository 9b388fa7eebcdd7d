"""Checks of the tensors the evaluators score: index vectors (which image a caption belongs to,
which class an image has) and finite values."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor


def index_vector(values: Any, *, name: str, length: int, bound: int, device: torch.device, kind: str, per: str,
                 rows: str, outside: str, targets: str) -> Tensor:
    """``values`` as a 1-D LongTensor on ``device`` of ``length`` indices in ``range(bound)``.

    The words name what the indices are in every message: ``name`` the argument
    (``"txt2img"``), ``kind`` what an index points at (``"image"``), ``per`` what each entry
    belongs to (``"caption"``), ``rows`` what ``length`` counts (``"captions (text columns)"``),
    ``targets`` what ``bound`` counts (``"images"``) and ``outside`` what an index out of range
    does (``"points at a missing image"``).

    Raises:
        ValueError: not a flat sequence of integers, another length, or an index out of range.
    """
    if isinstance(values, Tensor):
        indices = values.detach()
    else:
        array = np.ascontiguousarray(values)
        if array.dtype == object or array.dtype.kind in "USV":  # ragged lists, strings, bytes
            raise ValueError(f"{name} must be a flat sequence of integer {kind} indices")
        indices = torch.from_numpy(array) if array.size else torch.zeros(0, dtype=torch.long)
    if indices.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one {kind} index per {per}); got shape {tuple(indices.shape)}")
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer {kind} indices; got dtype {indices.dtype}")
    if indices.shape[0] != length:
        raise ValueError(f"{name} has {indices.shape[0]} entries but there are {length} {rows}; need exactly "
                         f"one {kind} index per {per}")
    indices = indices.to(device=device, dtype=torch.long)
    out_of_range = (indices < 0) | (indices >= bound)
    if bool(out_of_range.any()):
        first = int(out_of_range.nonzero()[0, 0])
        raise ValueError(f"{name}[{first}] = {int(indices[first])} {outside}: there are {bound} {targets} "
                         f"(valid indices 0..{bound - 1})")
    return indices


def score_matrix(values: Any, name: str, shape: str, task: str) -> Tensor:
    """``values`` as a 2-D floating-point tensor (integers as float64, half precision as float32:
    CPU comparisons on half types are slow and the upcast is exact), checked finite. ``shape``
    names the axes in the message (``"(n_images, n_texts)"``)."""
    tensor = values.detach() if isinstance(values, Tensor) else torch.from_numpy(np.ascontiguousarray(values))
    if tensor.ndim != 2:
        raise ValueError(f"{name} must be a 2-D {shape} matrix; got shape {tuple(tensor.shape)}")
    if not tensor.dtype.is_floating_point:
        tensor = tensor.double()
    elif tensor.dtype in (torch.float16, torch.bfloat16):
        tensor = tensor.float()
    check_finite(tensor, name, task)
    return tensor


def reject_nonfinite(tensor: Tensor, name: str, task: str) -> None:
    """Raise a `ValueError` saying how many values of ``tensor`` are NaN or infinite and where
    the first is (``name[row, column]``), for ``task`` (``"retrieval"``); nothing if all are finite."""
    bad = ~torch.isfinite(tensor)
    count = int(bad.sum())
    if count == 0:
        return
    nans = int(torch.isnan(tensor).sum())
    first = ", ".join(str(i) for i in bad.nonzero()[0].tolist())
    raise ValueError(
        f"{name} contain {count} NaN or infinite value(s) ({nans} NaN, {count - nans} infinite) of "
        f"{tensor.numel()}, the first at {name}[{first}]; {task} needs finite values (did the model diverge?)"
    )


def check_finite(tensor: Tensor, name: str, task: str) -> None:
    """`reject_nonfinite` after a cheap screen: the sum is finite unless some value is NaN or
    infinite (or the sum overflows, which the full check then clears)."""
    if not bool(torch.isfinite(tensor.sum())):
        reject_nonfinite(tensor, name, task)
