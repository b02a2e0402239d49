r"""Curvature of the model manifold (theory.md section 3).

* :func:`statistical_curvature` -- Efron's ``gamma^2`` for one parameter.
* :func:`embedding_curvature`   -- scalar e/m/alpha-curvature ``gamma^2``, dense or stochastic.
* :func:`normal_curvature`      -- curvature along one parameter direction.
* :func:`alpha_connection`, :func:`skewness_tensor` -- dense coefficients for inspection.
* :func:`range_gamma2`          -- the undamped ``gamma^2`` on the exact range of ``J``, without
  the ``[n, K, P, P]`` Hessian tensor (any ``P`` on a few inputs).
* :mod:`.invariant` -- coordinate-free measures (normal curvature along the mask and
  dropout-noise tangent directions) and the invariance table ``INVARIANCE``.
* :mod:`.natural_gradient` -- normal curvature along the natural-gradient direction, plain
  or with a function-space regulariser (invariant and stable on a badly conditioned ``g``).
* :mod:`.sharpness` -- coordinate-dependent sharpness measures (Hessian trace / top eigenvalue,
  SAM sharpness, Fisher trace / top eigenvalue), reported beside the invariant ones.
* :func:`dropout_mixture_manifold` -- the manifold of the dropout-averaged model (theory.md 4.3).
* :mod:`.streamed` -- ``fisher_trace``, ``fisher_top_eigenvalue`` and the stochastic ``embedding_curvature`` of a
  :class:`~dropgeom.dispatch.StreamedManifold` (a data loader, across processes).

No PyTorch library computes these for neural networks; everything here is
written for dropgeom on top of :mod:`torch.func`.
"""

from .dense import MAX_DENSE_PARAMS, alpha_connection, skewness_tensor
from .efron import statistical_curvature
from .embedding import CurvatureResult, embedding_curvature
from .invariant import INVARIANCE, curvature_profile, dropout_tangent_directions, noise_tangent_curvature, normal_curvatures
from .mixture_model import dropout_mixture_manifold
from .natural_gradient import natural_gradient_curvature, natural_gradient_direction
from .normal import normal_curvature
from .range_gamma import range_gamma2
from .sharpness import TraceEstimate, fisher_top_eigenvalue, fisher_trace, hessian_top_eigenvalue, hessian_trace, sam_sharpness
from . import streamed  # noqa: F401  (registers the curvature over batches, dropgeom.dispatch)

__all__ = [
    "statistical_curvature",
    "embedding_curvature",
    "range_gamma2",
    "CurvatureResult",
    "normal_curvature",
    "alpha_connection",
    "skewness_tensor",
    "MAX_DENSE_PARAMS",
    "INVARIANCE",
    "curvature_profile",
    "normal_curvatures",
    "natural_gradient_direction",
    "natural_gradient_curvature",
    "dropout_tangent_directions",
    "noise_tangent_curvature",
    "dropout_mixture_manifold",
    "hessian_trace",
    "hessian_top_eigenvalue",
    "sam_sharpness",
    "fisher_trace",
    "fisher_top_eigenvalue",
    "TraceEstimate",
]
