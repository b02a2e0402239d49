"""C2's within-setting analysis: the acceptance test (a between-setting correlation alone is 'no effect')."""

from __future__ import annotations

import numpy as np
import pytest

from dropgeom.config import RunConfig
from dropgeom.experiments import c2_curvature_strength as c2
from dropgeom.experiments.c2_analysis import rounding_zero, within_setting_analysis


def _blocks(within: float, between: float, seed: int = 0, groups: int = 8, per: int = 5, spread: float = 1.0, step: float = 2.0):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(groups), per)
    logc = step * g + spread * rng.normal(size=g.size)  # curvature differs strongly between settings
    y = between * g + within * (logc - step * g) + rng.normal(scale=0.3, size=g.size)
    return np.exp(logc), y, g


def test_between_setting_correlation_alone_is_no_effect():
    curv, y, g = _blocks(within=0.0, between=-1.0)
    a = within_setting_analysis(curv, y, g, expected_sign=-1)
    assert a["pooled_spearman"] < -0.8 and a["pooled_spearman_p"] < 1e-6  # the pooled correlation is strong ...
    assert a["label"] == "no effect"  # ... but nothing happens within settings
    assert a["p_value"] > 0.05


@pytest.mark.parametrize(
    "within,expected,label", [(-1.0, -1, "predicted sign"), (-1.0, 1, "opposite sign"), (1.0, 1, "predicted sign")]
)
def test_within_setting_effect_is_found_with_its_sign(within, expected, label):
    curv, y, g = _blocks(within=within, between=0.0)
    a = within_setting_analysis(curv, y, g, expected_sign=expected)
    assert a["label"] == label
    assert np.sign(a["slope"]) == np.sign(within) and a["slope_lo"] < within < a["slope_hi"]


def test_rounding_level_curvature_is_zero_and_off_the_log_scale():
    assert rounding_zero([1e-300, 2.0, 3e-12], reference=2.0) == [0.0, 2.0, 0.0]
    curv, y, g = _blocks(within=0.0, between=0.0)
    curv[:3] = 0.0
    a = within_setting_analysis(curv, y, g, expected_sign=-1)
    assert a["zeros"] == 3 and a["n"] == curv.size - 3
    with pytest.raises(ValueError, match="expected_sign"):
        within_setting_analysis(curv, y, g, expected_sign=0)


def _records(within: float, between: float, knob_moves: bool = True, groups: int = 6, per: int = 4, spread: float = 1.0):
    # between-block steps shrink with many blocks, so that no block's curvature is at rounding level against the largest
    curv, y, g = _blocks(within=within, between=between, groups=groups, per=per, spread=spread, step=min(2.0, 12.0 / groups))
    # the knob: the rank of the curvature within its block (it moves the curvature), or unrelated to it
    scales = [
        float(sum(curv[j] < curv[i] for j in range(len(g)) if g[j] == g[i]) + 1) if knob_moves else float((i * 3) % 4 + 1)
        for i in range(len(g))
    ]
    if not knob_moves:  # make the knob's order unrelated to curvature within every block
        scales = [
            float(1 + (k + int(g[i])) % per) if k % 2 else float(per - (k + int(g[i])) % per) for i, k in enumerate(range(len(g)))
        ]
    recs = []
    for i, (c, v, s) in enumerate(zip(curv, y, g)):
        recs.append(
            {
                "status": "ok",
                "setting": "tanh-w6-d2",
                "activation": "tanh",
                "width": 6,
                "depth": 2,
                "seed": int(s),
                "group": f"tanh-w6-d2/seed={int(s)}",
                "init_scale": scales[i],
                "gain": float(v),
                "gain_last_epoch": float(v),
                "gap": {"per_rate": float(v), "value": 0.1, "stderr": 0.0},
                "terms": {"share_bernoulli": float(v), "ratio_bernoulli": 0.0},
                "curvature": {"mask_normal_curvature": float(c)},
            }
        )
    return recs


#: enough blocks and runs for the 95% interval of a null within-block correlation to fall inside +-0.3
_MANY = dict(groups=30, per=5)


@pytest.mark.parametrize(
    "within,between,verdict", [(0.0, -1.0, "not supported"), (-1.0, 0.0, "supported"), (1.0, 0.0, "refuted")]
)
def test_c2_verdict_rests_on_the_within_setting_test(within, between, verdict):
    s = c2.summarize(RunConfig.from_preset("test"), _records(within, between, **_MANY))
    assert s["verdict"].verdict == verdict
    assert "negative" in s["rule"].lower() and s["what_would_change"] and s["caveats"]
    assert any("description" in line for line in s["evidence"])


