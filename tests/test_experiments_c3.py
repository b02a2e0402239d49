"""C3: the gradient comparison and the Wager-regime quantities against float64 brute force (tests/reference/c3.py)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pytest
import torch
from torch import nn

from dropgeom.dropout import terms
from dropgeom.experiments.c3_gradients import (
    compare_gradients,
    exact_regularizer_gradient,
    form_gradient,
    mc_regularizer_gradient,
)
from dropgeom.experiments.wager import glm_with_input_dropout, wager_curve, wager_gap, wager_quadratic
from tests.reference.c3 import glm_gap, glm_quadratic, mlp_regularizer_and_grad


def _net(seed: int = 0, h: int = 4):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, h), nn.Tanh(), nn.Dropout(0.3), nn.Linear(h, 3)).double()
    with torch.no_grad():
        net[0].weight.mul_(2.0)
    x = torch.randn(12, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    return net, x, y


def test_exact_gradient_matches_brute_force_enumeration():
    net, x, y = _net()
    value, grad = exact_regularizer_gradient(net, x, y, p=0.3)
    ref_value, ref_grads = mlp_regularizer_and_grad(net[0].weight, net[0].bias, net[3].weight, net[3].bias, x, y, 0.3)
    assert value == pytest.approx(ref_value, rel=1e-12, abs=1e-14)
    torch.testing.assert_close(grad, torch.cat([g.reshape(-1) for g in ref_grads]), rtol=1e-10, atol=1e-13)


def test_mc_gradient_is_unbiased_within_its_standard_error():
    net, x, y = _net(1)
    _, exact = exact_regularizer_gradient(net, x, y, p=0.3)
    mc = mc_regularizer_gradient(net, x, y, p=0.3, n_samples=4000, groups=20, generator=torch.Generator().manual_seed(0))
    z = (mc["grad"] - exact) / mc["grad_se"].clamp_min(1e-12)
    assert float(z.abs().max()) < 5.0  # 35 coordinates, 5 standard errors
    assert float((z.abs() < 2).double().mean()) > 0.7
    cos = float(mc["grad"] @ exact / (mc["grad"].norm() * exact.norm()))
    assert cos > 0.98


def test_form_gradients_against_terms_and_finite_differences():
    net, x, y = _net(2)
    t = terms(net, x, y)
    vq, gq = form_gradient(net, x, p=0.3, form="quadratic")
    vd, gd = form_gradient(net, x, p=0.3, form="divergence")
    assert vq == pytest.approx(0.5 * 0.3 / 0.7 * t.fisher, rel=1e-10)
    assert vd == pytest.approx(0.3 * t.divergence, rel=1e-10)
    # directional finite difference of the quadratic form
    v = torch.randn(gq.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    theta = torch.nn.utils.parameters_to_vector(net.parameters()).detach()
    vals = []
    for s in (1e-5, -1e-5):
        torch.nn.utils.vector_to_parameters(theta + s * v, net.parameters())
        vals.append(form_gradient(net, x, p=0.3, form="quadratic")[0])
    torch.nn.utils.vector_to_parameters(theta, net.parameters())
    assert (vals[0] - vals[1]) / 2e-5 == pytest.approx(float(gq @ v), rel=1e-6)


def test_compare_gradients_exact_and_mc_agree():
    net, x, y = _net(4)
    ex = compare_gradients(net, x, y, p=0.3, method="exact")
    mc = compare_gradients(net, x, y, p=0.3, method="mc", n_samples=2000, groups=20, generator=torch.Generator().manual_seed(1))
    for key in ("cos_quadratic", "cos_divergence"):
        assert abs(mc[key] - ex[key]) < 5 * mc[f"{key}_se"] + 0.02
        assert ex[f"{key}_se"] == 0.0 and mc[f"{key}_se"] > 0
    assert abs(mc["value_R"] - ex["value_R"]) < 5 * mc["value_R_se"]
    assert ex["ratio_quadratic"] == pytest.approx(ex["value_quadratic"] / ex["value_R"])
    with pytest.raises(ValueError, match="method"):
        compare_gradients(net, x, y, p=0.3, method="magic")
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\)"):
        compare_gradients(net, x, y, p=1.5, method="exact")


def test_glm_dropout_gradient_matches_quadratic_form_for_small_weights():
    # Wager's regime: a GLM with input dropout, where the Fisher form is the exact second-order term
    torch.manual_seed(5)
    glm = glm_with_input_dropout(4, 3, seed=5)
    with torch.no_grad():
        glm[1].weight.normal_(std=0.01)
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    c = compare_gradients(glm, x, y, p=0.2, method="exact")
    assert c["cos_quadratic"] > 0.999 and c["norm_quadratic"] == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize("k", [2, 3])
def test_wager_quantities_match_brute_force(k):
    torch.manual_seed(k)
    glm = glm_with_input_dropout(4, k, seed=k)
    with torch.no_grad():
        glm[1].weight.normal_()
        glm[1].bias.normal_()
    x, y = torch.randn(15, 4, dtype=torch.float64), torch.randint(0, k, (15,))
    W, b, xn, yn = (t.detach().numpy() for t in (glm[1].weight, glm[1].bias, x, y))
    for p in (0.05, 0.3):
        assert wager_quadratic(glm, x, p) == pytest.approx(glm_quadratic(W, b, xn, p), rel=1e-12)
        assert wager_gap(glm, x, y, p)["value"] == pytest.approx(glm_gap(W, b, xn, yn, p), rel=1e-10)
    # the penalty of dropgeom.dropout is the same quadratic form
    assert form_gradient(glm, x, p=0.3)[0] == pytest.approx(glm_quadratic(W, b, xn, 0.3), rel=1e-10)
    # exact to second order in the per-feature change of eta: the ratio tends to 1 as the weights shrink
    # (not as p -> 0: a dropped input is a jump, theory.md 4.2)
    errs = []
    for scale in (1.0, 0.1, 0.01):
        with torch.no_grad():
            glm[1].weight.copy_(torch.as_tensor(W) * scale)
        errs.append(abs(wager_curve(glm, x, y, [0.2])[0]["ratio"] - 1))
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-3


def test_wager_rejects_a_model_that_is_not_a_glm():
    net, x, y = _net()
    with pytest.raises(ValueError, match="GLM with input dropout"):
        wager_quadratic(net, x, 0.2)
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\)"):
        wager_quadratic(glm_with_input_dropout(3, 3), x, 0.0)


# --------------------------------------------------------------------------- C3 verdicts and bad input
from dropgeom.config import ConfigError, RunConfig  # noqa: E402
from dropgeom.experiments import c3_fisher_regularizer as c3  # noqa: E402
from dropgeom.experiments.regularizers import build_cnn, make_regularizer  # noqa: E402


def _grad_records(cos: float, ratio: float, datasets=("digits", "fashion_mnist")):
    recs = []
    for ds in datasets:
        for s in range(4):
            st = {
                k: {
                    "cos_quadratic": cos + 0.01 * s,
                    "ratio_quadratic": ratio * (1 + 0.01 * s),
                    "norm_quadratic": 1.0,
                    "cos_divergence": 0.5,
                    "ratio_divergence": 0.5,
                    "norm_divergence": 0.5,
                    "grad_rel_se": 0.01,
                }
                for k in c3.STAGES
            }
            recs.append({"status": "ok", "part": "grad", "seed": s, "dataset": ds, "tag": f"{ds}-mlp", "stages": st})
    return recs


@pytest.mark.parametrize(
    "cos,ratio,datasets,verdict",
    [
        (0.95, 1.0, ("digits", "fashion_mnist"), "supported"),
        (0.95, 1.0, ("digits",), "inconclusive"),
        (0.6, 1.0, ("digits", "fashion_mnist"), "not supported"),
        (0.95, 0.5, ("digits", "fashion_mnist"), "not supported"),
    ],
)
def test_c3a_rule(cos, ratio, datasets, verdict):
    s = c3.summarize(RunConfig.from_preset("test"), _grad_records(cos, ratio, datasets))
    assert s["verdict"].verdict == verdict
    assert "0.9" in s["rule"] and "[0.8, 1.25]" in s["rule"]
    if verdict == "not supported":
        assert "<" in s["verdict"].evidence or "outside" in s["verdict"].evidence  # names what did not hold


def _obj_records(fisher_kl: float, l2_kl: float):
    rng = np.random.default_rng(0)
    recs = []
    for s in range(6):
        noise = float(np.exp(rng.normal(scale=0.05)))
        # each regularizer its own seed-to-seed spread: with the same factor on both, every seed's log-ratio was the
        # same up to rounding, which paired() has no test for
        own = {"l2": 1.0, "fisher_quadratic": float(np.exp(rng.normal(scale=0.05)))}
        objs = {
            "dropout": {"test": {"nll": 1.0}, "kl_from_dropout": 0.0},
            "dropout_floor": {"test": {"nll": 1.0}, "kl_from_dropout": 0.01 * (1 + 0.1 * s)},
        }
        for reg, kl in (("l2", l2_kl), ("fisher_quadratic", fisher_kl)):
            for k in (0.5, 2.0):
                objs[f"{reg}@{k:g}"] = {
                    "test": {"nll": 1.0},
                    "kl_from_dropout": kl * noise * own[reg] * (1 + abs(math.log(k))),
                    "regularizer": reg,
                    "strength": k,
                }
        recs.append({"status": "ok", "part": "objectives", "seed": s, "objectives": objs})
    return recs


@pytest.mark.parametrize("fisher,l2,verdict", [(0.01, 0.1, "supported"), (0.1, 0.01, "refuted"), (0.05, 0.05, "inconclusive")])
def test_c3b_rule_compares_best_strengths(fisher, l2, verdict):
    cfg = RunConfig.from_preset("test", c3_regularizers=["l2", "fisher_quadratic"])
    s = c3.summarize(cfg, _obj_records(fisher, l2))
    assert s["verdict_b"].verdict == verdict
    assert any("noise floor" in line for line in s["evidence"])


def test_bad_regularizer_input_is_rejected():
    with pytest.raises(ValueError, match="unknown regularizer 'l3'"):
        make_regularizer("l3", 1.0, p=0.2, l2=1e-3)
    with pytest.raises(ValueError, match="log grid"):
        make_regularizer("l2", 0.0, p=0.2, l2=1e-3)
    with pytest.raises(ConfigError) as info:
        RunConfig.from_preset("test", c3_strengths=[1.0, -2.0, 0.0], c3_regularizers=["l2", "dropconnect"], c2_init_scales=[0])
    text = str(info.value)
    assert "c3_strengths: -2.0" in text and "c3_strengths: 0.0" in text and "'dropconnect'" in text and "c2_init_scales" in text


def test_wkm_noise_has_zero_mean_and_the_explicit_regularizer_without_it():
    from dropgeom.train.objectives import FisherDropout
    from dropgeom.train.wkm import WKMNoise

    net, x, y = _net(6)
    base = FisherDropout(p=0.3)(net, x, y).metrics["loss"]
    assert WKMNoise(p=0.3, noise_scale=0.0)(net, x, y).metrics["loss"] == pytest.approx(base, rel=1e-12)
    gen = torch.Generator().manual_seed(0)
    noise = [WKMNoise(p=0.3)(net, x, y, "categorical", gen).metrics["noise"] for _ in range(400)]
    assert abs(np.mean(noise)) < 4 * np.std(noise) / math.sqrt(len(noise))
    assert np.std(noise) > 0


def test_cnn_has_dropout_between_blocks_and_its_fisher_form_has_a_gradient():
    net = build_cnn(8, 1, 3, p=0.2, seed=0)
    names = [type(m).__name__ for m in net]
    assert names.count("Dropout") == 2 and names.index("Dropout") < names.index("Conv2d", 1)
    x, y = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (4,))
    v, g = form_gradient(net, x, p=0.2)
    assert v > 0 and torch.isfinite(g).all() and g.norm() > 0
    mc = mc_regularizer_gradient(net, x, y, p=0.2, n_samples=8, groups=2, generator=torch.Generator().manual_seed(0))
    assert mc["grad"].shape == g.shape


def test_c3_units_run_with_the_cnn_on_image_data():
    cfg = RunConfig.from_preset(
        "test", c3_architectures=["cnn"], epochs=1, c3_regularizers=["fisher_divergence"], curvature_inputs=20
    )
    units = {u["part"]: u for u in c3.units(cfg) if u.get("arch") == "cnn"}
    g = c3.run_unit(cfg, units["grad"])
    assert set(g["stages"]) == set(c3.STAGES) and all(-1 <= v["cos_quadratic"] <= 1 for v in g["stages"].values())
    o = c3.run_unit(cfg, units["objectives"])
    assert o["objectives"]["fisher_divergence@1"]["kl_from_dropout"] >= 0
    assert o["objectives"]["dropout"]["kl_from_dropout"] == 0.0


def test_missing_fashion_mnist_fails_at_once(tmp_path, monkeypatch):
    import dropgeom.data as data_mod
    from dropgeom.pipeline import reproduce

    monkeypatch.setattr(data_mod, "FASHION_MNIST_DIR", str(tmp_path / "absent"))
    cfg = RunConfig.from_preset("test", experiments=["C3"], c3_datasets=["fashion_mnist"])
    with pytest.raises(ConfigError, match="apt-get install -y dataset-fashion-mnist"):
        reproduce(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "units").exists()  # nothing was computed


# --------------------------------------------------------------------------- the full preset's plan
def test_full_preset_covers_every_architecture_size_and_optimizer_without_the_cross_product():
    from dropgeom.experiments.regularizers import c3_epochs

    cfg = RunConfig.from_preset("full")
    us = c3.units(cfg)
    grads = [u for u in us if u["part"] == "grad" and u["dataset"] == "fashion_mnist"]
    assert {u["arch"] for u in grads} == {"mlp", "cnn"}
    assert {u["size"] for u in grads} == {1000, 10000, 60000}
    assert {u["optimizer"] for u in grads} == {"adam", "sgd"}
    assert {u["size"] for u in grads if u["arch"] == "cnn"} == {1000, 10000, 60000}
    sweeps = {u["tag"] for u in us if u["part"] == "objectives"}
    assert sweeps == set(cfg.c3_sweep_settings) and len(sweeps) < len(cfg.c3_settings())
    assert {u["dataset"] for u in us if u["part"] == "grad"} == set(c3.RULE_DATASETS)  # C3a's rule needs both
    for part in ("grad", "objectives", "wager"):  # >= 10 seeds per setting
        assert (
            min(
                sum(1 for u in us if u["part"] == part and u.get("tag") == t)
                for t in {u.get("tag") for u in us if u["part"] == part}
            )
            >= 10
        )
    # the step budget: about as many optimizer steps at every size
    steps = [c3_epochs(cfg, n) * math.ceil(n / cfg.batch_size) for n in (1000, 10000, 60000)]
    assert max(steps) / min(steps) < 1.25


def test_setting_filters_must_name_settings_of_the_config():
    with pytest.raises(ConfigError) as info:
        RunConfig.from_preset(
            "test", c3_sweep_settings=["fashion_mnist-mlp-n1000-adam"], c3_grad_settings=["digits-cnn-n200-adam"], c3_max_steps=-1
        )
    text = str(info.value)
    assert "c3_sweep_settings: 'fashion_mnist-mlp-n1000-adam' is not a C3 setting" in text
    assert "c3_grad_settings: 'digits-cnn-n200-adam'" in text and "c3_max_steps" in text
    cfg = RunConfig.from_preset(
        "test",
        c3_architectures=["mlp", "cnn"],
        c3_grad_settings=["digits-cnn-n200-adam"],
        c3_sweep_settings=["digits-mlp-n200-adam"],
    )
    assert {(u["part"], u["arch"]) for u in c3.units(cfg) if u["part"] != "wager"} == {("grad", "cnn"), ("objectives", "mlp")}


def test_c3a_verdict_names_what_held_and_the_missing_data_set():
    s = c3.summarize(RunConfig.from_preset("test"), _grad_records(0.95, 1.0, ("digits",)))
    assert "not run: fashion_mnist" in s["verdict"].evidence and "of 3 (setting, stage) pairs 3 hold" in s["verdict"].evidence
    s = c3.summarize(RunConfig.from_preset("test"), _grad_records(0.6, 1.0, ("digits",)))
    assert s["verdict"].verdict == "not supported" and "0 hold" in s["verdict"].evidence and "3 fail" in s["verdict"].evidence
    tag = s["rows"][0]["setting"]  # the failed (setting, stage) pairs, grouped by setting
    assert f"failed at {tag} (init, mid, solution)" in s["verdict"].evidence


def test_c3a_a_stage_without_measurements_is_undecided_not_skipped():
    """The rule's 'supported' needs every stage of every setting to hold; a stage no seed measured ('mid' is measured by
    a callback at the middle epoch, which a training that stops early never reaches) was skipped, and the other stages
    holding read 'supported'. The setting's data set is its records' even when none has stages."""
    recs = _grad_records(0.95, 1.0)
    for r in recs:
        del r["stages"]["mid"]
    s = c3.summarize(RunConfig.from_preset("test"), recs)
    assert s["verdict"].verdict == "inconclusive"
    assert (
        "of 3 (setting, stage) pairs 2 hold" in s["verdict"].evidence and "undecided at digits-mlp (mid)" in s["verdict"].evidence
    )
    recs = _grad_records(0.95, 1.0)
    for r in recs:
        if r["dataset"] == "fashion_mnist":
            del r["stages"]
    s = c3.summarize(RunConfig.from_preset("test"), recs)
    assert s["verdict"].verdict == "inconclusive" and "fashion_mnist: of 3 (setting, stage) pairs 0 hold" in s["verdict"].evidence


def _spread_records(cos: Sequence[float], ratio: float = 1.0):
    """Both data sets, one setting each, the cosine over seeds given by ``cos`` (the same at every stage)."""
    recs = _grad_records(0.95, ratio)
    for r in recs:
        for st in r["stages"].values():
            st["cos_quadratic"] = cos[r["seed"] % len(cos)]
    return recs


@pytest.mark.parametrize(
    "cos,verdict",
    [
        ((0.99, 0.85, 0.99, 0.85), "inconclusive"),
        ((0.97, 0.81, 0.97, 0.81), "inconclusive"),
        ((0.8, 0.82, 0.8, 0.82), "not supported"),
    ],
)
def test_c3a_decides_on_the_intervals_not_the_point_estimates(cos, verdict):
    """Rule change D (2026-12-05): a mean cosine of 0.92 (or 0.89) over 4 seeds whose 95% interval straddles 0.9 read
    'supported' (or 'not supported') on the point estimate; it is undecided, and undecided pairs make it inconclusive."""
    s = c3.summarize(RunConfig.from_preset("test"), _spread_records(cos))
    assert s["verdict"].verdict == verdict
    if verdict == "inconclusive":
        assert "6 undecided" not in s["verdict"].evidence and "3 undecided" in s["verdict"].evidence
    assert "95% interval" in c3.RULE_A and "undecided" in c3.RULE_A


def test_c3b_table_has_a_block_per_setting():
    cfg = RunConfig.from_preset("test", c3_regularizers=["l2", "fisher_quadratic"])
    recs = [dict(r, tag=tag) for tag in ("digits-mlp-n300-adam", "fashion_mnist-mlp-n1000-adam") for r in _obj_records(0.01, 0.1)]
    s = c3.summarize(cfg, recs)
    assert s["columns_b"][0] == "setting" and {r["setting"] for r in s["rows_b"]} == {
        "digits-mlp-n300-adam",
        "fashion_mnist-mlp-n1000-adam",
    }
    assert any(line.startswith("fashion_mnist-mlp-n1000-adam: fisher_quadratic vs L2") for line in s["evidence"])
    assert s["verdict_b"].verdict == "supported"
    one = c3.summarize(cfg, _obj_records(0.01, 0.1))
    assert "setting" not in one["columns_b"]  # one setting (the quick run): the table as before


def _settings(closer: int, farther: int):
    """``closer`` settings where the Fisher form is 10x closer to dropout than L2, ``farther`` where it is 10x farther."""
    recs = [dict(r, tag=f"c{i}-mlp-n1-adam") for i in range(closer) for r in _obj_records(0.01, 0.1)]
    return recs + [dict(r, tag=f"f{i}-mlp-n1-adam") for i in range(farther) for r in _obj_records(0.1, 0.01)]


def test_c3b_tests_each_setting_over_its_seeds_and_names_a_setting_dependent_effect():
    """Rule change A (2026-12-05): three settings closer and one farther pooled into one t-test read 'supported' (the
    pooled (setting, seed) pairs are not replicates of one effect); per setting with Holm, significant both ways is
    inconclusive, named setting-dependent, and the pooled test stays as a description."""
    cfg = RunConfig.from_preset("test", c3_regularizers=["l2", "fisher_quadratic"])
    s = c3.summarize(cfg, _settings(3, 1))
    assert s["verdict_b"].verdict == "inconclusive"
    assert "setting-dependent" in s["verdict_b"].evidence and "closer than L2 in 3" in s["verdict_b"].evidence
    assert "farther in 1 (f0-mlp-n1-adam: fisher_quadratic)" in s["verdict_b"].evidence
    assert "pooled (a description)" in s["verdict_b"].evidence
    line = next(x for x in s["evidence"] if x.startswith("f0-mlp-n1-adam: fisher_quadratic vs L2"))
    assert "ratio 10 " in line and "6 seeds" in line
    assert c3.summarize(cfg, _settings(2, 0))["verdict_b"].verdict == "supported"
    assert c3.summarize(cfg, _settings(0, 2))["verdict_b"].verdict == "refuted"


def _lucky_records(seeds: int = 10):
    """L2 and the Fisher form equally close to dropout at their usual strength; the Fisher form's other strength is
    erratic (0.005 on half the seeds, 5 on the others): the smallest of a seed's own KLs picks its lucky draws."""
    rng = np.random.default_rng(3)
    recs = []
    for s in range(seeds):
        level = 0.05 * float(np.exp(rng.normal(scale=0.05)))
        objs = {"dropout": {"kl_from_dropout": 0.0}, "dropout_floor": {"kl_from_dropout": 0.05}}
        objs["l2@1"] = {"kl_from_dropout": level}
        objs["l2@4"] = {"kl_from_dropout": 2 * level}
        objs["fisher_quadratic@1"] = {"kl_from_dropout": level * float(np.exp(rng.normal(scale=0.05)))}
        objs["fisher_quadratic@4"] = {"kl_from_dropout": 0.005 if s % 2 else 5.0}
        recs.append({"status": "ok", "part": "objectives", "seed": s, "objectives": objs})
    return recs


