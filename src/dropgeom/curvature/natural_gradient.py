r"""Normal curvature along the natural-gradient direction of the NLL (theory.md sections 3 and 5.4).

Two variants, both invariant under a reparametrisation ``theta = phi(theta')``
when the directions they solve for are unique:

* **plain** (``reference=None``): ``v = g^+ J^T r``, ``r = d(sum_i l_i)/d eta``.
  ``J v = P_T G^+ r`` (the G-orthogonal projection of the output-space gradient
  onto the tangent space) is always coordinate-free, but ``v`` picks up
  ``(u_k . z) / s_k`` along every right singular vector of the whitened
  Jacobian: on a badly conditioned ``g`` the directions in which the outputs
  barely move dominate ``v``, and the normal curvature along it is that of a
  nearly degenerate direction -- large, and volatile from seed to seed.
* **function-space regularised** (``reference`` = the same network on other
  inputs): ``v = (g + w g_ref)^+ J^T r``, the minimiser of
  ``|J v - G^+ r|_G^2 + w |J_ref v|_{G_ref}^2``. The penalty is the squared
  length of the change of the *function* on the reference inputs, not a norm
  of ``v`` in parameter coordinates (``lambda I``): both terms are quadratic
  forms of tensors (``g_ref = J_ref^T G_ref J_ref``), so ``v`` transforms as a
  tangent vector and the curvature along it is invariant, while directions that
  barely move the outputs on the measured inputs but move them elsewhere are
  damped. With ``w = 1`` the system matrix is the Fisher of both input sets
  together: the natural gradient of the loss on the measured inputs in the
  metric of a larger sample. Unique whenever ``g + w g_ref`` has full rank
  (``n_ref (K - 1) >= P`` generically), up to exact symmetries of the function
  on every input (the softmax gauge), which change no normal curvature.

The dense solve (SVD of the stacked whitened Jacobians) is invariant to
rounding (1e-8 and better in tests/test_curvature_invariance.py). The
matrix-free ``cg`` solve is invariant only up to its convergence: on a badly
conditioned ``g + w g_ref`` conjugate gradients stop at different points in
different coordinates (up to 2% apart under ``W/c``, ``c = 0.1`` or ``10``,
there), so C1 uses the dense method (``method="auto"`` picks it at its sizes).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..manifold import ModelManifold
from ._common import check_alpha, check_manifold
from ._projector import Projector, as_rows, check_method

__all__ = ["natural_gradient_direction", "natural_gradient_curvature"]


def loss_gradient_eta(manifold: ModelManifold, targets: Tensor) -> Tensor:
    """``d (sum_i l_i) / d eta`` (``[n, K]``; ``mu - y`` for an exponential family)."""
    manifold.check_targets(targets)
    eta = manifold.eta().detach().requires_grad_(True)
    loss = manifold.family.nll(eta, targets).sum()
    return torch.autograd.grad(loss, eta)[0].detach()


def reference_projector(manifold: ModelManifold, reference: object, weight: object) -> Projector:
    """Check ``reference`` (the same parameters on other inputs) and ``weight`` (> 0); a matrix-free projector."""
    if not isinstance(reference, ModelManifold):
        raise TypeError(f"reference must be a ModelManifold (the same model on other inputs), got {type(reference).__name__}")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"reference_weight must be a finite number > 0, got {weight!r}")
    if reference.num_params != manifold.num_params or not torch.equal(reference.theta.to(manifold.theta.dtype), manifold.theta):
        raise ValueError(
            "reference must be the same model at the same parameters (on other inputs): "
            f"got P={reference.num_params} vs P={manifold.num_params} or different parameter values"
        )
    return Projector(reference, "cg", None, None)


def solve_direction(
    proj: Projector, manifold: ModelManifold, targets: Tensor, reference: Optional[ModelManifold], weight: float
) -> Tensor:
    """The (regularised) natural-gradient direction with the projector ``proj`` of ``manifold``."""
    r = loss_gradient_eta(manifold, targets)
    ref = None if reference is None else reference_projector(manifold, reference, weight)
    v = proj.natural_gradient(r, ref, float(weight))
    if not bool(torch.isfinite(v).all()) or float(v.norm()) == 0.0:
        raise ValueError("the loss gradient has no tangent component at these parameters (a stationary point)")
    return v


def natural_gradient_direction(
    manifold: ModelManifold,
    targets: Tensor,
    *,
    reference: Optional[ModelManifold] = None,
    reference_weight: float = 1.0,
    method: str = "auto",
    cg_tol: Optional[float] = None,
    cg_max_iter: Optional[int] = None,
) -> Tensor:
    r"""The natural-gradient direction of the NLL, plain or with a function-space regulariser.

    .. math::  v = \arg\min_v |J v - G^+ r|_G^2 + w\,|J_{ref} v|_{G_{ref}}^2
               = (g + w\, g_{ref})^+ J^T r, \qquad r = \partial_\eta \textstyle\sum_i l_i

    (``w = 0``, no ``reference``: ``v = g^+ J^T r``, the minimum-norm solution).
    Dense: SVD of the (stacked) whitened Jacobian; ``cg``: conjugate gradients
    on ``g + w g_ref``. theory.md section 3.

    Invariance: ``J v`` of the plain variant is invariant; ``v`` itself
    transforms as a tangent vector when the solution is unique (``rank J = P``,
    or ``rank [J; J_ref] = P`` with a reference). The regulariser is a
    function-space quadratic form, so it never breaks the invariance (a
    parameter-space ``lambda I`` would).

    Args:
        manifold: the model manifold.
        targets: labels (as for ``ModelManifold.loss``).
        reference: the same model at the same parameters on other inputs (the
            function-space regulariser); ``None`` for the plain direction.
        reference_weight: ``w > 0``.
        method: ``"dense"``, ``"cg"`` or ``"auto"``; cg_tol, cg_max_iter: CG settings.

    Returns:
        Tensor ``[P]`` (the descent direction is ``-v``).

    Raises:
        TypeError: ``manifold`` or ``reference`` is not a ModelManifold.
        ValueError: bad targets, method or weight; a reference with other
            parameters; the gradient has no tangent component (a stationary point).

    Example:
        >>> import torch
        >>> from dropgeom import ModelManifold
        >>> x = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
        >>> m = ModelManifold.from_function(lambda th: x * th, torch.tensor([0.5], dtype=torch.float64), "gaussian")
        >>> natural_gradient_direction(m, torch.tensor([[1.0], [1.0]], dtype=torch.float64))  # (x.x)^-1 x.(eta - y)
        tensor([-0.1000], dtype=torch.float64)
        >>> r = ModelManifold.from_function(lambda th: 3.0 * th[None], torch.tensor([0.5], dtype=torch.float64), "gaussian")
        >>> natural_gradient_direction(m, torch.tensor([[1.0], [1.0]], dtype=torch.float64), reference=r)  # /(5 + 9)
        tensor([-0.0357], dtype=torch.float64)
    """
    check_manifold(manifold, "natural_gradient_direction")
    check_method(method)
    proj = Projector(manifold, method, cg_tol, cg_max_iter)
    return solve_direction(proj, manifold, targets, reference, reference_weight)


def natural_gradient_curvature(
    manifold: ModelManifold,
    targets: Tensor,
    alpha: float = 1.0,
    *,
    reference: Optional[ModelManifold] = None,
    reference_weight: float = 1.0,
    method: str = "auto",
    cg_tol: Optional[float] = None,
    cg_max_iter: Optional[int] = None,
) -> Tensor:
    r"""Normal curvature along the (regularised) natural-gradient direction ``v`` of the NLL.

    .. math::  \kappa_{ng} = \frac{|N^\alpha(v, v)|_G}{|J v|_G^2}

    with ``v`` from :func:`natural_gradient_direction`: how much the manifold
    bends away from the straight output-space path a natural-gradient step would
    take (theory.md section 3).

    Invariance: **invariant** when ``v`` is unique (``rank J = P`` for the plain
    variant; ``rank [J; J_ref] = P`` with a ``reference``, which holds on far
    fewer measured inputs and keeps the value away from nearly degenerate
    directions; see the module docstring).

    Args:
        manifold: the model manifold.
        targets: labels on the manifold's inputs.
        alpha: 1 (e, default), -1 (m) or any real.
        reference, reference_weight: the function-space regulariser (see
            :func:`natural_gradient_direction`).
        method, cg_tol, cg_max_iter: as in :func:`~dropgeom.curvature.normal_curvatures`.

    Returns:
        0-dim tensor.

    Raises:
        TypeError, ValueError: as :func:`natural_gradient_direction`; a
            direction with ``J v = 0`` (no curvature defined).

    Example:
        >>> import torch
        >>> from dropgeom import ModelManifold
        >>> rho = 2.0
        >>> m = ModelManifold.from_function(
        ...     lambda th: rho * torch.stack([th.cos(), th.sin()], -1), torch.tensor([0.3], dtype=torch.float64), "gaussian")
        >>> round(float(natural_gradient_curvature(m, torch.tensor([[0.0, 1.0]], dtype=torch.float64))), 6)
        0.5
    """
    check_manifold(manifold, "natural_gradient_curvature")
    alpha = check_alpha(alpha)
    check_method(method)
    proj = Projector(manifold, method, cg_tol, cg_max_iter)
    v = solve_direction(proj, manifold, targets, reference, reference_weight)
    return proj.kappas(as_rows(manifold, v[None]), alpha)[0]
