"""The case table of the test suite: how each option-enum member is checked.

Tests take their options from the enums of :mod:`dropgeom.options` (through the
fixtures of ``tests/conftest.py``), so a new member is tested without editing a
test body. What a member needs beyond the default check is stated here, once:

* a Fisher structure is exact (equal to the dense Fisher on what it represents)
  unless listed in :data:`APPROXIMATE_STRUCTURES`;
* a Fisher kind has a deterministic float64 reference unless listed in
  :data:`RANDOM_KINDS`;
* a penalty estimator is deterministic unless listed in :data:`SAMPLED_ESTIMATORS`;
* a reduction scales the mean over the ``n`` inputs by :data:`REDUCTION_FACTOR`.
"""

from __future__ import annotations

from typing import Callable, Dict

from dropgeom.options import Estimator, FisherKind, Reduction, Structure

#: Structures that approximate the Fisher (checked by their own identities, not against the dense Fisher).
APPROXIMATE_STRUCTURES = frozenset({Structure.KFAC})
#: Kinds drawn at random (checked for unbiasedness and reproducibility, not against a fixed reference).
RANDOM_KINDS = frozenset({FisherKind.MC})
#: Penalty estimators drawn at random (unbiased; equal to ``exact`` only in expectation).
SAMPLED_ESTIMATORS = frozenset({Estimator.MC, Estimator.UNIT})

EXACT_STRUCTURES = tuple(s for s in Structure if s not in APPROXIMATE_STRUCTURES)
DETERMINISTIC_KINDS = tuple(k for k in FisherKind if k not in RANDOM_KINDS)
SAMPLED = tuple(e for e in Estimator if e in SAMPLED_ESTIMATORS)
#: The factor of each reduction relative to the mean over ``n`` inputs.
REDUCTION_FACTOR: Dict[Reduction, Callable[[int], float]] = {Reduction.MEAN: lambda n: 1.0, Reduction.SUM: lambda n: float(n)}
