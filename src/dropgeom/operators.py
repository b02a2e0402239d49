r"""One linear-operator algebra for every curvature structure.

Every Fisher representation (dense, diagonal, per-layer blocks, KFAC,
matrix-free) is a :class:`CurvatureOperator` of shape ``[P, P]`` with the same
methods, so callers never branch on structure:

* ``mv(v)``                 ``F v`` for ``v`` of shape ``[P]`` or ``[P, m]``
* ``diag()``                the diagonal ``[P]``
* ``trace()``               ``tr F``
* ``dense()``               ``[P, P]`` (size-checked)
* ``eig(k)``                the ``k`` largest eigenpairs
* ``solve(b, damping)``     ``(F + damping I)^{-1} b``

Each operator records ``kind`` (which Fisher it represents: exact, mc,
empirical), ``structure`` and ``reduction`` (``mean`` over inputs, or
``sum = n * mean``) so that scaling conventions are never silent.

Example:
    >>> import torch
    >>> from dropgeom.operators import DenseOperator, DiagonalOperator
    >>> A = DenseOperator(torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64))
    >>> A.eig(1)[0]
    tensor([3.], dtype=torch.float64)
    >>> DiagonalOperator(torch.tensor([1.0, 4.0])).solve(torch.tensor([1.0, 4.0]), damping=0.0)
    tensor([1., 1.])
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._utils import memory_guard
from .solvers import _as_matrix, _check_damping, conjugate_gradient, lanczos_top_eigenpairs, top_eigenpairs

__all__ = [
    "CurvatureOperator",
    "DenseOperator",
    "DiagonalOperator",
    "BlockDiagonalOperator",
    "KroneckerBlock",
    "KFACOperator",
    "ImplicitOperator",
    "conjugate_gradient",
]


@dataclass
class _Meta:
    kind: str = "unknown"
    structure: str = "unknown"
    reduction: str = "mean"
    n: int = 0


class CurvatureOperator(ABC):
    """A symmetric positive semi-definite ``[P, P]`` operator (abstract)."""

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device, **meta) -> None:
        self.size = int(size)
        self.dtype = dtype
        self.device = device
        self.meta = _Meta(**meta)

    # metadata ----------------------------------------------------------------
    @property
    def shape(self) -> Tuple[int, int]:
        return (self.size, self.size)

    @property
    def kind(self) -> str:
        return self.meta.kind

    @property
    def structure(self) -> str:
        return self.meta.structure

    @property
    def reduction(self) -> str:
        return self.meta.reduction

    # algebra -------------------------------------------------------------------
    @abstractmethod
    def _matmat(self, V: Tensor) -> Tensor:
        """``F V`` for ``V`` of shape ``[P, m]``."""

    def mv(self, v: Tensor) -> Tensor:
        """``F v`` for ``v`` of shape ``[P]`` or ``[P, m]``."""
        V, squeeze = _as_matrix(v.to(self.dtype), self.size)
        out = self._matmat(V)
        return out[:, 0] if squeeze else out

    def __matmul__(self, v: Tensor) -> Tensor:
        return self.mv(v)

    def diag(self) -> Tensor:
        """The diagonal ``[P]``. Default: ``P`` products with unit vectors, in blocks."""
        out = torch.empty(self.size, dtype=self.dtype, device=self.device)
        step = 256
        for s in range(0, self.size, step):
            e = torch.zeros(self.size, min(step, self.size - s), dtype=self.dtype, device=self.device)
            idx = torch.arange(e.shape[1], device=self.device)
            e[s + idx, idx] = 1
            out[s : s + e.shape[1]] = (e * self._matmat(e)).sum(0)
        return out

    def trace(self) -> Tensor:
        """``tr F``."""
        return self.diag().sum()

    def dense(self, memory_limit: Optional[int] = None) -> Tensor:
        """The full ``[P, P]`` matrix (size-checked)."""
        memory_guard(
            self.size * self.size,
            self.dtype,
            f"a dense [{self.size} x {self.size}] matrix",
            "use mv/diag/eig/solve instead (structure 'diag', 'kfac' or 'implicit')",
            memory_limit,
        )
        return self._matmat(torch.eye(self.size, dtype=self.dtype, device=self.device))

    def eig(self, k: int = 1, tol: float = 1e-8) -> Tuple[Tensor, Tensor]:
        """The ``k`` largest eigenvalues (descending, ``[k]``) and eigenvectors (``[P, k]``).

        Dense ``eigh`` for ``P <= 2048``; otherwise implicitly restarted Lanczos
        (ARPACK through :func:`scipy.sparse.linalg.eigsh`) on ``mv``.
        """
        if not (1 <= k <= self.size):
            raise ValueError(f"k must lie in [1, P={self.size}], got {k}")
        if self.size <= 2048 or k >= self.size - 1:
            return top_eigenpairs(self.dense(), k, tol=tol)
        return lanczos_top_eigenpairs(self._matmat, self.size, k, tol, self.dtype, self.device)

    def solve(self, b: Tensor, damping: float = 0.0, tol: float = 1e-10, max_iter: Optional[int] = None) -> Tensor:
        """``(F + damping I)^{-1} b`` (conjugate gradients unless the structure allows a direct solve)."""
        _check_damping(damping)
        V, squeeze = _as_matrix(b.to(self.dtype), self.size)
        x = conjugate_gradient(lambda M: self._matmat(M) + damping * M, V, tol=tol, max_iter=max_iter)
        return x[:, 0] if squeeze else x

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(P={self.size}, kind={self.kind!r}, structure={self.structure!r}, "
            f"reduction={self.reduction!r}, dtype={self.dtype})"
        )


class DenseOperator(CurvatureOperator):
    """An explicit ``[P, P]`` matrix."""

    def __init__(self, matrix: Tensor, **meta) -> None:
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square, got {tuple(matrix.shape)}")
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device, **meta)
        self.matrix = matrix

    def _matmat(self, V: Tensor) -> Tensor:
        return self.matrix @ V

    def diag(self) -> Tensor:
        return self.matrix.diagonal().clone()

    def dense(self, memory_limit: Optional[int] = None) -> Tensor:
        return self.matrix

    def solve(self, b: Tensor, damping: float = 0.0, tol: float = 1e-10, max_iter: Optional[int] = None) -> Tensor:
        _check_damping(damping)
        V, squeeze = _as_matrix(b.to(self.dtype), self.size)
        eye = torch.eye(self.size, dtype=self.dtype, device=self.device)
        x = (
            torch.linalg.lstsq(self.matrix + damping * eye, V).solution
            if damping == 0
            else torch.linalg.solve(self.matrix + damping * eye, V)
        )
        return x[:, 0] if squeeze else x


class DiagonalOperator(CurvatureOperator):
    """A diagonal matrix given by its diagonal ``[P]``."""

    def __init__(self, diagonal: Tensor, **meta) -> None:
        if diagonal.dim() != 1:
            raise ValueError(f"diagonal must be 1-D, got {tuple(diagonal.shape)}")
        super().__init__(diagonal.shape[0], diagonal.dtype, diagonal.device, **meta)
        self.diagonal = diagonal

    def _matmat(self, V: Tensor) -> Tensor:
        return self.diagonal[:, None] * V

    def diag(self) -> Tensor:
        return self.diagonal

    def dense(self, memory_limit: Optional[int] = None) -> Tensor:
        memory_guard(
            self.size * self.size,
            self.dtype,
            f"a dense [{self.size} x {self.size}] matrix",
            "use mv/diag/eig/solve instead (structure 'diag', 'kfac' or 'implicit')",
            memory_limit,
        )
        return torch.diag(self.diagonal)

    def eig(self, k: int = 1, tol: float = 1e-8) -> Tuple[Tensor, Tensor]:
        if not (1 <= k <= self.size):
            raise ValueError(f"k must lie in [1, P={self.size}], got {k}")
        vals, idx = torch.topk(self.diagonal, k)
        vecs = torch.zeros(self.size, k, dtype=self.dtype, device=self.device)
        vecs[idx, torch.arange(k, device=self.device)] = 1
        return vals, vecs

    def solve(self, b: Tensor, damping: float = 0.0, tol: float = 1e-10, max_iter: Optional[int] = None) -> Tensor:
        _check_damping(damping)
        V, squeeze = _as_matrix(b.to(self.dtype), self.size)
        d = self.diagonal + damping
        x = torch.where(d[:, None] > 0, V / d[:, None].clamp_min(torch.finfo(self.dtype).tiny), torch.zeros_like(V))
        return x[:, 0] if squeeze else x


class BlockDiagonalOperator(CurvatureOperator):
    """Block-diagonal matrix: one dense block per parameter group (e.g. per layer).

    ``blocks[b]`` acts on the flat-vector indices ``index[b]`` (a 1-D long
    tensor); the index sets partition ``range(P)``.
    """

    def __init__(self, blocks: Sequence[Tensor], index: Sequence[Tensor], size: int, names: Sequence[str] = (), **meta) -> None:
        if len(blocks) != len(index) or not blocks:
            raise ValueError("one index set per block is needed (and at least one block)")
        for b, (blk, idx) in enumerate(zip(blocks, index)):
            if blk.dim() != 2 or blk.shape[0] != blk.shape[1] or blk.shape[0] != idx.numel():
                raise ValueError(f"block {b} has shape {tuple(blk.shape)} but {idx.numel()} indices")
        flat = torch.cat([i.reshape(-1).cpu() for i in index])
        if flat.numel() != size or not torch.equal(flat.sort().values, torch.arange(size)):
            raise ValueError(f"the index sets must partition range(P={size}) exactly once")
        ref = blocks[0]
        super().__init__(size, ref.dtype, ref.device, **meta)
        self.blocks = list(blocks)
        self.index = [i.to(ref.device) for i in index]
        self.names = list(names)

    def _matmat(self, V: Tensor) -> Tensor:
        out = torch.zeros_like(V)
        for blk, idx in zip(self.blocks, self.index):
            out[idx] = blk @ V[idx]
        return out

    def diag(self) -> Tensor:
        out = torch.zeros(self.size, dtype=self.dtype, device=self.device)
        for blk, idx in zip(self.blocks, self.index):
            out[idx] = blk.diagonal()
        return out

    def eig(self, k: int = 1, tol: float = 1e-8) -> Tuple[Tensor, Tensor]:
        if not (1 <= k <= self.size):
            raise ValueError(f"k must lie in [1, P={self.size}], got {k}")
        vals, vecs = [], []
        for blk, idx in zip(self.blocks, self.index):
            w, q = top_eigenpairs(blk, min(k, blk.shape[0]), tol=tol)
            full = torch.zeros(self.size, q.shape[1], dtype=self.dtype, device=self.device)
            full[idx] = q
            vals.append(w)
            vecs.append(full)
        w = torch.cat(vals)
        q = torch.cat(vecs, dim=1)
        top = torch.argsort(w, descending=True)[:k]
        return w[top], q[:, top]

    def solve(self, b: Tensor, damping: float = 0.0, tol: float = 1e-10, max_iter: Optional[int] = None) -> Tensor:
        _check_damping(damping)
        V, squeeze = _as_matrix(b.to(self.dtype), self.size)
        out = torch.zeros_like(V)
        for blk, idx in zip(self.blocks, self.index):
            eye = torch.eye(blk.shape[0], dtype=self.dtype, device=self.device)
            if damping > 0:
                out[idx] = torch.linalg.solve(blk + damping * eye, V[idx])
            else:
                out[idx] = torch.linalg.lstsq(blk, V[idx]).solution
        return out[:, 0] if squeeze else out


@dataclass
class KroneckerBlock:
    r"""One layer's Kronecker factorisation ``F_l ~ B \otimes A``.

    The layer's weight ``W`` (``[out, in]``, flattened row-major, conv kernels
    flattened to ``[out, in * kh * kw]``) and optional bias ``b`` (``[out]``)
    are stacked as ``[W | b]`` (``[out, in + 1]``); ``A`` (``[in(+1), in(+1)]``)
    is the input (activation) factor and ``B`` (``[out, out]``) the output
    gradient factor, so ``F_l vec([W|b]) = vec(B [W|b] A)``.

    ``weight_index`` and ``bias_index`` locate ``W`` and ``b`` in the flat
    parameter vector: a ``slice`` (a contiguous range, as the Fisher engine
    gives: no index tensor is stored and the blocks read views) or a 1-D long
    tensor of positions.

    Raises:
        TypeError: an index that is neither a slice nor a long tensor.
    """

    A: Tensor
    B: Tensor
    weight_index: Union[Tensor, slice]
    bias_index: Optional[Union[Tensor, slice]]
    name: str = ""

    def __post_init__(self) -> None:
        for field, idx in (("weight_index", self.weight_index), ("bias_index", self.bias_index)):
            if idx is None and field == "bias_index":
                continue
            ok = isinstance(idx, slice) or (isinstance(idx, Tensor) and idx.dtype == torch.long and idx.dim() == 1)
            if not ok:
                raise TypeError(f"KroneckerBlock {field} must be a slice or a 1-D long tensor, got {idx!r:.80}")

    @property
    def out_features(self) -> int:
        return self.B.shape[0]

    def gather(self, V: Tensor) -> Tensor:
        """Flat ``[P, m]`` -> ``[m, out, in(+1)]``."""
        m = V.shape[1]
        W = V[self.weight_index].T.reshape(m, self.out_features, -1)
        if self.bias_index is not None:
            W = torch.cat([W, V[self.bias_index].T.reshape(m, self.out_features, 1)], dim=2)
        return W

    def scatter(self, out: Tensor, W: Tensor) -> None:
        m = W.shape[0]
        if self.bias_index is not None:
            out[self.bias_index] = W[:, :, -1].reshape(m, -1).T
            W = W[:, :, :-1]
        out[self.weight_index] = W.reshape(m, -1).T


class KFACOperator(CurvatureOperator):
    """Kronecker-factored blocks (Martens & Grosse 2015; Grosse & Martens 2016 for convolutions).

    Parameters without a Kronecker rule (norm layers, embeddings, ...) keep
    an exact dense block, listed in ``dense_blocks``.
    """

    def __init__(
        self,
        kron_blocks: Sequence[KroneckerBlock],
        dense_blocks: Sequence[Tuple[Tensor, Tensor]],
        size: int,
        dtype: torch.dtype,
        device: torch.device,
        **meta,
    ) -> None:
        super().__init__(size, dtype, device, **meta)
        self.kron_blocks = list(kron_blocks)
        self.dense_blocks = list(dense_blocks)  # (block, index)
        self._eig_cache: Optional[List[Tuple[Tensor, Tensor, Tensor, Tensor]]] = None

    def _matmat(self, V: Tensor) -> Tensor:
        out = torch.zeros_like(V)
        for kb in self.kron_blocks:
            W = kb.gather(V)
            kb.scatter(out, kb.B @ W @ kb.A)
        for blk, idx in self.dense_blocks:
            out[idx] = blk @ V[idx]
        return out

    def diag(self) -> Tensor:
        out = torch.zeros(self.size, 1, dtype=self.dtype, device=self.device)
        for kb in self.kron_blocks:
            d = torch.outer(kb.B.diagonal(), kb.A.diagonal())[None]
            kb.scatter(out, d)
        for blk, idx in self.dense_blocks:
            out[idx, 0] = blk.diagonal()
        return out[:, 0]

    def _eigs(self) -> List[Tuple[Tensor, Tensor, Tensor, Tensor]]:
        if self._eig_cache is None:
            self._eig_cache = []
            for kb in self.kron_blocks:
                wa, qa = torch.linalg.eigh(kb.A)
                wb, qb = torch.linalg.eigh(kb.B)
                self._eig_cache.append((wa, qa, wb, qb))
        return self._eig_cache

    def eig(self, k: int = 1, tol: float = 1e-8) -> Tuple[Tensor, Tensor]:
        if not (1 <= k <= self.size):
            raise ValueError(f"k must lie in [1, P={self.size}], got {k}")
        cands: List[Tuple[float, int, int, int]] = []  # (value, block, ib, ia)
        for bi, (wa, _, wb, _) in enumerate(self._eigs()):
            prod = torch.outer(wb, wa).reshape(-1)
            top = torch.topk(prod, min(k, prod.numel()))
            for v, flat in zip(top.values.tolist(), top.indices.tolist()):
                cands.append((v, bi, flat // wa.numel(), flat % wa.numel()))
        dense_eigs = [torch.linalg.eigh(blk) for blk, _ in self.dense_blocks]
        for di, (w, _) in enumerate(dense_eigs):
            for j, v in enumerate(w.tolist()):
                cands.append((v, -1 - di, j, 0))
        cands.sort(key=lambda c: -c[0])
        cands = cands[:k]
        vals = torch.tensor([c[0] for c in cands], dtype=self.dtype, device=self.device)
        vecs = torch.zeros(self.size, len(cands), dtype=self.dtype, device=self.device)
        for col, (_, bi, i, j) in enumerate(cands):
            if bi >= 0:
                kb = self.kron_blocks[bi]
                _, qa, _, qb = self._eigs()[bi]
                W = torch.outer(qb[:, i], qa[:, j])[None]
                tmp = torch.zeros(self.size, 1, dtype=self.dtype, device=self.device)
                kb.scatter(tmp, W)
                vecs[:, col] = tmp[:, 0]
            else:
                _, idx = self.dense_blocks[-1 - bi]
                vecs[idx, col] = dense_eigs[-1 - bi][1][:, i]
        return vals, vecs

    def solve(self, b: Tensor, damping: float = 0.0, tol: float = 1e-10, max_iter: Optional[int] = None) -> Tensor:
        """Exact inverse of the Kronecker blocks through their factors' eigenbases."""
        _check_damping(damping)
        V, squeeze = _as_matrix(b.to(self.dtype), self.size)
        out = torch.zeros_like(V)
        for kb, (wa, qa, wb, qb) in zip(self.kron_blocks, self._eigs()):
            W = qb.T @ kb.gather(V) @ qa
            lam = torch.outer(wb, wa) + damping
            W = torch.where(lam > 0, W / lam.clamp_min(torch.finfo(self.dtype).tiny), torch.zeros_like(W))
            kb.scatter(out, qb @ W @ qa.T)
        for blk, idx in self.dense_blocks:
            eye = torch.eye(blk.shape[0], dtype=self.dtype, device=self.device)
            out[idx] = torch.linalg.lstsq(blk + damping * eye, V[idx]).solution
        return out[:, 0] if squeeze else out


class ImplicitOperator(CurvatureOperator):
    """A matrix-free operator given by its product ``matmat(V) -> F V``.

    ``diag_fn`` / ``trace_fn`` supply exact diagonals or traces cheaper than
    ``P`` products when the producer knows how (the Fisher engine does).
    """

    def __init__(
        self,
        matmat: Callable[[Tensor], Tensor],
        size: int,
        dtype: torch.dtype,
        device: torch.device,
        diag_fn: Optional[Callable[[], Tensor]] = None,
        **meta,
    ) -> None:
        super().__init__(size, dtype, device, **meta)
        self._mm = matmat
        self._diag_fn = diag_fn
        self._diag_cache: Optional[Tensor] = None

    def _matmat(self, V: Tensor) -> Tensor:
        return self._mm(V)

    def diag(self) -> Tensor:
        if self._diag_fn is None:
            return super().diag()
        if self._diag_cache is None:
            self._diag_cache = self._diag_fn()
        return self._diag_cache


# --------------------------------------------------------------------------- sums over chunks of inputs
