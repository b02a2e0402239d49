"""What :func:`dropgeom.train.train` agrees on across the ranks of a ``DistributedDataParallel`` model.

DDP all-reduces the gradients at every backward pass, so every rank must take the same optimizer steps: a rank
with one batch more, or one that stops alone, waits in an all-reduce that no other rank joins (a hang), or
pairs its step with another rank's next epoch (silently wrong gradients, then a crash when that rank leaves).
:func:`check_equal_steps` compares the ranks' step counts once, before the first step, and refuses unequal
shards with one line naming each rank's count. Every decision to stop is then taken on all ranks together:
:func:`agree_any` (a batch's divergence on any rank, a callback's stop on any rank) and :func:`global_record`
(the epoch's metrics over the whole data, so early stopping and its best epoch are the same on every rank;
the parameters are the same on every rank under DDP, so restoring the best state keeps them in sync).

Example:
    >>> import torch
    >>> check_equal_steps(torch.nn.Linear(2, 2), n_train=10, batch_size=4)   # not DDP: nothing to compare
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping

import torch
from torch import nn

__all__ = ["check_equal_steps", "is_ddp", "agree_any", "global_record"]


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
    mine = torch.tensor([value], dtype=torch.int64, device=_group_device(model))
    out = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [int(t.item()) for t in out]


def check_equal_steps(model: nn.Module, n_train: int, batch_size: int, n_test: int = 0) -> None:
    """Under DDP, check that every rank takes ``ceil(n_train / batch_size)`` steps per epoch, the same number, and
    that every rank has a test split (``n_test > 0``) or none.

    Does nothing for a model that is not a ``DistributedDataParallel`` wrapper in an initialised process group.
    Every rank of the group must call it (it is a collective), as every rank calls ``train``.

    Raises:
        ValueError: the ranks' shards give different numbers of mini-batches per epoch; the message gives each
            rank's count and training-set size (make the shards equal, e.g. drop the remainder, or choose a
            ``batch_size`` that gives every shard the same number of batches); some ranks have a test split and
            others none (the message says which).

    Example:
        >>> check_equal_steps(torch.nn.Linear(2, 2), n_train=7, batch_size=3)   # no process group: nothing to do
    """
    if not is_ddp(model):
        return
    tests = _gathered(int(n_test > 0), model)
    if len(set(tests)) > 1:  # the epoch records are summed over ranks key by key (global_record): the keys must agree
        have = ", ".join(f"rank {r}: {'a test split' if t else 'none'}" for r, t in enumerate(tests))
        raise ValueError(f"under DistributedDataParallel every rank needs a test split, or none ({have})")
    steps = _gathered(math.ceil(n_train / batch_size), model)
    if len(set(steps)) > 1:
        sizes = _gathered(n_train, model)
        per_rank = ", ".join(f"rank {r}: {s} ({n} inputs)" for r, (s, n) in enumerate(zip(steps, sizes)))
        raise ValueError(
            f"DistributedDataParallel needs the same number of optimizer steps per epoch on every rank; with "
            f"batch_size={batch_size} the ranks' training shards give {per_rank}: give every rank a shard of the same "
            "size (drop the remainder) or a batch_size that splits every shard into as many batches"
        )


def _group_device(model: nn.Module) -> torch.device:
    """Where the process group's collectives take their tensors (the model's device for NCCL, else the CPU)."""
    nccl = torch.distributed.get_backend() == "nccl"
    return next(model.parameters()).device if nccl else torch.device("cpu")


def agree_any(flag: bool, model: nn.Module) -> bool:
    """``flag`` on any rank (an all-reduce of its maximum); ``flag`` itself when ``model`` is not DDP.

    Every rank of the group must call it at the same point (it is a collective).

    Raises:
        Nothing of its own; a broken process group raises as ``torch.distributed.all_reduce`` does.

    Example:
        >>> agree_any(True, torch.nn.Linear(2, 2))   # not DDP: the rank's own answer
        True
    """
    if not is_ddp(model):
        return bool(flag)
    t = torch.tensor([int(bool(flag))], dtype=torch.int64, device=_group_device(model))
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def global_record(record: Mapping[str, float], n_train: int, n_test: int, model: nn.Module) -> Dict[str, float]:
    r"""The epoch's record over every rank's shard: each ``train_*`` / ``objective_*`` (``test_*``) metric becomes
    the shard-size-weighted mean :math:`\sum_r n_r m_r / \sum_r n_r` of the ranks' values.

    Exact for the means (NLL, accuracy, the objective's batch means); for the expected calibration error it is
    the mean of the ranks' ECEs, not the ECE of the pooled predictions. ``epoch``, ``lr`` and ``seconds`` stay
    the rank's own. Not DDP: ``record`` unchanged. Every rank must call it (a collective), with the same keys.

    Raises:
        Nothing of its own (:func:`check_equal_steps` has refused ranks with and without a test split, whose keys
        would differ); a broken process group raises as ``torch.distributed.all_reduce`` does.

    Example:
        >>> global_record({"epoch": 1, "train_nll": 0.5}, 10, 0, torch.nn.Linear(2, 2))
        {'epoch': 1, 'train_nll': 0.5}
    """
    if not is_ddp(model):
        return dict(record)
    keys = sorted(k for k in record if k.startswith(("train_", "test_", "objective_")))
    sizes = [float(n_test if k.startswith("test_") else n_train) for k in keys]
    t = torch.tensor([record[k] * n for k, n in zip(keys, sizes)] + [float(n_train), float(n_test)], dtype=torch.float64)
    t = t.to(_group_device(model))
    torch.distributed.all_reduce(t)
    total_train, total_test = float(t[-2]), float(t[-1])
    out = dict(record)
    for i, k in enumerate(keys):
        out[k] = float(t[i]) / (total_test if k.startswith("test_") else total_train)
    return out
