r"""Curvature of the model manifold (theory.md section 3).

* :func:`statistical_curvature` -- Efron's ``gamma^2`` for one parameter.
* :func:`embedding_curvature`   -- scalar e/m/alpha-curvature ``gamma^2``, dense or stochastic.
* :func:`normal_curvature`      -- curvature along one parameter direction.
* :func:`alpha_connection`, :func:`skewness_tensor` -- dense coefficients for inspection.

No PyTorch library computes these for neural networks; everything here is
written for dropgeom on top of :mod:`torch.func`.
"""

from .dense import MAX_DENSE_PARAMS, alpha_connection, skewness_tensor
from .efron import statistical_curvature
from .embedding import CurvatureResult, embedding_curvature
from .normal import normal_curvature

__all__ = [
    "statistical_curvature",
    "embedding_curvature",
    "CurvatureResult",
    "normal_curvature",
    "alpha_connection",
    "skewness_tensor",
    "MAX_DENSE_PARAMS",
]
