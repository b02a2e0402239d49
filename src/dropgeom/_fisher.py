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
* ``kfac``     Kronecker factors per Linear layer (Martens & Grosse 2015) and per
  Conv1d/Conv2d/Conv3d layer (KFC, Grosse & Martens 2016, "expand"), exact blocks elsewhere
* ``implicit`` matrix-free ``F V = (1/n) J^T S S^T J V`` (jvp and vjp vectorised over columns)

Fast paths: for layers with a rule in :data:`dropgeom.layer_rules.LAYER_RULES`
(Linear, Conv1d/Conv2d/Conv3d, and any type registered with
:func:`~dropgeom.layer_rules.register_layer_rule`) the diagonal and the Kronecker
factors come from the layer inputs and the columns of ``S`` back-propagated to
the layer outputs (:mod:`dropgeom._capture`: one forward, one backward per column of ``S`` to the
layer outputs only, never per-sample gradients for plain Linear layers; the last layer needs no
backward). Every other layer (norms, embeddings, attention, ...) goes through
per-sample ``torch.func`` products. For the categorical family the exact Fisher uses a
``K-1``-column square root of ``Sigma``.

Every result is a :class:`~dropgeom.operators.CurvatureOperator` with
``kind``, ``structure`` and ``reduction`` recorded (``mean``, or ``sum = n * mean``).

References: Amari (1998) natural gradient; Martens (2020) "New insights and
perspectives on the natural gradient method" (GGN = Fisher for exponential
families; empirical Fisher caveats); Kunstner et al. (2019).

Example:
    >>> import torch
    >>> from dropgeom import ModelManifold
    >>> from dropgeom import fisher
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

from typing import Dict, List, Optional, Tuple, Union

from .options import FisherKind, Reduction, Structure, parse

import torch
from torch import Tensor
from torch.func import jvp, vjp, vmap

from ._capture import RuleLayer, capture_columns, pname, rule_layers
from .dispatch import streams
from .layer_rules import LayerRule, diagonal_from_squares
from .manifold import DEFAULT_CHUNK_BYTES, ModelManifold, memory_guard
from .operator_parts import OperatorLayout, operator_from_parts, operator_layout, sum_parts
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


def _enum(cls, value, what: str):
    return parse(cls, value, what)


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
    n, k = eta.shape
    # all draws at once: rows m * n + i hold sample m of input i (n_samples = 1: one plain draw)
    y = fam.sample(eta.repeat(n_samples, 1) if n_samples > 1 else eta, generator=generator)
    t = fam.sufficient_statistic(y, k).to(eta.dtype).reshape(n_samples, n, k)
    return (t - mu).permute(1, 2, 0) / n_samples**0.5


