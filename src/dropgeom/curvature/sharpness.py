r"""Sharpness measures of the loss surface: Hessian trace and top eigenvalue, SAM sharpness, Fisher trace.

These are the common "flat minimum" measures of the deep-learning literature.
They are measured **in parameter coordinates** and are therefore
**coordinate-dependent**: storing a layer as ``W / c`` (same function)
multiplies its Hessian block by ``c^2`` and its Fisher block by ``c^2``, and
``rho |theta|`` (SAM) changes with the Euclidean norm (Dinh et al. 2017).
They are reported beside the invariant measures of
:mod:`dropgeom.curvature.invariant`, never as the only basis of a verdict
(theory.md section 3).

The loss is the mean NLL ``L(theta) = (1/n) sum_i l_i`` over the manifold's
inputs (``ModelManifold.loss``). Hessian-vector products use ``torch.func``
(forward over reverse); the top eigenvalue uses ``scipy.sparse.linalg.eigsh``
(Lanczos) on those products.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor
from torch.func import grad, jvp

from ..dispatch import streams
from ..manifold import ModelManifold
from ._common import check_manifold

__all__ = ["hessian_trace", "hessian_top_eigenvalue", "sam_sharpness", "fisher_trace", "fisher_top_eigenvalue", "TraceEstimate"]


class TraceEstimate(NamedTuple):
    """A Hutchinson estimate: ``value`` and its standard error ``stderr`` over ``n_probes`` probes."""

    value: float
    stderr: float
    n_probes: int


def _loss_fn(manifold: ModelManifold, targets: Tensor):
    manifold.check_targets(targets)
    fam = manifold.family

    def loss(theta: Tensor) -> Tensor:
        return fam.nll(manifold.forward(manifold.unflatten(theta)), targets).mean()

    return loss


def _hvp(manifold: ModelManifold, targets: Tensor):
    loss = _loss_fn(manifold, targets)
    theta = manifold.theta
    g = grad(loss)

    def hvp(v: Tensor) -> Tensor:
        return jvp(g, (theta,), (v,))[1]

    return hvp


def _positive_int(x: object, name: str, lo: int = 1) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {x!r}")
    return x


def hessian_trace(
    manifold: ModelManifold, targets: Tensor, *, n_probes: int = 32, generator: Optional[torch.Generator] = None
) -> TraceEstimate:
    r"""Hutchinson estimate of the trace of the loss Hessian, ``tr(d^2 L / d theta^2)``.

    .. math::  \mathrm{tr} H \approx \frac{1}{m} \sum_{k=1}^{m} z_k^T H z_k,\qquad z_k \in \{\pm 1\}^P

    (Hutchinson 1989; Rademacher probes, unbiased). ``L`` is the mean NLL on the
    manifold's inputs. theory.md section 3 (a sharpness measure, not a curvature
    of the manifold).

    Invariance: **coordinate-dependent** (a layer stored as ``W / c`` scales its block by ``c^2``).

    Args:
        manifold: the model manifold (inputs and family).
        targets: labels on its inputs.
        n_probes: Rademacher probes ``m`` (>= 2, for a standard error).
        generator: random generator for the probes.

    Returns:
        :class:`TraceEstimate` ``(value, stderr, n_probes)``.

    Raises:
        TypeError: ``manifold`` is not a ModelManifold.
        ValueError: bad targets or ``n_probes < 2``.

    Example:
        >>> import torch
        >>> from dropgeom import ModelManifold
        >>> x = torch.tensor([[1.0], [2.0]], dtype=torch.float64)   # L = mean (x th - y)^2 / 2: H = mean x^2 = 2.5
        >>> m = ModelManifold.from_function(lambda th: x * th, torch.tensor([0.5], dtype=torch.float64), "gaussian")
        >>> hessian_trace(m, torch.zeros(2, 1, dtype=torch.float64), n_probes=4).value
        2.5
    """
    check_manifold(manifold, "hessian_trace")
    _positive_int(n_probes, "n_probes", 2)
    hvp = _hvp(manifold, targets)
    P = manifold.num_params
    Z = torch.randint(0, 2, (n_probes, P), generator=generator).to(manifold.dtype) * 2 - 1
    vals = torch.stack([(z * hvp(z)).sum() for z in Z])
    return TraceEstimate(float(vals.mean()), float(vals.std() / math.sqrt(n_probes)), n_probes)


def hessian_top_eigenvalue(
    manifold: ModelManifold, targets: Tensor, *, tol: float = 1e-6, max_iter: Optional[int] = None
) -> float:
    r"""Largest (algebraic) eigenvalue of the loss Hessian ``d^2 L / d theta^2``.

    Lanczos (``scipy.sparse.linalg.eigsh(which="LA")``) on Hessian-vector
    products (``torch.func``, forward over reverse). theory.md section 3.

    Invariance: **coordinate-dependent**.

    Args:
        manifold: the model manifold.
        targets: labels on its inputs.
        tol: relative accuracy of the eigenvalue (``eigsh``'s ``tol``).
        max_iter: Lanczos restarts cap (default scipy's).

    Returns:
        The eigenvalue (a float; may be negative away from a minimum).

    Raises:
        ValueError: bad targets or ``tol``.

    Example:
        >>> import torch
        >>> from dropgeom import ModelManifold
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)   # H = diag(1, 4) / 2
        >>> m = ModelManifold.from_function(lambda th: (x @ th)[:, None], torch.zeros(2, dtype=torch.float64), "gaussian")
        >>> round(hessian_top_eigenvalue(m, torch.zeros(2, 1, dtype=torch.float64)), 6)
        2.0
    """
    check_manifold(manifold, "hessian_top_eigenvalue")
    if not (isinstance(tol, (int, float)) and 0 <= tol < 1):
        raise ValueError(f"tol must lie in [0, 1), got {tol!r}")
    hvp = _hvp(manifold, targets)
    P = manifold.num_params
    if P == 1:
        return float(hvp(torch.ones(1, dtype=manifold.dtype)))
    if P <= 3:  # eigsh needs k < P; a tiny problem is solved densely
        H = torch.stack([hvp(e) for e in torch.eye(P, dtype=manifold.dtype)])
        return float(torch.linalg.eigvalsh(0.5 * (H + H.T))[-1])
    from scipy.sparse.linalg import LinearOperator, eigsh

    def mv(x: np.ndarray) -> np.ndarray:
        v = torch.as_tensor(np.asarray(x).reshape(-1), dtype=manifold.dtype)
        return hvp(v).detach().numpy()

    op = LinearOperator((P, P), matvec=mv, dtype=np.float64)
    v0 = np.ones(P) / math.sqrt(P)
    vals = eigsh(op, k=1, which="LA", tol=tol, maxiter=max_iter, v0=v0, return_eigenvectors=False)
    return float(vals[-1])


def sam_sharpness(manifold: ModelManifold, targets: Tensor, rho: float = 0.05, *, steps: int = 5, relative: bool = True) -> float:
    r"""SAM sharpness: the worst increase of the loss within a ball around ``theta``.

    .. math::  s_\rho = \max_{|\epsilon| \le r} L(\theta + \epsilon) - L(\theta),\qquad r = \rho\,|\theta| \text{ (relative) or } \rho

    (Foret et al. 2021; the radius relative to ``|theta|`` follows the
    adaptive-SAM convention of Kwon et al. 2021 only in its scale, the ball is
    Euclidean). The maximum is approximated by ``steps`` steps of normalised
    gradient ascent on the sphere ``|epsilon| = r`` started at SAM's first-order
    step ``r g / |g|``; the largest loss seen is returned, a lower bound on the
    maximum (exact for a linear loss). theory.md section 3.

    Invariance: **coordinate-dependent** (Euclidean ball in parameter coordinates).

    Args:
        manifold: the model manifold.
        targets: labels on its inputs.
        rho: the radius (relative to ``|theta|`` by default); must be > 0.
        steps: ascent steps after the first-order step (>= 0).
        relative: radius ``rho |theta|`` (default) or ``rho``.

    Returns:
        The loss increase (>= 0).

    Raises:
        ValueError: ``rho <= 0`` or not finite, ``steps < 0``, bad targets, or
            ``theta = 0`` with a relative radius.

    Example:
        >>> import torch
        >>> from dropgeom import ModelManifold
        >>> x = torch.tensor([[1.0], [2.0]], dtype=torch.float64)   # L = 2.5 th^2 / 2 at th = 0.5 ... worst at th = 0.55
        >>> m = ModelManifold.from_function(lambda th: x * th, torch.tensor([0.5], dtype=torch.float64), "gaussian")
        >>> round(sam_sharpness(m, torch.zeros(2, 1, dtype=torch.float64), rho=0.1), 6)   # 1.25 (0.55^2 - 0.5^2)
        0.065625
    """
    check_manifold(manifold, "sam_sharpness")
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho <= 0:
        raise ValueError(f"rho must be a finite number > 0 (the radius of the SAM ball), got {rho!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    loss = _loss_fn(manifold, targets)
    theta = manifold.theta
    r = rho * float(theta.norm()) if relative else float(rho)
    if r == 0:
        raise ValueError("theta = 0: a radius relative to |theta| is zero; pass relative=False")
    g_fn = grad(loss)
    base = float(loss(theta))
    g = g_fn(theta)
    if float(g.norm()) == 0:
        g = torch.ones_like(theta)
    eps = r * g / g.norm()
    best = float(loss(theta + eps))
    for _ in range(steps):
        g = g_fn(theta + eps)
        if float(g.norm()) == 0:
            break
        eps = r * g / g.norm()
        best = max(best, float(loss(theta + eps)))
    return max(0.0, best - base)


@streams
def fisher_trace(manifold: ModelManifold) -> float:
    r"""Trace of the Fisher information (mean over inputs), ``tr F = (1/n) sum_i |S_i^T J_i|_F^2``.

    The trace of :func:`dropgeom.fisher`'s exact diagonal; a manifold with a custom ``forward`` (e.g. reparametrised
    layers) is measured through that forward (such manifolds take the engine's generic path). theory.md section 2.

    Invariance: **coordinate-dependent**.

    Raises:
        TypeError: ``manifold`` is not a ModelManifold.

    Example:
        >>> import torch
        >>> from dropgeom import ModelManifold
        >>> x = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
        >>> m = ModelManifold.from_function(lambda th: x * th, torch.tensor([0.5], dtype=torch.float64), "gaussian")
        >>> fisher_trace(m)   # mean x^2
        2.5
    """
    from .._fisher import fisher

    check_manifold(manifold, "fisher_trace")
    return float(fisher(manifold, "exact", "diag").trace())


@streams
def fisher_top_eigenvalue(manifold: ModelManifold) -> float:
    r"""Largest eigenvalue of the Fisher information (mean over inputs).

    Lanczos on the matrix-free :func:`dropgeom.fisher` operator (``structure="implicit"``). theory.md section 2.

    Invariance: **coordinate-dependent**.

    Raises:
        TypeError: ``manifold`` is not a ModelManifold.

    Example:
        >>> import torch
        >>> from dropgeom import ModelManifold
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> m = ModelManifold.from_function(lambda th: (x @ th)[:, None], torch.zeros(2, dtype=torch.float64), "gaussian")
        >>> round(fisher_top_eigenvalue(m), 6)   # diag(1, 4) / 2
        2.0
    """
    from .._fisher import fisher

    check_manifold(manifold, "fisher_top_eigenvalue")
    R = manifold.num_outputs
    small = manifold.n * R * manifold.num_params <= 2**24  # per-sample products fit: dense is cheapest
    F = fisher(manifold, "exact", "dense" if small else "implicit")
    vals, _ = F.eig(k=1)
    return float(vals.max())
