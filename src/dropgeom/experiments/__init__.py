"""Experiments testing the paper's claims (theory.md: C1, C2, C3), and the sweep runner.

Each claim is one module exposing ``NAME``, ``TITLE``, ``units(config)``,
``run_unit(config, unit) -> record``, ``summarize(config, records)`` (tables,
evidence and a :class:`~dropgeom.experiments.common.Verdict`) and
``figures(config, records, folder)``. :func:`reproduce` runs them all into a
run directory, resuming finished units, and renders the report.
"""

from . import c1_flatness, c2_curvature_strength, c3_fisher_regularizer
from .sweep import EXPERIMENTS, reproduce

__all__ = ["reproduce", "EXPERIMENTS", "c1_flatness", "c2_curvature_strength", "c3_fisher_regularizer"]
