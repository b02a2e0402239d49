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

**What a batch is** (a tensor split into chunks, or a ``DataLoader`` / list of ``(inputs, targets)``): see
:mod:`dropgeom.batches`. ``fisher_streamed(model, data, ...)`` is the same computation as
``fisher(StreamedManifold(model, data), ...)``: :func:`dropgeom._fisher.fisher` routes a
:class:`~dropgeom.dispatch.StreamedManifold` here (:mod:`dropgeom.dispatch`). ``iter_batches``, ``stream_mean`` and
``check_same_parameters`` are re-exported from :mod:`dropgeom.batches`.

**Memory.** Peak memory is that of one batch, and within a batch :func:`~dropgeom._fisher.fisher` keeps the
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
    >>> from dropgeom._fisher import fisher
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

from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .batches import Batch, Data, all_reduce, rank, check_same_parameters, is_batches, iter_batches, stream_mean
from .dispatch import StreamedManifold, register_streamed
from .families import ExponentialFamily
from ._fisher import FisherKind, Reduction, Structure, _enum, add_sum_into, fisher
from .manifold import DEFAULT_CHUNK_BYTES
from .operator_parts import OperatorLayout, operator_from_parts, operator_layout, sum_parts
from .operators import CurvatureOperator, ImplicitOperator

__all__ = ["DEFAULT_MEMORY_BUDGET", "Batch", "iter_batches", "fisher_streamed", "stream_mean", "check_same_parameters"]

#: Default bytes the back-propagated factors of one chunk of inputs may use (1 GiB).
DEFAULT_MEMORY_BUDGET = DEFAULT_CHUNK_BYTES


# ----------------------------------------------------------------------------- the Fisher
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

    Each batch goes through :func:`dropgeom._fisher.fisher` with ``reduction="sum"``; the sums are added (and, under
    ``torch.distributed``, all-reduced over ranks) and divided by the global ``N`` (theory.md section 2). Equals
    ``fisher(ModelManifold(model, all_inputs, family), kind, structure)`` up to rounding for ``exact`` and
    ``empirical``; ``mc`` draws differ (module docstring).

    Args:
        model: the network (evaluated in eval mode, as :class:`~dropgeom.manifold.ModelManifold` does).
        data: a tensor of inputs (with ``targets=`` for the empirical kind) or an iterable of batches.
        family, kind, structure, n_samples, reduction, param_names: as for :func:`~dropgeom._fisher.fisher`.
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
        >>> from dropgeom._fisher import fisher
        >>> torch.allclose(F.dense(), fisher(ModelManifold(net, x), structure="dense").dense(), atol=1e-12)
        True
    """
    if structure in (Structure.IMPLICIT, "implicit") and is_batches(data) and iter(data) is data:  # type: ignore[arg-type]
        raise ValueError(
            "structure='implicit' re-reads the data at every product; a one-shot iterator can be read only once: pass a "
            "list of batches or a DataLoader"
        )
    source = StreamedManifold(
        model, data, family, targets=targets, batch_size=batch_size, param_names=param_names, memory_budget=memory_budget
    )
    return _fisher_of(source, kind, structure, n_samples=n_samples, generator=generator, seed=seed, reduction=reduction)


def _fisher_of(
    source: StreamedManifold,
    kind: Union[str, FisherKind] = "exact",
    structure: Union[str, Structure] = "dense",
    *,
    targets: Optional[Tensor] = None,
    n_samples: int = 1,
    generator: Optional[torch.Generator] = None,
    reduction: Union[str, Reduction] = "mean",
    chunk_bytes: Optional[int] = None,
    seed: Optional[int] = None,
) -> CurvatureOperator:
    """:func:`dropgeom._fisher.fisher` of a :class:`~dropgeom.dispatch.StreamedManifold` (its streamed implementation)."""
    kind = _enum(FisherKind, kind, "Fisher kind")
    structure = _enum(Structure, structure, "structure")
    reduction = _enum(Reduction, reduction, "reduction")
    if targets is not None:
        raise ValueError("fisher() of a StreamedManifold takes its targets from the batches (or its targets=), not targets=")
    budget = source.memory_budget if chunk_bytes is None else chunk_bytes
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise ValueError(f"chunk_bytes must be a positive number of bytes, got {budget!r}")
    device = next(source.model.parameters()).device
    base_seed = _base_seed(seed, generator) if kind is FisherKind.MC else 0
    check_same_parameters(source.model)

    def prepare(b: int, inputs: Tuple[Tensor, ...], tgt: Optional[Tensor]):
        """Batch ``b``'s manifold, Monte Carlo generator (seeded ``base_seed + b``) and targets (empirical kind)."""
        gen = torch.Generator(device=device).manual_seed(base_seed + b) if kind is FisherKind.MC else None
        if kind is FisherKind.EMPIRICAL and tgt is None:
            raise ValueError("the empirical Fisher needs observed labels: batches of (inputs, targets), or targets= for tensors")
        return source.manifold_of(b, inputs), gen, tgt if kind is FisherKind.EMPIRICAL else None

    def batch_operator(
        b: int, inputs: Tuple[Tensor, ...], tgt: Optional[Tensor], struct: Structure
    ) -> Tuple[CurvatureOperator, int]:
        m, gen, t = prepare(b, inputs, tgt)
        op = fisher(m, kind, struct, targets=t, n_samples=n_samples, generator=gen, reduction="sum", chunk_bytes=budget)
        return op, m.n

    if structure is Structure.IMPLICIT:
        return _implicit(source.batches, batch_operator, reduction)

    def add_batch(b: int, inputs: Tuple[Tensor, ...], tgt: Optional[Tensor], total: List[Tensor]) -> int:
        """Batch ``b`` added into ``total`` in place where the engine can (diag, KFAC), else through its operator."""
        m, gen, t = prepare(b, inputs, tgt)
        if add_sum_into(total, m, kind, structure, targets=t, n_samples=n_samples, generator=gen, chunk_bytes=budget):
            return m.n
        op, n_b = batch_operator(b, inputs, tgt, structure)  # add_sum_into drew nothing: same draws as one pass
        sum_parts(total, op, n_b)
        return n_b

    layout, total, n_local = _sum_batches(source.batches(), lambda b, inp, tgt: batch_operator(b, inp, tgt, structure), add_batch)
    N = int(all_reduce(torch.tensor([n_local], dtype=torch.float64)).item())
    total = [all_reduce(t) for t in total]
    scale = 1.0 if reduction is Reduction.SUM else 1.0 / N
    return operator_from_parts(layout, total, N, scale, reduction=reduction.value)


