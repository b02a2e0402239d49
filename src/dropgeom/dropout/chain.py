r"""Explicit propagation through a chain of Linear / elementwise modules (fast dropout paths).

When a model is a top-level ``nn.Sequential`` and every module downstream of a
dropout layer is an ``nn.Linear``, an elementwise activation, a dropout module
(identity at mask 1), ``nn.Flatten`` or ``nn.Identity``, the quantities of
theory.md 4.2 follow from one recorded forward pass and explicit matmuls, so
autograd only ever differentiates a first-order graph (no double backward):

* ``d eta_i / d h~_i`` contracted with probe vectors ``w_i`` (pull-back):
  ``w -> w @ W`` at a Linear, ``w -> w * act'(z)`` at an activation; then
  ``d_j eta_i`` contracted with ``w_i`` is ``h_ij (w_i^T d eta_i / d h~_i)_j``.
* ``eta^(-j)`` (unit ``j`` dropped): dropping unit ``j`` subtracts the tangent
  ``t_j = h_j e_j`` from the dropout layer's output; through the identity-like
  modules and the first downstream Linear this is a rank-1 change of its output,
  ``z^(-j) = z - h_j W[:, j]``; the ``[units, n, width]`` perturbed states are then
  pushed through the rest of the chain.
* ``d^2 eta / d m_j^2``: second-order forward propagation of ``(value, t, s)``
  along the same tangent: Linear ``(Wv + b, Wt, Ws)``; activation
  ``(a(v), a'(v) t, a''(v) t^2 + a'(v) s)``.

Each module acts through its rule in :data:`~dropgeom.dropout.chain_rules.CHAIN_RULES`
(:mod:`dropgeom.dropout.chain_rules`): a new module type for this path is one
registered :class:`~dropgeom.dropout.chain_rules.ChainRule`. Hand-written: no
library propagates these per-unit quantities through a chain.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .._utils import training_off  # noqa: F401 (one copy, in dropgeom._utils; penalty and terms import it from here)
from ._kinks import kink_correction
from .chain_rules import AffineRule, ChainRule, ElementwiseRule, IdentityRule, chain_rule
from .masks import _CHANNEL_TYPES, DROPOUT_TYPES

__all__ = ["Chain", "as_chain"]


class Affine(NamedTuple):
    """The weight and bias of an affine module (:class:`~dropgeom.dropout.chain_rules.AffineRule`)."""

    weight: Tensor
    bias: Optional[Tensor]


@dataclass
class Chain:
    """A top-level ``nn.Sequential`` seen as a list of modules, with one recorded forward.

    ``states[i]`` is the input of module ``i`` (``states[-1]`` the output ``eta``).
    """

    modules: List[nn.Module]
    index: Dict[str, int]  # dropout layer name -> position
    states: List[Tensor]
    #: ``rules[i]``: the chain rule of module ``i`` (upstream of the dropout layers, where none is
    #: needed, the base :class:`~dropgeom.dropout.chain_rules.ChainRule`, whose methods raise)
    rules: List[ChainRule] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.rules:
            self.rules = [chain_rule(m) or ChainRule() for m in self.modules]

    @property
    def eta(self) -> Tensor:
        return self.states[-1]

    def h(self, name: str) -> Tensor:
        """The input of dropout layer ``name`` (``[n, U]``)."""
        return self.states[self.index[name]]

    def pull_back(self, w: Tensor, names: Sequence[str]) -> Dict[str, Tensor]:
        """``w^T d eta / d h~`` at each named dropout layer's output, for probes ``w`` ``[..., n, K]``.

        One sweep from the output down to the deepest named layer; ``[..., n, U]`` per layer.
        """
        want = {self.index[k]: k for k in names}
        out: Dict[str, Tensor] = {}
        stop = min(want)
        for i in range(len(self.modules) - 1, stop - 1, -1):
            if i in want:
                out[want[i]] = w
                if i == stop:
                    break
            w = self.rules[i].pull_back(self.modules[i], w, self.states[i], self.states[i + 1])
        return out

    def _affine(self, i: int) -> Optional[Affine]:
        """Weight and bias of module ``i`` if its rule is affine."""
        rule = self.rules[i]
        if not isinstance(rule, AffineRule):
            return None
        return Affine(rule.weight(self.modules[i]), rule.bias(self.modules[i]))

    def _start(self, name: str) -> Tuple[int, Tensor, Optional[Affine]]:
        """Where perturbations of layer ``name`` enter: (position, base value, first Linear or None).

        If only identity-like modules lie between the dropout layer and a Linear,
        perturbations enter after that Linear (rank-1 change of its output)."""
        d = self.index[name]
        i = d + 1
        while i < len(self.modules) and isinstance(self.rules[i], IdentityRule):
            i += 1
        lin = self._affine(i) if i < len(self.modules) else None
        if lin is not None:
            return i + 1, self.states[i + 1], lin
        return d + 1, self.states[d + 1], None

    def tangents(self, name: str, units: Tensor) -> Tuple[int, Tensor, Tensor]:
        """Tangents ``t_j = d state / d m_j`` of units ``units`` (``[c]``, the same for every sample).

        Returns ``(position, base value [n, d], t [c, n, d])``: the state with unit
        ``j`` dropped is ``base - t[j]`` (entering module ``position``)."""
        pos, base, lin = self._start(name)
        h = self.h(name)  # [n, U]
        hj = h[:, units].t().unsqueeze(-1)  # [c, n, 1]
        if lin is not None:
            return pos, base, hj.contiguous() * lin.weight[:, units].t().contiguous().unsqueeze(1)  # [c, n, d]
        t = torch.zeros(units.shape[0], *h.shape, dtype=h.dtype, device=h.device)
        t[torch.arange(units.shape[0]), :, units] = h[:, units].t()
        return pos, base, t

    def tangent_per_sample(self, name: str, units: Tensor) -> Tuple[int, Tensor, Tensor]:
        """Like :meth:`tangents` with one unit ``units[i]`` per sample ``i``: ``t`` is ``[n, d]``."""
        pos, base, lin = self._start(name)
        h = self.h(name)
        rows = torch.arange(h.shape[0], device=h.device)
        hj = h[rows, units].unsqueeze(-1)  # [n, 1]
        if lin is not None:
            # [n, d]. index_select keeps the weight-gradient layout (a transposed gather made the backward add
            # strided, ~5 ms at 1024x1024); the product is made row-major, as a transposed operand made the next
            # Linear's matmul 5x slower (232 vs 48 us for [256, 256] x [256, 10])
            return pos, base, (hj * torch.index_select(lin.weight, 1, units).t()).contiguous()
        t = torch.zeros_like(h)
        t[rows, units] = h[rows, units]
        return pos, base, t

    def tangent_along(self, name: str, v: Tensor) -> Tuple[int, Tensor]:
        """The tangent ``sum_j v_ij t_j`` of per-sample mask directions ``v`` (``[n, U]``): ``(position, t [n, d])``.

        Through the first downstream Linear this is ``(h * v) @ W^T`` (one matmul)."""
        pos, _, lin = self._start(name)
        hv = self.h(name) * v
        return pos, (hv @ lin.weight.t() if lin is not None else hv)

    def along_mask(self, name: str) -> Tensor:
        """``sum_j d_j eta`` (``[n, K]``): eta's derivative along the all-ones mask direction.

        The tangent at the dropout output is ``h`` itself, so after the first downstream
        Linear it is ``z - b`` (its output less the bias): no matmul with ``W``, then one
        forward-mode sweep through the rest of the chain."""
        pos, z, lin = self._start(name)
        if lin is None:
            t = self.h(name)
        else:
            t = z if lin.bias is None else z - lin.bias
        return self.forward_tangent(pos, t)

    def dropped(self, name: str, units: Tensor) -> Tuple[int, Tensor]:
        """States with unit ``j`` dropped for each ``j`` in ``units`` (``[c, n, d]``, entering module ``pos``).

        Rank-1 case: ``z - h_j W[:, j]`` in one fused pass (``addcmul``)."""
        pos, base, lin = self._start(name)
        if lin is None:
            _, base, t = self.tangents(name, units)
            return pos, base.unsqueeze(0) - t
        h = self.h(name)
        # contiguous operands: otherwise the broadcast output takes a transposed layout
        # and every later op on the [c, n, d] states copies it
        hj = h[:, units].t().contiguous().unsqueeze(-1)  # [c, n, 1]
        wj = lin.weight[:, units].t().contiguous().unsqueeze(1)  # [c, 1, d]
        return pos, torch.addcmul(base.unsqueeze(0), hj, wj, value=-1.0)

    def curvature_rank1(self, name: str, r: Tensor) -> Optional[Tensor]:
        """``<r_i, d^2 eta_i / d m_j^2>`` (``[n, U]``) in closed form, or ``None`` if it does not apply.

        Applies when the mask enters a Linear ``W`` (rank-1 tangent ``h_j W[:, j]``)
        followed only by piecewise-linear activations (ReLU & co: zero), or by one
        elementwise activation ``a`` before a purely linear rest ``L``: then
        ``d^2 eta / d m_j^2 = L (a''(z) (h_j W[:, j])^2)`` and
        ``<r, .> = h_j^2 ((L^T r) a''(z)) @ W^2`` -- one matmul, no per-unit pass."""
        pos, _, lin = self._start(name)
        if lin is None:
            return None
        h = self.h(name)
        rest = self.rules[pos:]
        if any(not isinstance(rule, (AffineRule, ElementwiseRule, IdentityRule)) for rule in rest):
            return None
        elementwise = {i: rule for i, rule in enumerate(rest) if isinstance(rule, ElementwiseRule)}
        acts = list(elementwise)
        if all(rule.piecewise_linear for rule in elementwise.values()):  # eta (piecewise) affine in the mask
            return torch.zeros_like(h)
        if len(acts) > 1 or any(isinstance(rule, AffineRule) for rule in rest[: acts[0]]):
            return None
        a = pos + acts[0]
        rb = r
        for i in range(len(self.modules) - 1, a, -1):
            aff = self._affine(i)
            if aff is not None:
                rb = rb @ aff.weight
        q = rb * elementwise[acts[0]].d2(self.modules[a], self.states[a])  # [n, d]
        return h * h * (q @ (lin.weight * lin.weight))

    def _linear_rest(self, start: int) -> Optional[Tensor]:
        """``L`` (``[K, d]``) if modules ``start..`` map their input to eta affinely (Linear / pass-through only)."""
        if any(not isinstance(rule, (AffineRule, IdentityRule)) for rule in self.rules[start:]):
            return None
        mat: Optional[Tensor] = None
        for i in range(len(self.modules) - 1, start - 1, -1):
            aff = self._affine(i)
            if aff is not None:
                mat = aff.weight if mat is None else mat @ aff.weight
        return mat

    def relu_shift(self, name: str, rows: Optional[slice] = None) -> Optional[Tensor]:
        """Every ``eta^(-j) - eta`` (``[n, K, U]``: the shift of sample ``i`` when unit ``j`` drops is
        ``[i, :, j]``; of the samples ``rows`` only, if given) by a low-rank update, or ``None`` if it does not
        apply.

        Applies when the mask enters a Linear ``W`` followed by one ReLU (or LeakyReLU,
        slope ``alpha`` below the kink: every ``c_j`` below is scaled by ``1 - alpha``) and an
        affine rest ``L``: with ``z`` the Linear's output, ``D = a'(z)`` (``1[z > 0]``) and
        ``delta_j = h_j W[:, j]``,

        ``eta^(-j) - eta = -h_j J[:, j] + L c_j``,  ``J = L D W`` (``[n, K, U]``, one matmul),
        ``c_j = relu(z - delta_j) - relu(z) + D delta_j``,

        and ``c_j`` is zero except where ``z - delta_j`` and ``z`` lie on different
        sides of the kink (:mod:`dropgeom.dropout._kinks`: only the coordinates with
        ``|z_a| <= max_j |h_j| max_j |W[a, j]|`` are examined, in cache-sized blocks of
        samples). Exact (no Taylor step); differentiable. The layout is the one the matmul and the kink
        blocks produce, and the one :meth:`~dropgeom.families.ExponentialFamily.kl_shift` takes."""
        pos, z, lin = self._start(name)
        if lin is None or pos >= len(self.modules):
            return None
        act = self.rules[pos]
        slope = act.kink_slope(self.modules[pos])
        if slope is None or not isinstance(act, ElementwiseRule):
            return None
        mat = self._linear_rest(pos + 1)
        if mat is None:
            return None
        h, w = self.h(name), lin.weight  # [n, U], [d, U]
        if rows is not None:
            h, z = h[rows], z[rows]
        n, u = h.shape
        d = act.d1(self.modules[pos], z)  # 1 above the kink, the slope below
        # laid out [n, K, U]: one [n K, d] x [d, U] matmul, and the kink correction's blocks of samples
        # -J: the sign on the small [K, d] factor, so that neither pass over [n, K, U] nor its backward negates
        dl = d.unsqueeze(1) * mat.neg().unsqueeze(0)  # [n, K, d]: -D L
        neg_jac = (dl.reshape(-1, dl.shape[-1]) @ w).view(n, -1, u)  # -J per sample
        # a crossing changes the slope by 1 - alpha: c = (1 - alpha) relu(s (delta - z))
        kinks = kink_correction(z, h, w, mat if slope == 0.0 else (1.0 - slope) * mat)
        return torch.addcmul(kinks, h.unsqueeze(1), neg_jac)

    def dropped_relu(self, name: str, rows: Optional[slice] = None) -> Optional[Tensor]:
        """Every ``eta^(-j)`` (``[U, n, K]``; of the samples ``rows`` only, if given): ``eta +``
        :meth:`relu_shift` laid out unit-major, or ``None`` where that does not apply."""
        shift = self.relu_shift(name, rows)
        if shift is None:
            return None
        eta = self.eta if rows is None else self.eta[rows]
        return (eta.unsqueeze(-1) + shift).permute(2, 0, 1).contiguous()

    def push(self, pos: int, v: Tensor) -> Tensor:
        """Run states ``v`` (``[..., n, d]``, input of module ``pos``) through the rest of the chain."""
        for mod, rule in zip(self.modules[pos:], self.rules[pos:]):
            v = rule.push(mod, v)
        return v

    def forward_tangent(self, pos: int, t: Tensor) -> Tensor:
        """``d eta`` along tangents ``t`` (``[..., n, d]``) entering at module ``pos`` (forward mode)."""
        for i in range(pos, len(self.modules)):
            t = self.rules[i].tangent(self.modules[i], t, self.states[i], self.states[i + 1])
        return t

    def second(self, pos: int, t: Tensor) -> Tensor:
        """``d^2 eta / d m^2`` along tangents ``t`` ``[c, n, d]`` entering at module ``pos``."""
        s: Optional[Tensor] = None
        for i in range(pos, len(self.modules)):
            t, s = self.rules[i].second(self.modules[i], t, s, self.states[i], self.states[i + 1])
        return torch.zeros_like(t) if s is None else s


def as_chain(model: nn.Module, names: Sequence[str]) -> Optional[List[nn.Module]]:
    """The module list if the fast chain path applies to dropout layers ``names``, else ``None``.

    Requires a top-level ``nn.Sequential`` (its own ``forward``), each named layer a
    top-level unit-wise dropout module, and only modules with a chain rule
    (:func:`~dropgeom.dropout.chain_rules.chain_rule`) downstream of the first named layer.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Dropout(0.5), nn.Linear(4, 2))
        >>> as_chain(net, ["2"]) is not None
        True
        >>> as_chain(nn.Sequential(nn.Dropout(0.5), nn.LayerNorm(3), nn.Linear(3, 2)), ["0"]) is None
        True
    """
    if not isinstance(model, nn.Sequential) or type(model).forward is not nn.Sequential.forward:
        return None
    keys = list(model._modules)
    if not names or any(k not in keys for k in names):
        return None
    mods = [model._modules[k] for k in keys]
    if len({id(m) for m in mods}) != len(mods):  # a module placed twice: the generic path refuses a reused dropout
        return None
    first = min(keys.index(k) for k in names)
    for k in names:
        m = model._modules[k]
        if not isinstance(m, DROPOUT_TYPES) or isinstance(m, _CHANNEL_TYPES):
            return None
    if any(chain_rule(m) is None for m in mods[first + 1 :]):
        return None
    return mods


def run_chain(model: nn.Sequential, mods: List[nn.Module], x: Tensor, names: Sequence[str]) -> Optional[Chain]:
    """One forward pass (dropout as identity), recording every module's input; ``None`` if a
    named layer's input is not ``[n, U]``."""
    keys = list(model._modules)
    states = [x]
    v = x
    for mod in mods:
        if not isinstance(mod, DROPOUT_TYPES):
            v = mod(v)
        states.append(v)
    index = {k: keys.index(k) for k in names}
    if any(states[i].dim() != 2 for i in index.values()):
        return None
    return Chain(mods, index, states)
