"""End-to-end `reproduce` smoke test on the test-size preset: the report's contents, not just its files."""

from __future__ import annotations

import csv
import json
import math
import re

import pytest

from dropgeom.cli import main
from dropgeom.config import RunConfig
from dropgeom.experiments.common import fmt_ci, mean_ci
from dropgeom.report import markdown_to_html

VERDICTS = {"supported", "not supported", "refuted", "inconclusive"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    # exactly what `dropgeom reproduce --preset test --out DIR` runs, in one worker process
    assert main(["reproduce", "--preset", "test", "--out", str(out), "--no-progress", "--workers", "1"]) == 0
    return out


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_directory_layout(run):
    cfg = RunConfig.from_json((run / "config.json").read_text())
    assert cfg == RunConfig.from_preset("test")
    for name in ("C1", "C2", "C3"):
        recs = _jsonl(run / "metrics" / f"{name}.jsonl")
        with open(run / "metrics" / f"{name}.csv") as fh:
            rows = list(csv.DictReader(fh))
        assert len(recs) == len(rows) > 0
        assert {r["key"] for r in recs} == {r["key"] for r in rows}
        assert all(r["status"] == "ok" for r in recs), [r.get("error") for r in recs]
    c3_tag = "digits-mlp-n200-adam"  # the test preset's one C3 setting; C2's is tanh-w6-d2: one figure per setting
    for fig in ("c1_curvature", "c1_mixture", "c2_tanh-w6-d2", f"c3_gradients_{c3_tag}", f"c3_objectives_{c3_tag}", "c3_wager"):
        assert (run / "figures" / f"{fig}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(run.rglob("*.tmp"))  # no half-written file left


def test_verdict_table_rows(run):
    text = (run / "report.md").read_text()
    summary = json.loads((run / "summary.json").read_text())
    rows = re.findall(r"^\| (C\d\w*(?: \(\w+\))?) \| ([a-z ]+) \| (.+) \|$", text, flags=re.M)
    claims = [r[0] for r in rows]
    assert claims == ["C1", "C2", "C3a (gradients)", "C3b (training)"]
    for _claim, verdict, evidence in rows:
        assert verdict in VERDICTS
        assert re.search(r"\d", evidence), "evidence must carry numbers"
    assert summary["C1"]["verdict"]["verdict"] == rows[0][1]
    assert summary["C3"]["verdict_b"]["verdict"] == rows[3][1]


def test_report_numbers_match_metrics_files(run):
    text = (run / "report.md").read_text()
    c1 = [r for r in _jsonl(run / "metrics" / "C1.jsonl") if r["p"] == 0.0]
    from dropgeom.experiments.stats import geometric_mean_ci

    cell = fmt_ci(*geometric_mean_ci([r["measures"]["test"]["mask_m"] for r in c1]))  # C1 table: p, runs, mask_e, mask_m, ...
    assert re.search(rf"^\| 0 \| {len(c1)} \| [^|]+ \| {re.escape(cell)} \|", text, flags=re.M)

    # the C1 confound caveat: clean train NLL at both ends of the grid, from the metrics files
    c1_all = _jsonl(run / "metrics" / "C1.jsonl")
    hi = max(r["p"] for r in c1_all)
    top = [r for r in c1_all if r["p"] == hi]
    train0 = sum(r["train"]["nll"] for r in c1) / len(c1)
    train1 = sum(r["train"]["nll"] for r in top) / len(top)
    assert f"the clean train NLL went from {train0:.3g} at p=0 to {train1:.3g} at p={hi:g}" in text
    assert all("matched" in r and r["matched"]["epochs_run"] >= 1 for r in top)
    assert "matched fit, m-curvature along the mask directions, held-out inputs" in text

    c2 = _jsonl(run / "metrics" / "C2.jsonl")
    for setting, scale in {(r["setting"], r["init_scale"]) for r in c2}:
        gains = [
            r["test_none_early_stopped"] - r["test_dropout"]["nll"]
            for r in c2
            if (r["setting"], r["init_scale"]) == (setting, scale)
        ]
        assert f"| {setting} | {scale:.3g} | {len(gains)} |" in text
        assert fmt_ci(*mean_ci(gains)) in text
    better = sum(1 for r in c2 if r["gain"] > 0)
    assert f"lowered the test NLL against the early-stopped plain baseline in {better} of {len(c2)} runs" in text
    # the early-stopped baseline is never worse than plain training at its last epoch
    assert all(r["test_none_early_stopped"] <= r["test_none"]["nll"] + 1e-12 for r in c2)

    c3 = [r for r in _jsonl(run / "metrics" / "C3.jsonl") if r["part"] == "grad"]
    for r in c3:
        assert set(r["stages"]) == {"init", "mid", "solution"}
        t = r["terms"]
        for row in r["gap"]:
            assert row["fisher_term"] == pytest.approx(row["p"] * t["divergence"])
            assert row["bernoulli_law"] == pytest.approx(row["p"] * (t["divergence"] + t["curvature_bernoulli"]))
            assert math.isfinite(row["measured"]) and row["stderr"] >= 0
    wager = [r for r in _jsonl(run / "metrics" / "C3.jsonl") if r["part"] == "wager"]
    assert wager and all(len(r["rows"]) == 2 for r in wager)


def test_report_html_is_self_contained(run):
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 6  # C1: one per reading; C2, C3a, C3b: one per setting; Wager
    assert not re.search(r'src="(?!data:)', html)  # no external file referenced
    assert "<table>" in html and "C3b (training)" in html


def test_report_rerender(run):
    before = (run / "summary.json").read_text()
    for f in ("report.md", "report.html", "summary.json"):
        (run / f).unlink()
    for png in (run / "figures").glob("*.png"):
        png.unlink()
    assert main(["report", str(run)]) == 0
    assert json.loads((run / "summary.json").read_text()) == json.loads(before)
    assert (run / "report.html").exists() and len(list((run / "figures").glob("*.png"))) == 6


def test_markdown_to_html_subset(tmp_path):
    md = (
        "# T <x>\n\npara `code` **b**, `$x$` stays code\n\n- one\n- two\n\n"
        "| a | b |\n|---|---|\n| 1 \\| 2 | $\\gamma^2$ |\n\n```\n<raw>\n```\n\n$$\\frac{a}{b}$$\n\n![a caption](fig.png)\n"
    )
    (tmp_path / "fig.png").write_bytes(b"\x89PNG fake")
    html = markdown_to_html(md, base=tmp_path).replace("\n", "")
    assert "<h1>T &lt;x&gt;</h1>" in html
    assert "<code>code</code>" in html and "<strong>b</strong>" in html
    assert "<code>$x$</code>" in html
    assert "<li>one</li><li>two</li>" in html
    assert "<td>1 | 2</td>" in html and "<mi>&#x003B3;</mi><mn>2</mn>" in html  # gamma^2 as MathML
    assert "<pre><code>&lt;raw&gt;</code></pre>" in html
    assert 'display="block"' in html and "<mfrac>" in html
    assert '<figure><img alt="a caption" src="data:image/png;base64,' in html and "<figcaption>a caption</figcaption>" in html
    assert "<p><figure>" not in html


def test_optional_summary_keys_are_rendered(tmp_path):
    """The report contract: rule, tables, symbols, caveats, what_would_change and captions appear when present."""
    from dropgeom.report.markdown import build_markdown
    from dropgeom.summary import ClaimSummary, Figure, RunSummary, Table, Verdict, VerdictEntry

    cfg = RunConfig.from_preset("test", experiments=["C1"])
    fig = tmp_path / "figures" / "c1_x.png"
    fig.parent.mkdir()
    fig.write_bytes(b"png")
    claim = ClaimSummary(
        "C1",
        "C1 title",
        verdicts=(
            VerdictEntry(
                "verdict",
                Verdict("C1", "measure-dependent", "two of three measures fall"),
                rule="supported when every measure falls significantly",
            ),
        ),
        tables=(
            Table(["p", "curvature"], [{"p": "0", "curvature": "1.0"}]),
            Table(["arch"], [{"arch": "tanh-w16-d2"}], title="Per architecture"),
        ),
        symbols=(("$\\gamma^2$", "embedding curvature"),),
        evidence=("a line",),
        what_would_change="a significant rise of any measure",
        caveats=("only tanh networks",),
        figures=(Figure(fig, "Curvature against p; dots: seeds"),),
        units=(3, 4),
    )
    text = build_markdown(RunSummary(tmp_path, cfg, (claim,)))
    for piece in (
        "**Verdict (C1): measure-dependent.** Rule: supported when every measure falls significantly",
        "**Per architecture**",
        "| tanh-w16-d2 |",
        "Symbols: $\\gamma^2$: embedding curvature.",
        "What would change the verdict: a significant rise of any measure",
        "- only tanh networks",
        "![Curvature against p; dots: seeds](figures/c1_x.png)",
        "This run is incomplete",
        "**Incomplete: 3 of 4 units finished.**",
        "1 unit(s) of C1 have not run yet",
    ):
        assert piece in text, piece
    html = markdown_to_html(text, base=tmp_path)
    assert "<math" in html and "<figcaption>Curvature against p; dots: seeds</figcaption>" in html


def test_report_text_comes_from_the_summary_builders_not_docstrings(tmp_path):
    """Editing an experiment module's docstring does not change a report: the text under a claim's title is its ABOUT."""
    import types

    from dropgeom.experiments.run_summary import claim_summary
    from dropgeom.experiments.verdicts import Verdict

    cfg = RunConfig.from_preset("test", experiments=["C1"])
    mod = types.ModuleType("fake_claim", "Fake claim.\n\nDOCSTRING TEXT that the report must not print.\n")
    mod.TITLE, mod.ABOUT = "C1: fake", "Widths `config.c2_widths`, explicit text."
    mod.units = lambda config: [{"key": "a"}]
    mod.summarize = lambda config, records: {"verdict": Verdict("C1", "inconclusive", "why"), "rule": "seeds config.seeds"}
    mod.figures = lambda config, records, folder: []
    claim = claim_summary("C1", mod, cfg, [{"key": "a", "status": "ok", "seconds": 1.5}], tmp_path)
    assert claim.about == f"Widths {{{', '.join(str(w) for w in cfg.c2_widths)}}}, explicit text."
    assert claim.verdicts[0].rule == f"seeds {cfg.seeds}" and claim.units == (1, 1) and claim.seconds == (1.5,)
    assert "DOCSTRING" not in claim.about


def test_scope_names_each_claims_models_and_data():
    """The scope section describes every claim of the run from its config (the full preset's C3 on Fashion-MNIST
    MLPs and CNNs is not called "MLPs of width 16 on digits"), and the curvature set-up per claim."""
    from dropgeom.config import RunConfig
    from dropgeom.experiments.run_summary import scope_caveats

    full = RunConfig.from_preset("full")
    lines = scope_caveats(full, {})
    assert [ln.split(":")[0] for ln in lines[:3]] == ["C1", "C2", "C3"]
    assert "fashion_mnist" in lines[1] and "784-256-256-10" in lines[2] and "fashion_mnist-cnn-n60000-adam" in lines[2]
    assert "SGD" in lines[2] and f"{full.seeds} seed(s)" in lines[3]
    only_c1 = scope_caveats(full.replace(experiments=["C1"]), {})
    assert len(only_c1) == 2 and only_c1[0].startswith("C1:")
    curv = {"n_inputs": 30, "num_params": 10, "num_outputs": 4, "method": "stochastic"}
    with_curv = scope_caveats(full, {"C2": [{"curvature": curv}], "C1": [{"curvature": {"n_inputs": 5, "num_params": 7}}]})
    assert any(ln.startswith("Curvature (C2): over 30 inputs, on 10 parameters; n(K-1)/P 9.0") for ln in with_curv)
    assert any(ln.startswith("Curvature (C1): over 5 inputs") and "method" not in ln for ln in with_curv)
    converged = dict(curv, gamma2_damped=2.0, gamma2_damped_stderr=0.1, projection_residual=1e-9)
    stuck = dict(converged, projection_residual=3e-4)
    line = scope_caveats(full, {"C2": [{"curvature": converged}, {"curvature": stuck}]})[-1]
    assert "In 1 of 2 of these the projections onto the tangent space did not converge" in line and "3.0e-04" in line
    assert "did not converge" not in scope_caveats(full, {"C2": [{"curvature": converged}]})[-1]
    assert "conjugate-gradient iterations" in scope_caveats(full, {"C2": [{"curvature": converged}]})[-1]
    exact = dict(converged, solver="svd", projection_residual=0.0)
    line = scope_caveats(full, {"C2": [{"curvature": exact}]})[-1]
    assert "its solves and projections exact (a dense SVD of S^T J, or" in line and "conjugate-gradient" not in line
    gram = dict(exact, solver="gram")  # the Gram-matrix solver is exact too (it was counted as capped CG)
    assert "its solves and projections exact" in scope_caveats(full, {"C2": [{"curvature": exact}, {"curvature": gram}]})[-1]
    mixed = scope_caveats(full, {"C2": [{"curvature": exact}, {"curvature": converged}]})[-1]
    assert "(1 of 2 runs solved exactly, by an SVD or the Gram matrix)" in mixed
    assert "1 of 2 of these records predate the exact solver" in mixed  # `converged` has no solver key: old
    assert "predate" not in line
    quick = RunConfig.from_preset("quick")  # C2 averages its own count of pairs (c2_curvature_samples = 8)
    assert " averages 8 sample pairs" in scope_caveats(quick, {"C2": [{"curvature": converged}]})[-1]
    assert " averages 5 sample pairs" in scope_caveats(quick, {"C2": [{"curvature": dict(exact, n_samples=5)}]})[-1]


def test_a_verdict_says_how_many_of_its_units_diverged(tmp_path):
    """A diverged unit counts as finished (rerunning repeats it) but has no data: the verdict's evidence says so,
    so a verdict resting on fewer seeds than the preset's does not read as a complete one."""
    import types

    from dropgeom.experiments.run_summary import claim_summary
    from dropgeom.experiments.verdicts import Verdict

    cfg = RunConfig.from_preset("test", experiments=["C1"])
    mod = types.ModuleType("fake_claim")
    mod.TITLE, mod.ABOUT = "C1: fake", "about"
    mod.units = lambda config: [{"key": k} for k in "abc"]
    mod.summarize = lambda config, records: {"verdict": Verdict("C1", "inconclusive", "why")}
    mod.figures = lambda config, records, folder: []
    recs = [{"key": "a", "status": "ok"}, {"key": "b", "status": "diverged"}, {"key": "c", "status": "ok"}]
    claim = claim_summary("C1", mod, cfg, recs, tmp_path)
    v = claim.verdicts[0].verdict
    assert (
        v.verdict == "inconclusive"
        and v.evidence == "why; 1 of 3 finished units diverged and are not in the test (see the failures)"
    )
    clean = claim_summary("C1", mod, cfg, [dict(r, status="ok") for r in recs], tmp_path)
    assert clean.verdicts[0].verdict.evidence == "why"


def test_a_verdict_counts_only_the_diverged_units_of_its_own_test(tmp_path):
    """C3's two verdicts rest on different units (C3a on ``grad/``, C3b on ``objectives/``): a diverged gradient unit
    was noted on C3b's verdict as 'not in the test' (it never was) over every C3 unit; a stale record whose key is no
    unit of the config was counted as a diverged unit too ('2 of 1 finished units')."""
    import types

    from dropgeom.experiments import c3_fisher_regularizer as c3
    from dropgeom.experiments.run_summary import claim_summary
    from dropgeom.experiments.verdicts import Verdict

    assert c3.VERDICT_PARTS == {"verdict": "grad", "verdict_b": "objectives"}
    cfg = RunConfig.from_preset("test", experiments=["C3"])
    mod = types.ModuleType("fake_claim")
    mod.TITLE, mod.ABOUT, mod.VERDICT_PARTS = "C3: fake", "about", c3.VERDICT_PARTS
    mod.units = lambda config: [{"key": k} for k in ("g0", "g1", "o0", "o1")]
    mod.summarize = lambda config, records: {"verdict": Verdict("a", "x", "why"), "verdict_b": Verdict("b", "y", "why")}
    mod.figures = lambda config, records, folder: []
    recs = [
        {"key": "g0", "part": "grad", "status": "ok"},
        {"key": "g1", "part": "grad", "status": "diverged"},
        {"key": "o0", "part": "objectives", "status": "ok"},
        {"key": "o1", "part": "objectives", "status": "ok"},
        {"key": "old", "part": "objectives", "status": "diverged"},
    ]
    a, b = (e.verdict for e in claim_summary("C3", mod, cfg, recs, tmp_path).verdicts)
    assert a.evidence == "why; 1 of 2 finished units diverged and are not in the test (see the failures)"
    assert b.evidence == "why" and a.verdict == "x" and b.verdict == "y"