def test_c2_not_supported_needs_the_interval_inside_the_smallest_effect_of_interest():
    """Rule change C (2026-12-05): 'not supported' asserted an absence from a non-significant test over >= 20 runs in
    >= 4 blocks; now the share's 95% interval (bootstrap over blocks) must lie inside (-0.3, 0.3), over >= 8 blocks."""
    few = c2.summarize(RunConfig.from_preset("test"), _records(0.0, -1.0, groups=8, per=4))  # 32 runs: a wide interval
    assert few["verdict"].verdict == "inconclusive"
    lo, hi = few["tests"]["share_lo"], few["tests"]["share_hi"]
    assert lo <= -0.3 or hi >= 0.3
    assert f"[{c2.fmt(lo)}, {c2.fmt(hi)}] (95% bootstrap over 8 blocks" in few["verdict"].evidence
    many = c2.summarize(RunConfig.from_preset("test"), _records(0.0, -1.0, **_MANY))
    assert many["verdict"].verdict == "not supported" and -0.3 < many["tests"]["share_lo"] < many["tests"]["share_hi"] < 0.3
    six = c2.summarize(RunConfig.from_preset("test"), _records(0.0, -1.0))  # 6 blocks: no interval, never 'not supported'
    assert six["verdict"].verdict == "inconclusive" and "no interval: 6 blocks" in six["verdict"].evidence
    for text in (c2.RULE, c2.ABOUT):
        assert "4 settings" not in text and "8 setting-seed blocks" in text and "0.3" in text and "not all finished runs" in text


def test_c2_counts_the_runs_in_the_test_not_every_finished_run():
    recs = _records(0.0, -1.0, groups=8, per=4)
    for r in recs[:6]:
        r["curvature"] = {"mask_normal_curvature": 0.0}  # rounding level: off the log scale, out of the test
    s = c2.summarize(RunConfig.from_preset("test"), recs)
    assert "26 runs in the test" in s["verdict"].evidence and s["tests"]["share_runs"] == 26


def test_c2_manipulation_check_is_per_setting_and_does_not_cancel():
    """Rule change C (2026-12-05): the full run's knob lowered tanh's curvature and raised softplus's; pooled, as many
    blocks each way read 'did not move'. Per setting (Holm) it moved in both, and the verdict can use the blocks."""
    recs = _records(0.0, -1.0, groups=20, per=5)
    up = [dict(r, setting="softplus-w6-d2", group=f"softplus-w6-d2/seed={r['seed']}") for r in recs]
    down = [dict(r, init_scale=6.0 - r["init_scale"]) for r in recs]
    s = c2.summarize(RunConfig.from_preset("test"), up + down)
    assert "moved significantly in 2 of 2 (down with the scale in 1, up in 1)" in s["evidence"][0]
    assert s["tests"]["knob_moved"] and s["verdict"].verdict == "not supported"
    assert "cancel" in s["evidence"][1]  # the pooled correlation stays, as a description


def test_c2_knob_must_span_a_factor_of_two_in_curvature():
    """Rule change C (2026-12-05): a knob that moves curvature significantly but by less than a factor of 2 between the
    initial scales (the full run's moved it by at most 1.54) is not a manipulation 'not supported' can rest on."""
    s = c2.summarize(RunConfig.from_preset("test"), _records(0.0, -1.0, spread=0.1, **_MANY))
    assert s["verdict"].verdict == "inconclusive" and not s["tests"]["knob_moved"]
    assert (
        "did NOT move the curvature enough" in s["evidence"][0] and "(the rule needs >= 2 in every setting)" in s["evidence"][0]
    )


def test_c2_without_a_manipulation_effect_is_inconclusive_not_negative():
    s = c2.summarize(RunConfig.from_preset("test"), _records(0.0, -1.0, knob_moves=False))
    assert s["tests"]["knob_p"] > 0.05
    assert s["verdict"].verdict == "inconclusive"
    assert any("did NOT move" in line for line in s["evidence"])


def test_c2_units_vary_the_initial_scale_within_one_architecture():
    cfg = RunConfig.from_preset("test")
    us = c2.units(cfg)
    assert {u["init_scale"] for u in us} == set(cfg.c2_init_scales)
    assert len({u["setting"] for u in us}) == 1


def test_c2_on_a_second_data_set_names_it_in_the_setting():
    cfg = RunConfig.from_preset("test", c2_datasets=["digits", "iris"])
    us = c2.units(cfg)
    assert {u["setting"] for u in us} == {"tanh-w6-d2", "iris-tanh-w6-d2"}  # the default data set keeps its keys
    full = RunConfig.from_preset("full")
    assert {u.get("dataset", full.dataset) for u in c2.units(full)} == {"digits", "fashion_mnist"}


def test_c2_missing_fashion_mnist_fails_at_once(tmp_path, monkeypatch):
    import dropgeom.data as data_mod
    from dropgeom.config import ConfigError
    from dropgeom.pipeline import reproduce

    monkeypatch.setattr(data_mod, "FASHION_MNIST_DIR", str(tmp_path / "absent"))
    cfg = RunConfig.from_preset("test", experiments=["C2"], c2_datasets=["fashion_mnist"])
    with pytest.raises(ConfigError, match="apt-get install -y dataset-fashion-mnist"):
        reproduce(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "units").exists()


def test_c2_data_on_fashion_mnist_in_the_full_preset():
    import os

    if not os.path.isdir("/usr/share/datasets/fashion-mnist"):
        pytest.skip("Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist)")
    cfg = RunConfig.from_preset("full")
    data = c2.c2_data(cfg, "fashion_mnist", seed=0)
    assert data.x_train.shape == (cfg.c2_train_size, cfg.input_dim)
    assert data.x_curv.shape[0] * (data.num_outputs - 1) > 10 * 16 + 16 + 16 * 16 + 16  # n(K-1) > the parameters around the mask
