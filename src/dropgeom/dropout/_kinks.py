r"""Kink crossings of dropped units through one ReLU (the exact divergence form's fast path).

Setting (theory.md 4.2, :meth:`~dropgeom.dropout.chain.Chain.dropped_relu`): a dropout
layer with input ``h`` (``[n, U]``) feeds a Linear ``W`` (``[d, U]``, output ``z``), then a
ReLU, then an affine rest ``L`` (``[K, d]``). Dropping unit ``j`` of sample ``i`` shifts
``z_i`` by ``-delta_ij = -h_ij W[:, j]``; the ReLU output then changes by
``-D_i delta_ij + c_ij`` with ``D = 1[z > 0]`` and

.. math::  c_{ija} = \mathrm{relu}(z_{ia} - \delta_{ija}) - \mathrm{relu}(z_{ia}) + D_{ia}\,\delta_{ija},

which is zero unless the shift crosses the kink: ``delta >= z > 0`` or ``delta < z <= 0``.
At a crossing ``c = s (delta - z)`` with ``s = sign`` (``+1`` for ``z > 0``, else ``-1``),
and it enters ``eta^(-j)`` as ``L[:, a] c_ija``.

:func:`kink_crossings` finds every crossing ``(i, a, j)``; :func:`kink_correction`
returns ``sum_a c_ija L[:, a]`` for every ``(j, i)`` with its gradient with respect to
``z``, ``h``, ``W`` and ``L``. Hand-written: no library enumerates these crossings.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["kink_crossings", "kink_correction"]

Crossings = Tuple[Tensor, Tensor, Tensor]


def kink_crossings(h: Tensor, w: Tensor, z: Tensor) -> Optional[Crossings]:
    """Every ``(i, a, j)`` where dropping unit ``j`` moves ``z[i, a]`` across the ReLU's kink.

    A crossing needs ``|z_ia| <= max_j |h_ij| max_j |W_aj|``; only those ``(i, a)`` pairs
    are examined, one sample at a time (``W``'s candidate rows times ``h_i``, compared
    with ``z_ia``: no ``[pairs, U]`` gather of ``h``). Not differentiable (indices).

    Args:
        h: ``[n, U]`` dropout-layer input.
        w: ``[d, U]`` the following Linear's weight.
        z: ``[n, d]`` its output.

    Returns:
        ``(i, a, j)`` index tensors, or ``None`` if nothing crosses.

    Example:
        >>> import torch
        >>> h = torch.tensor([[1.0, 2.0]]); w = torch.tensor([[1.0, -1.0]]); z = torch.tensor([[0.5]])
        >>> [t.tolist() for t in kink_crossings(h, w, z)]  # unit 0 moves z to -0.5, unit 1 to 2.5
        [[0], [0], [0]]
    """
    with torch.no_grad():
        h, w, z = h.detach(), w.detach(), z.detach()
        bound = h.abs().amax(1, keepdim=True) * w.abs().amax(1).unsqueeze(0)  # [n, d]
        cand = z.abs() <= bound
        positive = z > 0
        found = []
        for i in torch.nonzero(cand.any(1)).flatten().tolist():
            hi, zi = h[i], z[i]
            for rows, up in ((cand[i] & positive[i], True), (cand[i] & ~positive[i], False)):
                a = torch.nonzero(rows).flatten()
                if a.numel() == 0:
                    continue
                delta = torch.index_select(w, 0, a).mul_(hi)  # [c, U]: h_ij W_aj
                thr = zi[a].unsqueeze(1)
                hit = delta >= thr if up else delta < thr  # z > 0: delta >= z; z <= 0: delta < z
                c, j = torch.nonzero(hit, as_tuple=True)
                if c.numel():
                    found.append((torch.full_like(c, i), a[c], j))
        if not found:
            return None
        i_f, a_f, j_f = (torch.cat(t) for t in zip(*found))
        return i_f, a_f, j_f


class _KinkCorrection(torch.autograd.Function):
    """``corr[k, i, j] = sum_a c_ija L[k, a]`` at the crossings (``[K, n, U]``), with a hand-written backward.

    Per output coordinate ``k`` every step is a one-dimensional gather, product or
    ``index_add`` over the ``F`` crossings: ``[F, K]`` tensors (rows of 10 floats) cost 2-3x
    more per element to gather, broadcast and scatter on the CPU, and autograd's own graph
    differentiates the gather with a sorting ``index_put``. Differentiable once (the
    penalty's gradient; nothing here takes its second derivative)."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, h: Tensor, w: Tensor, lmat: Tensor, i_f: Tensor, a_f: Tensor, j_f: Tensor) -> Tensor:
        n, u = h.shape
        sign, val = _values(z, h, w, i_f, a_f, j_f)
        rows = i_f * u + j_f  # the crossings come sample by sample: nearby rows of G, cache-friendly
        corr = torch.zeros(lmat.shape[0], n * u, dtype=z.dtype, device=z.device)
        for k in range(lmat.shape[0]):
            corr[k].index_add_(0, rows, val * lmat[k].index_select(0, a_f))
        ctx.save_for_backward(h, w, lmat, i_f, a_f, j_f, sign, val)
        ctx.zdim = z.shape[1]
        return corr.view(-1, n, u)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        h, w, lmat, i_f, a_f, j_f, sign, val = ctx.saved_tensors
        n, u = h.shape
        kdim, d = lmat.shape
        rows = i_f * u + j_f
        g = grad.reshape(kdim, n * u)
        g_rows = torch.empty(kdim, rows.shape[0], dtype=grad.dtype, device=grad.device)
        g_val = torch.zeros_like(val)
        for k in range(kdim):  # g_val = sum_k G[k, j, i] L[k, a], one coordinate at a time
            torch.index_select(g[k], 0, rows, out=g_rows[k])
            g_val.addcmul_(g_rows[k], lmat[k].index_select(0, a_f))
        g_val.mul_(sign)
        gz = gh = gw = gl = None
        if ctx.needs_input_grad[0]:
            gz = (
                torch.zeros(n * ctx.zdim, dtype=h.dtype, device=h.device)
                .index_add_(0, i_f * ctx.zdim + a_f, g_val.neg())
                .view(n, -1)
            )
        if ctx.needs_input_grad[1]:
            gh = torch.zeros(n * u, dtype=h.dtype, device=h.device).index_add_(0, rows, g_val * _at(w, a_f, j_f)).view(n, u)
        if ctx.needs_input_grad[2]:
            gw = (
                torch.zeros(d * u, dtype=w.dtype, device=w.device)
                .index_add_(0, a_f * u + j_f, g_val * h.reshape(-1).index_select(0, rows))
                .view(d, u)
            )
        if ctx.needs_input_grad[3]:  # along the transposed [F, K] view: the fastest of the index_add layouts tried
            gl = torch.zeros(d, kdim, dtype=lmat.dtype, device=lmat.device).index_add_(0, a_f, g_rows.mul_(val).t()).t()
        return gz, gh, gw, gl, None, None, None


def _values(z: Tensor, h: Tensor, w: Tensor, i_f: Tensor, a_f: Tensor, j_f: Tensor) -> Tuple[Tensor, Tensor]:
    """``(s, c)`` at the crossings: ``s = +1`` where ``z > 0`` else ``-1``, ``c = s (h_ij W_aj - z_ia)``."""
    zf = _at(z, i_f, a_f)
    sign = torch.where(zf > 0, 1.0, -1.0).to(z.dtype)
    return sign, sign * (_at(h, i_f, j_f) * _at(w, a_f, j_f) - zf)


def _at(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``x[rows, cols]`` by a flat ``index_select`` (differentiable; faster than advanced indexing)."""
    return x.reshape(-1).index_select(0, rows * x.shape[1] + cols)


def kink_correction(z: Tensor, h: Tensor, w: Tensor, lmat: Tensor, crossings: Crossings) -> Tensor:
    r"""``sum_a c_ija L[k, a]`` for every output coordinate ``k``, sample ``i`` and dropped unit ``j`` (``[K, n, U]``).

    .. math::  \mathrm{corr}_{ij} = \sum_{a:\,(i,a,j)\ \mathrm{crosses}} s_{ia} (h_{ij} W_{aj} - z_{ia})\, L_{:,a}

    (module docstring; theory.md 4.2). Differentiable in ``z``, ``h``, ``W`` and ``L``.

    Args:
        z: ``[n, d]`` the Linear's output.
        h: ``[n, U]`` the dropout layer's input.
        w: ``[d, U]`` the Linear's weight.
        lmat: ``[K, d]`` the affine rest's matrix ``L``.
        crossings: ``(i, a, j)`` from :func:`kink_crossings`.

    Raises:
        ValueError: shapes that do not fit together.

    Example:
        >>> import torch
        >>> h = torch.tensor([[1.0, 2.0]]); w = torch.tensor([[1.0, -1.0]]); z = torch.tensor([[0.5]])
        >>> kink_correction(z, h, w, torch.tensor([[3.0]]), kink_crossings(h, w, z))[0, 0]  # c = 1 - 0.5, times 3
        tensor([1.5000, 0.0000])
    """
    n, u = h.shape
    if z.shape[0] != n or w.shape[1] != u or lmat.shape[1] != w.shape[0] or z.shape[1] != w.shape[0]:
        raise ValueError(f"shapes do not fit: z {tuple(z.shape)}, h {tuple(h.shape)}, W {tuple(w.shape)}, L {tuple(lmat.shape)}")
    return _KinkCorrection.apply(z, h, w, lmat, *crossings)
