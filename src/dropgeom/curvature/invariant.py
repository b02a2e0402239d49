r"""Coordinate-free curvature measures of the model manifold (theory.md section 3).

A reparametrisation ``theta = phi(theta')`` (the same network function, new
coordinates; e.g. a layer stored as ``W / c`` and multiplied by ``c`` in the
forward pass, or ``W = W' B`` with ``B`` invertible) leaves the model manifold
-- the image ``{eta(theta)}`` in ``R^{nK}`` -- unchanged. A measure *of the
manifold* must then be unchanged too. The invariance status of every curvature
function in dropgeom (also stated in each docstring):

=====================================  ===========================================
measure                                 under ``theta = phi(theta')``
=====================================  ===========================================
``statistical_curvature``              invariant (one parameter)
``embedding_curvature(damping=None)``  invariant (``g^+`` on the exact range of J)
``embedding_curvature(damping>0)``     coordinate-dependent (``lambda I`` lives in
                                        parameter coordinates)
``normal_curvature(m, v)``             invariant, given the tangent vector ``J v``
:func:`normal_curvatures`              invariant, given the tangent vectors
``range_gamma2``                       invariant (the same ``gamma^2``, on the
                                        exact range of J without the Hessian tensor)
``natural_gradient_curvature``         invariant when ``rank J = P`` (for a
  (plain)                               singular ``g`` the null-space part of the
                                        minimum-norm direction depends on the
                                        coordinates; ``J v`` itself never does);
                                        volatile on a badly conditioned ``g``
``natural_gradient_curvature``         invariant when ``rank [J; J_ref] = P``
  (``reference=``, function-space       (the regulariser is the change of the
  regulariser)                          function on other inputs, a tensor);
                                        ``cg``: only up to its convergence
:func:`noise_tangent_curvature`        invariant (the noise directions are defined
                                        by the network function: a unit's output
                                        scaled)
``sharpness.*`` (Hessian trace, top    coordinate-dependent (Euclidean norm or
Hessian eigenvalue, Fisher trace /     trace in parameter coordinates)
top eigenvalue, SAM sharpness)
=====================================  ===========================================

Why the normal curvature is invariant: the normal part ``N(v, v) = (I - P_T)
D^2 eta[v, v]`` of the acceleration of any curve through ``theta`` with velocity
``J v`` depends only on ``J v`` (the second fundamental form); a change of
coordinates adds a tangent term ``J D^2 phi[v', v']`` that the projection
removes, and ``|J v|_G`` is the length of the same tangent vector.

Why the undamped ``gamma^2`` is dominated by nearly degenerate directions:
``gamma^2 = sum_ab |E^T N_ab E|^2`` with ``E = V s^{-1}`` (the whitened
Jacobian's right singular vectors divided by its singular values): a tangent
direction with singular value ``s_k`` enters with weight ``s_k^{-4}``. The
directions in which the network's outputs barely move (``s_k`` near the rank
cut-off) dominate the sum, though their normal curvature ``|N(v_k, v_k)| /
s_k^2`` is the honest curvature *of those directions*: ``gamma^2`` averages
the squared normal curvature over *all* tangent directions with equal weight,
and a badly conditioned ``g`` makes the rarely excited ones count as much as
the rest. It is invariant but volatile. Damping ``g + lambda I`` suppresses
those directions, but ``lambda I`` is measured in parameter units, so the
result depends on the coordinates (rescaling a layer by ``c`` changes it by
orders of magnitude). The measures here instead pick *meaningful* tangent
directions -- the natural-gradient step, the dropout noise -- and report the
normal curvature along them, which needs only the projection onto
``range(J)`` (a least-squares problem), never ``g^{-1}`` itself. The
natural-gradient direction itself solves ``g v = J^T r`` and inherits the
conditioning of ``g``; its function-space regularised variant
(:mod:`dropgeom.curvature.natural_gradient`) damps with the Fisher of other
inputs, a tensor, instead of ``lambda I``.
"""

from __future__ import annotations

from typing import List, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from ..manifold import ModelManifold
from ._common import check_alpha, check_manifold
from ._projector import Projector, as_rows, check_method
from .natural_gradient import solve_direction

