"""Executors of a sweep: the process pool, Ray (local, 2 CPUs) when installed, and their errors."""

import socket
import sys
import time

import pytest

from dropgeom.experiments.executors import ExecutorKind, check_address, make_executor


def _square(x: int) -> int:
    return x * x


def test_process_pool_runs_units():
    ex = make_executor("process", workers=2)
    try:
        assert sorted(f.result() for f in [ex.submit(_square, i) for i in range(5)]) == [0, 1, 4, 9, 16]
    finally:
        ex.shutdown()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown executor 'dask'"):
        make_executor("dask")
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        make_executor("process", workers=0)
    with pytest.raises(ValueError, match="--address goes with --executor ray"):
        make_executor("process", address="127.0.0.1:6379")
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
        make_executor(ExecutorKind.RAY)


def test_ray_local_runs_units():
    pytest.importorskip("ray")
    ex = make_executor("ray", workers=2)
    try:
        assert sorted(f.result(timeout=120) for f in [ex.submit(_square, i) for i in range(4)]) == [0, 1, 4, 9]
    finally:
        ex.shutdown(cancel_futures=True)