def _base_seed(seed: Optional[int], generator: Optional[torch.Generator]) -> int:
    """The Monte Carlo base seed of this rank: ``seed`` (or one draw from ``generator``) plus ``1000003 * rank``."""
    base = int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,), generator=generator).item())
    return base + 1_000_003 * rank()


def _sum_batches(
    batches: Iterator[Batch],
    operator: Callable[[int, Tuple[Tensor, ...], Optional[Tensor]], Tuple[CurvatureOperator, int]],
    add: Callable[[int, Tuple[Tensor, ...], Optional[Tensor], List[Tensor]], int],
) -> Tuple[OperatorLayout, List[Tensor], int]:
    """The operators' layout, the summed additive parts of all batches, and the input count: the first batch's
    operator gives the layout and (its own matrices) the running totals, and ``add`` adds every later batch into
    them (only the totals and one batch's work are alive at a time)."""
    total: Optional[List[Tensor]] = None
    layout: Optional[OperatorLayout] = None
    count = 0
    for index, (inputs, tgt) in enumerate(batches):
        if total is None:
            op, n_b = operator(index, inputs, tgt)
            layout = operator_layout(op)
            total = sum_parts(None, op, n_b)
            del op
        else:
            n_b = add(index, inputs, tgt, total)
        count += n_b
    assert total is not None and layout is not None  # iter_batches raises on an empty data set
    return layout, total, count


def _implicit(
    batches: Callable[[], Iterator[Batch]],
    batch_operator: Callable[[int, Tuple[Tensor, ...], Optional[Tensor], Structure], Tuple[CurvatureOperator, int]],
    reduction: Reduction,
) -> ImplicitOperator:
    """A matrix-free operator whose product streams over the batches (and all-reduces across ranks)."""
    first = next(iter(batches()))
    probe, _ = batch_operator(0, first[0], first[1], Structure.IMPLICIT)
    n_local = sum(b[0][0].shape[0] for b in batches())
    N = int(all_reduce(torch.tensor([n_local], dtype=torch.float64)).item())
    scale = 1.0 if reduction is Reduction.SUM else 1.0 / N

    def matmat(V: Tensor) -> Tensor:
        out = torch.zeros(V.shape, dtype=probe.dtype, device=probe.device)
        for b, (inputs, tgt) in enumerate(batches()):
            op, _ = batch_operator(b, inputs, tgt, Structure.IMPLICIT)
            out += op @ V
        return all_reduce(out) * scale

    def diag() -> Tensor:
        out = torch.zeros(probe.size, dtype=probe.dtype, device=probe.device)
        for b, (inputs, tgt) in enumerate(batches()):
            op, _ = batch_operator(b, inputs, tgt, Structure.DIAG)
            out += op.diag()
        return all_reduce(out) * scale

    meta = dict(kind=probe.kind, structure="implicit", reduction=reduction.value, n=N)
    return ImplicitOperator(matmat, probe.size, probe.dtype, probe.device, diag_fn=diag, **meta)


register_streamed(fisher, _fisher_of)
