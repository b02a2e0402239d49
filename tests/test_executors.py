"""Executors of a sweep: the process pool and Ray (local, 2 CPUs), one interface; their errors."""

import socket
import sys
import time

import pytest

from dropgeom.experiments.executors import ExecutorKind, check_address, make_pool


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
