"""Where the units of a sweep run: this process, a local process pool, or Ray tasks on a machine or a cluster.

Every executor is a :class:`concurrent.futures.Executor`, so the sweep runner submits units and collects results the
same way whatever runs them; the driver (the process that called ``reproduce``) stays the single writer of the run
directory, and the workers only compute.

- :attr:`ExecutorKind.PROCESS`: a pool of spawned processes on this machine (the default; nothing extra to install).
- :attr:`ExecutorKind.RAY`: Ray tasks (``pip install 'dropgeom[ray]'``): a local Ray started for the sweep when no
  address is given, or the cluster at ``address`` (``host:port`` of a running head node, or ``auto``). Each unit is one
  task with one CPU. Ray is the real component here: no home-made scheduler.

Example:
    >>> ex = make_executor("process", workers=1)
    >>> ex.submit(pow, 2, 5).result()
    32
    >>> ex.shutdown()
"""

from __future__ import annotations

import concurrent.futures
import socket
from enum import Enum
from typing import Any, Callable, List, Optional, Union

__all__ = ["ExecutorKind", "RayExecutor", "make_executor", "RAY_INSTALL_HINT", "check_address"]

RAY_INSTALL_HINT = "pip install 'dropgeom[ray]'"


class ExecutorKind(str, Enum):
    """Which executor runs the units of a sweep."""

    PROCESS = "process"
    """Spawned worker processes on this machine (default)."""
    RAY = "ray"
    """Ray tasks, on a local Ray or on a cluster (``--address``)."""


def check_address(address: str, timeout: float = 10.0) -> None:
    """Fail within ``timeout`` seconds, with one clear line, when a Ray head at ``host:port`` cannot be reached.

    ``auto`` and ``local`` are left to Ray; ``ray://host:port`` (Ray client) is checked like ``host:port``.

    Raises:
        ConnectionError: when nothing accepts connections at the address.
        ValueError: when the address is not of the form ``host:port``.

    Example:
        >>> check_address("auto")            # Ray finds the cluster itself
    """
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"Ray address {address!r} is not of the form host:port (or ray://host:port, or auto)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as err:
        raise ConnectionError(
            f"cannot reach a Ray head at {address} within {timeout:g} s ({err.strerror or err}); start one with "
            "`ray start --head` on that machine, or leave --address out to run a local Ray"
        ) from None


def _invoke(fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    return fn(*args, **kwargs)


class RayExecutor(concurrent.futures.Executor):
    """Units as Ray tasks (one CPU each); results come back as :class:`concurrent.futures.Future`.

    Args:
        address: a running cluster (``host:port``, ``ray://host:port`` or ``auto``); ``None`` starts a local Ray
            with ``num_cpus`` CPUs for this executor and stops it at :meth:`shutdown`.
        num_cpus: CPUs of the local Ray (``None``: all of this machine's).
        connect_timeout: seconds to wait for ``address`` before failing.

    Raises:
        ImportError: when Ray is not installed (the message says how to install it).
        ConnectionError: when ``address`` cannot be reached within ``connect_timeout``.
    """

    def __init__(self, address: Optional[str] = None, num_cpus: Optional[int] = None, connect_timeout: float = 10.0) -> None:
        try:
            import ray
        except ImportError:
            raise ImportError(f"--executor ray needs Ray, which is not installed: {RAY_INSTALL_HINT}") from None
        if address is not None:
            check_address(address, connect_timeout)
        self._ray = ray
        self._owns = not ray.is_initialized()
        if self._owns:
            kwargs: dict = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
            if address is None:
                ray.init(num_cpus=num_cpus, **kwargs)
            else:
                ray.init(address=address, **kwargs)
        self._remote = ray.remote(num_cpus=1, max_retries=0)(_invoke)
        self._refs: List[Any] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:  # type: ignore[override]
        ref = self._remote.remote(fn, args, kwargs)
        self._refs.append(ref)
        return ref.future()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Cancel unfinished tasks when ``cancel_futures`` (force-killing their workers) and stop a Ray we started."""
        if cancel_futures:
            for ref in self._refs:
                try:
                    self._ray.cancel(ref, force=True)
                except Exception:  # already finished or gone: nothing to cancel
                    pass
        self._refs = []
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()


def make_executor(
    kind: Union[str, ExecutorKind] = ExecutorKind.PROCESS,
    workers: int = 1,
    address: Optional[str] = None,
) -> concurrent.futures.Executor:
    """The executor of ``kind``: a spawned process pool with ``workers`` processes, or a :class:`RayExecutor`.

    Raises:
        ValueError: for an unknown kind, ``workers < 1``, or ``address`` given for the process pool.
        ImportError: for ``ray`` without Ray installed.

    Example:
        >>> make_executor("threads")
        Traceback (most recent call last):
        ...
        ValueError: unknown executor 'threads'; choose one of ['process', 'ray']
    """
    try:
        kind = ExecutorKind(kind.value if isinstance(kind, Enum) else str(kind))
    except ValueError:
        raise ValueError(f"unknown executor {kind!r}; choose one of {[k.value for k in ExecutorKind]}") from None
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    if kind is ExecutorKind.RAY:
        return RayExecutor(address=address, num_cpus=workers if address is None else None)
    if address is not None:
        raise ValueError("--address goes with --executor ray")
    import multiprocessing

    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
