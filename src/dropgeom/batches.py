r"""What a batch is, how a data set is read batch by batch, and means over inputs across batches and processes.

Every quantity of docs/theory.md that is a mean over inputs, :math:`\bar q = \frac1N \sum_{i=1}^N q_i` (the Fisher of
section 2, the dropout terms and gap of section 4), can be accumulated batch by batch: each batch contributes
:math:`n_b \bar q_b` and the total is divided by the global :math:`N` once (a mean over the whole data set, never a
mean of batch means). Under ``torch.distributed`` every rank reads its own shard and the sums (and :math:`N`) are
all-reduced before the division.

**What a batch is.** A data set is

- a tensor of inputs (or a *tuple* of input tensors for a model with several inputs), with ``targets=`` where the
  quantity needs labels, split into chunks of ``batch_size`` rows;
- an iterable of batches (a :class:`torch.utils.data.DataLoader`, a list, a generator). Each batch is either a tensor of
  inputs, or a tuple/list ``(inputs, targets)`` as a ``DataLoader`` over a ``TensorDataset(x, y)`` yields it (the
  curvlinops convention). A model with several inputs takes them as a tuple in the first slot:
  ``((x1, x2), y)``. A batch of exactly two tensors is therefore always read as ``(inputs, targets)``; a *list*
  is always a list of batches, a *tuple* of tensors always the inputs of one data set (:func:`is_batches`).

Example:
    >>> import torch
    >>> x = torch.arange(10.0)[:, None]
    >>> [tuple(b[0][0].shape) for b in iter_batches([x[:4], x[4:]])]
    [(4, 1), (6, 1)]
    >>> float(stream_mean(lambda inp, t: inp[0].mean(), [x[:4], x[4:]]))   # the mean of all 10, not of 1.5 and 6.5
    4.5
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = ["Batch", "Data", "is_batches", "iter_batches", "stream_mean", "check_same_parameters", "all_reduce", "shard", "rank"]

Batch = Tuple[Tuple[Tensor, ...], Optional[Tensor]]
Data = Union[Tensor, Tuple[Tensor, ...], Iterable[Any]]


def _split_batch(batch: Any, index: int) -> Batch:
    """``batch`` -> ``(inputs tuple, targets or None)`` by the convention of the module docstring."""
    if isinstance(batch, Tensor):
        return (batch,), None
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2:
            inputs, targets = batch
            if isinstance(inputs, Tensor):
                inputs = (inputs,)
            elif isinstance(inputs, (tuple, list)) and inputs and all(isinstance(t, Tensor) for t in inputs):
                inputs = tuple(inputs)
            else:
                raise TypeError(
                    f"batch {index}: the inputs (first element) must be a tensor or a tuple of tensors, got "
                    f"{type(inputs).__name__}"
                )
            if targets is not None and not isinstance(targets, Tensor):
                raise TypeError(f"batch {index}: the targets (second element) must be a tensor, got {type(targets).__name__}")
            return inputs, targets
        if len(batch) == 1 and isinstance(batch[0], Tensor):
            return (batch[0],), None
    raise TypeError(
        f"batch {index}: expected a tensor of inputs or a pair (inputs, targets), got "
        f"{type(batch).__name__}{'' if not isinstance(batch, (tuple, list)) else f' of length {len(batch)}'}; "
        "a model with several inputs takes them as ((x1, x2), targets)"
    )


def _check_batch(inputs: Tuple[Tensor, ...], targets: Optional[Tensor], index: int, ref: Optional[List[Any]]) -> List[Any]:
    n = inputs[0].shape[0] if inputs[0].dim() else 0
    for t in inputs:
        if t.dim() == 0 or t.shape[0] != n:
            raise ValueError(
                f"batch {index}: the input tensors disagree in their sample axis: {[tuple(t.shape) for t in inputs]}"
            )
    if targets is not None and (targets.dim() == 0 or targets.shape[0] != n):
        raise ValueError(f"batch {index}: {n} inputs but targets of shape {tuple(targets.shape)}")
    sig = [(tuple(t.shape[1:]), t.dtype) for t in inputs] + [
        None if targets is None else (tuple(targets.shape[1:]), targets.dtype)
    ]
    if ref is not None and sig != ref:
        raise ValueError(
            f"batch {index} has shapes/dtypes {sig} but the first batch had {ref}: every batch must have the same "
            "shape apart from its size"
        )
    return sig


def iter_batches(data: Data, targets: Optional[Tensor] = None, *, batch_size: Optional[int] = None) -> Iterator[Batch]:
    """Yield ``(inputs, targets)`` batches of ``data`` (see the module docstring for what a batch is).

    Args:
        data: a tensor (or tuple of input tensors) of ``N`` inputs, or an iterable of batches.
        targets: labels for tensor ``data`` (``[N]`` or ``[N, K]``); must be ``None`` for an iterable.
        batch_size: rows per chunk for tensor ``data`` (default: all rows at once).

    Raises:
        ValueError: on an empty data set, batches whose shapes disagree, a non-positive ``batch_size``, or
            ``targets`` given together with an iterable.
        TypeError: on a batch that is neither a tensor nor an ``(inputs, targets)`` pair.

    Example:
        >>> import torch
        >>> [tuple(b[0][0].shape) for b in iter_batches(torch.zeros(5, 2), batch_size=2)]
        [(2, 2), (2, 2), (1, 2)]
    """
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(data, Tensor) or (isinstance(data, tuple) and data and all(isinstance(t, Tensor) for t in data)):
        inputs = (data,) if isinstance(data, Tensor) else tuple(data)
        n = inputs[0].shape[0] if inputs[0].dim() else 0
        if n == 0:
            raise ValueError("the data set is empty (0 inputs)")
        _check_batch(inputs, targets, 0, None)
        step = batch_size or n
        for start in range(0, n, step):
            yield tuple(t[start : start + step] for t in inputs), None if targets is None else targets[start : start + step]
        return
    if targets is not None:
        raise ValueError("targets= goes with tensor inputs; an iterable of batches carries its targets in each batch")
    ref = None
    count = 0
    for i, batch in enumerate(data):
        inputs, tgt = _split_batch(batch, i)
        ref = _check_batch(inputs, tgt, i, ref)
        if inputs[0].shape[0] == 0:
            continue
        count += 1
        yield inputs, tgt
    if count == 0:
        raise ValueError("the data loader yielded no batches (an empty data set)")


# ----------------------------------------------------------------------------- distributed
def _dist() -> Optional[Any]:
    """``torch.distributed`` when a process group is initialised, else ``None``."""
    dist = torch.distributed
    return dist if dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    """This process's rank in the process group (0 without one).

    Raises:
        Nothing of its own; what ``torch.distributed.get_rank`` raises passes through.

    Example:
        >>> rank()
        0
    """
    dist = _dist()
    return dist.get_rank() if dist is not None else 0


def all_reduce(t: Tensor) -> Tensor:
    """``t`` summed over the ranks of the process group, in place (``t`` itself without one).

    The step that turns per-rank sums into the global sums of a mean over inputs (module docstring).

    Raises:
        TypeError: ``t`` is not a tensor (refused with and without a process group, so a single-process run
            fails where a distributed one would). What ``torch.distributed.all_reduce`` raises passes through.

    Example:
        >>> all_reduce(torch.ones(2))
        tensor([1., 1.])
    """
    if not isinstance(t, Tensor):
        raise TypeError(f"all_reduce sums a tensor in place, got {type(t).__name__}")
    dist = _dist()
    if dist is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def check_same_parameters(model: nn.Module) -> None:
    """Under ``torch.distributed``, check that every rank holds the same parameters (a SHA-256 of their bytes).

    Does nothing without an initialised process group.

    Raises:
        RuntimeError: naming the ranks whose parameters differ from rank 0's.

    Example:
        >>> import torch
        >>> check_same_parameters(torch.nn.Linear(2, 2))   # no process group: nothing to compare
    """
    dist = _dist()
    if dist is None:
        return
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    digest = torch.tensor([int.from_bytes(h.digest()[:7], "little")], dtype=torch.int64)
    world = dist.get_world_size()
    gathered = [torch.zeros_like(digest) for _ in range(world)]
    dist.all_gather(gathered, digest)
    bad = [r for r, d in enumerate(gathered) if int(d) != int(gathered[0])]
    if bad:
        raise RuntimeError(
            f"ranks {bad} hold different model parameters than rank 0: broadcast the parameters (or build the model "
            "from the same seed) before computing a distributed Fisher"
        )


def is_batches(data: Any) -> bool:
    """True when ``data`` is an iterable of batches rather than a tensor (or tuple of tensors) of inputs.

    A ``str``, ``bytes`` or ``dict`` is never batches. Nothing is iterated (a generator is left as it was).

    Raises:
        Nothing: any object gets an answer.

    Example:
        >>> import torch
        >>> x = torch.zeros(4, 2)
        >>> is_batches(x), is_batches((x, x)), is_batches([x]), is_batches([(x, torch.zeros(4))])
        (False, False, True, True)
    """
    if isinstance(data, Tensor) or (isinstance(data, tuple) and data and all(isinstance(t, Tensor) for t in data)):
        return False
    return isinstance(data, Iterable) and not isinstance(data, (str, bytes, dict))


def shard(n_local: int) -> Tuple[int, int]:
    """``(N, start)``: the global number of inputs and where this rank's rows start (rank order; ``(n, 0)`` alone).

    ``N = sum_r n_r`` and ``start = sum_{r' < r} n_r'`` over the ranks' local counts ``n_r``.

    Raises:
        ValueError: ``n_local`` is not an int ``>= 0``. What ``torch.distributed.all_gather`` raises passes through.

    Example:
        >>> shard(7)
        (7, 0)
    """
    if isinstance(n_local, bool) or not isinstance(n_local, int) or n_local < 0:
        raise ValueError(f"n_local (this rank's number of inputs) must be an int >= 0, got {n_local!r}")
    dist = _dist()
    if dist is None:
        return n_local, 0
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([n_local], dtype=torch.int64))
    sizes = [int(c) for c in counts]
    return sum(sizes), sum(sizes[: dist.get_rank()])


# ----------------------------------------------------------------------------- any mean over inputs
def _leaves(obj: Any, path: str, keep: Sequence[str], stderr: Sequence[str], out: List[Tuple[str, str, Any]]) -> None:
    """Flatten a result into ``(path, role, value)`` leaves; role is ``mean``, ``stderr`` or ``keep``."""
    name = path.rsplit(".", 1)[-1]
    if name in keep:
        out.append((path, "keep", obj))
    elif isinstance(obj, dict):
        for k in obj:
            _leaves(obj[k], f"{path}.{k}", keep, stderr, out)
    elif hasattr(obj, "_fields"):  # NamedTuple
        for k in obj._fields:
            _leaves(getattr(obj, k), f"{path}.{k}", keep, stderr, out)
    elif hasattr(obj, "__dataclass_fields__"):
        for k in obj.__dataclass_fields__:
            _leaves(getattr(obj, k), f"{path}.{k}", keep, stderr, out)
    elif isinstance(obj, Tensor) and obj.is_floating_point() or isinstance(obj, float):
        out.append((path, "stderr" if name in stderr else "mean", obj))
    else:  # ints, strings, flags: configuration, the same for every batch
        out.append((path, "keep", obj))


def _rebuild_result(obj: Any, path: str, values: dict) -> Any:
    if path in values:
        return values[path]
    if isinstance(obj, dict):
        return {k: _rebuild_result(v, f"{path}.{k}", values) for k, v in obj.items()}
    if hasattr(obj, "_fields"):
        return type(obj)(*(_rebuild_result(getattr(obj, k), f"{path}.{k}", values) for k in obj._fields))
    if hasattr(obj, "__dataclass_fields__"):
        return dataclasses.replace(
            obj,
            **{
                k: _rebuild_result(getattr(obj, k), f"{path}.{k}", values)
                for k in obj.__dataclass_fields__
                if obj.__dataclass_fields__[k].init
            },
        )
    return obj


def stream_mean(
    fn: Callable[[Tuple[Tensor, ...], Optional[Tensor]], Any],
    data: Data,
    targets: Optional[Tensor] = None,
    *,
    batch_size: Optional[int] = None,
    keep: Sequence[str] = ("p",),
    stderr: Sequence[str] = ("stderr",),
) -> Any:
    r"""A mean over inputs, :math:`\bar q = \frac1N \sum_b n_b \bar q_b`, of any result ``fn(inputs, targets)`` over batches.

    Every floating leaf of the result (floats, floating tensors, inside dicts, NamedTuples and dataclasses) is the
    size-weighted mean of its per-batch values, all-reduced over ranks under ``torch.distributed``; leaves named in
    ``stderr`` are standard errors of independent batch estimates and combine as
    :math:`\sqrt{\sum_b (n_b/N)^2 s_b^2}`; leaves named in ``keep`` and non-float leaves (ints, strings) are taken
    from the first batch. This is exact for every quantity defined as a mean over inputs (docs/theory.md: the
    dropout terms and gap of section 4, the penalty's value), whatever the batch sizes.

    Raises:
        ValueError: on an empty data set or disagreeing batches (see :func:`iter_batches`).

    Example:
        >>> import torch
        >>> x = torch.arange(10.0)[:, None]
        >>> stream_mean(lambda inp, t: {"mean": inp[0].mean(), "count": 1}, x, batch_size=3)
        {'mean': tensor(4.5000), 'count': 1}
    """
    sums: Optional[List[Any]] = None
    first: Optional[Any] = None
    leaves0: List[Tuple[str, str, Any]] = []
    n_local = 0
    for inputs, tgt in iter_batches(data, targets, batch_size=batch_size):
        res = fn(inputs, tgt)
        n_b = inputs[0].shape[0]
        leaves: List[Tuple[str, str, Any]] = []
        _leaves(res, "", keep, stderr, leaves)
        if first is None:
            first, leaves0 = res, leaves
            sums = [None] * len(leaves)
        elif [(p, r) for p, r, _ in leaves] != [(p, r) for p, r, _ in leaves0]:
            raise ValueError("the function returned results of different structure for different batches")
        assert sums is not None
        for i, (_, role, v) in enumerate(leaves):
            if role == "keep":
                continue
            v = v.detach() if isinstance(v, Tensor) else torch.tensor(float(v), dtype=torch.float64)
            contrib = v * n_b if role == "mean" else (v * n_b) ** 2
            sums[i] = contrib if sums[i] is None else sums[i] + contrib
        n_local += n_b
    assert first is not None and sums is not None
    N = float(all_reduce(torch.tensor([float(n_local)], dtype=torch.float64)).item())
    values = {}
    for (path, role, v0), s in zip(leaves0, sums):
        if role == "keep":
            continue
        s = all_reduce(s.clone())
        out = s / N if role == "mean" else s.sqrt() / N
        values[path] = out if isinstance(v0, Tensor) else float(out)
    return _rebuild_result(first, "", values)
