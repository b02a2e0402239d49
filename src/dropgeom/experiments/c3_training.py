r"""C3b's rule (:data:`~dropgeom.experiments.c3_fisher_regularizer.RULE_B`): which regularizer's trained predictions
come closest to dropout's, setting by setting.

* The unit of replication is the seed *within a setting* (data set x architecture x size x optimizer): the
  settings' effects differ (the full run: the Fisher quadratic form is 0.375x L2's KL on digits with SGD and 1.44x
  on digits with Adam), so the (setting, seed) pairs of all settings are not replicates of one effect. One paired
  t-test per (setting, Fisher form), Holm over all of them (:func:`per_setting_tests`).
* A regularizer's strength is chosen per seed on the *other* seeds of its setting (leave-one-seed-out,
  :func:`held_out_kl`): the strength minimising their mean log KL to dropout, and the seed's own KL at that strength
  is its value. The units record no validation-set KL (only the test KL, test NLL, agreement on the test inputs and
  the clean train NLL), so the seeds are the held-out data; the minimum over the grid of a seed's own KLs (the old
  rule, :func:`in_sample_best`) is shown as a description: a minimum of noisy values, biased low against the
  single-draw noise floor.
* A strength whose training diverged has no KL: it is listed (:func:`diverged_runs`), never silently dropped.

Example:
    >>> recs = [{"tag": "a", "seed": s, "objectives": {f"l2@{k:g}": {"kl_from_dropout": k * (1 + s)} for k in (1, 2)}}
    ...         for s in range(3)]
    >>> held_out_kl(recs, "l2")          # strength 1 is best on the other seeds, so each seed's KL at strength 1
    [1.0, 2.0, 3.0]
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from .stats import Comparison, adjust, paired
from ..options import VerdictLabel

__all__ = ["in_sample_best", "held_out_kl", "per_setting_tests", "decide", "diverged_runs"]


def _kl(r: Mapping[str, Any], name: str) -> float:
    e = r["objectives"].get(name, {})
    v = float(e.get("kl_from_dropout", math.nan)) if isinstance(e, Mapping) else math.nan
    return v if math.isfinite(v) and v > 0 else math.nan


def _strength(name: str) -> float:
    """The strength multiplier of a grid entry ``"<regularizer>@<multiplier>"`` (``inf`` if it does not parse)."""
    try:
        return float(name.split("@", 1)[1])
    except (IndexError, ValueError):
        return math.inf


def _grid(r: Mapping[str, Any], reg: str) -> List[str]:
    return [n for n in r["objectives"] if "@" in n and n.split("@")[0] == reg]


def in_sample_best(r: Mapping[str, Any], reg: str) -> float:
    """The smallest KL over ``reg``'s strength grid on the seed's own runs (a description: biased low)."""
    ks = [_kl(r, n) for n in _grid(r, reg)]
    ks = [k for k in ks if math.isfinite(k)]
    return min(ks) if ks else math.nan


def held_out_kl(rs: Sequence[Mapping[str, Any]], reg: str) -> List[float]:
    """Per record of one setting: its KL at the strength that minimises the mean log KL over the setting's *other*
    records, ties to the smaller strength (NaN with no other record, or where the seed's run at that strength
    diverged)."""
    out = []
    for i, r in enumerate(rs):
        others = [o for j, o in enumerate(rs) if j != i]
        score: Dict[str, float] = {}
        for n in _grid(r, reg):
            logs = [math.log(_kl(o, n)) for o in others if math.isfinite(_kl(o, n))]
            if logs:
                score[n] = float(np.mean(logs))
        # ties go to the smaller strength (the mildest regularizer that does as well), not to the grid's key order
        out.append(_kl(r, min(score, key=lambda n: (score[n], _strength(n)))) if score else math.nan)
    return out


def per_setting_tests(objs: Sequence[Mapping[str, Any]], fisher: Sequence[str]) -> List[Tuple[str, Comparison]]:
    """``[(setting, comparison), ...]``: each Fisher form's held-out KL against L2's, paired over the seeds of one
    setting (log-ratios), Holm over every (setting, Fisher form)."""
    tags = sorted({str(r.get("tag", "")) for r in objs})
    raw = []
    for tag in tags:
        rs = [r for r in objs if str(r.get("tag", "")) == tag]
        l2 = held_out_kl(rs, "l2")
        raw += [(tag, paired(held_out_kl(rs, f), l2, log=True, name=f)) for f in fisher]
    adjusted = adjust([c for _, c in raw])
    return [(tag, c) for (tag, _), c in zip(raw, adjusted)]


def decide(tests: Sequence[Tuple[str, Comparison]]) -> Tuple[str, str]:
    """``(label, words)``: supported when some (setting, form) is significantly closer than L2 and none farther;
    refuted mirrored; inconclusive otherwise, named *setting-dependent* when significant both ways."""
    closer = [f"{t}: {c.name}" if t else c.name for t, c in tests if c.sign < 0]
    farther = [f"{t}: {c.name}" if t else c.name for t, c in tests if c.sign > 0]
    words = (
        f"closer than L2 in {len(closer)} ({'; '.join(closer) or 'none'}), farther in {len(farther)} "
        f"({'; '.join(farther) or 'none'}) of {len(tests)} (setting, Fisher form) tests (Holm)"
    )
    if closer and farther:
        return VerdictLabel.INCONCLUSIVE.value, "setting-dependent: " + words
    if closer:
        return VerdictLabel.SUPPORTED.value, words
    if farther:
        return VerdictLabel.REFUTED.value, words
    return VerdictLabel.INCONCLUSIVE.value, words


def diverged_runs(objs: Sequence[Mapping[str, Any]]) -> List[str]:
    """``["<setting> seed=<s>: <objective>", ...]`` for every objective whose training diverged (no KL, left out)."""
    return [
        f"{r.get('tag', '')} seed={r.get('seed')}: {n}".strip()
        for r in objs
        for n, e in r["objectives"].items()
        if isinstance(e, Mapping) and e.get("diverged")
    ]