__all__ = ["normal_curvatures", "dropout_tangent_directions", "noise_tangent_curvature", "INVARIANCE", "curvature_profile"]

#: Invariance status of every curvature measure under a reparametrisation ``theta = phi(theta')``.
INVARIANCE = {
    "statistical_curvature": "invariant",
    "embedding_curvature (undamped)": "invariant",
    "embedding_curvature (damped)": "coordinate-dependent",
    "normal_curvature": "invariant",
    "normal_curvatures": "invariant",
    "range_gamma2": "invariant",
    "natural_gradient_curvature": "invariant (rank J = P)",
    "natural_gradient_curvature (function-space regulariser)": "invariant (rank [J; J_ref] = P)",
    "noise_tangent_curvature": "invariant",
    "hessian_trace": "coordinate-dependent",
    "hessian_top_eigenvalue": "coordinate-dependent",
    "fisher_trace": "coordinate-dependent",
    "fisher_top_eigenvalue": "coordinate-dependent",
    "sam_sharpness": "coordinate-dependent",
}


def normal_curvatures(
    manifold: ModelManifold,
    directions: Union[Tensor, List[Mapping[str, Tensor]]],
    alpha: float = 1.0,
    *,
    method: str = "auto",
    cg_tol: Optional[float] = None,
    cg_max_iter: Optional[int] = None,
) -> Tensor:
    r"""Normal curvature along each of several directions, sharing one projection onto ``range(J)``.

    .. math::  \kappa(v) = \frac{|N^\alpha(v, v)|_G}{|J v|_G^2}

    the same quantity as :func:`~dropgeom.curvature.normal_curvature` (theory.md
    section 3), for ``m`` directions at the cost of one Jacobian SVD (dense) or
    one batched least-squares solve (``cg``).

    Invariance: **invariant** under every reparametrisation ``theta = phi(theta')``
    when the directions are transformed as tangent vectors (``v' = Dphi^{-1} v``):
    ``kappa`` depends only on the tangent vector ``J v`` (the second fundamental form).

    Args:
        manifold: the model manifold.
        directions: ``[m, P]`` tensor (one direction per row) or a list of dicts of named tensors.
        alpha: 1 (e, default), -1 (m) or any real.
        method: ``"dense"``, ``"cg"`` or ``"auto"`` (as in ``normal_curvature``).
        cg_tol, cg_max_iter: conjugate-gradient settings (``"cg"``).

    Returns:
        Tensor ``[m]`` of normal curvatures (a normal part at rounding level of
        ``D^2 eta[v, v]``, e.g. along an e-flat direction, is reported as 0).

    Raises:
        TypeError: ``manifold`` is not a ModelManifold.
        ValueError: bad ``alpha``/``method``, a direction of the wrong size, zero,
            non-finite, or in the null space of ``J``.

    Example:
        >>> import torch
        >>> from dropgeom import ModelManifold
        >>> rho = 2.0   # circle of radius rho: normal curvature 1/rho in every direction
        >>> m = ModelManifold.from_function(
        ...     lambda th: rho * torch.stack([th.cos(), th.sin()], -1), torch.tensor([0.3], dtype=torch.float64), "gaussian")
        >>> normal_curvatures(m, torch.tensor([[1.0], [-3.0]], dtype=torch.float64))
        tensor([0.5000, 0.5000], dtype=torch.float64)
    """
    check_manifold(manifold, "normal_curvatures")
    alpha = check_alpha(alpha)
    check_method(method)
    V = as_rows(manifold, directions)
    return Projector(manifold, method, cg_tol, cg_max_iter).kappas(V, alpha)


