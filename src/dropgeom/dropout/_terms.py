r"""The terms of the two small-noise laws of the dropout gap (theory.md section 4.2).

For each unit ``j`` of each dropout layer (``d_j eta_i = d eta_i / d m_j``,
``r_i = mu_i - t(y_i)`` at ``m = 1``, ``eta_i^(-j)``: unit ``j`` dropped, every
other mask 1), mean over inputs:

.. code-block:: text

    F^mask_jj = (1/n) sum_i (d_j eta_i)^T Sigma_i (d_j eta_i)        fisher
    C_jj      = (1/n) sum_i < r_i, d^2 eta_i / d m_j^2 >            curvature_gaussian
    K_j       = (1/n) sum_i KL(p(.|eta_i) || p(.|eta_i^(-j)))        divergence
    B_j       = (1/n) sum_i < r_i, eta_i^(-j) - eta_i + d_j eta_i >  curvature_bernoulli

Gaussian law (``m ~ N(1, V)``, ``V -> 0``): ``R = V/2 sum_j (F^mask_jj + C_jj) + O(V^2)``.
Bernoulli law (``p -> 0``): ``R = p sum_j (K_j + B_j) + O(p^2)``.

Fast path (``chain.py``): for a top-level ``nn.Sequential`` whose modules
downstream of the dropout layers are Linear / elementwise activations / Dropout /
Flatten / Identity, one recorded forward pass and explicit matmuls give
everything, batched over chunks of units:

* ``d_j eta_i`` contracted with ``Sigma_i^{1/2}`` and ``r_i``: ``R + 1`` probes pulled
  back through the downstream layers (``w -> w @ W``, ``w -> w * a'(z)``), one sweep.
* ``eta^(-j)``: the first downstream Linear's output changes by rank 1,
  ``z^(-j) = z - h_j W[:, j]``; the ``[chunk, n, width]`` states are pushed through
  the rest of the chain (for the layer right before the output Linear this is
  ``eta - h_j W_out[:, j]`` itself).
* ``<r, d^2 eta / d m_j^2>``: zero when eta is affine in the mask; with one
  activation ``a`` between that Linear and a linear rest ``L`` the closed form
  ``h_j^2 ((L^T r) a''(z)) @ W^2`` (one matmul); otherwise second-order forward
  propagation of the chunked tangents.

Cost on the 784-1024-1024-10 MLP at batch 256, all 1024 units of a layer: a few
forward+backward passes for the layer before the output, about ``U`` pushes of
``[n, 1024]`` states through one activation and the output Linear for the first
hidden layer (see ``bench/bench_dropout.py``).

Generic path otherwise, batched over units (never a Python loop over units):

* ``d_j eta_i`` contracted with the columns of ``Sigma_i^{1/2}`` and with ``r_i``:
  ``R + 1`` reverse-mode products with respect to per-sample masks (``vmap`` over
  the ``R`` columns) -- the mask gradient is ``h_ij * d eta_i / d h~_ij``.
* ``eta^(-j)``: ``vmap`` over units of a forward pass with a one-unit-dropped mask;
  layers upstream of the dropout layer are not batched, so each unit costs one
  pass through the downstream layers.
* ``d^2 eta / d m_j^2``: forward-over-forward ``jvp`` along the one-hot mask
  direction, ``vmap`` over units in chunks (again downstream layers only).

Cost: about ``R`` backward passes plus ``3 U`` downstream forward passes per
layer of ``U`` units (see ``bench/bench_dropout.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.func import jvp, vjp, vmap

from .._intercept import ALPHA, alpha_mode
from ..families import ExponentialFamily
from ..options import Noise, parse
from ._common import Inputs, model_inputs, check_output, chunk_for, detached_params, family_of
from ._legacy import legacy_signature
from .chain import Chain, as_chain, run_chain, training_off
from .explicit import forward_with_masks
from .masks import ALPHA_KINDS, PSpec, mask_spec, mask_variance
from ._penalty_generic import _piecewise_linear_after

__all__ = ["DropoutTerms", "terms", "TERM_NAMES"]

TERM_NAMES = ("fisher", "curvature_gaussian", "divergence", "curvature_bernoulli")


@dataclass(frozen=True)
class DropoutTerms:
    """The four terms of theory.md 4.2, summed over units (mean over inputs, no variance factor).

    ``per_unit[layer][term]`` holds the per-unit values (shape: the layer's unit
    shape); ``per_layer[layer][term]`` their sums; ``p`` the modules' drop probabilities.
    """

    fisher: float
    curvature_gaussian: float
    divergence: float
    curvature_bernoulli: float
    per_unit: Dict[str, Dict[str, Tensor]]
    per_layer: Dict[str, Dict[str, float]]
    p: Dict[str, float]
    family: str = field(default="categorical")
    kinds: Dict[str, str] = field(default_factory=dict)

    def predicted_gap(self, p: PSpec = None, noise: Union[str, Noise] = "bernoulli") -> float:
        """The gap each law predicts: ``sum_l p_l (K_l + B_l)`` (bernoulli) or
        ``sum_l V_l/2 (F_l + C_l)`` with ``V_l = p_l/(1-p_l)`` (gaussian).

        ``p``: default the modules' ``p``; a float for all layers or a dict per layer.
        """
        if noise not in ("bernoulli", "gaussian"):
            raise ValueError(f"predicted_gap: noise must be 'bernoulli' or 'gaussian', got {noise!r}")
        if isinstance(p, Mapping):
            unknown = [k for k in p if k not in self.per_layer]
            if unknown:
                raise ValueError(f"p names unknown layers {unknown}; layers: {list(self.per_layer)}")
            ps = {k: p.get(k, self.p[k]) for k in self.per_layer}
        else:
            ps = {k: (self.p[k] if p is None else p) for k in self.per_layer}
        alpha = [k for k in self.per_layer if self.kinds.get(k) in ALPHA_KINDS]
        if alpha and noise == "gaussian":
            raise ValueError(
                f"predicted_gap: layers {alpha} are alpha dropout, whose masks are Bernoulli: only the Bernoulli "
                "law applies (theory.md 4.5); use noise='bernoulli'"
            )
        total = 0.0
        for k, t in self.per_layer.items():
            if noise == "bernoulli":
                mask_variance(ps[k])  # validates p
                total += ps[k] * (t["divergence"] + t["curvature_bernoulli"])
            else:
                total += 0.5 * mask_variance(ps[k]) * (t["fisher"] + t["curvature_gaussian"])
        return total


def _one_hot_rows(start: int, stop: int, width: int, like: Tensor) -> Tensor:
    rows = torch.zeros(stop - start, width, dtype=like.dtype, device=like.device)
    rows[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
    return rows


def _batched_over_units(fn: Callable[[Tensor], Tensor], units: int, chunk: int, like: Tensor) -> Tensor:
    """``stack([fn(e_j) for j in range(units)])`` with ``vmap`` over chunks of one-hot rows."""
    outs = []
    for s in range(0, units, chunk):
        e = _one_hot_rows(s, min(units, s + chunk), units, like)
        try:
            outs.append(vmap(fn)(e))
        except (RuntimeError, NotImplementedError):  # layer without a batching rule: loop this chunk
            outs.append(torch.stack([fn(row) for row in e]))
    return torch.cat(outs)


@legacy_signature(old=("targets", "family", "layers"))
def terms(
    model: nn.Module,
    inputs: Inputs,
    targets: Tensor,
    *,
    family: Union[str, ExponentialFamily] = "categorical",
    p: PSpec = None,
    layers: Optional[Sequence[str]] = None,
    noise: Union[str, Noise] = "bernoulli",
    chunk_size: Optional[int] = None,
    fast: bool = True,
) -> DropoutTerms:
    r"""Fisher, divergence and curvature terms of the dropout gap for every unit (theory.md 4.2).

    Args:
        model: the network with ``nn.Dropout`` modules (evaluated at ``m = 1``, eval mode).
        inputs: tensor (or tuple) with leading sample axis ``n``.
        targets: labels in the family's format (required: they enter through ``r = mu - t(y)``).
        family: output family of the model's outputs.
        layers: restrict to these dropout layers (default: all).
        chunk_size: units evaluated together in one ``vmap`` (default: from a memory budget).
        fast: use the explicit chain path when the model allows it (see the module
            docstring); ``False`` forces the generic ``torch.func`` path.
        noise: ``"dropconnect"`` takes the weights of the ``nn.Linear`` layers in ``layers``
            (default all) as the units; otherwise every dropout site
            (:func:`~dropgeom.dropout.dropout_sites`: modules, attention-weight and functional
            dropout, stochastic depth, alpha dropout). The terms do not depend on the mask law;
            alpha dropout is read along its mask line ``h~ = m (h + ALPHA) - ALPHA`` and its
            ``curvature_bernoulli`` includes the drift of its mean (theory.md 4.5).
        p: drop probabilities recorded for :meth:`DropoutTerms.predicted_gap` (required for
            DropConnect; default the layers' own).

    Raises:
        ValueError: no dropout, unknown or never-run layers, ``p`` outside ``[0, 1)``,
            targets that do not fit the family.

    Returns:
        :class:`DropoutTerms` with the sums ``fisher``, ``curvature_gaussian``,
        ``divergence``, ``curvature_bernoulli`` and ``predicted_gap(p, noise)``.

    Example (a GLM with input dropout: the mask is affine, both curvature terms vanish):
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> glm = nn.Sequential(nn.Dropout(0.1), nn.Linear(3, 1)).double()
        >>> x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6, 1)).double()
        >>> t = terms(glm, x, y, family="bernoulli")
        >>> abs(t.curvature_gaussian) < 1e-12, abs(t.curvature_bernoulli) < 1e-12, t.fisher > 0
        (True, True, True)
    """
    fam = family_of(family)
    args = model_inputs(model, inputs)
    n = args[0].shape[0]
    noise = parse(Noise, noise, where="terms").value
    spec = mask_spec(model, args, layers, p, noise)
    ps = spec.p
    names = list(spec.shapes)
    kinds = dict(spec.kinds)
    chain_mods = as_chain(model, names) if fast and len(args) == 1 and noise != "dropconnect" else None
    if chain_mods is not None:
        with torch.no_grad(), training_off(model):
            chain = run_chain(model, chain_mods, args[0], names)
        if chain is not None:
            check_output(fam, chain.eta, n)
            fam.check_targets(targets, n, chain.eta.shape[1])
            with torch.no_grad():
                per_unit = _terms_chain(chain, fam, names, targets, chunk_size)
            per_layer = {k: {name: float(v.sum()) for name, v in per_unit[k].items()} for k in names}
            sums = {name: sum(per_layer[k][name] for k in names) for name in TERM_NAMES}
            return DropoutTerms(per_unit=per_unit, per_layer=per_layer, p=ps, family=fam.name, kinds=kinds, **sums)
    with alpha_mode("line"):  # alpha dropout along its mask line (theory.md 4.5); no effect otherwise
        per_unit = _terms_generic(model, args, fam, targets, spec.shapes, names, kinds, chunk_size)
    per_layer = {k: {name: float(v.sum()) for name, v in per_unit[k].items()} for k in names}
    sums = {name: sum(per_layer[k][name] for k in names) for name in TERM_NAMES}
    return DropoutTerms(per_unit=per_unit, per_layer=per_layer, p=ps, family=fam.name, kinds=kinds, **sums)


def _terms_generic(
    model: nn.Module,
    args: Tuple[Tensor, ...],
    fam: ExponentialFamily,
    targets: Tensor,
    shapes: Mapping[str, torch.Size],
    names: Sequence[str],
    kinds: Mapping[str, str],
    chunk_size: Optional[int],
) -> Dict[str, Dict[str, Tensor]]:
    """The four terms by ``torch.func`` with respect to the masks, batched over units."""
    n = args[0].shape[0]
    params = detached_params(model)
    with torch.no_grad():
        eta0 = forward_with_masks(model, args, {}, params)
    check_output(fam, eta0, n)
    kdim = eta0.shape[1]
    fam.check_targets(targets, n, kdim)
    sizes = {k: math.prod(shapes[k]) for k in names}
    dtype, device = eta0.dtype, eta0.device
    r = fam.residual(eta0, targets).to(dtype)
    sq = fam.cov_sqrt(eta0)  # [n, K, R]

    def f(masks: Dict[str, Tensor]) -> Tensor:
        return forward_with_masks(model, args, masks, params)

    ones = {k: torch.ones(n, *shapes[k], dtype=dtype, device=device) for k in names}
    curved = {k: not _piecewise_linear_after(model, k) for k in names}  # else d^2 eta / d m_j^2 = 0
    # d_j eta: free from the per-unit forward-over-forward passes where the curvature runs them;
    # elsewhere the cheaper of U forward tangents and R + 1 reverse products
    reverse = [k for k in names if not curved[k] and sizes[k] > sq.shape[2] + 1]
    g_sigma, g_res = _reverse_first_order(f, {k: ones[k] for k in reverse}, sq, r)
    drift = _alpha_drift(f, {k: ones[k] for k in names if kinds[k] in ALPHA_KINDS}, r)

    shared = {k: torch.ones(1, *shapes[k], dtype=dtype, device=device) for k in names}
    width = max(kdim, *sizes.values())
    chunk = chunk_size or chunk_for(n, width, 2**22)
    per_unit: Dict[str, Dict[str, Tensor]] = {}
    for k in names:
        u, shape = sizes[k], shapes[k]

        def eta_drop(e: Tensor, k: str = k, shape=shape) -> Tensor:
            return f({**shared, k: (1.0 - e).reshape(1, *shape)})

        def along(m: Tensor, e: Tensor, k: str = k) -> Tensor:
            return jvp(lambda mm: f({**shared, k: mm}), (m,), (e,))[1]

        def taylor(e: Tensor, k: str = k, shape=shape) -> Tensor:  # [2, n, K]: d_e eta and d_e^2 eta
            t = e.reshape(1, *shape)
            return torch.stack(jvp(lambda m: along(m, t), (shared[k],), (t,)))

        def first(e: Tensor, k: str = k, shape=shape) -> Tensor:
            return along(shared[k], e.reshape(1, *shape))

        curv = torch.zeros(u, dtype=dtype, device=device)
        if curved[k]:
            both = _batched_over_units(taylor, u, chunk, eta0)  # [U, 2, n, K]
            d1 = both[:, 0]
            curv = (both[:, 1] * r).sum(-1).mean(1).detach()
        elif k not in reverse:
            d1 = _batched_over_units(first, u, chunk, eta0)  # [U, n, K]
        with torch.no_grad():
            if k in reverse:
                fisher_u = g_sigma[k].reshape(-1, n, u).pow(2).sum(0).mean(0)
                rd = g_res[k].reshape(n, u).mean(0)
            else:
                fisher_u = torch.einsum("unk,nkr->unr", d1, sq).pow(2).sum(-1).mean(1)
                rd = (d1 * r).sum(-1).mean(1)
            dropped = _batched_over_units(eta_drop, u, chunk, eta0)  # [U, n, K]
            kl = fam.kl(eta0.expand(u, n, kdim).reshape(-1, kdim), dropped.reshape(-1, kdim)).reshape(u, n).mean(1)
            bern = ((dropped - eta0) * r).sum(-1).mean(1) + rd
            if k in drift:  # alpha dropout's mean drifts: E h~ = a (1 - p) h (theory.md 4.5)
                bern = bern - 0.5 * (1.0 + ALPHA * ALPHA) * drift[k].reshape(n, u).mean(0)
        per_unit[k] = {
            "fisher": fisher_u.reshape(shape),
            "curvature_gaussian": curv.reshape(shape),
            "divergence": kl.reshape(shape),
            "curvature_bernoulli": bern.reshape(shape),
        }
    return per_unit


def _reverse_first_order(
    f: Callable[[Dict[str, Tensor]], Tensor], ones: Dict[str, Tensor], sq: Tensor, r: Tensor
) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
    """``Sigma^{1/2 T} d_j eta`` (``[R, n, *unit]``) and ``<r, d_j eta>`` (``[n, *unit]``) for every unit
    of the layers in ``ones`` by ``R + 1`` reverse-mode products (``vmap`` over the columns); the mask
    gradient is ``h * d eta / d h~``."""
    if not ones:
        return {}, {}
    _, pull = vjp(f, ones)
    try:
        g_sigma = vmap(pull)(sq.permute(2, 0, 1).contiguous())[0]  # name -> [R, n, *unit]
    except (RuntimeError, NotImplementedError):
        cols = [pull(sq[:, :, c].contiguous())[0] for c in range(sq.shape[2])]
        g_sigma = {k: torch.stack([c[k] for c in cols]) for k in ones}
    return g_sigma, pull(r)[0]


def _alpha_drift(f: Callable[[Dict[str, Tensor]], Tensor], ones: Dict[str, Tensor], r: Tensor) -> Dict[str, Tensor]:
    """``<r_i, sum_{s in unit j} d eta_i / d h~_s h_s>`` per alpha-dropout unit (``[n, *unit]``):
    the mask derivative of ``<r, eta>`` with the alpha layers read as ``h~ = m h`` (one backward)."""
    if not ones:
        return {}
    with alpha_mode("scale"):
        _, pull = vjp(lambda ms: f(ms), ones)
        return pull(r)[0]


#: entries of one ``[samples, K, U]`` block of dropped outputs' shifts on the low-rank path (:func:`_relu_drops`)
_DROP_BLOCK = 2**22


def _relu_drops(chain: Chain, fam: ExponentialFamily, k: str, r: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
    """``(K_j, <r, eta^(-j) - eta>)`` means over samples (``[U]`` each) from :meth:`Chain.relu_shift`, in chunks of
    samples (``[rows, K, U]`` blocks of about ``_DROP_BLOCK`` entries), or ``None`` where that low-rank path does
    not apply."""
    eta0 = chain.eta
    n, kdim = eta0.shape
    u = chain.h(k).shape[1]
    step = max(1, _DROP_BLOCK // (u * kdim))
    kl = bern = None
    for s in range(0, n, step):
        rows = slice(s, min(n, s + step))
        shift = chain.relu_shift(k, rows)  # [rows, K, U]
        if shift is None:
            return None
        part_kl = fam.kl_shift(eta0[rows], shift).sum(0)
        part_bern = torch.bmm(r[rows].unsqueeze(1), shift).sum((0, 1))
        kl = part_kl if kl is None else kl + part_kl
        bern = part_bern if bern is None else bern + part_bern
    if kl is None or bern is None:
        return None
    return kl / n, bern / n


def _terms_chain(
    chain: Chain, fam: ExponentialFamily, names: Sequence[str], targets: Tensor, chunk_size: Optional[int]
) -> Dict[str, Dict[str, Tensor]]:
    """The four terms by explicit propagation through a Linear/elementwise chain (``chain.py``)."""
    eta0 = chain.eta
    n, kdim = eta0.shape
    r = fam.residual(eta0, targets).to(eta0.dtype)
    sq = fam.cov_sqrt(eta0)  # [n, K, R]
    g_sigma = chain.pull_back(sq.permute(2, 0, 1), names)  # [R, n, U]: Sigma^{1/2 T} d eta / d h~
    g_res = chain.pull_back(r, names)  # [n, U]
    out: Dict[str, Dict[str, Tensor]] = {}
    for k in names:
        h = chain.h(k)
        u = h.shape[1]
        fisher_u = (h * g_sigma[k]).pow(2).sum(0).mean(0)
        rd = (h * g_res[k]).mean(0)
        curv_closed = chain.curvature_rank1(k, r)
        pos, base, _ = chain._start(k)
        kl = torch.empty(u, dtype=eta0.dtype, device=eta0.device)
        bern, curv = torch.empty_like(kl), torch.empty_like(kl)
        low_rank = _relu_drops(chain, fam, k, r) if curv_closed is not None else None
        if low_rank is not None:  # one (leaky) ReLU then an affine rest: every drop by one matmul + the kinks
            kl, bern = low_rank
        else:  # one push through the rest of the chain per unit, in chunks of units
            chunk = chunk_size or chunk_for(n, max(base.shape[1], kdim), 2**24)
            for s in range(0, u, chunk):
                units = torch.arange(s, min(u, s + chunk), device=eta0.device)
                c = units.shape[0]
                pos, states = chain.dropped(k, units)
                dropped = chain.push(pos, states)  # [c, n, K]
                del states
                kl[s : s + c] = fam.kl_to_each(eta0, dropped).mean(1)
                bern[s : s + c] = ((dropped - eta0) * r).sum(-1).mean(1)
                del dropped
                if curv_closed is None:
                    _, _, t = chain.tangents(k, units)
                    curv[s : s + c] = (chain.second(pos, t) * r).sum(-1).mean(1)
        if curv_closed is not None:
            curv = curv_closed.mean(0)
        shape = h.shape[1:]
        out[k] = {
            "fisher": fisher_u.reshape(shape),
            "curvature_gaussian": curv.reshape(shape),
            "divergence": kl.reshape(shape),
            "curvature_bernoulli": (bern + rd).reshape(shape),
        }
    return out
