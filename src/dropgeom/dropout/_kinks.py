r"""Kink crossings of dropped units through one ReLU (the exact divergence form's fast path).

Setting (theory.md 4.2, :meth:`~dropgeom.dropout.chain.Chain.relu_shift`): a dropout
layer with input ``h`` (``[n, U]``) feeds a Linear ``W`` (``[d, U]``, output ``z``), then a
ReLU, then an affine rest ``L`` (``[K, d]``). Dropping unit ``j`` of sample ``i`` shifts
``z_i`` by ``-delta_ij = -h_ij W[:, j]``; the ReLU output then changes by
``-D_i delta_ij + c_ij`` with ``D = 1[z > 0]`` and

.. math::  c_{ija} = \mathrm{relu}(z_{ia} - \delta_{ija}) - \mathrm{relu}(z_{ia}) + D_{ia}\,\delta_{ija}
           = \mathrm{relu}\big(s_{ia} (\delta_{ija} - z_{ia})\big),

``s = +1`` where ``z > 0`` and ``-1`` elsewhere: zero unless the shift crosses the kink
(``delta >= z > 0`` or ``delta < z <= 0``). It enters ``eta^(-j)`` as ``L[:, a] c_ija``. A LeakyReLU
with slope ``alpha`` below the kink gives ``(1 - alpha)`` times the same ``c`` (the caller scales ``L``).

Only coordinates with ``|z_ia| <= max_j |h_ij| max_j |W_aj|`` can cross; for those
(padded per sample, a few samples at a time so that each block stays in cache)
:func:`kink_correction` forms ``C = relu(s (W_a h_i - z_ia))`` densely and multiplies it
by ``L``'s matching columns (one batched matmul), forwards and backwards. This touches
each candidate ``(i, a, j)`` a dozen times in all, where enumerating the crossings first
(``nonzero``) and scattering them costs more per element on the CPU. Hand-written: no
library computes these drops.
"""

from __future__ import annotations

from typing import Any, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .._utils import first_order_only

__all__ = ["kink_correction"]

#: elements of one padded ``[samples, candidates, U]`` block (1 MiB of float32: stays in cache)
_BLOCK = 2**18


class _Block(NamedTuple):
    """Samples ``start:stop``; their candidate coordinates ``idx`` ``[g, m]`` and signs ``s`` (0 on padding)."""

    start: int
    stop: int
    idx: Tensor
    s: Tensor


