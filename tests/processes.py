"""Starting several worker processes for the multi-process (gloo) tests."""

from __future__ import annotations

import socket
from collections.abc import Callable

import torch.multiprocessing as mp

ATTEMPTS = 3


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def spawn_on_free_port(worker: Callable[..., None], args: tuple, nprocs: int) -> None:
    """``mp.spawn(worker, args=(port, *args))`` with a free local port for the rendezvous.

    The port is free when picked but not reserved, so another process can take it before the
    workers bind it; only that failure is retried, with a new port.
    """
    for attempt in range(ATTEMPTS):
        try:
            mp.spawn(worker, args=(free_port(), *args), nprocs=nprocs, join=True)
            return
        except mp.ProcessRaisedException as error:
            if "address already in use" not in str(error).lower() or attempt == ATTEMPTS - 1:
                raise
