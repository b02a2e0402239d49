r"""The curvature over a data set read batch by batch, and across processes (theory.md sections 2-3).

Registered with :func:`dropgeom.dispatch.register_streamed`, so that the public functions accept a
:class:`~dropgeom.dispatch.StreamedManifold` (a model over a ``DataLoader`` or a list of batches):

* :func:`~dropgeom.curvature.sharpness.fisher_trace` -- the trace of the streamed exact diagonal;
* :func:`~dropgeom.curvature.sharpness.fisher_top_eigenvalue` -- Lanczos on the streamed implicit Fisher (every
  product reads the batches; under ``torch.distributed`` the products are all-reduced, so Lanczos runs in lockstep);
* :func:`~dropgeom.curvature.embedding.embedding_curvature` with ``method="stochastic"``. The estimator lives in
  :math:`\mathbb R^{nK}`: ``J v`` and ``D^2\eta[u, v]`` are computed batch by batch and concatenated,
  ``J^T w = \sum_b J_b^T w_b`` is summed over batches and all-reduced over ranks, and the squared normal norms are
  summed over ranks. For ``N R <= MAX_GRAM_ROWS`` the solves and projections come from the ``N R x N R`` Gram matrix
  ``K = S^T J J^T S`` (``solver="gram"``, exact): each rank forms its rows of ``K e_i`` from the all-reduced
  ``J^T S e_i`` and the rows are gathered (:func:`~dropgeom.curvature._tangent.gram_matrix`; ``K`` is ``N R x N R``,
  nothing ``P``-sized beyond a block of products), so every rank decomposes the same ``K`` and the result equals the
  in-memory Gram estimate with the same generator up to the rounding of the batch sums. Beyond, conjugate gradients
  on ``g`` (``solver="cg"``): every iterate (in parameter space) is the same on every rank, and the result equals
  the in-memory estimate up to their tolerance. The draws ``z`` are taken for all ``N`` inputs from ``generator``
  (the same on every rank) and each rank keeps its rows; every rank gets the same bits. A float32 model is
  estimated on a float64 copy, each batch cast as it is read (:func:`batch_manifolds`). Memory: activations of
  one batch at a time, plus the inputs, the ``[batch_size, N, K]`` normal vectors (the estimator's own size) and,
  with the Gram solver, ``K`` and its eigenvectors. ``method="dense"`` forms the Hessian tensor of all inputs at
  once: a clear error.

The coordinate-free C1 measures (:mod:`dropgeom.curvature.invariant`), the Hessian measures and the dense
coefficients are not streamed: they say so (:func:`~dropgeom.curvature._common.check_manifold`).

Example:
    >>> import torch
    >>> from dropgeom import ModelManifold, StreamedManifold
    >>> from dropgeom.curvature import fisher_trace
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    >>> x = torch.randn(11, 3, dtype=torch.float64)
    >>> abs(fisher_trace(StreamedManifold(net, [x[:4], x[4:]])) - fisher_trace(ModelManifold(net, x))) < 1e-12
    True
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from ..batches import all_reduce, check_same_parameters, shard
from ..dispatch import StreamedManifold, register_streamed
from .._fisher import fisher
from ..manifold import ModelManifold
from ._common import LinearisedManifold, check_alpha, check_damping
from .embedding import (
    CurvatureResult,
    Linearisation,
    _float64_inputs,
    _float64_model,
    _stochastic,
    check_stochastic_options,
    embedding_curvature,
)
from .sharpness import fisher_top_eigenvalue, fisher_trace

__all__: List[str] = []


class BatchedLinearisation(LinearisedManifold):
    """``J v``, ``J^T w`` and ``D^2 eta`` of the inputs of several batch manifolds (this rank's share).

    Vectors in output space are ``[..., n_local, K]``, the batches' rows concatenated in order; ``J^T w`` is summed
    over batches and all-reduced over ranks. Each product builds its own ``torch.func`` transform per batch, so only
    one batch's activations are alive at a time.
    """

    def __init__(self, parts: List[ModelManifold]) -> None:
        super().__init__(parts[0])
        self.parts = parts
        self.sizes = [p.n for p in parts]

    def jvp(self, V: Tensor) -> Tensor:
        return torch.cat([LinearisedManifold(p).jvp(V) for p in self.parts], dim=-2)

    def vjp(self, W: Tensor) -> Tensor:
        pieces = torch.split(W, self.sizes, dim=-2)
        total = sum(LinearisedManifold(p).vjp(w.contiguous()) for p, w in zip(self.parts, pieces))
        return all_reduce(total)  # type: ignore[arg-type]

    def d2(self, U: Tensor, V: Tensor) -> Tensor:
        return torch.cat([LinearisedManifold(p).d2(U, V) for p in self.parts], dim=-2)


def batch_manifolds(source: StreamedManifold) -> List[ModelManifold]:
    """This rank's batch manifolds, in float64: a lower-precision model is copied once and cast, and each batch's
    floating inputs are cast as they are read (the caller's model is untouched).

    Why not a warning: the estimator's tangent projections lose the directions with singular values below about
    ``sqrt(nR eps) s_max`` (the Gram matrix squares the condition number of ``S^T J``, and conjugate gradients stall
    there too). In float32 that is ``1e-2 s_max``: the in-memory estimate was 26.3 against 0.544 on a 4-16-3 tanh MLP,
    below any warning threshold, so a warning could not say when it mattered. In memory such a model is estimated on
    a float64 copy (:func:`~dropgeom.curvature.embedding._in_float64`); this does the same batch by batch, so a
    streamed float32 model equals its in-memory estimate. Cost: the parameters and the inputs held, twice over, and
    float64 arithmetic.

    Raises:
        ValueError: a batch the model cannot take (:meth:`~dropgeom.dispatch.StreamedManifold.manifold_of`).

    Example:
        >>> import torch
        >>> from dropgeom import StreamedManifold
        >>> net = torch.nn.Linear(3, 2)   # float32
        >>> parts = batch_manifolds(StreamedManifold(net, [torch.randn(4, 3), torch.randn(3, 3)]))
        >>> [p.inputs[0].dtype for p in parts], next(net.parameters()).dtype
        ([torch.float64, torch.float64], torch.float32)
    """
    dtype = next(source.model.parameters()).dtype
    if dtype == torch.float64 or not dtype.is_floating_point:
        return [m for m, _ in source.manifolds()]
    # hand-written cast: a float64 copy of the model behind a StreamedManifold of no data, for manifold_of's errors
    cast = StreamedManifold(_float64_model(source.model), [], source.family, param_names=source.param_names)
    return [cast.manifold_of(b, _float64_inputs(inputs)) for b, (inputs, _) in enumerate(source.batches())]


def linearisation(source: StreamedManifold) -> Linearisation:
    r"""The :class:`~dropgeom.curvature.embedding.Linearisation` of a streamed manifold (this rank's batches).

    ``J v`` and ``D^2 eta[u, v]`` are the batches' rows concatenated, ``J^T w = sum_b J_b^T w_b`` summed over
    batches and all-reduced over ranks; ``S`` with ``S S^T = Sigma_i`` whitens this rank's rows, the slice ``rows``
    of the ``n`` inputs of all ranks (theory.md sections 2-3). In float64 whatever the model's precision: a
    lower-precision model is linearised on a float64 copy, each batch cast as it is read (:func:`batch_manifolds`).

    Raises:
        TypeError: ``source`` is not a :class:`~dropgeom.dispatch.StreamedManifold`; a batch is neither a tensor
            nor an ``(inputs, targets)`` pair.
        ValueError: an empty data set, batches that disagree in shape, or a batch the model cannot take.
        RuntimeError: under ``torch.distributed``, ranks hold different parameters.

    Example:
        >>> import torch
        >>> from dropgeom import StreamedManifold
        >>> net = torch.nn.Linear(3, 2).double()
        >>> x = torch.randn(7, 3, dtype=torch.float64)
        >>> setup = linearisation(StreamedManifold(net, [x[:4], x[4:]]))
        >>> setup.n, tuple(setup.eta.shape), setup.rows
        (7, (7, 2), slice(0, 7, None))
    """
    if not isinstance(source, StreamedManifold):
        raise TypeError(f"linearisation() needs a StreamedManifold, got {type(source).__name__}")
    check_same_parameters(source.model)
    parts = batch_manifolds(source)
    lin = BatchedLinearisation(parts)
    eta = torch.cat([p.eta() for p in parts])
    S = source.family.cov_sqrt(eta)
    n_local = int(eta.shape[0])
    N, start = shard(n_local)
    return Linearisation(lin, source, eta, S, torch.linalg.pinv(S), N, slice(start, start + n_local), all_reduce)


def _embedding_curvature(
    source: StreamedManifold,
    alpha: float = 1.0,
    method: str = "dense",
    n_samples: int = 64,
    generator: Optional[torch.Generator] = None,
    damping: Optional[float] = None,
    *,
    batch_size: int = 16,
    cg_tol: Optional[float] = None,
    cg_max_iter: Optional[int] = None,
) -> CurvatureResult:
    alpha = check_alpha(alpha)
    damping = check_damping(damping)
    if method == "dense":
        raise ValueError(
            "embedding_curvature(method='dense') cannot be streamed over batches: it forms the Hessian tensor "
            "[n, K, P, P] of all inputs at once; use method='stochastic' (streamed, same estimand) or a ModelManifold"
        )
    if method != "stochastic":
        raise ValueError(f"method must be 'dense' or 'stochastic', got {method!r}")
    check_stochastic_options(n_samples, batch_size, cg_tol, cg_max_iter)
    setup = linearisation(source)
    return _stochastic(source, alpha, n_samples, generator, damping, batch_size, cg_tol, cg_max_iter, setup=setup)  # type: ignore[arg-type]


def _fisher_trace(source: StreamedManifold) -> float:
    return float(fisher(source, "exact", "diag").trace())  # type: ignore[arg-type]  # @streams routes it


def _fisher_top_eigenvalue(source: StreamedManifold) -> float:
    vals, _ = fisher(source, "exact", "implicit").eig(k=1)  # type: ignore[arg-type]  # @streams routes it
    return float(vals.max())


register_streamed(embedding_curvature, _embedding_curvature)
register_streamed(fisher_trace, _fisher_trace)
register_streamed(fisher_top_eigenvalue, _fisher_top_eigenvalue)
