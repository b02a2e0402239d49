"""Run config validation, run directory (atomic writes, resume), statistics and verdict logic."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from scipy import stats

from dropgeom.config import ConfigError, RunConfig
from dropgeom.experiments import c1_flatness, c3_fisher_regularizer
from dropgeom.pipeline import reproduce
from dropgeom.experiments.common import build_mlp, mean_ci, spearman
from dropgeom.rundir import RunDir, RunDirError, atomic_write_text


# --------------------------------------------------------------------------- config
def test_config_lists_every_problem_in_one_error():
    bad = {
        "seeds": 0,
        "c1_p_grid": [0.0, 1.0],
        "c2_activations": ["tanh", "sigmoid"],
        "lr": -1,
        "curvature_method": "magic",
        "c3_objectives": ["none", "l2"],
        "frobnicate": 3,
        "c2_widths": 8,
    }
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict(bad)
    problems = info.value.problems
    text = str(info.value)
    for needle in ("seeds", "1.0", "sigmoid", "lr", "magic", "must include 'dropout'", "frobnicate", "c2_widths"):
        assert needle in text, needle
    assert len(problems) == 8
    assert f"{len(problems)} problem(s)" in text


def test_config_roundtrip_and_presets():
    for name in ("full", "quick", "test"):
        cfg = RunConfig.from_preset(name)
        assert RunConfig.from_json(cfg.to_json()) == cfg
    assert RunConfig.from_preset("quick", seeds=7).seeds == 7
    with pytest.raises(ConfigError, match="unknown preset"):
        RunConfig.from_preset("huge")
    with pytest.raises(ConfigError, match="not valid JSON"):
        RunConfig.from_json("{")


# --------------------------------------------------------------------------- run directory
def test_atomic_write_keeps_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    atomic_write_text(path, "old")

    def boom(src, dst):
        raise KeyboardInterrupt  # killed between writing the temporary file and the rename

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(path, "new" * 1000)
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # no temporary file left behind


def test_rundir_refuses_a_different_config(tmp_path):
    rd = RunDir(tmp_path)
    cfg = RunConfig.from_preset("test")
    rd.init(cfg)
    assert rd.init(cfg) == cfg  # same config: resume
    with pytest.raises(RunDirError, match="already holds a run of another config [(]it differs in seeds[)]") as info:
        rd.init(cfg.replace(seeds=3))
    assert "invalid configuration" not in str(info.value)


def test_rundir_adds_up_the_claims_run_into_it(tmp_path):
    """The claims (--only) are not part of a run's identity: the stored config lists every claim run in the folder."""
    rd = RunDir(tmp_path)
    cfg = RunConfig.from_preset("test")
    assert rd.init(cfg.replace(experiments=["C3"])).experiments == ("C3",)
    assert rd.init(cfg.replace(experiments=["C1"])).experiments == ("C1", "C3")
    assert rd.load_config().experiments == ("C1", "C3")
    assert rd.init(cfg.replace(experiments=["C3"])).experiments == ("C1", "C3")  # a subset changes nothing
    assert rd.init(cfg.replace(experiments=["C2", "C3"])) == cfg
    with pytest.raises(RunDirError, match="differs in seeds"):
        rd.init(cfg.replace(experiments=["C1"], seeds=3))


def _c3_config() -> RunConfig:
    return RunConfig.from_preset("test", experiments=["C3"], c3_objectives=["none", "dropout"], epochs=2)


