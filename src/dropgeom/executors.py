"""Where the units of a sweep run: a pool of local worker processes, or Ray tasks on this machine or a cluster.

Both pools have one interface -- ``imap_unordered(items, on_start)`` yielding ``(item, result)`` as results arrive
(an exception in a unit is yielded as its result), ``close()``, ``terminate()`` and use as a context manager -- so the
sweep runner treats them alike. The driver (the process that called ``reproduce``) stays the single writer of the run
directory; workers only compute.

- :attr:`ExecutorKind.PROCESS`: :class:`dropgeom.pool.WorkerPool`, spawned processes that stop at Ctrl-C and die with
  their parent (the default; nothing extra to install).
- :attr:`ExecutorKind.RAY`: :class:`RayPool`, Ray tasks (``pip install 'dropgeom[ray]'``): a local Ray started for the
  sweep when no address is given, or the cluster at ``address`` (``host:port`` of a head node started with
  ``ray start --head``, or ``auto``). Each unit is one task with one CPU; Ray is the real component (no home-made
  scheduler across machines).

Example:
    >>> ExecutorKind("ray").value
    'ray'
    >>> check_address("auto")   # Ray finds a running cluster itself
"""

from __future__ import annotations

import socket
from enum import Enum
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

from .options import ExecutorKind

__all__ = ["ExecutorKind", "RayPool", "make_pool", "check_executor", "RAY_INSTALL_HINT", "check_address", "CONNECT_TIMEOUT"]

RAY_INSTALL_HINT = "pip install 'dropgeom[ray]'"
#: seconds within which an unreachable ``--address`` is reported
CONNECT_TIMEOUT = 10.0


