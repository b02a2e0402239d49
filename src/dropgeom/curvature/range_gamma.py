r"""The undamped scalar curvature ``gamma^2`` computed on the exact range of ``J`` (theory.md sections 3 and 5.4).

``gamma^2 = sum_{k,l} |N(e_k, e_l)|_G^2`` with ``e_k = v_k / s_k`` (``s_k, v_k``:
the non-zero singular values and right singular vectors of the whitened
Jacobian ``S^T J``): the squared second fundamental form summed over a
G-orthonormal basis ``J e_k = u_k`` of the tangent space. This is exactly what
``embedding_curvature(method="dense")`` computes, but the second derivatives
are taken only along the ``r = rank J`` basis directions, ``d_a d_b
eta(theta + E_block a + E b)`` for a block of basis directions at a time
(``[n, K, block, r]``), never as the ``[n, K, P, P]`` Hessian tensor: the
memory falls from ``n K P^2`` to ``n K r block``. The time does not: the
projection of ``r^2`` second derivatives onto the normal space costs about
``2 n (K-1) r^3`` flops (``5e11`` at ``P = r = 618``, ``n = 100``, ``K = 10``:
minutes per model), so for networks of that size it is computed on a
parameter subset (``ModelManifold(..., param_names=...)``; the curvature of the
submanifold swept by those parameters, the same subset for every model
compared). When ``n (K-1) <= P`` the tangent space fills the output space and
``gamma^2 = 0``: the inputs must outnumber the parameters.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.func import jacfwd, jacrev, vmap

from ..manifold import ModelManifold, memory_guard
from ._common import check_alpha, check_manifold, skew_whitened, whiten, whitening

__all__ = ["range_gamma2"]


def _basis_hessian(manifold: ModelManifold, E: Tensor, Ek: Tensor) -> Tensor:
    """``d_a d_b eta(theta + Ek a + E b)`` at ``0``, ``[n, K, c, r]`` (jacfwd over jacrev, per sample)."""
    theta = manifold.theta
    a0 = torch.zeros(Ek.shape[1], dtype=theta.dtype, device=theta.device)
    b0 = torch.zeros(E.shape[1], dtype=theta.dtype, device=theta.device)

    def hess(fn):
        # d/da of (d/db f(a, b)) -> [K, r, c]
        return jacfwd(lambda a: jacrev(lambda b: fn(theta + Ek @ a + E @ b))(b0))(a0)

    if manifold.model is None or not manifold.inputs:
        return hess(lambda th: manifold.forward(manifold.unflatten(th))).transpose(-1, -2)

    def one(xs: Tuple[Tensor, ...]) -> Tensor:
        single = tuple(x.unsqueeze(0) for x in xs)
        return hess(lambda th: manifold.forward(manifold.unflatten(th), single)[0])

    chunk = max(
        1, min(manifold.n, int(64 * 1024**2 // max(1, manifold.num_outputs * E.shape[1] * Ek.shape[1] * theta.element_size())))
    )
    try:
        out = vmap(one, chunk_size=chunk)(manifold.inputs)
    except (RuntimeError, NotImplementedError):
        out = torch.stack([one(tuple(x[i] for x in manifold.inputs)) for i in range(manifold.n)])
    return out.transpose(-1, -2)


def range_gamma2(
    manifold: ModelManifold, alpha: float = 1.0, *, rcond: Optional[float] = None, block_bytes: int = 256 * 2**20
) -> Tensor:
    r"""Undamped ``gamma^2`` on the exact range of ``J``, without the ``[n, K, P, P]`` Hessian tensor.

    .. math::  \gamma^2 = \sum_{k,l=1}^{r} \big|(I - P_T)\, D^2_\alpha \eta[e_k, e_l]\big|_G^2,
               \qquad e_k = v_k / s_k

    (``S^T J = U diag(s) V^T`` truncated at the numerical rank ``r``;
    ``D^2_alpha eta[u, v] = D^2 eta[u, v] + (1-alpha)/2 G^+ A'''[J u, J v, .]``).
    Equal to ``embedding_curvature(manifold, alpha, method="dense").gamma2``;
    memory ``n K r block`` instead of ``n K P^2``; time about ``2 n (K-1) r^3`` flops. theory.md section 3.

    Invariance: **invariant** (the basis ``J e_k`` is G-orthonormal in the
    tangent space, a coordinate-free object); dominated by the directions with
    the smallest ``s_k``, which enter with weight ``s_k^{-4}``.

    Args:
        manifold: the model manifold (any number of parameters).
        alpha: 1 (e, default), -1 (m) or any real.
        rcond: relative rank cut-off (default ``max(nR, P) * eps``, as the dense method).
        block_bytes: memory for one block of second derivatives (sets the block size).

    Returns:
        0-dim tensor.

    Raises:
        TypeError: ``manifold`` is not a ModelManifold.
        ValueError: bad ``alpha`` or ``rcond``.
        MemoryError: one block (``[n, K, 1, r]`` at least) exceeds the memory limit.

    Example:
        >>> import torch
        >>> from dropgeom import ModelManifold
        >>> rho = 2.0   # circle of radius rho: gamma^2 = 1/rho^2
        >>> m = ModelManifold.from_function(
        ...     lambda th: rho * torch.stack([th.cos(), th.sin()], -1), torch.tensor([0.3], dtype=torch.float64), "gaussian")
        >>> round(float(range_gamma2(m)), 6)
        0.25
    """
    check_manifold(manifold, "range_gamma2")
    alpha = check_alpha(alpha)
    if rcond is not None and (isinstance(rcond, bool) or not isinstance(rcond, (int, float)) or not 0 <= rcond < 1):
        raise ValueError(f"rcond must be a number in [0, 1), got {rcond!r}")
    eta, S, S_pinv = whitening(manifold)
    n, K, P = manifold.n, manifold.num_outputs, manifold.num_params
    J = manifold.jacobian()  # [n, K, P]
    Jw = whiten(S, J.permute(2, 0, 1)).permute(1, 2, 0).reshape(-1, P)  # [nR, P]
    U, s, Vh = torch.linalg.svd(Jw, full_matrices=False)
    cut = max(Jw.shape) * torch.finfo(Jw.dtype).eps if rcond is None else rcond
    r = int((s > cut * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    if r == 0:
        return torch.zeros((), dtype=manifold.dtype)
    U, E = U[:, :r], Vh[:r].T / s[:r]
    # blocks of c basis directions at a time: [n, K, c, r] tensors within ``block_bytes``
    c = max(1, min(r, block_bytes // max(1, 4 * n * K * r * torch.finfo(manifold.dtype).bits // 8)))
    memory_guard(
        4 * n * K * r * c,
        manifold.dtype,
        f"range_gamma2: about 4 copies of [n={n}, K={K}, {c}, r={r}]",
        "use fewer inputs (r <= n (K-1)) or a smaller block_bytes",
    )
    je = torch.einsum("nkp,pa->ank", J, E) if alpha != 1.0 else None  # [r, n, K]
    total = torch.zeros((), dtype=manifold.dtype)
    for k0 in range(0, r, c):
        k1 = min(r, k0 + c)
        Y = torch.einsum("nkr,nkab->nrab", S, _basis_hessian(manifold, E, E[:, k0:k1])).reshape(-1, k1 - k0, r)
        if je is not None:
            a = je[k0:k1, None].expand(k1 - k0, r, n, K)
            b = je[None, :].expand(k1 - k0, r, n, K)
            Y = Y + 0.5 * (1.0 - alpha) * skew_whitened(manifold, eta, S_pinv, a, b).permute(2, 3, 0, 1).reshape(-1, k1 - k0, r)
        N = Y - torch.einsum("jq,qab->jab", U, torch.einsum("jq,jab->qab", U, Y))
        total = total + (N * N).sum()
    return total