@streams
def fisher(
    manifold: ModelManifold,
    kind: Union[str, FisherKind] = "exact",
    structure: Union[str, Structure] = "dense",
    *,
    targets: Optional[Tensor] = None,
    n_samples: int = 1,
    generator: Optional[torch.Generator] = None,
    reduction: Union[str, Reduction] = "mean",
    chunk_bytes: Optional[int] = None,
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
        chunk_bytes: memory the back-propagated factors of one chunk of inputs may take (default
            :data:`~dropgeom.manifold.DEFAULT_CHUNK_BYTES`, 1 GiB). Larger input sets are processed in chunks whose
            sums are added (the factors ``S`` are drawn once for all inputs first, so every kind gives the same
            result as one pass, up to rounding). For data that do not fit in memory at all, see
            :func:`dropgeom.streaming.fisher_streamed`.

    Returns:
        A :class:`~dropgeom.operators.CurvatureOperator` of shape ``[P, P]``.

    Notes:
        ``kfac``: per Linear / Conv1d / Conv2d / Conv3d layer (any layer rule) with weight ``W`` (conv kernels
        flattened to ``[out, in * prod(kernel)]``) and bias ``b``, the block on
        ``vec([W | b])`` is ``B (x) A`` with ``A = (1/(n T)) sum_{i,t} a~_it a~_it^T``
        (layer inputs or unfolded patches, ``a~ = [a; 1]`` with a bias, ``T`` output
        positions, 1 for a plain Linear layer) and ``B = c sum_{i,r,t} g_irt g_irt^T``
        (columns of ``S`` back-propagated to the layer output; ``c = 1/n`` for the
        mean, 1 for the sum): KFAC (Martens & Grosse 2015) and KFC (Grosse & Martens
        2016), the "expand" variant of Eschenhagen et al. (2023); identical to
        curvlinops' ``KFACLinearOperator(kfac_approx="expand",
        separate_weight_and_bias=False)``. BackPACK's KFLR/KFAC drop the weight-bias
        cross terms; for convolutions their input factor is ``T`` times ours and their
        gradient factor is the exact bias block (tests/test_fisher_peers.py checks
        both relations). Modules without a Kronecker rule keep exact dense blocks.

        ``diag``, ``kfac`` and ``implicit``'s ``diag()`` never form ``[P, P]`` or
        ``[n, K, P]``: Linear layers on ``[n, d]`` inputs use squared inputs and squared
        back-propagated columns; convolutions and Linear layers on ``[n, ..., d]``
        inputs form per-sample gradients of that layer only, in chunks; other layers
        (norms, embeddings, attention) use chunked per-sample ``torch.func`` products.
        Tied weights take the generic path.

    Example:
        >>> import torch
        >>> from dropgeom import ModelManifold
        >>> from dropgeom._fisher import fisher
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
    if kind is FisherKind.EXACT:
        S = manifold.family.reduced_cov_sqrt(manifold.eta())  # categorical: K-1 columns instead of K
    else:
        S = fisher_factors(manifold, kind, targets=targets, n_samples=n_samples, generator=generator)
    scale = 1.0 if reduction is Reduction.SUM else 1.0 / manifold.n
    meta = dict(kind=kind.value, structure=structure.value, reduction=reduction.value, n=manifold.n)
    step = _chunk_rows(manifold, S.shape[-1], DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes)
    if step < manifold.n:
        return _chunked(manifold, S, structure, step, scale, meta)
    return _build(manifold, S, structure, scale, meta)


