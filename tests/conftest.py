"""Shared fixtures: a seeded torch RNG for every test, and one fixture per option enum.

Each option fixture is parametrised over the members of its enum in
:mod:`dropgeom.options` (and the objective fixture over the registered objectives),
so a test that takes ``structure``, ``kind``, ``reduction``, ``form``,
``estimator``, ``noise`` or ``objective_name`` runs once per member, and a new
member is tested without editing a test body. The subsets (``exact_structure``,
``deterministic_kind``, ``sampled_estimator``) come from the case table in
``tests/reference/cases.py``. Members are ``str`` subclasses, so test bodies
compare them with plain strings.

``reference`` (tests/reference) is importable because pyproject.toml puts
``tests`` on pytest's ``pythonpath``.
"""

import pytest
import torch

from dropgeom.options import Estimator, FisherKind, Noise, PenaltyForm, Reduction, Structure
from dropgeom.train import objective_names
from reference.cases import DETERMINISTIC_KINDS, EXACT_STRUCTURES, SAMPLED


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def _over(members, name):
    """A fixture named ``name`` that runs its test once per member (ids: the values)."""

    @pytest.fixture(params=list(members), ids=str, name=name)
    def option(request):
        return request.param

    return option


structure = _over(Structure, "structure")
exact_structure = _over(EXACT_STRUCTURES, "exact_structure")
kind = _over(FisherKind, "kind")
deterministic_kind = _over(DETERMINISTIC_KINDS, "deterministic_kind")
reduction = _over(Reduction, "reduction")
form = _over(PenaltyForm, "form")
estimator = _over(Estimator, "estimator")
sampled_estimator = _over(SAMPLED, "sampled_estimator")
noise = _over(Noise, "noise")
objective_name = _over(objective_names(), "objective_name")