def test_c3b_chooses_the_strength_on_the_other_seeds_not_on_the_reported_kl():
    """Rule change B (2026-12-05): the old rule's minimum over the grid of a seed's own KLs found the Fisher form
    significantly closer than L2 from lucky draws; chosen on the other seeds, the erratic strength is not chosen."""
    cfg = RunConfig.from_preset("test", c3_regularizers=["l2", "fisher_quadratic"])
    s = c3.summarize(cfg, _lucky_records())
    assert s["verdict_b"].verdict == "inconclusive"
    assert "closer than L2 in 0" in s["verdict_b"].evidence
    assert any("in-sample, biased low" in line for line in s["evidence"])
    assert any("no validation-set KL" in c for c in s["caveats"])
    from dropgeom.experiments.c3_training import held_out_kl

    recs = _lucky_records()
    assert held_out_kl(recs, "fisher_quadratic") == [r["objectives"]["fisher_quadratic@1"]["kl_from_dropout"] for r in recs]


def test_c3b_without_a_finished_sweep_says_so():
    """A partial run with gradient units only read 'L2 or no Fisher form in the comparison' (both were configured)."""
    cfg = RunConfig.from_preset("test", c3_regularizers=["l2", "fisher_quadratic"])
    s = c3.summarize(cfg, _grad_records(0.95, 1.0))
    assert s["verdict_b"].verdict == "inconclusive" and s["verdict_b"].evidence == "no finished strength-sweep run"
    none = c3.summarize(RunConfig.from_preset("test", c3_regularizers=["l2"]), _obj_records(0.01, 0.1))
    assert none["verdict_b"].evidence == "L2 or no Fisher form in the comparison"


