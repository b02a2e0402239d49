"""Training: objectives (none, L2, dropout, Gaussian dropout, Fisher-dropout), the loop, checkpoints, metrics.

See :mod:`dropgeom.train.objectives` (theory.md 4.4 for Fisher-dropout),
:mod:`dropgeom.train.registry` (the named objectives: one registration each),
:mod:`dropgeom.train.loop` (seeded, resumable training), :mod:`dropgeom.train.checkpoint`
(atomic writes) and :mod:`dropgeom.train.metrics` (NLL, accuracy, calibration).
"""

from .checkpoint import atomic_write_bytes, load_checkpoint, save_checkpoint
from .loop import CHECKPOINT_NAME, EarlyStopping, History, train
from .metrics import classification_metrics, evaluate, expected_calibration_error
from .objectives import (
    L2,
    NLL,
    DropoutNLL,
    FisherDropout,
    FisherPenalty,
    GaussianDropoutNLL,
    Objective,
    ObjectiveOutput,
    Sum,
    dropout_modules,
)
from .registry import (
    ObjectiveName,
    ObjectiveSpec,
    make_objective,
    objective_names,
    objective_spec,
    register_objective,
    run_options,
)

__all__ = [
    "train",
    "History",
    "EarlyStopping",
    "CHECKPOINT_NAME",
    "Objective",
    "ObjectiveOutput",
    "ObjectiveName",
    "ObjectiveSpec",
    "make_objective",
    "objective_names",
    "objective_spec",
    "register_objective",
    "run_options",
    "NLL",
    "L2",
    "DropoutNLL",
    "GaussianDropoutNLL",
    "FisherPenalty",
    "FisherDropout",
    "Sum",
    "dropout_modules",
    "evaluate",
    "classification_metrics",
    "expected_calibration_error",
    "save_checkpoint",
    "load_checkpoint",
    "atomic_write_bytes",
]
