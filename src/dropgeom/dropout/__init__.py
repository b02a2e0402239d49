"""Dropout analysis (theory.md section 4): explicit masks, the exact dropout gap,
its Fisher (divergence) and curvature terms, dropout inference as a mixture of
sub-models, and the differentiable Fisher-dropout penalty. :func:`gap`, :func:`terms` and
:func:`penalty` also take a ``DataLoader`` or a list of ``(inputs, targets)`` batches in place of the
inputs (a mean over the whole data set; the penalty's value is then detached: train with gradient
accumulation, see :mod:`dropgeom.dispatch`). Dropout layers of every
kind -- modules, attention-weight and functional dropout, DropConnect, stochastic
depth -- are explicit masks (see :mod:`dropgeom.dropout.masks`)."""

from ..dispatch import mean_over_batches
from .explicit import forward_with_masks, record_dropout_inputs
from ._gap import GapResult, gap
from ._mixture import MixtureResult, mixture
from ._penalty import output_linear, penalty
from ._penalty_result import PenaltyResult
from ._terms import DropoutTerms, terms
from .modules import DropPath, StochasticDepth
from .masks import (
    DROPOUT_TYPES,
    dropout_sites,
    enumerate_shapes,
    MaskEnumeration,
    enumerate_masks,
    find_dropout,
    mask_variance,
    resolve_p,
    sample_masks,
    unit_shapes,
)

# The public gap, terms and penalty also take an iterable of batches (a DataLoader, a list of (inputs, targets)) in
# place of ``inputs``: a mean over the whole data set (dropgeom.dispatch.mean_over_batches, guide section 8).
gap = mean_over_batches(gap)
terms = mean_over_batches(terms)
penalty = mean_over_batches(
    penalty,
    refuse={"return_output": "the outputs of all batches are not kept; call penalty per batch for them"},
    per_batch=lambda res: res.value,  # the outputs of the batches are not kept: eta is None over batches
    finish=lambda value: PenaltyResult(value, None),
)

__all__ = [
    "DROPOUT_TYPES",
    "DropPath",
    "StochasticDepth",
    "dropout_sites",
    "enumerate_shapes",
    "MaskEnumeration",
    "GapResult",
    "find_dropout",
    "resolve_p",
    "mask_variance",
    "unit_shapes",
    "sample_masks",
    "enumerate_masks",
    "forward_with_masks",
    "record_dropout_inputs",
    "gap",
    "DropoutTerms",
    "terms",
    "penalty",
    "PenaltyResult",
    "output_linear",
    "MixtureResult",
    "mixture",
]