def check_address(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Fail within ``timeout`` seconds, with one clear line, when a Ray head at ``host:port`` cannot be reached.

    ``auto`` and ``local`` are left to Ray; ``ray://host:port`` (Ray client) is checked like ``host:port``.

    Raises:
        ConnectionError: when nothing accepts connections at the address.
        ValueError: when the address is not of the form ``host:port``.

    Example:
        >>> check_address("nonsense")
        Traceback (most recent call last):
        ...
        ValueError: Ray address 'nonsense' is not of the form host:port (or ray://host:port, or auto)
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


def _kind(kind: Union[str, ExecutorKind]) -> ExecutorKind:
    try:
        return ExecutorKind(kind.value if isinstance(kind, Enum) else str(kind))
    except ValueError:
        raise ValueError(f"unknown executor {kind!r}; choose one of {[k.value for k in ExecutorKind]}") from None


def check_executor(
    kind: Union[str, ExecutorKind], address: Optional[str] = None, timeout: float = CONNECT_TIMEOUT
) -> ExecutorKind:
    """Check up front, before anything is written, that ``kind`` can run: a known kind, Ray installed for ``ray``,
    ``address`` only with ``ray`` and reachable within ``timeout``.

    Raises:
        ValueError: for an unknown kind or an ``address`` without ``ray``.
        ImportError: for ``ray`` without Ray installed (the message says how to install it).
        ConnectionError: for an unreachable ``address``.

    Example:
        >>> check_executor("process")
        <ExecutorKind.PROCESS: 'process'>
    """
    kind = _kind(kind)
    if kind is ExecutorKind.PROCESS:
        if address is not None:
            raise ValueError("--address goes with --executor ray")
        return kind
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise ImportError(f"--executor ray needs Ray, which is not installed: {RAY_INSTALL_HINT}")
    if address is not None:
        check_address(address, timeout)
    return kind


def _call(fn: Callable[[Any], Any], item: Any) -> Any:
    """One unit in a Ray worker: the exception, not a Ray error, comes back when the unit fails."""
    try:
        return fn(item)
    except Exception as err:  # noqa: BLE001 - sent back, recorded by the driver
        return err


class RayPool:
    """Units as Ray tasks, at most ``workers`` in flight (on a cluster: its CPU count); see the module docstring.

    Args:
        fn: the unit function (picklable by cloudpickle).
        workers: CPUs of the local Ray, and tasks in flight; ignored for a cluster (its CPUs are used).
        address: a running cluster; ``None`` starts a local Ray, stopped again at :meth:`close` / :meth:`terminate`.
        connect_timeout: seconds to wait for ``address``.

    Raises:
        ImportError: when Ray is not installed (the message says how to install it).
        ConnectionError: when ``address`` cannot be reached within ``connect_timeout``.
        ValueError: on ``workers < 1``.
    """

    def __init__(
        self, fn: Callable[[Any], Any], workers: int = 1, address: Optional[str] = None, connect_timeout: float = CONNECT_TIMEOUT
    ) -> None:
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive int, got {workers!r}")
        try:
            import ray
        except ImportError:
            raise ImportError(f"--executor ray needs Ray, which is not installed: {RAY_INSTALL_HINT}") from None
        if address is not None:
            check_address(address, connect_timeout)
        self._ray = ray
        self._owns = not ray.is_initialized()
        if self._owns:
            opts: Dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
            if address is None:
                ray.init(num_cpus=workers, **opts)
            else:
                ray.init(address=address, **opts)
        self.workers = workers if address is None else max(1, int(ray.cluster_resources().get("CPU", workers)))
        self._fn_ref = ray.put(fn)
        self._remote = ray.remote(num_cpus=1, max_retries=0)(_call)
        self._inflight: Dict[Any, Any] = {}

    def imap_unordered(self, items: Iterable[Any], on_start: Optional[Callable[[Any], None]] = None) -> Iterator[Tuple[Any, Any]]:
        """Yield ``(item, fn(item))`` as results arrive; a failed unit (or a lost worker) yields its exception."""
        pending: List[Any] = list(items)[::-1]

        def feed() -> None:
            while pending and len(self._inflight) < self.workers:
                item = pending.pop()
                if on_start is not None:
                    on_start(item)
                self._inflight[self._remote.remote(self._fn_ref, item)] = item

        feed()
        while self._inflight:
            done, _ = self._ray.wait(list(self._inflight), num_returns=1)
            for ref in done:
                item = self._inflight.pop(ref)
                try:
                    result = self._ray.get(ref)
                except Exception as err:  # noqa: BLE001 - a worker that died: the unit's result is the error
                    result = RuntimeError(f"the Ray task ended abnormally: {type(err).__name__}: {str(err).splitlines()[0]}")
                yield item, result
            feed()

    def close(self) -> None:
        """Stop a Ray this pool started (tasks in flight are cancelled)."""
        self.terminate()

    def terminate(self) -> None:
        """Cancel every task in flight (force-killing its worker) and stop a Ray this pool started."""
        for ref in list(self._inflight):
            try:
                self._ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - finished or gone already
                pass
        self._inflight.clear()
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()

    def __enter__(self) -> "RayPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.terminate()


def make_pool(
    fn: Callable[[Any], Any],
    workers: int = 1,
    kind: Union[str, ExecutorKind] = ExecutorKind.PROCESS,
    address: Optional[str] = None,
) -> Any:
    """The pool of ``kind`` running ``fn``: a :class:`dropgeom.pool.WorkerPool` or a :class:`RayPool`.

    Raises:
        ValueError: for an unknown kind, ``workers < 1``, or ``address`` given without ``kind="ray"``.
        ImportError: for ``ray`` without Ray installed.

    Example:
        >>> make_pool(abs, kind="threads")
        Traceback (most recent call last):
        ...
        ValueError: unknown executor 'threads'; choose one of ['process', 'ray']
    """
    kind = _kind(kind)
    if kind is ExecutorKind.RAY:
        return RayPool(fn, workers=workers, address=address)
    if address is not None:
        raise ValueError("--address goes with --executor ray")
    from .pool import WorkerPool

    return WorkerPool(fn, workers)
