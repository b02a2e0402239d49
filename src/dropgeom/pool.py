"""Worker processes that stop when asked and die with their parent.

:class:`WorkerPool` runs ``fn(item)`` for many items in a few spawned
processes and yields each result as it arrives. It is written by hand (on
``multiprocessing`` pipes) rather than with ``concurrent.futures`` because the
sweep needs three things that executor does not give:

* Ctrl-C stops everything within a second: workers ignore SIGINT (the parent
  alone decides) and :meth:`WorkerPool.terminate` kills them at once; no
  executor thread is left for the interpreter to join at exit;
* workers die with their parent even on ``kill -9`` of the parent: on Linux
  through ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, elsewhere (and as a second line
  of defence) through a watchdog thread polling ``os.getppid()``;
* a worker that dies (killed for memory, a crash in native code) turns into an
  error result for its item, and a fresh worker takes its place.

Example:
    >>> from dropgeom.pool import WorkerPool
    >>> with WorkerPool(abs, workers=2) as pool:
    ...     sorted(result for _item, result in pool.imap_unordered([-1, -2, 3]))
    [1, 2, 3]
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

__all__ = ["WorkerPool", "WorkerDied", "exit_on_next_interrupt", "interrupt_once_then_exit", "leave_after_interrupt"]

#: seconds between two checks of the watchdog thread in a worker
WATCHDOG_SECONDS = 0.5


class WorkerDied(RuntimeError):
    """A worker process ended while computing an item (the item's result is this error)."""


def _die_with_parent(parent_pid: int) -> None:
    """Make this process exit when ``parent_pid`` is gone (prctl on Linux, a watchdog thread everywhere)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except Exception:  # noqa: BLE001 - the watchdog below still works
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(WATCHDOG_SECONDS)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="dropgeom-watchdog", daemon=True).start()


def _worker_main(conn: Connection, fn: Callable[[Any], Any], parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides
    _die_with_parent(parent_pid)
    try:  # tqdm's default lock is a named multiprocessing semaphore: a killed worker would leak it
        from tqdm import tqdm

        tqdm.set_lock(threading.RLock())
    except ImportError:  # pragma: no cover
        pass
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        index, item = task
        try:
            result: Any = fn(item)
        except Exception as err:  # noqa: BLE001 - sent back, raised in the parent
            result = err
        conn.send((index, result))


class WorkerPool:
    """``workers`` spawned processes running ``fn`` (picklable) on items; see the module docstring."""

    def __init__(self, fn: Callable[[Any], Any], workers: int) -> None:
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive int, got {workers!r}")
        self.fn = fn
        self.workers = workers
        self._ctx = multiprocessing.get_context("spawn")
        self._procs: List[Any] = []
        self._conns: List[Connection] = []
        for _ in range(workers):
            self._start_one()

    def _start_one(self, slot: Optional[int] = None) -> None:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_worker_main, args=(child, self.fn, os.getpid()), daemon=True, name="dropgeom-worker")
        # started with SIGINT ignored (inherited through exec), so a Ctrl-C while the worker imports
        # torch prints no traceback there; the worker keeps ignoring it once running
        main = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            proc.start()
        finally:
            if main:
                signal.signal(signal.SIGINT, old)
        child.close()
        if slot is None:
            self._procs.append(proc)
            self._conns.append(parent)
        else:
            self._procs[slot], self._conns[slot] = proc, parent

    def imap_unordered(self, items: Iterable[Any], on_start: Optional[Callable[[Any], None]] = None) -> Iterator[Tuple[Any, Any]]:
        """Yield ``(item, fn(item))`` as results arrive; an exception in ``fn`` is yielded as the result.

        ``on_start(item)`` is called when an item is handed to a worker. A
        worker that dies yields a :class:`WorkerDied` for its item.
        """
        pending = list(enumerate(items))[::-1]
        busy: Dict[int, Tuple[int, Any]] = {}  # slot -> (index, item)

        def feed(slot: int) -> None:
            if pending:
                index, item = pending.pop()
                if on_start is not None:
                    on_start(item)
                self._conns[slot].send((index, item))
                busy[slot] = (index, item)

        for slot in range(self.workers):
            feed(slot)
        while busy:
            watched = {}
            for slot in busy:
                watched[self._conns[slot]] = slot
                watched[self._procs[slot].sentinel] = slot
            ready = wait(list(watched), timeout=None)
            for slot in sorted({watched[r] for r in ready}):
                if slot not in busy:
                    continue
                index, item = busy[slot]
                conn = self._conns[slot]
                try:
                    if not conn.poll():
                        raise EOFError
                    _i, result = conn.recv()
                except (EOFError, OSError):
                    proc = self._procs[slot]
                    proc.join(1.0)
                    result = WorkerDied(f"the worker process died (exit code {proc.exitcode}) while computing this unit")
                    conn.close()
                    self._start_one(slot)
                del busy[slot]
                yield item, result
                feed(slot)

    def close(self) -> None:
        """Ask every worker to finish and wait briefly; kill any that does not."""
        for conn in self._conns:
            try:
                conn.send(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 5.0
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        self.terminate()

    def terminate(self) -> None:
        """Kill every worker now (SIGKILL) and reap it; work in progress is lost."""
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
        for proc in self._procs:
            proc.join(2.0)
        for conn in self._conns:
            conn.close()

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.terminate()


def exit_on_next_interrupt(message: str = "interrupted again: exiting now", code: int = 130) -> None:
    """After a first Ctrl-C: make a second one exit at once (one line on stderr, no traceback).

    Only possible from the main thread (Python's rule for signal handlers); a no-op elsewhere.
    """
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: Any) -> None:
        try:
            os.write(2, ("\n" + message + "\n").encode())
        finally:
            os._exit(code)

    signal.signal(signal.SIGINT, handler)


@contextlib.contextmanager
def interrupt_once_then_exit(message: str = "interrupted again: exiting now", code: int = 130) -> Iterator[List[int]]:
    """While active, Ctrl-C works in two steps: the first press raises ``KeyboardInterrupt`` (the caller cleans up),
    every later one exits at once with ``code`` and one line, no traceback. Yields the press count (a list of one
    int); the previous handler is restored on exit.

    Installed before any work starts, so a second press that comes while the first one is being handled cannot fall
    into Python's default handler. After an interrupt the caller should leave with ``os._exit`` (see
    :func:`leave_after_interrupt`): during interpreter shutdown Python resets SIGINT to its default action, and a
    press then would end the process by the signal. A no-op outside the main thread.
    """
    presses = [0]
    if threading.current_thread() is not threading.main_thread():
        yield presses
        return

    def handler(signum: int, frame: Any) -> None:
        presses[0] += 1
        if presses[0] == 1:
            raise KeyboardInterrupt
        try:
            os.write(2, ("\n" + message + "\n").encode())
        finally:
            os._exit(code)

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield presses
    finally:
        if not presses[0]:
            signal.signal(signal.SIGINT, old)


def leave_after_interrupt(code: int = 130) -> None:
    """Exit now with ``code``, streams flushed, skipping interpreter shutdown (workers are already gone)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
