"""Executors of a sweep: the process pool and Ray (local, 2 CPUs), one interface; their errors."""

import socket
import sys
import time

import pytest

from dropgeom.executors import ExecutorKind, check_address, make_pool


def _square(x: int) -> int:
    if x < 0:
        raise ValueError("negative unit")
    return x * x


def _run(pool, items):
    started = []
    with pool:
        out = dict(pool.imap_unordered(items, on_start=started.append))
    return out, started


def test_process_pool_runs_units():
    out, started = _run(make_pool(_square, workers=2), [1, 2, 3, -1])
    assert {k: v for k, v in out.items() if k >= 0} == {1: 1, 2: 4, 3: 9} and isinstance(out[-1], ValueError)
    assert sorted(started) == [-1, 1, 2, 3]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown executor 'dask'"):
        make_pool(_square, kind="dask")
    with pytest.raises(ValueError, match="--address goes with --executor ray"):
        make_pool(_square, kind="process", address="127.0.0.1:6379")
    with pytest.raises(ValueError, match="not of the form host:port"):
        check_address("nonsense")


def test_unreachable_address_fails_fast():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    with pytest.raises(ConnectionError, match="cannot reach a Ray head"):
        check_address(f"127.0.0.1:{port}", timeout=3)
    assert time.perf_counter() - t0 < 5


def test_ray_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'dropgeom\[ray\]'"):
        make_pool(_square, kind=ExecutorKind.RAY)


def test_ray_local_runs_units_with_the_same_interface():
    pytest.importorskip("ray")
    out, started = _run(make_pool(_square, workers=2, kind="ray"), [0, 1, 2, 3, -5])
    assert {k: v for k, v in out.items() if k >= 0} == {0: 0, 1: 1, 2: 4, 3: 9}
    assert isinstance(out[-5], ValueError) and "negative unit" in str(out[-5])
    assert sorted(started) == [-5, 0, 1, 2, 3]


def test_reproduce_on_ray_killed_and_resumed_recomputes_nothing(tmp_path):
    """A tiny grid on a local Ray with 2 CPUs, interrupted after two units, then resumed: the finished units are
    not computed again, and the records equal those of the process pool (bitwise, apart from wall-clock fields)."""
    pytest.importorskip("ray")
    from dropgeom.config import RunConfig
    from dropgeom.pipeline import reproduce
    from dropgeom.rundir import RunDir

    cfg = RunConfig.from_preset("test", experiments=["C3"], c3_objectives=["none", "l2", "dropout"], epochs=2, seeds=2)
    done: list = []

    def stop_after_two(key: str) -> None:  # called as a unit is handed out: the third one interrupts
        done.append(key)
        if len(done) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        reproduce(cfg, tmp_path / "ray", progress=False, render=False, workers=2, executor="ray", on_compute=stop_after_two)
    finished = {r["key"] for r in RunDir(tmp_path / "ray").records("C3")}
    again: list = []
    reproduce(cfg, tmp_path / "ray", progress=False, render=False, workers=2, executor="ray", on_compute=again.append)
    assert finished and not finished & set(again)
    reproduce(cfg, tmp_path / "pool", progress=False, render=False, workers=2)

    def untimed(obj):
        if isinstance(obj, dict):
            return {k: untimed(v) for k, v in obj.items() if k != "seconds"}
        return [untimed(v) for v in obj] if isinstance(obj, list) else obj

    by_key = lambda d: {r["key"]: untimed(r) for r in RunDir(d).records("C3")}  # noqa: E731
    assert by_key(tmp_path / "ray") == by_key(tmp_path / "pool")


def test_cli_executor_errors_are_one_line(monkeypatch, capsys, tmp_path):
    from dropgeom.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)
    import importlib.util

    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else importlib.machinery.PathFinder.find_spec(name)
    )
    code = main(["reproduce", "--preset", "test", "--executor", "ray", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "pip install 'dropgeom[ray]'" in err
    assert not (tmp_path / "r").exists()  # nothing written
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.undo()
    code = main(
        ["reproduce", "--preset", "test", "--executor", "ray", "--address", f"127.0.0.1:{port}", "--out", str(tmp_path / "r")]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "cannot reach a Ray head" in err
