r"""The Fisher information over a data set of any size: batches streamed under a memory budget, across processes.

Every Fisher in docs/theory.md section 2 is a mean over inputs, :math:`F = \frac1N \sum_{i=1}^N F_i`, so it can be
accumulated batch by batch: each batch contributes its *sum* :math:`\sum_{i \in b} F_i` and the total is divided by
the global :math:`N` once at the end (a mean over the whole data set, never a mean of batch means). Under
``torch.distributed`` every rank accumulates its own shard and the sums (and :math:`N`) are all-reduced before the
division, so the result does not depend on how the data were split.

KFAC is the one structure that is not a plain sum: its block is :math:`B \otimes A` with
:math:`A = \frac{1}{N T}\sum_{i,t} \tilde a_{it} \tilde a_{it}^\top` and :math:`B = \frac1N \sum_{i,r,t} g_{irt} g_{irt}^\top`
(theory.md 2, "expand" KFAC); both factors are accumulated as sums and combined at the end, which reproduces the
all-in-memory factors exactly.

**What a batch is.** ``data`` may be

- a tensor of inputs (or a *tuple* of input tensors for a model with several inputs), with ``targets=`` where the
  quantity needs labels, split into chunks of ``batch_size`` rows, or of as many rows as the memory budget allows;
- an iterable of batches (a :class:`torch.utils.data.DataLoader`, a list, a generator). Each batch is either a tensor of
  inputs, or a tuple/list ``(inputs, targets)`` as a ``DataLoader`` over a ``TensorDataset(x, y)`` yields it (the
  curvlinops convention). A model with several inputs takes them as a tuple in the first slot:
  ``((x1, x2), y)``. A batch of exactly two tensors is therefore always read as ``(inputs, targets)``; a *list*
  is always a list of batches, a *tuple* of tensors always the inputs of one data set.

**Memory.** Peak memory is that of one batch, and within a batch :func:`~dropgeom.fisher.fisher` keeps the
back-propagated factors of one chunk under ``memory_budget`` bytes (default :data:`DEFAULT_MEMORY_BUDGET`, 1 GiB;
estimated from one forward pass over one input: activation sizes times the number of factor columns, a heuristic).

**Monte Carlo kinds** draw one base seed from ``generator`` (or take ``seed=``); batch ``b`` of rank ``r`` then draws
its labels from a generator seeded with ``base + 1_000_003 r + b``. The draws are reproducible, differ between ranks,
and are the same at every product of the implicit operator (so it is one fixed matrix, as CG needs). They differ from
an all-in-memory call with the same seed (the estimate is unbiased either way).

Example:
    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> from dropgeom import ModelManifold
    >>> from dropgeom.fisher import fisher
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    >>> x, y = torch.randn(50, 4, dtype=torch.float64), torch.randint(0, 3, (50,))
    >>> loader = DataLoader(TensorDataset(x, y), batch_size=16)     # 16 does not divide 50
    >>> D = fisher_streamed(net, loader, structure="diag")
    >>> torch.allclose(D.diag(), fisher(ModelManifold(net, x), structure="diag").diag(), atol=1e-12)
    True
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .families import ExponentialFamily
from .fisher import FisherKind, Reduction, Structure, _enum, fisher
from .manifold import DEFAULT_CHUNK_BYTES, ModelManifold
from .operators import CurvatureOperator, ImplicitOperator, operator_from_parts, operator_parts

__all__ = [
    "DEFAULT_MEMORY_BUDGET", "Batch", "iter_batches", "fisher_streamed", "stream_mean", "check_same_parameters",
]

#: Default bytes the back-propagated factors of one chunk of inputs may use (1 GiB).
DEFAULT_MEMORY_BUDGET = DEFAULT_CHUNK_BYTES

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
            raise ValueError(f"batch {index}: the input tensors disagree in their sample axis: {[tuple(t.shape) for t in inputs]}")
    if targets is not None and (targets.dim() == 0 or targets.shape[0] != n):
        raise ValueError(f"batch {index}: {n} inputs but targets of shape {tuple(targets.shape)}")
    sig = [(tuple(t.shape[1:]), t.dtype) for t in inputs] + [None if targets is None else (tuple(targets.shape[1:]), targets.dtype)]
    if ref is not None and sig != ref:
        raise ValueError(
            f"batch {index} has shapes/dtypes {sig} but the first batch had {ref}: every batch must have the same "
            "shape apart from its size"
        )
    return sig


def iter_batches(
    data: Data,
    targets: Optional[Tensor] = None,
    *,
    batch_size: Optional[int] = None,
) -> Iterator[Batch]:
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


def _all_reduce(t: Tensor) -> Tensor:
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


# ----------------------------------------------------------------------------- the Fisher
def _misfit(b: int, inputs: Tuple[Tensor, ...], err: Exception) -> ValueError:
    shapes = ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in inputs)
    return ValueError(
        f"batch {b}: the model cannot take inputs of shape {shapes} ({str(err).splitlines()[0]}); a batch is inputs or "
        "(inputs, targets), and a model with several inputs takes ((x1, x2), targets)"
    )


def fisher_streamed(
    model: nn.Module,
    data: Data,
    family: Union[str, ExponentialFamily] = "categorical",
    kind: Union[str, FisherKind] = "exact",
    structure: Union[str, Structure] = "diag",
    *,
    targets: Optional[Tensor] = None,
    batch_size: Optional[int] = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    n_samples: int = 1,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    reduction: Union[str, Reduction] = "mean",
    param_names: Optional[Sequence[str]] = None,
) -> CurvatureOperator:
    r"""The Fisher information :math:`F = \frac1N \sum_i J_i^\top S_i S_i^\top J_i` of ``model`` over ``data``, streamed.

    Each batch goes through :func:`dropgeom.fisher.fisher` with ``reduction="sum"``; the sums are added (and, under
    ``torch.distributed``, all-reduced over ranks) and divided by the global ``N`` (theory.md section 2). Equals
    ``fisher(ModelManifold(model, all_inputs, family), kind, structure)`` up to rounding for ``exact`` and
    ``empirical``; ``mc`` draws differ (module docstring).

    Args:
        model: the network (evaluated in eval mode, as :class:`~dropgeom.manifold.ModelManifold` does).
        data: a tensor of inputs (with ``targets=`` for the empirical kind) or an iterable of batches.
        family, kind, structure, n_samples, reduction, param_names: as for :func:`~dropgeom.fisher.fisher`.
        batch_size: rows per batch for tensor ``data`` (default: one batch, chunked under ``memory_budget``).
        memory_budget: bytes the factors of one chunk may use; larger batches are processed in chunks.
        generator: random generator for ``mc``; or ``seed=`` (rank ``r`` of a process group uses ``seed + r``).

    Returns:
        A :class:`~dropgeom.operators.CurvatureOperator`. For ``implicit`` the operator re-reads ``data`` at every
        product, so ``data`` must be re-iterable (a tensor, a list or a ``DataLoader``; not a one-shot generator).

    Raises:
        ValueError: on an empty data set, disagreeing batches, missing targets for the empirical kind, a one-shot
            iterator with ``structure="implicit"``, or an unknown kind/structure/reduction.
        RuntimeError: under ``torch.distributed``, when ranks hold different parameters.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(3, 2).double()
        >>> x = torch.randn(40, 3, dtype=torch.float64)
        >>> F = fisher_streamed(net, x, structure="dense", batch_size=7)
        >>> from dropgeom import ModelManifold
        >>> from dropgeom.fisher import fisher
        >>> torch.allclose(F.dense(), fisher(ModelManifold(net, x), structure="dense").dense(), atol=1e-12)
        True
    """
    kind = _enum(FisherKind, kind, "Fisher kind")
    structure = _enum(Structure, structure, "structure")
    reduction = _enum(Reduction, reduction, "reduction")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    device = next(model.parameters()).device
    base_seed = _base_seed(seed, generator) if kind is FisherKind.MC else 0
    check_same_parameters(model)
    if structure is Structure.IMPLICIT and not isinstance(data, (Tensor, tuple)) and iter(data) is data:  # type: ignore[arg-type]
        raise ValueError(
            "structure='implicit' re-reads the data at every product; a one-shot iterator can be read only once: pass a "
            "list of batches or a DataLoader"
        )
    if memory_budget <= 0:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget}")

    def batches() -> Iterator[Batch]:
        return iter_batches(data, targets, batch_size=batch_size if isinstance(data, (Tensor, tuple)) else None)

    def batch_operator(b: int, inputs: Tuple[Tensor, ...], tgt: Optional[Tensor], struct: Structure) -> Tuple[CurvatureOperator, int]:
        gen = torch.Generator(device=device).manual_seed(base_seed + b) if kind is FisherKind.MC else None
        if kind is FisherKind.EMPIRICAL and tgt is None:
            raise ValueError("the empirical Fisher needs observed labels: batches of (inputs, targets), or targets= for tensors")
        try:
            m = ModelManifold(model, inputs if len(inputs) > 1 else inputs[0], family, param_names=param_names)
        except (RuntimeError, TypeError) as err:
            raise _misfit(b, inputs, err) from err
        op = fisher(
            m, kind, struct, targets=tgt if kind is FisherKind.EMPIRICAL else None,
            n_samples=n_samples, generator=gen, reduction="sum", chunk_bytes=memory_budget,
        )
        return op, m.n

    if structure is Structure.IMPLICIT:
        return _implicit(batches, batch_operator, reduction)

    template, total, n_local = _sum_batches(batches(), lambda b, inp, tgt: batch_operator(b, inp, tgt, structure))
    N = int(_all_reduce(torch.tensor([n_local], dtype=torch.float64)).item())
    total = [_all_reduce(t) for t in total]
    scale = 1.0 if reduction is Reduction.SUM else 1.0 / N
    return operator_from_parts(template, total, N, scale, reduction=reduction.value)


def _base_seed(seed: Optional[int], generator: Optional[torch.Generator]) -> int:
    """The Monte Carlo base seed of this rank: ``seed`` (or one draw from ``generator``) plus ``1000003 * rank``."""
    base = int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,), generator=generator).item())
    dist = _dist()
    return base + 1_000_003 * (dist.get_rank() if dist else 0)


def _sum_batches(
    batches: Iterator[Batch], operator: Callable[[int, Tuple[Tensor, ...], Optional[Tensor]], Tuple[CurvatureOperator, int]]
) -> Tuple[CurvatureOperator, List[Tensor], int]:
    """The first batch's operator (a template), the summed additive parts of all batches, and the input count."""
    total: Optional[List[Tensor]] = None
    template: Optional[CurvatureOperator] = None
    count = 0
    for index, (inputs, tgt) in enumerate(batches):
        op, n_b = operator(index, inputs, tgt)
        parts = operator_parts(op, n_b)
        total = parts if total is None else [acc.add_(part) for acc, part in zip(total, parts)]
        template = template or op
        count += n_b
    assert total is not None and template is not None  # iter_batches raises on an empty data set
    return template, total, count


