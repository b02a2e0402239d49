"""Dropout analysis (theory.md section 4): explicit masks, the exact dropout gap,
its Fisher (divergence) and curvature terms, dropout inference as a mixture of
sub-models, and the differentiable Fisher-dropout penalty."""

from .explicit import forward_with_masks, record_dropout_inputs
from .gap import GapResult, gap
from .mixture import MixtureResult, mixture
from .penalty import output_linear, penalty
from .terms import DropoutTerms, terms
from .masks import (
    DROPOUT_TYPES,
    MaskEnumeration,
    enumerate_masks,
    find_dropout,
    mask_variance,
    resolve_p,
    sample_masks,
    unit_shapes,
)

__all__ = [
    "DROPOUT_TYPES",
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
    "output_linear",
    "MixtureResult",
    "mixture",
]
