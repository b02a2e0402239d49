r"""Fisher information of a model manifold in every common form (theory.md section 2).

With ``J_i = d eta_i / d theta`` (``K x P``) and the mean-over-inputs convention:

.. math::

    F       &= \frac1n \sum_i J_i^T \Sigma_i J_i                  \quad\text{(exact; = GGN of the NLL)}\\
    F_{mc}  &= \frac1n \sum_i J_i^T s_i s_i^T J_i,\ s_i = t(\hat y_i) - \mu_i,\ \hat y_i \sim p(\cdot|\eta_i)\\
    F_{emp} &= \frac1n \sum_i g_i g_i^T,\ g_i = J_i^T (\mu_i - t(y_i))  \quad\text{(observed labels)}

All three share one form, ``(1/n) sum_i J_i^T S_i S_i^T J_i`` with a per-sample
factor ``S_i`` (``K x R``): a square root of ``Sigma_i`` (exact), ``M`` sampled
residuals scaled by ``1/sqrt(M)`` (mc), or the observed residual (empirical).
:func:`fisher` builds ``S`` once and hands it to the requested structure:

* ``dense``    ``[P, P]``
* ``diag``     the diagonal
* ``layer``    exact per-module blocks
* ``kfac``     Kronecker factors per Linear layer (Martens & Grosse 2015), exact blocks elsewhere
* ``implicit`` matrix-free ``F v = (1/n) J^T S S^T J v`` (one jvp + one vjp)

Every result is a :class:`~dropgeom.operators.CurvatureOperator` with
``kind``, ``structure`` and ``reduction`` recorded (``mean``, or ``sum = n * mean``).

References: Amari (1998) natural gradient; Martens (2020) "New insights and
perspectives on the natural gradient method" (GGN = Fisher for exponential
families; empirical Fisher caveats); Kunstner et al. (2019).

Example:
    >>> import torch
    >>> from dropgeom import ModelManifold, fisher
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    >>> m = ModelManifold(net, torch.randn(20, 4, dtype=torch.float64))
    >>> F = fisher(m, kind="exact", structure="dense")
    >>> D = fisher(m, kind="exact", structure="diag")
    >>> torch.allclose(F.diag(), D.diag())
    True
    >>> float(F.trace()) > 0
    True
"""

from __future__ import annotations

from enum import Enum
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .manifold import ModelManifold, memory_guard
from .operators import (
    BlockDiagonalOperator,
    CurvatureOperator,
    DenseOperator,
    DiagonalOperator,
    ImplicitOperator,
    KFACOperator,
    KroneckerBlock,
)

__all__ = ["FisherKind", "Structure", "Reduction", "fisher", "fisher_factors"]


class FisherKind(str, Enum):
    """Which Fisher information (theory.md section 2)."""

    EXACT = "exact"
    """``(1/n) sum_i J_i^T Sigma_i J_i``: the Fisher information of the model; equals the GGN of the NLL."""
    MC = "mc"
    """Monte Carlo Fisher: labels sampled from the model; unbiased for ``exact``."""
    EMPIRICAL = "empirical"
    """Empirical Fisher from observed labels (``targets=``); biased, equals ``exact`` only at a perfect fit."""


class Structure(str, Enum):
    """How the ``[P, P]`` Fisher is represented."""

    DENSE = "dense"
    """The full matrix; exact, ``O(P^2)`` memory."""
    DIAG = "diag"
    """The exact diagonal of the chosen kind."""
    LAYER = "layer"
    """Exact per-module blocks (block-diagonal)."""
    KFAC = "kfac"
    """Kronecker factors for Linear layers (expectation approximation), exact blocks for other modules."""
    IMPLICIT = "implicit"
    """Matrix-free products through jvp/vjp; exact; ``O(P + nK)`` memory."""


class Reduction(str, Enum):
    """Scaling over the ``n`` inputs."""

    MEAN = "mean"
    """``(1/n) sum_i``: the per-sample Fisher (default)."""
    SUM = "sum"
    """``sum_i = n * mean``: the Fisher of all ``n`` observations together."""


def _enum(cls, value, what: str):
    try:
        return cls(value.value if isinstance(value, Enum) else str(value).lower())
    except ValueError:
        raise ValueError(f"unknown {what} {value!r}; choose one of {[e.value for e in cls]}") from None


