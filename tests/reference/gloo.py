"""Two-process test plumbing: ``torch.distributed`` with the gloo backend on 127.0.0.1 only."""

from __future__ import annotations

import os
import socket
from typing import Callable

import torch


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for ``MASTER_PORT``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gloo_rank(rank: int, world: int, port: int, body: Callable[[], None]) -> None:
    """Run ``body()`` as rank ``rank`` of a gloo group on 127.0.0.1 (one torch thread), then leave.

    ``body`` saves its results; both ranks pass a barrier before either tears gloo down. On success the
    process exits with ``os._exit(0)``, skipping interpreter finalization: gloo's threads can abort a process
    at exit ("terminate called without an active exception", seen once under load; pytorch/pytorch#190489).
    """
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        body()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)
