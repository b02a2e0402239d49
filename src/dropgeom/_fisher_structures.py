"""The Fisher ``scale * sum_i J_i^T S_i S_i^T J_i`` of given factors ``S`` in each structure (theory.md section 2).

:func:`dropgeom._fisher.fisher` draws or computes the factors ``S`` and chunks the inputs; this module builds the
requested structure from them: dense and layer blocks from chunked per-sample ``torch.func`` products, the
diagonal and the Kronecker factors from the layer rules' inputs and back-propagated columns
(:mod:`dropgeom._capture`) with per-sample products only for layers without a rule, and the matrix-free product.
The diagonal and KFAC can also add themselves into running totals (``into=``, used by streamed sums).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torch.func import jvp, vjp, vmap

from ._capture import RuleLayer, capture_columns, pname, rule_layers
from .layer_rules import LayerRule, diagonal_from_squares
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
from .options import Structure

__all__ = ["IN_PLACE", "add_into", "build", "fisher_diagonal", "fisher_kfac", "implicit_matmat"]


def build(manifold: ModelManifold, S: Tensor, structure: Structure, scale: float, meta: dict) -> CurvatureOperator:
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
        return DiagonalOperator(fisher_diagonal(manifold, S, scale), **meta)

    if structure is Structure.LAYER:
        names, blocks, index = _module_blocks(manifold, S, scale, "a layer block", "use structure='kfac', 'diag' or 'implicit'")
        return BlockDiagonalOperator(blocks, index, P, names=names, **meta)

    if structure is Structure.KFAC:
        op = fisher_kfac(manifold, S, scale, meta)
        assert op is not None  # None only when adding into totals
        return op

    # implicit
    return ImplicitOperator(
        implicit_matmat(manifold, S, scale),
        P,
        manifold.dtype,
        manifold.device,
        diag_fn=lambda: fisher_diagonal(manifold, S, scale),
        **meta,
    )


#: Structures :func:`add_into` adds in place
IN_PLACE = frozenset({Structure.DIAG, Structure.KFAC})


def add_into(total: List[Tensor], manifold: ModelManifold, S: Tensor, structure: Structure) -> bool:
    """Add the sum-reduced Fisher of ``manifold`` with factors ``S`` to ``total`` (the
    :func:`~dropgeom.operator_parts.operator_parts` of an operator of the same layout), in place, where the structure
    can (diagonal: each piece into its slice; KFAC: ``n A`` per layer and each column's ``B`` into the totals), and
    say whether it did: False for the other structures, whose caller adds the parts of :func:`build` instead. Sums
    over chunks and batches use it, so they hold the totals and one chunk's work, not a second set of matrices."""
    if structure is Structure.DIAG:
        fisher_diagonal(manifold, S, 1.0, into=total[0])
        return True
    if structure is Structure.KFAC:
        fisher_kfac(manifold, S, 1.0, {}, into=total)
        return True
    return False


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


def fisher_diagonal(manifold: ModelManifold, S: Tensor, scale: float = 1.0, into: Optional[Tensor] = None) -> Tensor:
    """Exact ``scale * sum_i diag(J_i^T S_i S_i^T J_i)`` (added to ``into``, in place, and returned, when given).

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
    if into is not None:
        slices = manifold.param_slices()
        for k in manifold.param_names:
            into[slices[k]] += pieces[k].reshape(-1)
        return into
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


def fisher_kfac(
    manifold: ModelManifold, S: Tensor, scale: float, meta: dict, into: Optional[List[Tensor]] = None
) -> Optional[KFACOperator]:
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

    With ``into`` (the :func:`~dropgeom.operator_parts.operator_parts` of an operator of the same layout) the
    factors are added to it in place (``n A`` and ``B`` per layer, then the dense blocks) and None is returned:
    each layer's input factor is a temporary, and the gradient factors accumulate in the totals directly.
    """
    n = manifold.n
    slices = manifold.param_slices()
    layers = rule_layers(manifold)
    inputs, columns, _ = capture_columns(manifold, layers, S) if layers else ({}, iter(()), {})
    order = list(inputs)
    A: Dict[str, Tensor] = {}
    for j, (name, a) in enumerate(inputs.items()):
        Aj = layers[name].rule.input_factor(a, layers[name].rule.has_bias(layers[name].module), n)
        if into is None:
            A[name] = Aj
        else:
            into[2 * j].add_(Aj, alpha=n)
        del Aj
    del inputs
    B: Dict[str, Tensor] = {} if into is None else {name: into[2 * j + 1] for j, name in enumerate(order)}
    for column in columns:  # B is a sum over the columns of S: one column's back-propagated outputs at a time
        for name, g in column.items():
            Br = layers[name].rule.gradient_factor(g, scale)
            B[name] = B[name].add_(Br) if name in B else Br
        column = g = Br = None  # dropped before the next column is back-propagated
    kron, done = [], set()
    for name in order:
        mod, rule = layers[name]
        has_bias = rule.has_bias(mod)
        w = slices[pname(name, "weight")]
        b = slices[pname(name, "bias")] if has_bias else None
        if into is None:
            kron.append(KroneckerBlock(A=A[name], B=B[name], weight_index=w, bias_index=b, name=name))
        done.update({pname(name, "weight")} | ({pname(name, "bias")} if has_bias else set()))
    rest = [k for k in manifold.param_names if k not in done]
    dense = []
    if rest:
        sub = manifold if not done else _sub_manifold(manifold, rest)
        _, blocks, _ = _module_blocks(sub, S, scale, "an exact block (no Kronecker rule)", "use structure='diag' or 'implicit'")
        idx_full = [_flat_index(slices, names) for _, names in _parameter_groups(sub)]
        dense = [(blk, idx.to(manifold.device)) for blk, idx in zip(blocks, idx_full)]
    if into is not None:
        for acc, (blk, _) in zip(into[2 * len(order) :], dense):
            acc.add_(blk)
        return None
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


def implicit_matmat(manifold: ModelManifold, S: Tensor, scale: float):
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