def dropout_tangent_directions(manifold: ModelManifold) -> List[Tensor]:
    r"""Per dropout layer of an ``nn.Sequential`` model: the mask directions ``[units, P]``.

    Dropping (scaling) unit ``j`` of a dropout layer scales column ``j`` of the
    next ``nn.Linear`` layer's weight, so the tangent vector of the mask noise of
    unit ``j`` is ``J v_j`` with ``v_j`` that column placed in the weight's slot
    (theory.md 4.2). The next Linear's weight must be a free parameter of the manifold.

    Raises:
        ValueError: the manifold has no model, the model is not an ``nn.Sequential``,
            it has no dropout layer followed by a Linear layer, or that weight is
            not among the manifold's parameters.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from dropgeom import ModelManifold
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Dropout(0.5), nn.Linear(3, 2)).double()
        >>> m = ModelManifold(net, torch.randn(4, 2, dtype=torch.float64))
        >>> [tuple(d.shape) for d in dropout_tangent_directions(m)]
        [(3, 17)]
    """
    check_manifold(manifold, "dropout_tangent_directions")
    model = manifold.model
    if model is None or not isinstance(model, nn.Sequential):
        raise ValueError(
            "dropout tangent directions need a manifold built from an nn.Sequential model with nn.Dropout layers "
            f"(got {'a closed-form manifold' if model is None else type(model).__name__})"
        )
    mods = list(model.named_children())
    out: List[Tensor] = []
    for i, (_, mod) in enumerate(mods):
        if not isinstance(mod, nn.Dropout):
            continue
        nxt = next(((nm, x) for nm, x in mods[i + 1 :] if isinstance(x, nn.Linear)), None)
        if nxt is None:
            continue
        wname = f"{nxt[0]}.weight"
        if wname not in manifold.param_names:
            raise ValueError(
                f"the weight {wname!r} after dropout layer {mods[i][0]!r} is not a free parameter of the manifold; "
                "include it in param_names"
            )
        W = manifold.params[wname]
        sl = manifold.param_slices()[wname]
        D = torch.zeros(W.shape[1], manifold.num_params, dtype=manifold.dtype, device=manifold.device)
        for j in range(W.shape[1]):
            col = torch.zeros_like(W)
            col[:, j] = W[:, j]
            D[j, sl] = col.reshape(-1)
        out.append(D)
    if not out:
        raise ValueError("the model has no nn.Dropout layer followed by an nn.Linear layer: no mask directions")
    return out


def noise_tangent_curvature(
    manifold: ModelManifold,
    alpha: float = 1.0,
    *,
    n_draws: int = 16,
    generator: Optional[torch.Generator] = None,
    method: str = "auto",
    cg_tol: Optional[float] = None,
    cg_max_iter: Optional[int] = None,
) -> Tensor:
    r"""Mean normal curvature along random dropout-noise tangent directions.

    .. math::  \bar\kappa_{noise} = \frac{1}{D} \sum_{d=1}^{D} \kappa\Big(\sum_{l, j} \xi^{(d)}_{lj} v_{lj}\Big),
               \qquad \xi^{(d)}_{lj} = \pm 1 \text{ (Rademacher)}

    with ``v_lj`` the mask direction of unit ``j`` of dropout layer ``l``
    (:func:`dropout_tangent_directions`): one draw of dropout noise shared by
    all inputs moves the parameters along ``sum_j xi_j v_j`` to first order. The
    symmetric +-1 law is the direction law of centred dropout noise up to its
    scale (which ``kappa`` ignores) and skew; it does not depend on ``p``, so
    models trained at different ``p`` (or without dropout) are measured alike.
    Unlike the mean over single-unit mask directions it includes the cross
    terms ``N(v_i, v_j)`` between units and layers (theory.md sections 3 and 4.2).

    Invariance: **invariant** (the directions are defined by the network
    function: scaling unit outputs).

    Args:
        manifold: a manifold built from an ``nn.Sequential`` with dropout layers.
        alpha: 1 (e), -1 (m) or any real.
        n_draws: noise draws ``D`` (>= 1).
        generator: random generator for the draws.
        method, cg_tol, cg_max_iter: as in :func:`normal_curvatures`.

    Returns:
        0-dim tensor.

    Raises:
        ValueError: as :func:`dropout_tangent_directions`; ``n_draws < 1``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from dropgeom import ModelManifold
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Dropout(0.5), nn.Linear(3, 2)).double()
        >>> m = ModelManifold(net, torch.randn(6, 2, dtype=torch.float64))
        >>> float(noise_tangent_curvature(m, n_draws=4, generator=torch.Generator().manual_seed(0)))  # mask before a linear output: e-flat
        0.0
    """
    check_manifold(manifold, "noise_tangent_curvature")
    alpha = check_alpha(alpha)
    if isinstance(n_draws, bool) or not isinstance(n_draws, int) or n_draws < 1:
        raise ValueError(f"n_draws must be a positive integer, got {n_draws!r}")
    D = torch.cat(dropout_tangent_directions(manifold))  # [U, P]
    xi = torch.randint(0, 2, (n_draws, D.shape[0]), generator=generator).to(D.dtype) * 2 - 1
    V = xi @ D
    return normal_curvatures(manifold, V, alpha, method=method, cg_tol=cg_tol, cg_max_iter=cg_max_iter).mean()