def _chunk_rows(manifold: ModelManifold, columns: int, chunk_bytes: int) -> int:
    """Inputs per chunk so that ``columns`` back-propagated factors stay under ``chunk_bytes`` (all: ``n``)."""
    if not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be a positive number of bytes, got {chunk_bytes!r}")
    if manifold.model is None:
        return manifold.n
    itemsize = torch.empty((), dtype=manifold.dtype).element_size()
    per_input = max(manifold.activation_numel(), 1) * (columns + 2) * itemsize
    return max(1, min(manifold.n, chunk_bytes // per_input))


def _chunked(manifold: ModelManifold, S: Tensor, structure: Structure, step: int, scale: float, meta: dict) -> CurvatureOperator:
    """Sum the operators of chunks of ``step`` inputs (the factors ``S`` were drawn for all inputs at once)."""
    slices = [slice(a, min(manifold.n, a + step)) for a in range(0, manifold.n, step)]
    if structure is Structure.IMPLICIT:

        def matmat(V: Tensor) -> Tensor:  # products rebuilt per chunk: no chunk's activations are kept
            return sum(_implicit_matmat(manifold.subset(sl), S[sl], 1.0)(V) for sl in slices) * scale

        def diag() -> Tensor:
            return sum(_diagonal(manifold.subset(sl), S[sl], 1.0) for sl in slices) * scale

        return ImplicitOperator(matmat, manifold.num_params, manifold.dtype, manifold.device, diag_fn=diag, **meta)
    total: Optional[List[Tensor]] = None
    layout: Optional[OperatorLayout] = None
    for sl in slices:  # the running totals and a layout are kept, not the first chunk's operator
        sub = manifold.subset(sl)
        op = _build(sub, S[sl], structure, 1.0, dict(meta, n=sub.n))
        layout = layout or operator_layout(op)
        total = sum_parts(total, op, sub.n)
        del op
    assert total is not None and layout is not None
    return operator_from_parts(layout, total, manifold.n, scale, **meta)


def _build(manifold: ModelManifold, S: Tensor, structure: Structure, scale: float, meta: dict) -> CurvatureOperator:
    """The Fisher ``scale * sum_i J_i^T S_i S_i^T J_i`` of ``manifold`` in ``structure``."""
    P = manifold.num_params

    if structure is Structure.DENSE:
        memory_guard(P * P, manifold.dtype, f"a dense Fisher [{P} x {P}]", "use structure='diag', 'kfac' or 'implicit'")
        F = torch.zeros(P, P, dtype=manifold.dtype, device=manifold.device)
        for _, G in manifold.iter_per_sample_vjp(S):
            G = G.reshape(-1, P)
            F.addmm_(G.T, G)
        return DenseOperator(F * scale, **meta)

    if structure is Structure.DIAG:
        return DiagonalOperator(_diagonal(manifold, S, scale), **meta)

    if structure is Structure.LAYER:
        names, blocks, index = _module_blocks(manifold, S, scale, "a layer block", "use structure='kfac', 'diag' or 'implicit'")
        return BlockDiagonalOperator(blocks, index, P, names=names, **meta)

    if structure is Structure.KFAC:
        return _kfac(manifold, S, scale, meta)

    # implicit
    return ImplicitOperator(
        _implicit_matmat(manifold, S, scale),
        P,
        manifold.dtype,
        manifold.device,
        diag_fn=lambda: _diagonal(manifold, S, scale),
        **meta,
    )


# --------------------------------------------------------------------------
# structure back-ends
# --------------------------------------------------------------------------


def _parameter_groups(manifold: ModelManifold) -> List[Tuple[str, List[str]]]:
    """Group parameter names by owning module (``"0.weight"``, ``"0.bias"`` -> ``"0"``; ``"weight"`` -> ``""``)."""
    groups: Dict[str, List[str]] = {}
    for k in manifold.param_names:
        mod = k.rsplit(".", 1)[0] if "." in k else ""
        groups.setdefault(mod, []).append(k)
    return list(groups.items())


def _diagonal(manifold: ModelManifold, S: Tensor, scale: float = 1.0) -> Tensor:
    """Exact ``scale * sum_i diag(J_i^T S_i S_i^T J_i)``.

    Rule layers (Linear, Conv1d/2d/3d, registered types) from layer inputs and
    back-propagated factor columns (:meth:`~dropgeom.layer_rules.LayerRule.diagonal`); every other parameter through per-sample
    products on a sub-manifold. The pieces are concatenated in parameter order
    (no ``[P]`` scratch buffer).
    """
    P = manifold.num_params
    layers = rule_layers(manifold)
    pieces: Dict[str, Tensor] = {}
    for name, (dw, db) in (_rule_diagonals(manifold, layers, S, scale) if layers else {}).items():
        pieces[pname(name, "weight")] = dw.reshape(-1)
        if db is not None:
            pieces[pname(name, "bias")] = db
    rest = [k for k in manifold.param_names if k not in pieces]
    if rest:
        sub = manifold if len(rest) == P or not pieces else _sub_manifold(manifold, rest)
        sub_slices = sub.param_slices()
        acc = torch.zeros(sub.num_params, dtype=manifold.dtype, device=manifold.device)
        for _, G in sub.iter_per_sample_vjp(S):
            acc += (G * G).sum((0, 1))
        acc *= scale
        for k in rest:
            pieces[k] = acc[sub_slices[k]]
    return torch.cat([pieces[k].to(manifold.dtype) for k in manifold.param_names])


def _rule_diagonals(
    manifold: ModelManifold, layers: Dict[str, RuleLayer], S: Tensor, scale: float
) -> Dict[str, Tuple[Tensor, Optional[Tensor]]]:
    """Each rule layer's :meth:`~dropgeom.layer_rules.LayerRule.diagonal` ``(weight part, bias part or None)``.

    Layers with ``T > 1`` positions (convolutions) form per-sample gradients, a sum over the columns of ``S``: they
    take one column at a time. ``T = 1`` layers need the columns only through their summed squares
    (:func:`~dropgeom.layer_rules.diagonal_from_squares`), accumulated one column at a time: no ``[R, n, d_out]``
    stack (on 784-1024-1024-10 with 1,000 inputs that stack and its square took 80 of the 200 MiB, and the
    strided stack made the digits MLP's diagonal 20% slower). A layer whose output is the model's output takes
    its columns from ``S`` at once (no backward, no copy), and so does a ``T = 1`` layer whose rule has its own
    :meth:`~dropgeom.layer_rules.LayerRule.diagonal`."""
    own = {k for k, layer in layers.items() if type(layer.rule).diagonal is not LayerRule.diagonal}
    inputs, columns, stacked = capture_columns(
        manifold, layers, S, stack=lambda k, a, is_eta: a.shape[1] == 1 and (k in own or is_eta)
    )
    squares: Dict[str, Tensor] = {}
    out: Dict[str, Tuple[Tensor, Optional[Tensor]]] = {}
    for column in columns:
        for name, g in column.items():
            mod, rule = layers[name]
            if inputs[name].shape[1] == 1:  # built-in diagonal, one position: add this column's squares
                g0 = g[0, :, 0]
                squares[name] = squares[name].addcmul_(g0, g0) if name in squares else g0 * g0
                continue
            dw, db = rule.diagonal(inputs[name], g, rule.has_bias(mod), scale)
            if name in out:
                dw0, db0 = out[name]
                dw, db = dw0.add_(dw), (None if db is None or db0 is None else db0.add_(db))
            out[name] = (dw, db)
        column = g = g0 = None  # drop this column before the next one is back-propagated (one alive at a time)
    for name, g2 in squares.items():
        out[name] = diagonal_from_squares(inputs[name], g2, layers[name].rule.has_bias(layers[name].module), scale)
    for name, g in stacked.items():
        mod, rule = layers[name]
        out[name] = rule.diagonal(inputs[name], g, rule.has_bias(mod), scale)
    return {name: out[name] for name in inputs}  # layer order


def _sub_manifold(manifold: ModelManifold, names: List[str]) -> ModelManifold:
    """The same manifold with only ``names`` free (others fixed at their values)."""
    return ModelManifold(manifold.model, manifold.inputs, manifold.family, param_names=names, forward=manifold._forward)


def _kfac(manifold: ModelManifold, S: Tensor, scale: float, meta: dict) -> KFACOperator:
    r"""KFAC (Martens & Grosse 2015) for Linear layers and KFC (Grosse & Martens 2016,
    the "expand" variant of Eschenhagen et al. 2023) for convolutions and Linear
    layers on inputs with extra dims. With ``a~ = [a; 1]`` when there is a bias,
    ``T`` output positions per sample (1 for plain Linear):

    ``A = (1/(n T)) sum_{i,t} a~_it a~_it^T``,  ``B = scale * sum_{i,r,t} g_irt g_irt^T``,

    block ``B (x) A`` on ``vec([W | b])`` (``scale = 1/n`` for the mean). This is
    curvlinops' ``KFACLinearOperator(kfac_approx="expand",
    separate_weight_and_bias=False)``. BackPACK (KFLR exact / KFAC mc) keeps
    separate weight and bias blocks; for Linear its weight block equals ours and
    its bias block equals our ``B``; for convolutions its input factor is ``T``
    times ours and its gradient factor is ``sum_i (sum_t g_it)(sum_t g_it)^T``
    (the exact bias block) instead of ours.
    Other parameters get exact dense blocks per module.
    """
    n = manifold.n
    slices = manifold.param_slices()
    layers = rule_layers(manifold)
    inputs, columns, _ = capture_columns(manifold, layers, S) if layers else ({}, iter(()), {})
    A = {
        name: layers[name].rule.input_factor(a, layers[name].rule.has_bias(layers[name].module), n) for name, a in inputs.items()
    }
    del inputs
    B: Dict[str, Tensor] = {}
    for column in columns:  # B is a sum over the columns of S: one column's back-propagated outputs at a time
        for name, g in column.items():
            Br = layers[name].rule.gradient_factor(g, scale)
            B[name] = B[name].add_(Br) if name in B else Br
        column = g = Br = None  # dropped before the next column is back-propagated
    kron, done = [], set()
    for name in A:
        mod, rule = layers[name]
        has_bias = rule.has_bias(mod)
        w = slices[pname(name, "weight")]
        b = slices[pname(name, "bias")] if has_bias else None
        kron.append(KroneckerBlock(A=A[name], B=B[name], weight_index=w, bias_index=b, name=name))
        done.update({pname(name, "weight")} | ({pname(name, "bias")} if has_bias else set()))
    rest = [k for k in manifold.param_names if k not in done]
    dense = []
    if rest:
        sub = manifold if not done else _sub_manifold(manifold, rest)
        _, blocks, _ = _module_blocks(sub, S, scale, "an exact block (no Kronecker rule)", "use structure='diag' or 'implicit'")
        idx_full = [_flat_index(slices, names) for _, names in _parameter_groups(sub)]
        dense = [(blk, idx.to(manifold.device)) for blk, idx in zip(blocks, idx_full)]
    return KFACOperator(kron, dense, manifold.num_params, manifold.dtype, manifold.device, **meta)


def _flat_index(slices: Dict[str, slice], names: List[str]) -> Tensor:
    """Flat-vector indices of the named parameters, in order."""
    return torch.cat([torch.arange(slices[k].start, slices[k].stop) for k in names])


def _module_blocks(
    manifold: ModelManifold, S: Tensor, scale: float, what: str, alternative: str
) -> Tuple[List[str], List[Tensor], List[Tensor]]:
    """Exact per-module blocks ``scale * sum_i G_i[:, idx]^T G_i[:, idx]`` of ``manifold``.

    Returns module names, blocks and their index sets in ``manifold``'s flat vector;
    per-sample products are accumulated in chunks, never held for all samples.
    """
    groups = _parameter_groups(manifold)
    slices = manifold.param_slices()
    index = [_flat_index(slices, names) for _, names in groups]
    for (gname, _), idx in zip(groups, index):
        memory_guard(len(idx) ** 2, manifold.dtype, f"{what} [{len(idx)} x {len(idx)}] for module {gname!r}", alternative)
    blocks = [torch.zeros(len(i), len(i), dtype=manifold.dtype, device=manifold.device) for i in index]
    for _, G in manifold.iter_per_sample_vjp(S):
        G = G.reshape(-1, manifold.num_params)
        for blk, idx in zip(blocks, index):
            g = G[:, idx.to(G.device)]
            blk.addmm_(g.T, g)
    return [g for g, _ in groups], [b * scale for b in blocks], index


def _implicit_matmat(manifold: ModelManifold, S: Tensor, scale: float):
    """``V -> scale * J^T S S^T J V`` for ``V`` of shape ``[P, m]``, vectorised over the
    ``m`` columns (``vmap`` over ``jvp`` and over one reusable ``vjp``); a loop over
    columns only where a layer has no ``vmap`` rule."""
    params = manifold.params
    names = manifold.param_names
    pullback: list = []  # the vjp closure, built once on first use (one forward)

    def mm(V: Tensor) -> Tensor:
        V = V.to(manifold.dtype)
        tangents = manifold.unflatten(V.T)  # dict of [m, *shape]
        try:
            JV = vmap(lambda t: jvp(manifold.forward, (params,), (t,))[1])(tangents)  # [m, n, K]
            W = torch.einsum("nkr,nlr,mnl->mnk", S, S, JV)
            if not pullback:
                pullback.append(vjp(manifold.forward, params)[1])
            out = vmap(pullback[0])(W)[0]
            # scaled in place and returned as the transposed view: one [m, P] buffer fewer than `cat(...).T * scale`
            return torch.cat([out[k].reshape(V.shape[1], -1) for k in names], dim=1).mul_(scale).T
        except (RuntimeError, NotImplementedError):  # a layer without a vmap rule
            cols = []
            for j in range(V.shape[1]):
                jv = manifold.jvp(V[:, j])
                cols.append(manifold.vjp(torch.einsum("nkr,nlr,nl->nk", S, S, jv)) * scale)
            return torch.stack(cols, dim=1)

    return mm
