"""dropgeom: the information geometry of dropout training, on PyTorch models.

A network is a curved exponential family (its outputs are natural parameters),
the Fisher information is its metric, and dropout acts as a Fisher-weighted
regularizer plus a term driven by the curvature of the model manifold.
See ``docs/guide.md`` and ``docs/theory.md`` for the notation.
"""

from ._utils import NonFiniteOutputError
from .families import ExponentialFamily, get_family
from ._fisher import FisherKind, Reduction, Structure, fisher
from .manifold import ModelManifold
from .dispatch import StreamedManifold
from .operators import CurvatureOperator
from .data import Dataset, load_dataset
from .train import EarlyStopping, History, Objective, make_objective  # the loop: dropgeom.train.train
from . import dropout, streaming  # noqa: F401  (streaming registers the Fisher over batches)
from .curvature import (
    CurvatureResult,
    alpha_connection,
    embedding_curvature,
    normal_curvature,
    skewness_tensor,
    statistical_curvature,
)

__version__ = "0.1.0"

__all__ = [
    "ModelManifold",
    "StreamedManifold",
    "fisher",
    "FisherKind",
    "Structure",
    "Reduction",
    "CurvatureOperator",
    "ExponentialFamily",
    "get_family",
    "Dataset",
    "load_dataset",
    "make_objective",
    "Objective",
    "History",
    "EarlyStopping",
    "statistical_curvature",
    "embedding_curvature",
    "CurvatureResult",
    "normal_curvature",
    "alpha_connection",
    "skewness_tensor",
    "NonFiniteOutputError",
]