def curvature_profile(
    manifold: ModelManifold,
    directions: Mapping[str, Tensor],
    alphas: Mapping[str, float],
    targets: Optional[Tensor] = None,
    *,
    reference: Optional[ModelManifold] = None,
    reference_weight: float = 1.0,
    method: str = "auto",
    cg_tol: Optional[float] = None,
    cg_max_iter: Optional[int] = None,
) -> dict:
    r"""Mean normal curvature of several named direction sets (and natural-gradient directions), one projection.

    For each name in ``directions`` (``[m, P]``) and each ``alpha`` in ``alphas``:
    ``mean_v kappa_alpha(v)`` (:func:`normal_curvatures`); with ``targets`` also
    ``"natural_gradient"`` (plain, :func:`~dropgeom.curvature.natural_gradient_curvature`),
    and with ``reference`` too ``"natural_gradient_fs"`` (its function-space
    regularised variant). The Jacobian SVD (dense) is computed once for everything.
    theory.md section 3.

    Invariance: as :func:`normal_curvatures` and :func:`~dropgeom.curvature.natural_gradient_curvature`.

    Args:
        manifold: the model manifold.
        directions: ``{name: [m, P] tensor}``.
        alphas: ``{label: alpha}``, e.g. ``{"e": 1.0, "m": -1.0}``.
        targets: labels; adds the natural-gradient direction.
        reference, reference_weight: the same model on other inputs and the weight
            of the function-space regulariser (needs ``targets``).
        method, cg_tol, cg_max_iter: as in :func:`normal_curvatures`.

    Returns:
        ``{f"{name}_{label}": float}``; directions with ``J v = 0`` (e.g. a unit that
        every mask of a mixture drops) are left out of the mean (NaN if all are).

    Raises:
        ValueError: as :func:`normal_curvatures`; a ``reference`` without ``targets``.

    Example:
        >>> import torch
        >>> from dropgeom import ModelManifold
        >>> m = ModelManifold.from_function(
        ...     lambda th: 2.0 * torch.stack([th.cos(), th.sin()], -1), torch.tensor([0.3], dtype=torch.float64), "gaussian")
        >>> curvature_profile(m, {"d": torch.ones(1, 1, dtype=torch.float64)}, {"e": 1.0})
        {'d_e': 0.5}
    """
    check_manifold(manifold, "curvature_profile")
    check_method(method)
    if reference is not None and targets is None:
        raise ValueError("curvature_profile: a reference (function-space regulariser) needs targets")
    proj = Projector(manifold, method, cg_tol, cg_max_iter)
    named = {k: as_rows(manifold, V) for k, V in directions.items()}
    if targets is not None:
        named["natural_gradient"] = as_rows(manifold, solve_direction(proj, manifold, targets, None, 1.0)[None])
        if reference is not None:
            v = solve_direction(proj, manifold, targets, reference, reference_weight)
            named["natural_gradient_fs"] = as_rows(manifold, v[None])
    out = {}
    for k, V in named.items():
        for label, a in alphas.items():
            kap = proj.kappas(V, check_alpha(a), null="nan")
            out[f"{k}_{label}"] = float(kap[~kap.isnan()].mean()) if bool((~kap.isnan()).any()) else float("nan")
    return out
