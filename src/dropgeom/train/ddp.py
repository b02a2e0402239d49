"""Checks :func:`dropgeom.train.train` makes before training a ``DistributedDataParallel`` model.

DDP all-reduces the gradients at every backward pass, so every rank must take the same number of optimizer
steps per epoch: a rank with one batch more waits in an all-reduce that no other rank joins (a hang), or
pairs its step with another rank's next epoch (silently wrong gradients, then a crash when that rank leaves).
:func:`check_equal_steps` compares the ranks' step counts once, before the first step, and refuses unequal
shards with one line naming each rank's count.

Example:
    >>> import torch
    >>> check_equal_steps(torch.nn.Linear(2, 2), n_train=10, batch_size=4)   # not DDP: nothing to compare
"""

from __future__ import annotations

import math
from typing import List

import torch
from torch import nn

__all__ = ["check_equal_steps", "is_ddp"]


def is_ddp(model: nn.Module) -> bool:
    """Whether ``model`` is a ``DistributedDataParallel`` wrapper in an initialised process group.

    Raises:
        Nothing: any module gets an answer.

    Example:
        >>> is_ddp(torch.nn.Linear(2, 2))
        False
    """
    dist = torch.distributed
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    return ddp and dist.is_available() and dist.is_initialized()


def _gathered(value: int, model: nn.Module) -> List[int]:
    """``value`` of every rank, in rank order (on the device the process group's backend needs)."""
    dist = torch.distributed
    backend = dist.get_backend()
    device = next(model.parameters()).device if backend == "nccl" else torch.device("cpu")
    mine = torch.tensor([value], dtype=torch.int64, device=device)
    out = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [int(t.item()) for t in out]


def check_equal_steps(model: nn.Module, n_train: int, batch_size: int) -> None:
    """Under DDP, check that every rank takes ``ceil(n_train / batch_size)`` steps per epoch, the same number.

    Does nothing for a model that is not a ``DistributedDataParallel`` wrapper in an initialised process group.
    Every rank of the group must call it (it is a collective), as every rank calls ``train``.

    Raises:
        ValueError: the ranks' shards give different numbers of mini-batches per epoch; the message gives each
            rank's count and training-set size (make the shards equal, e.g. drop the remainder, or choose a
            ``batch_size`` that gives every shard the same number of batches).

    Example:
        >>> check_equal_steps(torch.nn.Linear(2, 2), n_train=7, batch_size=3)   # no process group: nothing to do
    """
    if not is_ddp(model):
        return
    steps = _gathered(math.ceil(n_train / batch_size), model)
    if len(set(steps)) > 1:
        sizes = _gathered(n_train, model)
        per_rank = ", ".join(f"rank {r}: {s} ({n} inputs)" for r, (s, n) in enumerate(zip(steps, sizes)))
        raise ValueError(
            f"DistributedDataParallel needs the same number of optimizer steps per epoch on every rank; with "
            f"batch_size={batch_size} the ranks' training shards give {per_rank}: give every rank a shard of the same "
            "size (drop the remainder) or a batch_size that splits every shard into as many batches"
        )
