r"""The shared projection onto the normal space of a model manifold (theory.md section 3).

One dense SVD of the whitened Jacobian (or a batched least-squares solve by
conjugate gradients) serves every normal curvature of
:mod:`dropgeom.curvature.invariant` and :mod:`dropgeom.curvature.natural_gradient`.
Internal: no public functions.
"""

from __future__ import annotations

import math
from typing import List, Mapping, Optional, Union

import torch
from torch import Tensor

from ..manifold import ModelManifold
from .dense import dense_projection_fits
from ._common import LinearisedManifold, default_max_iter, default_tol, normal_part, range_basis, skew_whitened, whiten, whitening

__all__: List[str] = []


def check_method(method: str) -> str:
    if method not in ("auto", "dense", "cg"):
        raise ValueError(f"method must be 'auto', 'dense' or 'cg', got {method!r}")
    return method


def resolve(manifold: ModelManifold, method: str) -> str:
    if method == "auto":
        return "dense" if dense_projection_fits(manifold) else "cg"
    return method


def as_rows(manifold: ModelManifold, V: Union[Tensor, List[Mapping[str, Tensor]]]) -> Tensor:
    if isinstance(V, (list, tuple)):
        V = torch.stack([manifold.flatten(manifold._as_params(v, "direction")) for v in V])
    if not isinstance(V, Tensor) or V.dim() != 2 or V.shape[1] != manifold.num_params or V.shape[0] == 0:
        shape = tuple(V.shape) if isinstance(V, Tensor) else type(V).__name__
        raise ValueError(f"directions must be a non-empty [m, P={manifold.num_params}] tensor, got {shape}")
    V = V.to(dtype=manifold.dtype, device=manifold.device)
    if not torch.isfinite(V).all():
        raise ValueError("directions contain non-finite values (NaN or inf)")
    norms = V.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError("a direction is zero; the normal curvature needs non-zero directions")
    return V / norms


class Projector:
    """Whitened projection onto the normal space of the manifold, built once (dense SVD or CG)."""

    def __init__(self, manifold: ModelManifold, method: str, cg_tol: Optional[float], cg_max_iter: Optional[int]):
        self.m = manifold
        self.eta, self.S, self.S_pinv = whitening(manifold)
        self.lin = LinearisedManifold(manifold)
        self.method = resolve(manifold, method)
        P = manifold.num_params
        self.tol = default_tol(manifold.dtype) if cg_tol is None else cg_tol
        self.max_iter = default_max_iter(P) if cg_max_iter is None else cg_max_iter
        self.U: Optional[Tensor] = None
        self.Jw: Optional[Tensor] = None  # S^T J, [nR, P]
        if self.method == "dense":
            self.U, self.s, self.V, self.Jw = range_basis(manifold, self.S)

    def normal(self, Y: Tensor) -> Tensor:
        """Whitened normal part of whitened vectors ``Y`` (``[m, n, R]``)."""
        return normal_part(Y, self.U, self.lin, self.S, self.tol, self.max_iter)

    def kappas(self, V: Tensor, alpha: float, batch: int = 16, null: str = "raise") -> Tensor:
        out = []
        for i in range(0, V.shape[0], batch):
            v = V[i : i + batch]
            jv = self.lin.jvp(v)  # [b, n, K]
            speed2 = (whiten(self.S, jv) ** 2).sum((1, 2))
            if null == "raise" and bool((speed2 <= 0).any()):
                raise ValueError("a direction lies in the null space of J in the G-metric (|J v|_G = 0): no curvature defined")
            Y = whiten(self.S, self.lin.d2(v, v))
            if alpha != 1.0:
                Y = Y + 0.5 * (1.0 - alpha) * skew_whitened(self.m, self.eta, self.S_pinv, jv, jv)
            N = self.normal(Y).reshape(Y.shape[0], -1)
            nn_, ny = N.norm(dim=1), Y.reshape(Y.shape[0], -1).norm(dim=1)
            # a normal part at rounding level of the second derivative (an e-flat direction) is zero
            floor = 100 * torch.finfo(Y.dtype).eps * math.sqrt(N.shape[1]) * ny
            k = torch.where(nn_ <= floor, torch.zeros_like(nn_), nn_) / speed2
            out.append(torch.where(speed2 > 0, k, torch.full_like(k, float("nan"))))
        return torch.cat(out)

    def natural_gradient(self, r: Tensor, reference: Optional["Projector"] = None, weight: float = 1.0) -> Tensor:
        """``v = argmin_v |S^T J v - S^+ r|^2 + weight |S_ref^T J_ref v|^2`` (minimum norm), ``[P]``.

        Without ``reference``: ``g^+ J^T r``. With it: ``(g + weight g_ref)^+ J^T r``
        (dense: least squares on the stacked whitened Jacobians; ``cg``: conjugate
        gradients on ``g + weight g_ref``).
        """
        from ..operators import conjugate_gradient

        z = torch.einsum("nrk,nk->nr", self.S_pinv, r)  # whitened G^+ r
        if self.method == "dense":
            if reference is None:
                assert self.U is not None
                return self.V @ ((self.U.T @ z.reshape(-1)) / self.s)
            A = torch.cat([self.Jw, math.sqrt(weight) * reference.dense_jacobian()])
            b = torch.cat([z.reshape(-1), torch.zeros(A.shape[0] - z.numel(), dtype=z.dtype, device=z.device)])
            U, s, Vh = torch.linalg.svd(A, full_matrices=False)
            k = int((s > max(A.shape) * torch.finfo(A.dtype).eps * s[0]).sum()) if s[0] > 0 else 0
            return Vh[:k].T @ ((U[:, :k].T @ b) / s[:k])
        b = self.lin.vjp(torch.einsum("nkr,nr->nk", self.S, z)[None]).T  # [P, 1]

        def mv(M: Tensor) -> Tensor:
            out = self.lin.metric_matmat(self.S, M)
            return out if reference is None else out + weight * reference.lin.metric_matmat(reference.S, M)

        return conjugate_gradient(mv, b, tol=self.tol, max_iter=self.max_iter)[:, 0]

    def dense_jacobian(self) -> Tensor:
        """The whitened Jacobian ``S^T J`` as a dense ``[nR, P]`` matrix."""
        if self.Jw is None:
            P = self.m.num_params
            J = self.m.jacobian()
            self.Jw = whiten(self.S, J.permute(2, 0, 1)).permute(1, 2, 0).reshape(-1, P)
        return self.Jw