def _implicit(
    batches: Callable[[], Iterator[Batch]],
    batch_operator: Callable[[int, Tuple[Tensor, ...], Optional[Tensor], Structure], Tuple[CurvatureOperator, int]],
    reduction: Reduction,
) -> ImplicitOperator:
    """A matrix-free operator whose product streams over the batches (and all-reduces across ranks)."""
    first = next(iter(batches()))
    probe, _ = batch_operator(0, first[0], first[1], Structure.IMPLICIT)
    n_local = sum(b[0][0].shape[0] for b in batches())
    N = int(_all_reduce(torch.tensor([n_local], dtype=torch.float64)).item())
    scale = 1.0 if reduction is Reduction.SUM else 1.0 / N

    def matmat(V: Tensor) -> Tensor:
        out = torch.zeros(V.shape, dtype=probe.dtype, device=probe.device)
        for b, (inputs, tgt) in enumerate(batches()):
            op, _ = batch_operator(b, inputs, tgt, Structure.IMPLICIT)
            out += op @ V
        return _all_reduce(out) * scale

    def diag() -> Tensor:
        out = torch.zeros(probe.size, dtype=probe.dtype, device=probe.device)
        for b, (inputs, tgt) in enumerate(batches()):
            op, _ = batch_operator(b, inputs, tgt, Structure.DIAG)
            out += op.diag()
        return _all_reduce(out) * scale

    meta = dict(kind=probe.kind, structure="implicit", reduction=reduction.value, n=N)
    return ImplicitOperator(matmat, probe.size, probe.dtype, probe.device, diag_fn=diag, **meta)


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
        import dataclasses

        return dataclasses.replace(obj, **{k: _rebuild_result(getattr(obj, k), f"{path}.{k}", values) for k in obj.__dataclass_fields__ if obj.__dataclass_fields__[k].init})
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
    N = float(_all_reduce(torch.tensor([float(n_local)], dtype=torch.float64)).item())
    values = {}
    for (path, role, v0), s in zip(leaves0, sums):
        if role == "keep":
            continue
        s = _all_reduce(s.clone())
        out = s / N if role == "mean" else s.sqrt() / N
        values[path] = out if isinstance(v0, Tensor) else float(out)
    return _rebuild_result(first, "", values)
