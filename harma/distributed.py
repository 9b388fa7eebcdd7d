"""Thin helpers around ``torch.distributed`` for training and evaluation.

Every helper degrades to the single-process behaviour when no process group is initialised,
so the same code path runs on a laptop, on one GPU and under ``torchrun``.

Gradient convention of `all_gather_with_grad`: every rank computes the loss on the
full gathered batch (the same scalar on every rank) and DDP averages parameter gradients over
ranks. The backward pass therefore sums the incoming gradient over ranks before slicing out
the local shard; after DDP's averaging, parameter gradients equal those of one process that
saw the concatenated batch.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = [
    "all_gather_no_grad",
    "all_gather_with_grad",
    "barrier",
    "cleanup_distributed",
    "get_rank",
    "get_world_size",
    "init_distributed_from_env",
    "is_distributed",
    "is_main_process",
    "raise_on_any_rank",
]


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Rank of this process in the default group; 0 when not distributed."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes in the default group; 1 when not distributed."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0 (and always when not distributed)."""
    return get_rank() == 0


def _gather_first_dim_sizes(tensor: torch.Tensor) -> list[int]:
    local_size = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
    all_sizes = [torch.zeros_like(local_size) for _ in range(get_world_size())]
    dist.all_gather(all_sizes, local_size)
    return [int(size.item()) for size in all_sizes]


def _all_gather_concat(tensor: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Concatenate ``tensor`` of every rank along dim 0; returns it and the per-rank sizes.

    ``dist.all_gather`` needs equal shapes, so shards of different lengths are zero-padded
    to the longest one and the padding is cut off again after the exchange.
    """
    tensor = tensor.contiguous()
    sizes = _gather_first_dim_sizes(tensor)
    max_size = max(sizes)
    if tensor.shape[0] == max_size:
        padded = tensor
    else:
        padded = tensor.new_zeros((max_size, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
    buffers = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(buffers, padded)
    if all(size == max_size for size in sizes):
        return torch.cat(buffers, dim=0), sizes
    return torch.cat([buffer[:size] for buffer, size in zip(buffers, sizes, strict=True)], dim=0), sizes


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        gathered, sizes = _all_gather_concat(tensor)
        rank = get_rank()
        ctx.local_start = sum(sizes[:rank])
        ctx.local_size = sizes[rank]
        return gathered

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # Each rank back-propagates the same loss, so the gradient w.r.t. the local shard
        # is spread over the copies of that shard held by all ranks: sum them. The clone
        # keeps the in-place all_reduce off autograd's buffer.
        grad = grad_output.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.local_start : ctx.local_start + ctx.local_size]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (shape ``(n_rank, ...)``) of all ranks along dim 0, with gradient.

    Ranks may hold different first-dim sizes; trailing dims must match. The result has shape
    ``(sum of n_rank, ...)`` in rank order and is identical on every rank. The backward pass
    all-reduces (sums) the gradient and returns the local slice, which is exact when every
    rank computes the loss on the gathered batch and DDP averages gradients (see module
    docstring). Identity when not distributed.
    """
    if not is_distributed() or get_world_size() == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor)


def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Like `all_gather_with_grad` but detached; for ids, labels and evaluation."""
    if not is_distributed() or get_world_size() == 1:
        return tensor.detach()
    with torch.no_grad():
        gathered, _ = _all_gather_concat(tensor.detach())
    return gathered


def init_distributed_from_env(backend: str | None = None) -> tuple[int, int, int]:
    """Initialise the default process group from torchrun's environment variables.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (plus ``MASTER_ADDR``/``MASTER_PORT``
    through the ``env://`` init method). The backend defaults to NCCL when CUDA is available
    (and then the CUDA device is set to ``LOCAL_RANK``), gloo otherwise. An already
    initialised group is reused.

    Returns:
        ``(rank, local_rank, world_size)``; ``(0, 0, 1)`` when the variables are absent.
    """
    if is_distributed():
        return get_rank(), int(os.environ.get("LOCAL_RANK", 0)), get_world_size()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 0, 1
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size)
    return rank, local_rank, world_size


def cleanup_distributed() -> None:
    """Destroy the default process group if one is initialised; no-op otherwise."""
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    """``dist.barrier()`` under ``torch.distributed``; no-op otherwise."""
    if is_distributed():
        dist.barrier()


def raise_on_any_rank(error: BaseException | None) -> None:
    """Raise on every rank if any rank failed, so that no rank waits forever at a collective.

    Args:
        error: this rank's failure, or None. It is raised on its own rank; the other ranks
            raise a `RuntimeError` pointing at it.
    """
    if not is_distributed():
        if error is not None:
            raise error
        return
    failed = torch.tensor([1 if error is not None else 0])
    if dist.get_backend() == "nccl":
        failed = failed.cuda()
    dist.all_reduce(failed)
    if error is not None:
        raise error
    if int(failed.item()):
        raise RuntimeError("another rank failed (see its error above)")
