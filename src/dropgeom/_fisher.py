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

from typing import List, Optional, Union

from .options import FisherKind, Reduction, Structure, parse

import torch
from torch import Tensor

from ._fisher_structures import IN_PLACE, add_into, build, fisher_diagonal, implicit_matmat
from .dispatch import streams
from .manifold import DEFAULT_CHUNK_BYTES, ModelManifold
from .operator_parts import OperatorLayout, operator_from_parts, operator_layout, sum_parts
from .operators import CurvatureOperator, ImplicitOperator

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
        Tied weights take the generic path, and so does a layer whose weight or bias the forward also uses outside
        the layer's call (a tied autoencoder's ``F.linear(h, enc.weight.T)``).

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
    S = _factors(manifold, kind, targets, n_samples, generator)
    scale = 1.0 if reduction is Reduction.SUM else 1.0 / manifold.n
    meta = dict(kind=kind.value, structure=structure.value, reduction=reduction.value, n=manifold.n)
    step = _chunk_rows(manifold, S.shape[-1], DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes)
    if step < manifold.n:
        return _chunked(manifold, S, structure, step, scale, meta)
    return build(manifold, S, structure, scale, meta)


def _factors(
    manifold: ModelManifold, kind: FisherKind, targets: Optional[Tensor], n_samples: int, generator: Optional[torch.Generator]
) -> Tensor:
    """The factors ``S`` of ``kind`` (exact: the covariance root with as few columns as its rank; categorical K-1).

    Raises:
        ValueError: the samples interact (:func:`_check_samples_independent`).
    """
    _check_samples_independent(manifold)
    if kind is FisherKind.EXACT:
        return manifold.family.reduced_cov_sqrt(manifold.eta())
    return fisher_factors(manifold, kind, targets=targets, n_samples=n_samples, generator=generator)


def _check_samples_independent(manifold: ModelManifold) -> None:
    """Raise unless the model's output for the first input is the same when that input is evaluated alone.

    Every structure is built from per-sample products (``J_i`` of input ``i`` alone, by ``vmap`` or by the layer
    rules) and from chunks of inputs; a model whose samples interact in eval mode -- batch norm without running
    statistics (``track_running_stats=False``) normalises with the statistics of the batch, a forward that centres
    over the batch -- has no such per-sample ``J_i``, and its Fisher would silently change with the batch. Checked
    once per manifold (one forward of one input); a manifold with a custom ``forward``, a closed-form one and one
    input are not checked.

    Raises:
        ValueError: naming the batch-statistics norm layers, if any, and the fix.
    """
    if manifold.model is None or manifold._forward is not None or manifold.n == 1:
        return
    if manifold.__dict__.get("_samples_independent"):
        return
    try:
        with torch.no_grad():
            alone = manifold.forward(manifold.params, tuple(x[:1] for x in manifold.inputs))
    except Exception:  # noqa: BLE001 -- a model that cannot take one input fails with its own error in the per-sample path
        return
    eta0 = manifold.eta()[:1]
    if isinstance(alone, Tensor) and alone.shape == eta0.shape:
        tol = torch.finfo(eta0.dtype).eps ** 0.5 * max(1.0, float(manifold.eta().abs().max()))
        diff = float((alone - eta0).abs().max())
        if not diff > tol:  # NaN-safe: only a clear difference raises
            manifold._samples_independent = True
            return
        norms = _batch_statistics_norms(manifold.model)
        why = (
            f"batch statistics in {', '.join(norms)} (track_running_stats=False)"
            if norms
            else "the forward mixes the inputs or is random"
        )
        raise ValueError(
            f"fisher(): the model's output for input 0 changes by {diff:.3g} when that input is evaluated alone: its "
            f"samples interact ({why}). The Fisher is built from per-sample Jacobians, which assume independent "
            "samples in eval mode. Fix: give every batch norm running statistics (track_running_stats=True, "
            "estimated on the data) or remove the interaction."
        )


def _batch_statistics_norms(model: torch.nn.Module) -> List[str]:
    """The batch norm layers of ``model`` that normalise with batch statistics in eval mode (no running statistics)."""
    return [
        f"{k!r} ({type(m).__name__})"
        for k, m in model.named_modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is None
    ]


def add_sum_into(
    total: List[Tensor],
    manifold: ModelManifold,
    kind: FisherKind,
    structure: Structure,
    *,
    targets: Optional[Tensor] = None,
    n_samples: int = 1,
    generator: Optional[torch.Generator] = None,
    chunk_bytes: Optional[int] = None,
) -> bool:
    """:func:`~dropgeom._fisher_structures.add_into` for a whole batch: its factors ``S`` of ``kind``, then the
    sum-reduced Fisher added to ``total`` in place (:mod:`dropgeom.streaming` adds every batch after the first so).

    Returns False, touching nothing and drawing nothing from ``generator``, where it does not apply (structures
    without an in-place path, inputs that ``chunk_bytes`` splits into chunks): the caller then adds the parts of
    ``fisher(..., reduction="sum")``.
    """
    if structure not in IN_PLACE:
        return False
    budget = DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    drawn = {FisherKind.MC: n_samples, FisherKind.EMPIRICAL: 1}.get(kind)  # columns of S known before any draw
    if drawn is not None and _chunk_rows(manifold, drawn, budget) < manifold.n:
        return False
    S = _factors(manifold, kind, targets, n_samples, generator)
    if _chunk_rows(manifold, S.shape[-1], budget) < manifold.n:  # exact: S is deterministic, nothing was drawn
        return False
    return add_into(total, manifold, S, structure)


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
            return sum(implicit_matmat(manifold.subset(sl), S[sl], 1.0)(V) for sl in slices) * scale

        def diag() -> Tensor:
            return sum(fisher_diagonal(manifold.subset(sl), S[sl], 1.0) for sl in slices) * scale

        return ImplicitOperator(matmat, manifold.num_params, manifold.dtype, manifold.device, diag_fn=diag, **meta)
    total: Optional[List[Tensor]] = None
    layout: Optional[OperatorLayout] = None
    for sl in slices:  # the running totals and a layout are kept, not the first chunk's operator
        sub = manifold.subset(sl)
        if total is not None and add_into(total, sub, S[sl], structure):
            continue
        op = build(sub, S[sl], structure, 1.0, dict(meta, n=sub.n))
        layout = layout or operator_layout(op)
        total = sum_parts(total, op, sub.n)
        del op
    assert total is not None and layout is not None
    return operator_from_parts(layout, total, manifold.n, scale, **meta)