def fisher_factors(
    manifold: ModelManifold,
    kind: Union[str, FisherKind] = "exact",
    targets: Optional[Tensor] = None,
    n_samples: int = 1,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """The per-sample factor ``S`` (``[n, K, R]``) with ``F = (1/n) sum_i J_i^T S_i S_i^T J_i``.

    Example:
        >>> import torch
        >>> from dropgeom import ModelManifold
        >>> x = torch.randn(6, 2, dtype=torch.float64)
        >>> m = ModelManifold.from_function(lambda th: x @ th.reshape(2, 3), torch.zeros(6, dtype=torch.float64))
        >>> S = fisher_factors(m, "exact")
        >>> torch.allclose(S @ S.transpose(1, 2), m.family.cov(m.eta()))
        True
    """
    kind = _enum(FisherKind, kind, "Fisher kind")
    eta = manifold.eta()
    fam = manifold.family
    if kind is FisherKind.EXACT:
        return fam.cov_sqrt(eta)
    if kind is FisherKind.EMPIRICAL:
        if targets is None:
            raise ValueError("the empirical Fisher needs observed labels: pass targets=")
        manifold.check_targets(targets)
        return fam.residual(eta, targets.to(eta.device)).unsqueeze(-1)
    if not (isinstance(n_samples, int) and n_samples >= 1):
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    mu = fam.mean(eta)
    cols = []
    for _ in range(n_samples):
        y = fam.sample(eta, generator=generator)
        cols.append(fam.sufficient_statistic(y, eta.shape[-1]).to(eta.dtype) - mu)
    return torch.stack(cols, dim=-1) / n_samples**0.5


def fisher(
    manifold: ModelManifold,
    kind: Union[str, FisherKind] = "exact",
    structure: Union[str, Structure] = "dense",
    *,
    targets: Optional[Tensor] = None,
    n_samples: int = 1,
    generator: Optional[torch.Generator] = None,
    reduction: Union[str, Reduction] = "mean",
) -> CurvatureOperator:
    r"""The Fisher information of ``manifold`` as a curvature operator.

    Args:
        manifold: the model manifold (model, inputs, family).
        kind: ``exact`` | ``mc`` | ``empirical`` (:class:`FisherKind`).
        structure: ``dense`` | ``diag`` | ``layer`` | ``kfac`` | ``implicit`` (:class:`Structure`).
        targets: observed labels, needed for ``empirical`` (class indices ``[n]``
            for ``categorical``, ``[n, K]`` floats otherwise, ``[n]`` for ``normal``).
        n_samples: labels drawn per input for ``mc``.
        generator: random generator for ``mc`` (seeded, reproducible).
        reduction: ``mean`` over inputs (default) or ``sum`` (``= n * mean``).

    Returns:
        A :class:`~dropgeom.operators.CurvatureOperator` of shape ``[P, P]``.

    Example:
        >>> import torch
        >>> from dropgeom import ModelManifold, fisher
        >>> x = torch.randn(50, 3, dtype=torch.float64)
        >>> m = ModelManifold(torch.nn.Linear(3, 1).double(), x, "gaussian")
        >>> F = fisher(m, structure="dense", reduction="sum")
        >>> X = torch.cat([x, torch.ones(50, 1, dtype=torch.float64)], 1)
        >>> torch.allclose(F.dense(), X.T @ X)   # Gaussian GLM: F = X^T X (sigma = 1)
        True
    """
    kind = _enum(FisherKind, kind, "Fisher kind")
    structure = _enum(Structure, structure, "structure")
    reduction = _enum(Reduction, reduction, "reduction")
    if not isinstance(manifold, ModelManifold):
        raise TypeError(f"fisher() needs a ModelManifold, got {type(manifold).__name__}")
    S = fisher_factors(manifold, kind, targets=targets, n_samples=n_samples, generator=generator)
    scale = 1.0 if reduction is Reduction.SUM else 1.0 / manifold.n
    meta = dict(kind=kind.value, structure=structure.value, reduction=reduction.value, n=manifold.n)
    P = manifold.num_params

    if structure is Structure.DENSE:
        memory_guard(P * P, manifold.dtype, f"a dense Fisher [{P} x {P}]", "use structure='diag', 'kfac' or 'implicit'")
        F = torch.zeros(P, P, dtype=manifold.dtype, device=manifold.device)
        for _, G in manifold.iter_per_sample_vjp(S):
            G = G.reshape(-1, P)
            F.addmm_(G.T, G)
        return DenseOperator(F * scale, **meta)

    if structure is Structure.DIAG:
        return DiagonalOperator(_diagonal(manifold, S) * scale, **meta)

    if structure is Structure.LAYER:
        groups = _parameter_groups(manifold)
        slices = manifold.param_slices()
        index = [torch.cat([torch.arange(slices[k].start, slices[k].stop) for k in names]) for _, names in groups]
        blocks = [torch.zeros(len(i), len(i), dtype=manifold.dtype, device=manifold.device) for i in index]
        for idx in index:
            memory_guard(len(idx) ** 2, manifold.dtype, f"a layer block [{len(idx)} x {len(idx)}]", "use structure='kfac' or 'diag'")
        for _, G in manifold.iter_per_sample_vjp(S):
            G = G.reshape(-1, P)
            for blk, idx in zip(blocks, index):
                g = G[:, idx.to(G.device)]
                blk.addmm_(g.T, g)
        return BlockDiagonalOperator([b * scale for b in blocks], index, P, names=[g for g, _ in groups], **meta)

    if structure is Structure.KFAC:
        return _kfac(manifold, S, scale, meta)

    # implicit
    SS = S  # captured: (1/n) J^T S S^T J V

    def matmat(V: Tensor) -> Tensor:
        cols = []
        for j in range(V.shape[1]):
            jv = manifold.jvp(V[:, j])
            w = torch.einsum("nkr,nlr,nl->nk", SS, SS, jv)
            cols.append(manifold.vjp(w) * scale)
        return torch.stack(cols, dim=1)

    return ImplicitOperator(
        matmat, P, manifold.dtype, manifold.device, diag_fn=lambda: _diagonal(manifold, S) * scale, **meta
    )


# --------------------------------------------------------------------------
# structure back-ends
# --------------------------------------------------------------------------


def _parameter_groups(manifold: ModelManifold) -> List[Tuple[str, List[str]]]:
    """Group parameter names by owning module (``"0.weight"``, ``"0.bias"`` -> ``"0"``)."""
    groups: Dict[str, List[str]] = {}
    for k in manifold.param_names:
        mod = k.rsplit(".", 1)[0] if "." in k else k
        groups.setdefault(mod, []).append(k)
    return list(groups.items())


def _linear_layers(manifold: ModelManifold) -> Dict[str, nn.Linear]:
    """Linear modules whose weight (and bias, if any) are all free parameters."""
    if manifold.model is None:
        return {}
    free = set(manifold.param_names)
    out = {}
    for name, mod in manifold.model.named_modules():
        if type(mod) is nn.Linear:
            keys = [f"{name}.weight"] + ([f"{name}.bias"] if mod.bias is not None else [])
            if all(k in free for k in keys):
                out[name] = mod
    return out


def _capture_linear(
    manifold: ModelManifold, layers: Dict[str, nn.Linear], S: Tensor
) -> Dict[str, Tuple[Tensor, Tensor]]:
    """For each Linear layer: its inputs ``a`` (``[n, in]``) and the back-propagated
    columns ``g`` (``[R, n, out]``) of ``S`` at its outputs, in one forward and one
    batched backward pass (Dangel et al. 2020, BackPACK's recipe, written here with
    forward hooks because no ``torch.func`` primitive exposes layer outputs).

    Layers seen with inputs of more than 2 dimensions (weight sharing) are dropped.
    """
    records: Dict[str, Tuple[Tensor, Tensor]] = {}
    mods = {mod: name for name, mod in layers.items()}

    def hook(mod: nn.Module, inp: Tuple[Tensor, ...], out: Tensor) -> None:
        name = mods[mod]
        if inp[0].dim() == 2 and name not in records:
            records[name] = (inp[0].detach(), out)
        else:
            records[name] = (None, None)  # type: ignore[assignment]

    handles = [m.register_forward_hook(hook) for m in mods]
    try:
        params = {k: v.detach().requires_grad_(True) for k, v in manifold.params.items()}
        with torch.enable_grad():
            eta = manifold.forward(params)
            good = {k: v for k, v in records.items() if v[0] is not None}
            if not good:
                return {}
            outs = [v[1] for v in good.values()]
            grads = torch.autograd.grad(
                eta, outs, grad_outputs=S.permute(2, 0, 1).contiguous(), is_grads_batched=True, allow_unused=True
            )
    finally:
        for h in handles:
            h.remove()
    result = {}
    for (name, (a, _)), g in zip(good.items(), grads):
        if g is None:
            g = torch.zeros(S.shape[2], a.shape[0], layers[name].out_features, dtype=a.dtype, device=a.device)
        result[name] = (a, g.detach())
    return result


def _diagonal(manifold: ModelManifold, S: Tensor) -> Tensor:
    """Exact ``sum_i diag(J_i^T S_i S_i^T J_i)`` (sum convention).

    Linear layers: ``diag_W = sum_{i,r} g_ir^2 (x) a_i^2`` from layer inputs and
    back-propagated factor columns (no per-sample gradients); every other
    parameter through per-sample products on a sub-manifold.
    """
    P = manifold.num_params
    out = torch.zeros(P, dtype=manifold.dtype, device=manifold.device)
    slices = manifold.param_slices()
    layers = _linear_layers(manifold)
    captured = _capture_linear(manifold, layers, S) if layers else {}
    done = set()
    for name, (a, g) in captured.items():
        g2 = (g * g).sum(0)  # [n, out]
        out[slices[f"{name}.weight"]] = (g2.T @ (a * a)).reshape(-1)
        done.add(f"{name}.weight")
        if layers[name].bias is not None:
            out[slices[f"{name}.bias"]] = g2.sum(0)
            done.add(f"{name}.bias")
    rest = [k for k in manifold.param_names if k not in done]
    if rest:
        sub = manifold if len(rest) == P or not done else _sub_manifold(manifold, rest)
        sub_slices = sub.param_slices()
        acc = torch.zeros(sub.num_params, dtype=manifold.dtype, device=manifold.device)
        for _, G in sub.iter_per_sample_vjp(S):
            acc += (G * G).sum((0, 1))
        for k in rest:
            out[slices[k]] = acc[sub_slices[k]]
    return out


def _sub_manifold(manifold: ModelManifold, names: List[str]) -> ModelManifold:
    """The same manifold with only ``names`` free (others fixed at their values)."""
    return ModelManifold(
        manifold.model, manifold.inputs, manifold.family, param_names=names, forward=manifold._forward
    )


def _kfac(manifold: ModelManifold, S: Tensor, scale: float, meta: dict) -> KFACOperator:
    r"""KFAC for Linear layers: ``A = sum_i a~_i a~_i^T`` (``a~ = [a; 1]`` with a bias),
    ``B = sum_{i,r} g_ir g_ir^T``; the block is ``scale * (B/n) (x) A``
    (expectation approximation ``E[g g^T (x) a a^T] ~ E[g g^T] (x) E[a a^T]``).
    Other parameters get exact dense blocks per module.
    """
    n = manifold.n
    slices = manifold.param_slices()
    layers = _linear_layers(manifold)
    captured = _capture_linear(manifold, layers, S) if layers else {}
    kron, done = [], set()
    for name, (a, g) in captured.items():
        has_bias = layers[name].bias is not None
        if has_bias:
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)], dim=1)
        A = a.T @ a / n
        gf = g.reshape(-1, g.shape[-1])
        B = gf.T @ gf * scale
        w = slices[f"{name}.weight"]
        b = slices[f"{name}.bias"] if has_bias else None
        kron.append(
            KroneckerBlock(
                A=A,
                B=B,
                weight_index=torch.arange(w.start, w.stop, device=manifold.device),
                bias_index=None if b is None else torch.arange(b.start, b.stop, device=manifold.device),
                name=name,
            )
        )
        done.update({f"{name}.weight"} | ({f"{name}.bias"} if has_bias else set()))
    rest = [k for k in manifold.param_names if k not in done]
    dense = []
    if rest:
        sub = manifold if not done else _sub_manifold(manifold, rest)
        groups = _parameter_groups(sub)
        sub_slices = sub.param_slices()
        idx_sub = [torch.cat([torch.arange(sub_slices[k].start, sub_slices[k].stop) for k in names]) for _, names in groups]
        idx_full = [torch.cat([torch.arange(slices[k].start, slices[k].stop) for k in names]) for _, names in groups]
        blocks = [torch.zeros(len(i), len(i), dtype=manifold.dtype, device=manifold.device) for i in idx_sub]
        for _, G in sub.iter_per_sample_vjp(S):
            G = G.reshape(-1, sub.num_params)
            for blk, idx in zip(blocks, idx_sub):
                g = G[:, idx]
                blk.addmm_(g.T, g)
        dense = [(blk * scale, idx.to(manifold.device)) for blk, idx in zip(blocks, idx_full)]
    return KFACOperator(kron, dense, manifold.num_params, manifold.dtype, manifold.device, **meta)
