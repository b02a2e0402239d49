"""Per-setting figures of the report (issue 10: "per data set and architecture: a table and a figure").

Synthetic records with two settings, as the full run has (digits and Fashion-MNIST): C2 and C3 must write one
figure file per setting, caption each with its setting, and render them through the report. Nothing trains.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dropgeom.config import RunConfig
from dropgeom.experiments import c2_curvature_strength as c2
from dropgeom.experiments import c3_fisher_regularizer as c3
from dropgeom.experiments.c3_figures import figure_stem
from dropgeom.experiments.c3_units import STAGES

PNG = b"\x89PNG\r\n\x1a\n"
#: the two C3 settings of CONFIG (the test preset on both data sets)
TAGS = ("digits-mlp-n200-adam", "fashion_mnist-mlp-n200-adam")
CONFIG = RunConfig.from_preset(
    "test", experiments=["C3"], c3_datasets=["digits", "fashion_mnist"], c3_regularizers=["l2", "fisher_quadratic"]
)


def _grad(tag: str, seed: int) -> dict:
    st = {
        k: {
            f"{q}_{form}": v
            for form in ("quadratic", "divergence")
            for q, v in (("cos", 0.8 + 0.01 * seed), ("ratio", 0.6 + 0.02 * seed), ("norm", 0.9))
        }
        | {"grad_rel_se": 0.1}
        for k in STAGES
    }
    gap = [
        {"p": p, "measured": 2 * p, "quadratic_fisher": p, "fisher_term": 1.1 * p, "bernoulli_law": 1.2 * p, "stderr": 0.01}
        for p in (0.05, 0.2)
    ]
    return {"status": "ok", "part": "grad", "seed": seed, "tag": tag, "dataset": tag.split("-")[0], "stages": st, "gap": gap}


def _objectives(tag: str, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    objs = {
        "dropout": {"test": {"nll": 1.0}, "kl_from_dropout": 0.0, "train_nll": 0.1},
        "dropout_floor": {"test": {"nll": 1.0}, "kl_from_dropout": 0.01 * (1 + 0.1 * seed), "train_nll": 0.1},
        "none": {"test": {"nll": 1.2}, "kl_from_dropout": 0.2, "train_nll": 0.01},
    }
    for reg in ("l2", "fisher_quadratic"):
        for k in (0.25, 1.0, 4.0):
            objs[f"{reg}@{k:g}"] = {
                "test": {"nll": 1.0},
                "kl_from_dropout": 0.05 * (1 + abs(math.log(k))) * float(np.exp(rng.normal(scale=0.1))),
                "train_nll": 0.02 * k,
                "regularizer": reg,
                "strength": k,
            }
    return {"status": "ok", "part": "objectives", "seed": seed, "tag": tag, "objectives": objs}


def _wager(dataset: str, seed: int) -> dict:
    rows = [{"p": p, "gap": 2 * p, "quadratic": p, "ratio": 0.5 + 0.01 * seed} for p in (0.1, 0.3)]
    return {"status": "ok", "part": "wager", "seed": seed, "dataset": dataset, "num_classes": 3, "rows": rows}


def _c3_records() -> list:
    """One synthetic record per unit of CONFIG (two settings x seeds, and the Wager units), with its key."""
    make = {"grad": lambda u: _grad(u["tag"], u["seed"]), "objectives": lambda u: _objectives(u["tag"], u["seed"])}
    make["wager"] = lambda u: _wager(u["dataset"], u["seed"])
    return [dict(make[u["part"]](u), key=u["key"]) for u in c3.units(CONFIG)]


def test_c3_writes_one_gradient_and_one_objectives_figure_per_setting(tmp_path):
    cfg, recs = CONFIG, _c3_records()
    assert {r["tag"] for r in recs if "tag" in r} == set(TAGS)
    paths = c3.figures(cfg, recs, tmp_path)
    expected = {f"{figure_stem(kind, tag)}.png" for kind in ("gradients", "objectives") for tag in TAGS} | {"c3_wager.png"}
    assert {p.name for p in paths} == expected == {p.name for p in tmp_path.glob("*.png")}
    assert all(p.read_bytes()[:8] == PNG for p in paths)
    captions = c3.summarize(cfg, recs)["figure_captions"]
    assert set(captions) == {p.stem for p in paths}
    for tag in TAGS:  # each caption names its setting, and C3b's names the noise floor
        assert tag in captions[figure_stem("gradients", tag)]
        assert tag in captions[figure_stem("objectives", tag)] and "noise floor" in captions[figure_stem("objectives", tag)]


def test_c3_gap_table_and_rules_are_per_setting():
    s = c3.summarize(CONFIG, _c3_records())
    gap = next(t for t in s["tables"] if t["title"].startswith("Measured dropout gap"))
    assert {r["setting"] for r in gap["rows"]} == set(TAGS)
    assert "0.9" in s["rule"] and "KL" not in s["rule"]  # C3a's rule beside C3a's verdict
    assert "KL" in s["rule_b"] and "L2" in s["rule_b"]  # C3b's rule beside C3b's verdict
    assert "C3a" in s["what_would_change"] and "C3b" in s["what_would_change"]


def test_figure_stem_rejects_an_unknown_kind_and_cleans_the_tag():
    assert figure_stem("objectives", "a/b c") == "c3_objectives_a_b_c"
    with pytest.raises(ValueError, match="kind"):
        figure_stem("gap", "x")


def _c2_records() -> list:
    rng = np.random.default_rng(0)
    recs = []
    for setting in ("tanh-w6-d2", "fashion_mnist-tanh-w6-d2"):
        for seed in range(3):
            for k in (0.5, 1.0, 2.0):
                c = 0.01 * k * float(np.exp(rng.normal(scale=0.1)))
                v = float(rng.normal())
                recs.append(
                    {
                        "status": "ok",
                        "setting": setting,
                        "seed": seed,
                        "group": f"{setting}/seed={seed}",
                        "init_scale": k,
                        "gain": v,
                        "gain_last_epoch": v,
                        "gap": {"per_rate": v},
                        "terms": {"share_bernoulli": v},
                        "curvature": {"mask_normal_curvature": c},
                    }
                )
    return recs


def test_c2_writes_one_figure_per_setting_with_its_caption(tmp_path):
    cfg = RunConfig.from_preset("test")
    recs = _c2_records()
    paths = c2.figures(cfg, recs, tmp_path)
    assert sorted(p.name for p in paths) == ["c2_fashion_mnist-tanh-w6-d2.png", "c2_tanh-w6-d2.png"]
    assert all(p.read_bytes()[:8] == PNG for p in paths)
    captions = c2.summarize(cfg, recs)["figure_captions"]
    assert set(captions) == {p.stem for p in paths} and "fashion_mnist-tanh-w6-d2" in captions["c2_fashion_mnist-tanh-w6-d2"]


def test_report_shows_every_per_setting_figure_and_each_rule_beside_its_verdict(tmp_path):
    """A run directory with two C3 settings, rendered without recomputing: the figures, captions and both rules."""
    from dropgeom.pipeline import render_run
    from dropgeom.rundir import RunDir

    rd = RunDir(tmp_path)
    rd.init(CONFIG)
    for r in _c3_records():
        rd.save_unit("C3", r["key"], r)
    text = render_run(tmp_path).read_text()
    for tag in TAGS:
        assert f"figures/{figure_stem('objectives', tag)}.png" in text and f"figures/{figure_stem('gradients', tag)}.png" in text
    c3b_line = next(line for line in text.splitlines() if line.startswith("**Verdict (C3b"))
    assert "Rule: each regularizer's strength chosen per seed on the setting's other seeds" in c3b_line
    summary = json.loads((tmp_path / "summary.json").read_text())["C3"]
    assert summary["rule"] == c3.RULE_A and summary["rule_b"] == c3.RULE_B
