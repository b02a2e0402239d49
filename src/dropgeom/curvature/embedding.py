r"""Embedding curvature of the model manifold (theory.md section 3): dense and stochastic.

With ``G = blockdiag(Sigma_i)`` (sum convention), ``g = J^T G J``, ``P_T`` the
G-orthogonal projector onto ``range(J)`` and the alpha-normal vectors

.. math::

    N^\alpha(u, v) = (I - P_T)\big(D^2\eta[u, v]
        + \tfrac{1-\alpha}{2}\, G^{+} A'''[Ju, Jv, \cdot]\big),

the scalar alpha-curvature is

.. math::  \gamma^2_\alpha = g^{ac} g^{bd} \langle N^\alpha_{ab}, N^\alpha_{cd} \rangle_G

(Efron 1975 for one parameter; Reeds 1975 / Amari 1982 for several;
``g^+`` where ``g`` is singular). ``alpha = 1`` is the e-curvature
(``H_e(u, v, w) = <N(u, v), w>_G``), ``alpha = -1`` the m-curvature: the G-inner
product of ``N^alpha(u, v)`` with a normal ``w`` is
``H_alpha(u, v, w) = H_e(u, v, w) + (1-alpha)/2 T(Ju, Jv, w)``, and for alpha = -1
the bracket equals ``G^+ D^2 M[u, v]`` (``M`` the expectation coordinates), so the
value equals the same construction done in m-coordinates with metric ``G^{-1}``.
``gamma^2_alpha`` is a quadratic polynomial in alpha.

Derivation of the two methods:

* **dense** Whitening with ``S`` (``S S^T = Sigma``) turns G-inner products into
  Euclidean ones; with the thin SVD ``S^T J = U diag(s) V^T`` (rank ``r``)
  the tangent projector is ``U U^T`` and ``g^+ = V diag(s^-2) V^T``, so
  ``gamma^2 = sum_{k,l <= r} |(I - U U^T) S^T N(e_k, e_l)|^2`` with ``e_k = V_k / s_k``.
  Damped: ``g^+ -> (g + lambda I)^{-1} = Q diag(1/(w + lambda)) Q^T`` over all
  ``P`` eigenvectors ``Q`` of ``g``.
* **stochastic** For independent ``u, v`` with covariance ``C``,
  ``E |N(u, v)|_G^2 = C^{ac} C^{bd} <N_ab, N_cd>_G`` because ``N`` is bilinear.
  ``u = g^+ J^T S z`` (``z ~ N(0, I)``) has covariance ``g^+ g g^+ = g^+``;
  damped, ``u = (g + lambda I)^{-1} (J^T S z + sqrt(lambda) z')`` has covariance
  ``(g + lambda I)^{-1}``. ``D^2 eta[u, v]`` is forward over forward, and the normal part is the
  least-squares residual of ``S^T D^2 eta`` against ``range(S^T J)``. The solves and projections
  (:mod:`dropgeom.curvature._tangent`) are exact from the thin SVD of ``S^T J`` where it fits in memory
  (``solver="svd"``), or from the eigendecomposition of the ``nR x nR`` Gram matrix ``S^T J J^T S``, formed
  by Jacobian products, for ``nR <= 4096`` and any ``P``, in memory or streamed over batches and ranks
  (``solver="gram"``); beyond, conjugate gradients on ``g`` (``solver="cg"``; memory ``O(P + nK)`` per sample).
  Caveat: when ``g`` is badly conditioned (condition numbers of 1e6 and more are
  common even for tiny tanh networks) ``gamma^2`` is dominated by the flattest
  directions, the terms ``|N(u, v)|^2`` are heavy-tailed and a few hundred
  samples underestimate both the mean and its standard error; use ``damping``
  there (its estimator is well behaved: ``(g + lambda I)^{-1}`` is bounded).
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch
from torch import Tensor

from ..dispatch import streams
from ..manifold import ModelManifold
from ..options import CurvatureMethod, parse
from ._common import (
    LinearisedManifold,
    ProjectionWarning,
    check_alpha,
    check_cg_options,
    check_damping,
    check_manifold,
    default_max_iter,
    default_tol,
    skew_whitened,
    whiten,
    whitening,
)
from ._tangent import tangent_solver
from .dense import DenseGeometry, dense_projection_fits

__all__ = ["CurvatureResult", "embedding_curvature", "Linearisation"]


@dataclass
class CurvatureResult:
    """Result of :func:`embedding_curvature`.

    Attributes:
        gamma2: the scalar curvature ``gamma^2`` of the manifold over all ``n``
            inputs (sum-convention metric).
        gamma2_per_sample: ``n * gamma2``, the curvature of one observation
            (``gamma_n^2 = gamma_1^2 / n``).
        stderr: standard error of ``gamma2`` (0 for dense).
        normal_components: dense only: the normal vectors ``N^alpha(e_a, e_b)``
            of the coordinate directions, in natural-parameter coordinates,
            shape ``[n, K, P, P]`` (G-orthogonal to ``range(J)``); else None.
        alpha: 1 = e-curvature, -1 = m-curvature.
        method: ``"dense"`` or ``"stochastic"``.
        damping: the relative damping (``lambda = damping * lambda_max(g)``) or None.
        damping_abs: the absolute ``lambda`` used (None without damping).
        rank: dense only: the numerical rank of ``J`` in the G-metric (= rank of ``g``).
        normal_dim: dense only: ``rank(G) - rank`` (``n(K-1) - rank(J)`` for categorical).
        n_samples: number of ``(u, v)`` pairs (stochastic), else 0.
        projection_residual: stochastic only: the largest relative residual ``|J^T S r| / |J^T S Y|`` its
            projections onto the tangent space reached (0 at rounding level); above ``max(1e3 tol, 1e-6)``
            (:func:`~dropgeom.curvature._common.projection_tolerance`) they did not converge, or the Gram cutoff
            dropped tangent directions, and ``gamma2`` is too large (a ``ProjectionWarning`` says so). 0 for
            ``solver="svd"`` (exact by construction).
        solver: stochastic only, a :class:`~dropgeom.options.TangentSolver` value: ``"svd"`` (the sampling solves
            and projections from a dense SVD of ``S^T J``: at most ``MAX_DENSE_PARAMS`` parameters and ``nKP <=
            2^24``; exact), ``"gram"`` (from the eigendecomposition of the ``nR x nR`` Gram matrix ``S^T J J^T S``,
            ``nR <= 4096``, any ``P``, inputs in memory or streamed; exact up to a relative cutoff) or ``"cg"``
            (conjugate gradients, capped at ``cg_max_iter``: larger ``nR``).
    """

    gamma2: Tensor
    gamma2_per_sample: Tensor
    stderr: Tensor
    normal_components: Optional[Tensor]
    alpha: float
    method: str
    damping: Optional[float]
    damping_abs: Optional[float]
    rank: Optional[int]
    normal_dim: Optional[int]
    n_samples: int = 0
    projection_residual: Optional[float] = None
    solver: Optional[str] = None


def _dense(manifold: ModelManifold, alpha: float, damping: Optional[float]) -> CurvatureResult:
    geo = DenseGeometry(manifold, "embedding_curvature(method='dense')")
    n = manifold.n
    Y = geo.whitened_second(alpha)  # [nR, P, P]
    U, s, V = geo.tangent_basis()
    r = s.numel()
    # whitened normal parts, and their natural-parameter form N = Y_eta - J g^+ J^T G Y_eta
    coef = torch.einsum("jr,jab->rab", U, Y)  # U^T Y
    Nw = Y - torch.einsum("jr,rab->jab", U, coef)
    x = torch.einsum("pr,rab->pab", V / s, coef)  # g^+ J^T G Y_eta  (= V s^-1 U^T Y)
    H = geo.H
    if alpha != 1.0:
        Sigma_pinv = torch.linalg.pinv(manifold.family.cov(geo.eta))
        skew = torch.einsum("nkr,nrab->nkab", geo.S, geo.skew_whitened())  # t_ab (in range Sigma)
        H = H + 0.5 * (1.0 - alpha) * torch.einsum("nkl,nlab->nkab", Sigma_pinv, skew)
    normal = H - torch.einsum("nkp,pab->nkab", geo.J, x)
    lam = None
    if not damping:  # None or 0: the pseudo-inverse g^+ (a zero shift would blow up rounding-level eigenvalues)
        lam = None if damping is None else 0.0
        E = V / s
    else:
        w, Q = torch.linalg.eigh(geo.Jw.T @ geo.Jw)
        lam = damping * float(w[-1].clamp_min(0))
        denom = w.clamp_min(0) + lam
        keep = denom > 0
        E = Q[:, keep] / denom[keep].sqrt()
    C = E.T @ Nw @ E  # [nR, q, q]
    gamma2 = (C * C).sum()
    rank_G = int(torch.linalg.matrix_rank(manifold.family.cov(geo.eta)).sum())  # n(K-1) for categorical
    return CurvatureResult(
        gamma2=gamma2,
        gamma2_per_sample=n * gamma2,
        stderr=torch.zeros((), dtype=gamma2.dtype),
        normal_components=normal,
        alpha=alpha,
        method="dense",
        damping=damping,
        damping_abs=lam,
        rank=r,
        normal_dim=rank_G - r,
    )


def _normal(
    shape: Tuple[int, ...], dtype: torch.dtype, generator: Optional[torch.Generator], device: Optional[torch.device] = None
) -> Tensor:
    """Standard normal draws made on the CPU in float64, then cast: the same numbers on every device and in every
    dtype (torch draws float32 and float64 from one seed differently), so a float32 run on a GPU estimates what a
    float64 run on the CPU does, up to rounding."""
    return torch.randn(shape, dtype=torch.float64, generator=generator).to(device=device, dtype=dtype)


def _largest_metric_eigenvalue(lin: LinearisedManifold, S: Tensor, P: int, dtype, generator, iters: int = 100) -> float:
    """``lambda_max(g)`` by power iteration on Fisher products (stops at relative change 1e-6)."""
    v = _normal((P, 1), dtype, generator, S.device)
    v = v / v.norm()
    lam = 0.0
    for _ in range(iters):
        w = lin.metric_matmat(S, v)
        new = float((v * w).sum())
        nrm = w.norm()
        if nrm == 0:
            return 0.0
        v = w / nrm
        if abs(new - lam) <= 1e-6 * abs(new):
            return new
        lam = new
    return lam


@dataclass
class Linearisation:
    """What the stochastic estimator needs of the inputs: products, whitening, and how rows are spread over processes.

    ``lin`` gives ``J v``, ``J^T w`` (summed over every process) and ``D2 eta``; ``eta``, ``S``, ``S_pinv`` hold this
    process's rows ``rows`` of the ``n`` inputs; ``total`` sums a per-process partial sum over processes. One process
    with every input in memory: :meth:`of`. Over batches and ranks: :mod:`dropgeom.curvature.streamed`.
    """

    lin: LinearisedManifold
    family_of: object  # anything with ``.family`` (for the skewness term)
    eta: Tensor
    S: Tensor
    S_pinv: Tensor
    n: int
    rows: slice
    total: Callable[[Tensor], Tensor]

    @classmethod
    def of(cls, manifold: ModelManifold) -> "Linearisation":
        eta, S, S_pinv = whitening(manifold)
        return cls(LinearisedManifold(manifold), manifold, eta, S, S_pinv, manifold.n, slice(0, manifold.n), lambda t: t)


def _stochastic(
    manifold: ModelManifold,
    alpha: float,
    n_samples: int,
    generator: Optional[torch.Generator],
    damping: Optional[float],
    batch_size: int,
    cg_tol: Optional[float],
    cg_max_iter: Optional[int],
    setup: Optional[Linearisation] = None,
) -> CurvatureResult:
    # the tangent projections and sampling solves (_tangent): exact where S^T J (svd, in memory) or its n R x n R Gram
    # matrix (gram, in memory or streamed over batches and ranks) fits, conjugate gradients beyond (off the svd path in
    # float64: _in_float64, streamed.linearisation); capped conjugate gradients on the normal equations had left a
    # tangent remainder on a badly conditioned g (docs/benchmarks.md)
    in_memory = setup is None
    setup = Linearisation.of(manifold) if setup is None else setup
    n, P = setup.n, manifold.num_params
    dtype = setup.eta.dtype
    tol = default_tol(dtype) if cg_tol is None else cg_tol
    cg_max_iter = default_max_iter(P) if cg_max_iter is None else cg_max_iter
    eta, S, S_pinv, lin = setup.eta, setup.S, setup.S_pinv, setup.lin
    dense_fits = in_memory and dense_projection_fits(manifold)
    tangent = tangent_solver(lin, S, n, tol, cg_max_iter, dense_fits, setup.rows, setup.total)
    R = S.shape[-1]
    lam = 0.0
    if damping is not None:
        top = tangent.top()
        lam = damping * (_largest_metric_eigenvalue(lin, S, P, dtype, generator) if top is None else top)
    values = []
    done = 0
    while done < n_samples:
        m = min(batch_size, n_samples - done)
        z = _normal((2 * m, n, R), dtype, generator)[:, setup.rows].to(S.device)  # this rank's rows
        zp = None if damping is None else _normal((P, 2 * m), dtype, generator, S.device)
        uv = tangent.sample(z, zp, lam).T  # [2m, P] = (g + lam I)^{-1} (J^T S z + sqrt(lam) z')
        u, v = uv[:m], uv[m:]
        Y = whiten(S, lin.d2(u, v))  # [m, n, R]
        if alpha != 1.0:
            Y = Y + 0.5 * (1.0 - alpha) * skew_whitened(setup.family_of, eta, S_pinv, lin.jvp(u), lin.jvp(v))  # type: ignore[arg-type]
        Nw = tangent.normal(Y)
        values.append(setup.total((Nw * Nw).sum((1, 2))))
        done += m
    vals = torch.cat(values)
    gamma2 = vals.mean()
    stderr = vals.std() / math.sqrt(n_samples) if n_samples > 1 else torch.full((), float("inf"), dtype=dtype)
    return CurvatureResult(
        gamma2=gamma2,
        gamma2_per_sample=n * gamma2,
        stderr=stderr,
        normal_components=None,
        alpha=alpha,
        method="stochastic",
        damping=damping,
        damping_abs=None if damping is None else lam,
        rank=None,
        normal_dim=None,
        n_samples=n_samples,
        projection_residual=tangent.residual,
        solver=tangent.name.value,
    )


def check_stochastic_options(n_samples: object, batch_size: object, cg_tol: object, cg_max_iter: object) -> None:
    """Validate the options of the stochastic estimator (one-line ``ValueError`` naming the option)."""
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 2:
        raise ValueError(f"n_samples must be an integer >= 2 (for a standard error), got {n_samples!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    check_cg_options(cg_tol, cg_max_iter)


@streams
def embedding_curvature(
    manifold: ModelManifold,
    alpha: float = 1.0,
    method: Union[str, CurvatureMethod] = "dense",
    n_samples: int = 64,
    generator: Optional[torch.Generator] = None,
    damping: Optional[float] = None,
    *,
    batch_size: int = 16,
    cg_tol: Optional[float] = None,
    cg_max_iter: Optional[int] = None,
) -> CurvatureResult:
    r"""Scalar alpha-embedding curvature ``gamma^2_alpha`` of the model manifold.

    .. math::  \gamma^2_\alpha = g^{ac} g^{bd} \langle N^\alpha_{ab}, N^\alpha_{cd} \rangle_G,
               \quad N^\alpha(u, v) = (I - P_T)\big(D^2\eta[u,v] + \tfrac{1-\alpha}{2} G^+ A'''[Ju, Jv, \cdot]\big)

    (theory.md section 3; Efron 1975, Amari 1982/1985). Sum convention for
    ``G`` and ``g = J^T G J``; pseudo-inverse where ``g`` is singular. See the
    module docstring for the derivation of both methods.

    Invariance: without damping, **invariant** under every reparametrisation
    ``theta = phi(theta')`` (same function, new coordinates): ``g^+`` acts on the
    exact range of ``J`` (dense: truncated at the numerical rank). With
    ``damping`` it is **coordinate-dependent**: ``lambda I`` is measured in
    parameter units (storing a layer as ``W / c`` changes the damped value by
    orders of magnitude), so it is never the only basis of a verdict. The
    undamped value weights a tangent direction with singular value ``s_k`` by
    ``s_k^{-4}``: nearly degenerate directions dominate it
    (:mod:`dropgeom.curvature.invariant`).

    Args:
        manifold: the model manifold, or a :class:`~dropgeom.dispatch.StreamedManifold` (a ``DataLoader`` or list of
            batches) for the stochastic method: products stream over the batches (and are all-reduced across ranks),
            the ``[n_samples, n, K]`` normal vectors stay in memory (:mod:`dropgeom.curvature.streamed`).
        alpha: 1 (e-curvature, default), -1 (m-curvature) or any real.
        method: a :class:`~dropgeom.options.CurvatureMethod` or its value: ``"dense"``
            (exact; at most 2000 parameters, forms the Hessian
            tensor ``[n, K, P, P]``) or ``"stochastic"`` (matrix-free unbiased
            estimate ``mean |N(u, v)|_G^2`` over ``n_samples`` pairs ``u, v ~ N(0, g^+)``).
        n_samples: pairs for the stochastic method.
        generator: random generator for the stochastic method, on the CPU (draws made there in float64, then
            moved to the model's device and dtype: any device and dtype see the same draws for one seed).
        damping: if given, replace ``g^+`` by ``(g + lambda I)^{-1}`` with
            ``lambda = damping * lambda_max(g)`` (theory.md practical note); the
            projection onto ``range(J)`` stays exact.
        batch_size: pairs processed together (stochastic).
        cg_tol, cg_max_iter: ``solver="cg"``'s relative tolerance (default 1e-9 in float64, 1e-5 in float32; also the
            projection tolerance) and iteration cap per pass (default ``2 P + 100``).

    Returns:
        :class:`CurvatureResult` (``gamma2``, ``stderr``, ``solver``, ...); a ``ProjectionWarning`` if a projection stopped short.

    Raises:
        ValueError: an invalid option, or ``method="dense"`` with a ``StreamedManifold`` (the dense method forms the
            Hessian tensor of all inputs at once and cannot be streamed).
        TypeError: ``manifold`` is not a manifold.

    Example:
        >>> import torch
        >>> from dropgeom import ModelManifold, embedding_curvature
        >>> rho = 2.0   # bivariate normal, identity covariance, mean on a circle: gamma^2 = 1/rho^2
        >>> m = ModelManifold.from_function(
        ...     lambda th: rho * torch.stack([th.cos(), th.sin()], -1), torch.tensor([0.3], dtype=torch.float64), "gaussian")
        >>> round(float(embedding_curvature(m).gamma2), 6)
        0.25
        >>> g = torch.Generator().manual_seed(0)
        >>> est = embedding_curvature(m, method="stochastic", n_samples=2000, generator=g)
        >>> abs(float(est.gamma2) - 0.25) < 4 * float(est.stderr), est.solver   # exact ("gram" past the dense limits)
        (True, 'svd')
    """
    check_manifold(manifold, "embedding_curvature")
    alpha = check_alpha(alpha)
    damping = check_damping(damping)
    method = parse(CurvatureMethod, method, "method")
    if method is CurvatureMethod.DENSE:
        return _dense(manifold, alpha, damping)
    check_stochastic_options(n_samples, batch_size, cg_tol, cg_max_iter)
    return _stochastic(_in_float64(manifold), alpha, n_samples, generator, damping, batch_size, cg_tol, cg_max_iter)


def _in_float64(manifold: ModelManifold) -> ModelManifold:
    """Off the dense path, a float64 copy of a lower-precision model (same parameters and inputs); else ``manifold``.

    The ``gram`` solver decomposes ``S^T J J^T S``, which squares the condition number: in float32 the directions with
    singular values below about ``1e-2 s_max`` count as normal and ``gamma^2`` comes out too large, below any
    residual warning (measured 26.3 against 0.544 on a 4-16-3 tanh MLP); conjugate gradients lose the same
    directions. A manifold with a custom ``forward`` (``from_function``) cannot be copied: it warns instead. Streamed
    inputs: :func:`~dropgeom.curvature.streamed.batch_manifolds` (a float64 copy, each batch cast as it is read).
    """
    dtype = next(iter(manifold._params.values())).dtype
    if dtype == torch.float64 or not dtype.is_floating_point or dense_projection_fits(manifold):
        return manifold
    if manifold._forward is not None:
        warnings.warn(
            f"embedding_curvature(method='stochastic'): a {dtype} manifold with a custom forward, past the dense limits: "
            "its tangent projections lose the directions with singular values below about sqrt(eps) s_max and gamma^2 "
            "may be too large; build it in float64",
            ProjectionWarning,
            stacklevel=3,
        )
        return manifold
    return ModelManifold(
        _float64_model(manifold.model), _float64_inputs(manifold.inputs), manifold.family, param_names=manifold.param_names
    )


def _float64_model(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of ``model`` (the caller's model is untouched)."""
    return copy.deepcopy(model).to(torch.float64)


def _float64_inputs(inputs: Tuple[Tensor, ...]) -> Tuple[Tensor, ...]:
    """``inputs`` with the floating tensors cast to float64 (integer inputs, such as token ids, kept)."""
    return tuple(t.to(torch.float64) if t.is_floating_point() else t for t in inputs)
