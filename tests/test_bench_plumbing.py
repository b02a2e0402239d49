"""The benchmark scripts' plumbing, checked cheaply: the command lines parse and every topic
module exposes ``main(quick)``. Nothing here is timed (speed is measured by ``bench/run.py``,
never in tests)."""

from __future__ import annotations

import importlib
import inspect
import os
import pathlib
import subprocess
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench"
TOPICS = sorted(p.stem for p in BENCH.glob("bench_*.py"))


def _help(script: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(BENCH.parent / "src"), os.environ.get("PYTHONPATH")])))
    out = subprocess.run(
        [sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True, env=env, timeout=120, check=True
    )
    return out.stdout


def test_run_help_lists_the_modes() -> None:
    text = _help("run.py")
    for flag in ("--quick", "--only", "--threads"):
        assert flag in text
    assert "bench_scale.py --n 60000" in text  # the separate issue-12 command is documented where users look


def test_scale_help_offers_the_60000_image_run() -> None:
    text = _help("bench_scale.py")
    for flag in ("--n", "--models", "--no-scaling", "--quick"):
        assert flag in text


@pytest.mark.parametrize("topic", TOPICS)
def test_every_topic_exposes_main_quick(topic: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    module = importlib.import_module(topic)
    params = inspect.signature(module.main).parameters
    assert list(params)[0] == "quick", f"{topic}.main must take quick first (bench/run.py calls main(quick=...))"
    assert all(p.default is not inspect.Parameter.empty for name, p in params.items() if name != "quick")


def test_topics_are_the_expected_ones() -> None:
    assert {"bench_curvature", "bench_dropout", "bench_fisher", "bench_scale", "bench_train"} <= set(TOPICS)


def test_memory_probe_rows_measure_their_own_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each row of ``bench/memory_probe.py`` calls its own model's Fisher (the closures bind their manifold and
    peer model when built: a late-bound loop variable once made the MLP rows compute the CNN's diagonal)."""
    monkeypatch.syspath_prepend(str(BENCH))
    probe = importlib.import_module("memory_probe")
    rows = probe.cases()
    assert list(rows) == [
        "MLP diag, one call on 1,000",
        "MLP diag, streamed 2 x 1,000",
        "MLP kfac, one call on 1,000",
        "MLP kfac, streamed 2 x 1,000",
        "CNN diag, streamed 2 x 1,000",
        "CNN kfac, streamed 2 x 1,000",
    ]
    mlp_params = 784 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 10 + 10
    assert rows["MLP diag, one call on 1,000"][0]().size == mlp_params
    assert "--profile" in _help("memory_probe.py")


def test_asdl_runner_clears_the_result_it_keeps(monkeypatch: pytest.MonkeyPatch) -> None:
    """ASDL keeps its Fisher on the modules between calls; the runner's ``clear()`` (called by ``peak_memory``
    between its warm and measured calls) must drop it, or the old factors sit in the memory baseline."""
    import torch

    monkeypatch.syspath_prepend(str(BENCH))
    common = importlib.import_module("common")
    import asdl

    net = torch.nn.Sequential(torch.nn.Linear(4, 3))
    batches = [(torch.randn(5, 4), torch.randint(0, 3, (5,)))]
    run = common.asdl_fisher(net, batches, asdl.FISHER_EXACT, asdl.SHAPE_KRON, 5)
    held = run()
    assert held and all(hasattr(m, "fisher") for m in held)
    run.clear()
    assert not any(hasattr(m, "fisher") for m in held)