def _blocks(h: Tensor, w: Tensor, z: Tensor) -> List[_Block]:
    """The candidate coordinates of every sample, padded, in blocks of consecutive samples."""
    with torch.no_grad():
        bound = h.abs().amax(1, keepdim=True) * w.abs().amax(1).unsqueeze(0)  # [n, d]
        cand = z.abs() <= bound
        cnt = cand.sum(1)
        most = int(cnt.max()) if cnt.numel() else 0
        if most == 0:
            return []
        n, u = h.shape
        ii, aa = torch.nonzero(cand, as_tuple=True)  # sample-major
        slot = torch.arange(ii.shape[0], device=z.device) - (torch.cumsum(cnt, 0) - cnt)[ii]
        idx = torch.zeros(n, most, dtype=torch.long, device=z.device)
        idx[ii, slot] = aa
        s = torch.zeros(n, most, dtype=z.dtype, device=z.device)
        s[ii, slot] = torch.where(z[ii, aa] > 0, 1.0, -1.0).to(z.dtype)
        per = max(1, _BLOCK // (most * u))
        out = []
        for start in range(0, n, per):
            stop = min(n, start + per)
            m = int(cnt[start:stop].max())
            if m:
                out.append(_Block(start, stop, idx[start:stop, :m], s[start:stop, :m]))
        return out


def _pre(blk: _Block, z: Tensor, h: Tensor, w: Tensor) -> Tuple[Tensor, Tensor]:
    """``(s W_a, C)`` of one block: ``[g, m, U]`` each, ``C = relu(s W_a h_i - s z_ia)``."""
    g, m = blk.idx.shape
    sw = torch.index_select(w, 0, blk.idx.reshape(-1)).view(g, m, -1).mul_(blk.s.unsqueeze(-1))
    sz = (torch.gather(z[blk.start : blk.stop], 1, blk.idx) * blk.s).unsqueeze(-1)
    c = torch.addcmul(sz.neg(), sw, h[blk.start : blk.stop].unsqueeze(1)).clamp_(min=0)
    return sw, c


class _KinkCorrection(torch.autograd.Function):
    """``corr[i, :, j] = sum_a c_ija L[:, a]`` (``[n, K, U]``) block by block, with a hand-written backward.

    Differentiable once (the penalty's gradient; nothing here takes its second derivative)."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, h: Tensor, w: Tensor, lmat: Tensor) -> Tensor:
        n, u = h.shape
        corr = torch.empty(n, lmat.shape[0], u, dtype=z.dtype, device=z.device)
        blocks = _blocks(h, w, z)
        lt = lmat.t()
        done = 0  # samples before it are written; the blocks' bmm writes its samples whole, the gaps get zeros
        for blk in blocks:
            corr[done : blk.start].zero_()
            _, c = _pre(blk, z, h, w)
            la = lt[blk.idx].transpose(1, 2)  # [g, K, m]
            torch.bmm(la, c, out=corr[blk.start : blk.stop])
            done = blk.stop
        corr[done:].zero_()
        ctx.blocks = blocks
        ctx.save_for_backward(z, h, w, lmat)
        return corr

    @staticmethod
    @first_order_only("the kink correction of the exact divergence form")
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        z, h, w, lmat = ctx.saved_tensors
        grad = grad.contiguous()
        n, u = h.shape
        d = w.shape[0]
        gz = torch.zeros(n * d, dtype=z.dtype, device=z.device)
        gh = torch.zeros_like(h)
        gw = torch.zeros_like(w)
        glt = torch.zeros(d, lmat.shape[0], dtype=lmat.dtype, device=lmat.device)
        lt = lmat.t()
        for blk in ctx.blocks:
            g_blk = grad[blk.start : blk.stop]  # [g, K, U]
            sw, c = _pre(blk, z, h, w)
            flat = blk.idx.reshape(-1)
            # (G C^T)^T: this order runs about 1.6x faster than C G^T (the [U, K] operand transposed)
            glt.index_add_(0, flat, torch.bmm(g_blk, c.transpose(1, 2)).transpose(1, 2).reshape(flat.shape[0], -1))
            gc = torch.bmm(lt[blk.idx], g_blk).mul_(c.sign_())  # L_a^T G, where C > 0: [g, m, U]
            rows = torch.arange(blk.start, blk.stop, device=z.device).unsqueeze(1) * d + blk.idx
            gz.index_add_(0, rows.reshape(-1), (gc.sum(-1) * blk.s).neg().reshape(-1))
            gh[blk.start : blk.stop] = (gc * sw).sum(1)
            gc.mul_(h[blk.start : blk.stop].unsqueeze(1)).mul_(blk.s.unsqueeze(-1))
            gw.index_add_(0, flat, gc.reshape(flat.shape[0], u))
        return gz.view(n, d), gh, gw, glt.t()


def kink_correction(z: Tensor, h: Tensor, w: Tensor, lmat: Tensor) -> Tensor:
    r"""``sum_a c_ija L[:, a]`` for every sample ``i`` and dropped unit ``j`` (``[n, K, U]``).

    .. math::  \mathrm{corr}_{i,:,j} = \sum_a \mathrm{relu}\big(s_{ia} (h_{ij} W_{aj} - z_{ia})\big)\, L_{:,a}

    (module docstring; theory.md 4.2). Differentiable once in ``z``, ``h``, ``W`` and ``L``.

    Args:
        z: ``[n, d]`` the Linear's output.
        h: ``[n, U]`` the dropout layer's input.
        w: ``[d, U]`` the Linear's weight.
        lmat: ``[K, d]`` the affine rest's matrix ``L``.

    Raises:
        ValueError: shapes that do not fit together.

    Example:
        >>> import torch
        >>> h = torch.tensor([[1.0, 2.0]]); w = torch.tensor([[1.0, -1.0]]); z = torch.tensor([[0.5]])
        >>> kink_correction(z, h, w, torch.tensor([[3.0]]))  # unit 0 moves z to -0.5: c = 0.5, times 3
        tensor([[[1.5000, 0.0000]]])
    """
    if h.dim() != 2 or z.dim() != 2 or w.dim() != 2 or lmat.dim() != 2:
        raise ValueError("kink_correction takes matrices: z [n, d], h [n, U], W [d, U], L [K, d]")
    n, u = h.shape
    if z.shape[0] != n or w.shape[1] != u or lmat.shape[1] != w.shape[0] or z.shape[1] != w.shape[0]:
        raise ValueError(f"shapes do not fit: z {tuple(z.shape)}, h {tuple(h.shape)}, W {tuple(w.shape)}, L {tuple(lmat.shape)}")
    return _KinkCorrection.apply(z, h, w, lmat)
