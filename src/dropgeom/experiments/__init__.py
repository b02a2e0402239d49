"""Experiments testing the paper's claims (theory.md: C1, C2, C3), and the sweep runner.

Each claim is one module exposing ``NAME``, ``TITLE``, ``units(config)``,
``run_unit(config, unit) -> record``, ``summarize(config, records)`` (tables,
evidence and a :class:`~dropgeom.experiments.common.Verdict`) and
``figures(config, records, folder)``, and ``ABOUT`` (the design and the rule in
words, printed in the report). :func:`run_experiments` runs them all into a run
directory, resuming finished units; :func:`summarize_run` builds the typed
summary the report renders (:func:`dropgeom.pipeline.reproduce` does all three).
"""

from . import c1_flatness, c2_curvature_strength, c3_fisher_regularizer
from .run_summary import summarize_run
from .sweep import EXPERIMENTS, run_experiments

__all__ = ["run_experiments", "summarize_run", "EXPERIMENTS", "c1_flatness", "c2_curvature_strength", "c3_fisher_regularizer"]