def test_c3b_lists_a_strength_whose_training_diverged():
    """Rule change F (2026-12-05): a diverged strength was silently dropped from the grid's minimum."""
    cfg = RunConfig.from_preset("test", c3_regularizers=["l2", "fisher_quadratic"])
    recs = _obj_records(0.01, 0.1)
    recs[2]["objectives"]["fisher_quadratic@2"] = {"diverged": True, "epochs_run": 3}
    s = c3.summarize(cfg, recs)
    assert any("diverged" in line and "seed=2: fisher_quadratic@2" in line for line in s["evidence"])
    assert "1 diverged run(s)" in s["verdict_b"].evidence


def test_c3b_rule_text_names_the_unit_of_replication():
    # the rule tests each setting over its seeds; the pooled (setting, seed) test is a description only
    for text in (c3.RULE_B, c3.ABOUT):
        assert "over that setting's seeds" in text or "over the setting's seeds" in text
        assert "(setting, seed) pairs" in text and "description" in text and "setting-dependent" in text
        assert "other seeds" in text and "validation" in text


def test_c3a_a_seed_with_a_non_positive_value_ratio_never_holds():
    """The geometric mean of Q/R leaves out a non-positive ratio (dropout's measured regularizer R <= 0 on that seed),
    so the other seeds' ratios inside the band read 'supported'; such a pair is undecided at best (2026-12-05)."""
    recs = _grad_records(0.95, 1.0)
    assert c3.summarize(RunConfig.from_preset("test"), recs)["verdict"].verdict == "supported"
    for r in recs:
        if r["seed"] == 0 and r["dataset"] == "digits":
            r["stages"]["solution"]["ratio_quadratic"] = -0.4
    s = c3.summarize(RunConfig.from_preset("test"), recs)
    assert s["verdict"].verdict == "inconclusive" and "1 undecided" in s["verdict"].evidence


def test_c3b_a_tie_between_strengths_goes_to_the_smaller_one():
    """Ties in the other seeds' mean log KL were broken by the records' key order ('@16' before '@4'); the rule now
    takes the smaller strength (2026-12-05)."""
    from dropgeom.experiments.c3_training import held_out_kl

    recs = [{"seed": s, "objectives": {"l2@16": {"kl_from_dropout": 0.2}, "l2@4": {"kl_from_dropout": 0.2}}} for s in range(3)]
    recs[0]["objectives"]["l2@16"]["kl_from_dropout"] = 0.9  # seed 0's own KLs tell the choices apart
    recs[0]["objectives"]["l2@4"]["kl_from_dropout"] = 0.1
    assert held_out_kl(recs, "l2")[0] == 0.1