def test_resume_after_kill_skips_finished_units(tmp_path):
    cfg = _c3_config()
    keys = [u["key"] for u in c3_fisher_regularizer.units(cfg)]
    computed = []

    def killer(key):
        if len(computed) == 2:
            raise KeyboardInterrupt  # simulated Ctrl-C / kill before the third unit
        computed.append(key)

    with pytest.raises(KeyboardInterrupt):
        reproduce(cfg, tmp_path, progress=False, on_compute=killer)
    rd = RunDir(tmp_path)
    done = [k for k in keys if rd.is_done("C3", k)]
    assert done == computed == keys[:2]
    mtimes = {k: rd.unit_path("C3", k).stat().st_mtime_ns for k in done}

    again = []
    report = reproduce(cfg, tmp_path, progress=False, on_compute=again.append)
    assert again == keys[2:]  # finished units are not recomputed
    assert {k: rd.unit_path("C3", k).stat().st_mtime_ns for k in done} == mtimes
    assert all(rd.is_done("C3", k) for k in keys)
    lines = (tmp_path / "metrics" / "C3.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["key"] for x in lines) == sorted(keys)
    assert report.exists()
    # a third run computes nothing
    third = []
    reproduce(cfg, tmp_path, progress=False, on_compute=third.append, render=False)
    assert third == []


def test_diverged_and_failing_units_are_recorded_not_fatal(tmp_path, monkeypatch):
    cfg = _c3_config().replace(divergence_threshold=1e-6)  # every training 'diverges' at once
    report = reproduce(cfg, tmp_path, progress=False)
    rd = RunDir(tmp_path)
    statuses = {r["key"]: r["status"] for r in rd.records("C3")}
    assert set(statuses.values()) == {"diverged"}
    text = report.read_text()
    assert "## Diverged and failed runs" in text
    for key in statuses:
        assert f"| C3 | {key} | diverged |" in text

    # an exception inside a unit: recorded as 'error', shown, and retried on the next run
    cfg2 = _c3_config()
    calls = []
    original = c3_fisher_regularizer.run_unit

    def flaky(config, unit, workdir=None):
        calls.append(unit["key"])
        if unit["key"] == "wager/iris/seed=1" and calls.count("wager/iris/seed=1") == 1:
            raise RuntimeError("simulated failure")
        return original(config, unit, workdir)

    monkeypatch.setattr(c3_fisher_regularizer, "run_unit", flaky)
    out = tmp_path / "second"
    report = reproduce(cfg2, out, progress=False)
    assert "RuntimeError: simulated failure" in report.read_text()
    assert RunDir(out).load_unit("C3", "wager/iris/seed=1")["status"] == "error"
    before = len(calls)
    reproduce(cfg2, out, progress=False)
    assert calls[before:] == ["wager/iris/seed=1"]
    assert RunDir(out).load_unit("C3", "wager/iris/seed=1")["status"] == "ok"


# --------------------------------------------------------------------------- statistics
def test_mean_ci_matches_the_t_interval():
    rng = np.random.default_rng(0)
    xs = rng.normal(size=7)
    m, lo, hi = mean_ci(list(xs) + [float("nan")])  # NaN is dropped
    half = stats.t.ppf(0.975, 6) * xs.std(ddof=1) / math.sqrt(7)
    assert m == pytest.approx(xs.mean()) and lo == pytest.approx(xs.mean() - half) and hi == pytest.approx(xs.mean() + half)
    assert math.isinf(mean_ci([1.0])[2]) and math.isnan(mean_ci([])[0])


def test_spearman_of_monotone_data():
    rho, p = spearman([1, 2, 3, 4, 5], [2, 4, 8, 16, 32])
    assert rho == pytest.approx(1.0) and p < 0.05
    assert math.isnan(spearman([1, 2], [1, 2])[0])


def test_build_mlp_is_seeded():
    a = build_mlp(4, 3, 5, 2, "relu", 0.1, seed=3)
    b = build_mlp(4, 3, 5, 2, "relu", 0.1, seed=3)
    assert all(bool((x == y).all()) for x, y in zip(a.parameters(), b.parameters()))
    with pytest.raises(ValueError, match="unknown activation"):
        build_mlp(4, 3, 5, 2, "sigmoid")


# --------------------------------------------------------------------------- verdicts on synthetic records
_C1_KEYS = (
    "mask_e",
    "mask_m",
    "natural_gradient_fs_e",
    "noise_e",
    "gamma2",
    "natural_gradient_e",
    "fisher_trace",
    "fisher_top",
    "hessian_trace",
    "hessian_top",
    "sam",
)


def _c1_measures(scale: float, s: int, flip: bool = False) -> dict:
    out = {}
    for st in ("train", "test"):
        out[st] = {
            k: 0.1 * (1 + i) * scale ** (-1 if flip and k == "mask_m" else 1) * math.exp(0.02 * ((s * 7 + i) % 5))
            for i, k in enumerate(_C1_KEYS)
        }
        out[st].update(param_norm=5.0, num_params=100, seconds=0.1)
    return out


def _c1_records(trend: float, seeds: int = 6, flip: bool = False):
    """Dropout at p is exp(trend p) times its matched plain control; the mixture about half as curved."""
    recs = []
    for s in range(seeds):
        for p in (0.0, 0.3, 0.6):
            r = {
                "status": "ok",
                "p": p,
                "seed": s,
                "train": {"nll": 0.1 + p},
                "test": {"nll": 0.3},
                "measures": _c1_measures(math.exp(trend * p), s, flip),
            }
            if p > 0:
                r["matched"] = {
                    "matched": True,
                    "log_nll_gap": 0.01,
                    "steps": 9,
                    "train": {"nll": 0.1 + p},
                    "measures": _c1_measures(1.0, s + 1),
                }
                r["l2"] = {"matched": True, "log_nll_gap": 0.01, "weight": 0.01, "fits": 3, "measures": _c1_measures(1.0, s + 2)}
                # a little seed-to-seed spread: identical ratios have no t-test (stats.paired gives no p-value)
                r["mixture"] = _c1_measures(0.5 * math.exp(trend * p) * (1 + 0.02 * (s % 3 - 1)), s, flip)
                if p == 0.6:
                    r["noise_floor"] = {"measures": _c1_measures(math.exp(trend * p), s + 3, flip)}
            recs.append(r)
    return recs


@pytest.mark.parametrize(
    "trend, flip, verdict",
    [(-2.0, False, "supported"), (2.0, False, "refuted"), (2.0, True, "measure-dependent"), (0.0, False, "inconclusive")],
)
def test_c1_verdicts(trend, flip, verdict):
    cfg = RunConfig.from_preset("test")
    s = c1_flatness.summarize(cfg, _c1_records(trend, flip=flip))
    assert s["verdict"].verdict == verdict
    assert s["rule"] and s["what_would_change"] and s["caveats"]
    assert {t["title"].split(":")[0] for t in s["tables"]} >= {"C1 (a)", "C1 (b)", "C1 noise floor"}
    if trend:
        t = s["tests"]["mask_e|test|p=0.6"]
        assert t["p_adjusted"] >= t["p_value"] and t["n"] == 6


def test_c1_a_measure_significant_both_ways_over_p_is_neither_lower_nor_higher():
    # the rule: lower (higher) when some p is significantly below (above) 1 and none the other way;
    # measure-dependent only when some measures are lower and others higher
    from dropgeom.experiments.c1_summary import _label

    assert _label({("mask_e", "train"): 2, ("mask_e", "test"): 0}) == "inconclusive"
    assert _label({("mask_e", "train"): 2, ("mask_m", "train"): -1}) == "inconclusive"
    assert _label({("mask_e", "train"): 2, ("mask_m", "train"): -1, ("noise_e", "train"): 1}) == "measure-dependent"
    assert _label({("mask_e", "train"): -1, ("mask_m", "train"): -1}) == "supported"
    assert _label({}) == "inconclusive"
    s = c1_flatness.summarize(RunConfig.from_preset("test"), _c1_records(2.0, flip=True))
    assert "keeps the label measure-dependent" not in s["what_would_change"]


def test_c1_one_missing_value_drops_a_pair_never_a_deciding_measure():
    # the deciding measures are fixed before the data; a NaN in one p = 0 run (in none of the rule's comparisons)
    # took mask_m out of the verdict and turned measure-dependent into refuted
    recs = _c1_records(2.0, flip=True)
    next(r for r in recs if r["p"] == 0.0)["measures"]["train"]["mask_m"] = float("nan")
    next(r for r in recs if r["p"] == 0.6)["mixture"]["test"]["noise_e"] = float("nan")
    s = c1_flatness.summarize(RunConfig.from_preset("test"), recs)
    assert s["verdict"].verdict == "measure-dependent"
    assert {k.split("|")[0] for k in s["tests"]} == {"mask_e", "mask_m", "natural_gradient_fs_e", "noise_e", "gamma2"}
    assert s["tests"]["mask_m|train|p=0.6"]["n"] == 6
    assert s["reading_b"]["tests"]["noise_e|test|p=0.6"]["n"] == 5  # the pair is dropped, the measure kept
    inv = {r["measure"]: r["decides the verdict"] for r in s["tables"][-1]["rows"]}
    assert inv["m-curvature along the mask directions"] == "yes"


def test_c1_reading_b_and_descriptions():
    s = c1_flatness.summarize(RunConfig.from_preset("test"), _c1_records(0.0))
    assert s["reading_b"]["label"] == "supported"  # the mixture is half as curved on every measure
    assert s["reading_b"]["tests"]["noise_e|train|p=0.3"]["estimate"] == pytest.approx(-math.log(2.0), abs=1e-3)
    # coordinate-dependent measures never decide, they are described
    assert {k.split("|")[0] for k in s["tests"]} == {"mask_e", "mask_m", "natural_gradient_fs_e", "noise_e", "gamma2"}
    assert "fisher_trace|test|p=0.6" in s["matched_tests"] and "natural_gradient_e|test|p=0.6" in s["matched_tests"]
    inv = {r["measure"]: r["decides the verdict"] for r in s["tables"][-1]["rows"]}
    assert inv["SAM sharpness"] == "no" and inv["e-curvature along the mask directions"] == "yes"
    text = "\n".join(s["evidence"])
    assert "noise floor" in text and "matching:" in text and "L2 control tuned per p and seed" in text


def test_c1_verdict_line_says_how_the_l2_control_compares():
    """E (2026-12-05): the verdict rests on the plain control at matched fit; the full run's dropout was more curved than
    L2 at the same fit along the mask directions from p=0.5, which the verdict line did not say. The rule is unchanged;
    the line says it (a description, Holm over the same family)."""
    recs = _c1_records(-2.0)
    for r in recs:
        if "l2" in r:
            r["l2"]["measures"] = _c1_measures(0.1, r["seed"] + 2)  # L2 ten times flatter than dropout
    s = c1_flatness.summarize(RunConfig.from_preset("test"), recs)
    assert s["verdict"].verdict == "supported"  # the rule uses the plain control only
    assert (
        "against the L2 control at the same fit (a description, Holm over the same family): flatter in 0, more curved in 10 of 10"
        in s["verdict"].evidence
    )
    assert "e-curvature along the mask directions on training inputs from p=0.3" in s["verdict"].evidence


def test_c1_table_says_which_p_values_are_holm_adjusted():
    s = c1_flatness.summarize(RunConfig.from_preset("test"), _c1_records(-2.0))
    main = s["tables"][0]
    col = next(c for c in main["columns"] if c.startswith("dropout / plain at matched fit"))
    sam = next(
        r for r in main["rows"] if r["measure"] == "SAM sharpness" and r["inputs"] == "training inputs" and r["p"] == "0.6"
    )
    assert sam[col].endswith("(description)")
    raw = s["matched_tests"]["sam|train|p=0.6"]["p_value"]
    assert f"p={raw:.2g}" in sam[col]  # the description's p is the uncorrected one, and the header must say so
    assert "uncorrected" in col and "uncorrected" in main["title"]


def test_c1_unmatched_controls_are_left_out():
    recs = _c1_records(-2.0)
    for r in recs:
        if r["p"] > 0 and r["seed"] < 5:
            r["matched"]["matched"] = False
    s = c1_flatness.summarize(RunConfig.from_preset("test"), recs)
    assert s["verdict"].verdict == "inconclusive"  # one matched pair per p: no interval
    assert "2 of 12 plain controls" in s["verdict"].evidence


def test_c1_single_seed_is_inconclusive():
    s = c1_flatness.summarize(RunConfig.from_preset("test"), [r for r in _c1_records(-2.0) if r["seed"] == 0])
    assert s["verdict"].verdict == "inconclusive"


# C2: tests/test_experiments_c2.py


# C3: tests/test_experiments_c3.py


def test_fit_stops_at_the_step_closest_to_the_target_train_nll():
    from dropgeom.experiments.common import evaluate_model, fit, prepare_data

    cfg = RunConfig.from_preset("test", epochs=20)
    data = prepare_data(cfg, 0)
    net = build_mlp(data.num_features, data.num_outputs, cfg.width, cfg.depth, cfg.activation, 0.0, 0)
    target = 1.2
    tr = fit(net, data, "none", cfg, 0, 0.0, None, stop_at_train_nll=target, match_every=1)
    nll = evaluate_model(net, data.x_train, data.y_train, data.family)["nll"]
    assert nll == pytest.approx(tr["matched_nll"], rel=1e-12)  # the kept parameters are the model's
    assert abs(math.log(nll / target)) < 0.05 and tr["steps"] >= 1
    # an epoch-granular stop (the old behaviour) overshoots further than the step-granular one
    net2 = build_mlp(data.num_features, data.num_outputs, cfg.width, cfg.depth, cfg.activation, 0.0, 0)
    fit(net2, data, "none", cfg, 0, 0.0, None, stop_at_train_nll=target)
    assert abs(math.log(nll / target)) <= abs(
        math.log(evaluate_model(net2, data.x_train, data.y_train, data.family)["nll"] / target)
    )


def test_c1_config_fields_are_validated():
    with pytest.raises(ConfigError) as err:
        RunConfig.from_preset("test", c1_match_tol=0.0, c1_sam_rho=-1.0, c1_l2=0.0, c1_inputs=3)
    text = str(err.value)
    for name in ("c1_match_tol", "c1_sam_rho", "c1_l2", "c1_inputs"):
        assert name in text


def test_c1_l2_weight_search_brackets_then_interpolates():
    from dropgeom.experiments.c1_flatness import _next_weight

    cfg = RunConfig.from_preset("test")
    assert _next_weight([(1e-2, 0.5)], cfg) == pytest.approx(1e-3)  # final NLL above the target: weaker L2
    assert _next_weight([(1e-2, -0.5)], cfg) == pytest.approx(1e-1)  # below: stronger L2
    assert _next_weight([(1e-3, -1.0), (1e-2, 1.0)], cfg) == pytest.approx(10**-2.5)  # regula falsi in log weight
    assert _next_weight([(1e-3, -1.0), (1e-2, 0.01)], cfg) == pytest.approx(10**-2.1)  # clamped away from one end
    assert _next_weight([(1e-5, 0.5)], cfg) is None  # at the lower bound and still too strong: give up
