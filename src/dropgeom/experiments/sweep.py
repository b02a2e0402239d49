"""The sweep runner behind ``dropgeom reproduce``: every unit of every experiment, resumable.

:func:`run_experiments` writes the resolved config to the run directory (or
checks it against the one there), runs each experiment's units that are not
finished yet (experiment x setting x seed; each record written atomically) and
writes the metrics tables. Interrupt it at any point and run it again: finished
units are skipped. The report is not rendered here (the experiments import no
report code): :func:`dropgeom.pipeline.reproduce` runs the sweep, then the report.

Example:
    >>> sorted(EXPERIMENTS)
    ['C1', 'C2', 'C3']
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, TextIO, Tuple, Union

from ..config import RunConfig
from ..rundir import FINISHED, RunDir, atomic_write_json, safe_name
from . import c1_flatness, c2_curvature_strength, c3_fisher_regularizer

__all__ = ["EXPERIMENTS", "run_experiments", "ProgressLine"]

#: claim name -> experiment module
EXPERIMENTS = {"C1": c1_flatness, "C2": c2_curvature_strength, "C3": c3_fisher_regularizer}


def run_experiments(
    config: RunConfig,
    out: Union[str, Path],
    progress: bool = True,
    on_compute: Optional[Callable[[str], None]] = None,
    threads: Optional[int] = 1,
    workers: int = 1,
    executor: str = "process",
    address: Optional[str] = None,
) -> Path:
    """Run (or resume) every experiment of ``config`` into the folder ``out``; return the run directory.

    The report is rendered by the caller (:func:`dropgeom.pipeline.reproduce` runs this, then the report).

    Args:
        config: a validated :class:`~dropgeom.config.RunConfig`.
        out: the run directory: a new or empty folder, or one holding a run of
            the same config (that run is resumed); the claims (``config.experiments``) may differ from
            that run's: finished units are reused and the folder's ``config.json`` then lists every claim run in it.
        progress: show one overall progress line (claim, units done/total, ETA).
        on_compute: called with each unit key just before it is computed
            (finished units are skipped and never reach it).
        threads: torch intra-op threads while running (``None``: leave as is).
            The models are tiny: one thread per process is fastest.
        workers: run the units of each experiment in this many processes (with ``executor="ray"`` and no
            address: the CPUs of the local Ray).
        executor: ``process`` (spawned worker processes, default) or ``ray`` (Ray tasks; ``pip install
            'dropgeom[ray]'``); see :mod:`dropgeom.executors`. Records are written by this process either way.
        address: a Ray cluster's head (``host:port``) for ``executor="ray"``; ``None`` starts a local Ray.

    Every invocation is recorded in ``timings.json`` when it starts and
    updated as units finish, so a killed one is there too (status
    ``running`` at the time it was killed, ``interrupted`` after Ctrl-C).

    Raises:
        ConfigError: ``config`` is invalid.
        RunDirError: ``out`` is not a folder dropgeom may write into, another process works in it, or it holds a
            run whose config differs in an option other than ``experiments``.
        KeyboardInterrupt: on Ctrl-C, after the finished units are saved and the workers killed.
        ImportError: ``executor="ray"`` without Ray installed.
        ConnectionError: ``address`` cannot be reached (within :data:`dropgeom.executors.CONNECT_TIMEOUT` seconds).
    """
    _check_before_writing(config, executor, address, threads)
    rd = RunDir.claim(out)
    with rd.lock():
        rd.init(config)  # the stored config lists every claim run in the folder; this invocation runs config's
        plan = [(name, EXPERIMENTS[name].units(config)) for name in config.experiments]
        timings = _Timings(rd.root / "timings.json", workers)
        line = ProgressLine(rd, plan, workers, enabled=progress)
        try:
            for name, units in plan:
                _run_claim(rd, config, name, units, line, timings, on_compute, threads, workers, executor, address)
        except KeyboardInterrupt:
            timings.end("interrupted")
            raise
        except BaseException as err:
            timings.end(f"failed: {type(err).__name__}")
            raise
        finally:
            line.close()
        timings.end("finished")
    return rd.root


def _check_before_writing(config: RunConfig, executor: str, address: Optional[str], threads: Optional[int]) -> None:
    """Fail before anything is written: an invalid config, Ray missing or unreachable, missing inputs; set the threads
    and the allocator (``dropgeom.allocator``: with ``DROPGEOM_MALLOC=heap`` freed memory is kept in the heap)."""
    import torch

    from ..allocator import keep_freed_memory
    from ..executors import check_executor

    config.validate()
    check_executor(executor, address)  # before anything is written: Ray installed, the cluster reachable
    for name in config.experiments:  # missing inputs (e.g. a data set that is not installed) fail at once
        getattr(EXPERIMENTS[name], "check_inputs", lambda _c: None)(config)
    if threads is not None:
        torch.set_num_threads(int(threads))
    keep_freed_memory()  # forked workers inherit it; spawned and Ray workers apply it in _run_unit_in_worker


def _run_claim(
    rd: RunDir,
    config: RunConfig,
    name: str,
    units: Sequence[Mapping[str, Any]],
    line: "ProgressLine",
    timings: "_Timings",
    on_compute: Optional[Callable[[str], None]],
    threads: Optional[int],
    workers: int,
    executor: str,
    address: Optional[str],
) -> None:
    """The units of one claim that are not finished yet, then its metrics tables."""
    line.set_claim(name)
    t0 = time.perf_counter()
    if workers > 1 or executor != "process":
        fn = functools.partial(_run_unit_in_worker, name, config.to_dict(), str(rd.checkpoints), threads)
    else:
        fn = functools.partial(_run_unit, EXPERIMENTS[name], config, rd.checkpoints)
    counts = rd.run_units(
        name,
        units,
        fn,
        line,
        on_compute,
        workers=workers,
        on_done=lambda k, r: timings.unit_done(name),
        executor=executor,
        address=address,
    )
    rd.write_metrics(name)
    timings.experiment_done(name, counts, time.perf_counter() - t0)


class _Timings:
    """``timings.json``: one session per invocation, written at its start and updated as it runs."""

    def __init__(self, path: Path, workers: int) -> None:
        self.path = path
        try:
            old = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, json.JSONDecodeError):
            old = {}
        self.sessions: List[Dict[str, Any]] = list(old.get("sessions", [])) if isinstance(old, dict) else []
        self.session: Dict[str, Any] = {
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "pid": os.getpid(),
            "workers": workers,
            "status": "running",
            "seconds": 0.0,
            "units_computed": 0,
            "experiments": {},
        }
        self.sessions.append(self.session)
        self.t0 = time.perf_counter()
        self.last_write = 0.0
        self.write()

    def write(self) -> None:
        self.session["seconds"] = time.perf_counter() - self.t0
        self.last_write = time.perf_counter()
        atomic_write_json(self.path, {"sessions": self.sessions})

    def unit_done(self, name: str) -> None:
        self.session["units_computed"] += 1
        if time.perf_counter() - self.last_write > 1.0:  # a killed invocation keeps its progress
            self.write()

    def experiment_done(self, name: str, counts: Dict[str, int], seconds: float) -> None:
        self.session["experiments"][name] = {**counts, "seconds": seconds}
        self.write()

    def end(self, status: str) -> None:
        self.session["status"] = status
        self.write()


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class ProgressLine:
    """One overall progress line: the claim (k of n), units done/total, elapsed time, ETA, the running unit.

    The ETA sums, over the units left, the mean seconds of finished units of the same kind (the unit key
    without its ``seed=N`` part: C3's units range from seconds to many minutes by kind), or, for a kind not
    timed yet, the mean over the claim's timed kinds (over every claim's while the claim has none), divided
    by the number of workers, less the time since the last unit finished; the line says for how many units
    it had to guess. On a terminal a daemon thread refreshes the line every second; when ``stream`` (by
    default standard error) is not a terminal (a log file, a cluster job's output) it writes one plain
    line per finished unit and per claim instead, with no carriage returns.
    """

    def __init__(
        self,
        rd: RunDir,
        plan: Sequence[Tuple[str, Sequence[Mapping[str, Any]]]],
        workers: int,
        enabled: bool = True,
        stream: Optional[TextIO] = None,
    ) -> None:
        self.claims = [name for name, _ in plan]
        self.pending = {name: [u["key"] for u in units if not rd.is_done(name, u["key"])] for name, units in plan}
        self.total = sum(len(units) for _, units in plan)
        self.n_done = self.total - sum(len(keys) for keys in self.pending.values())
        self.seconds: Dict[str, Dict[str, List[float]]] = {name: {} for name, _ in plan}
        for name, _ in plan:
            for r in rd.records(name):
                if r.get("status") in FINISHED:
                    self._add(name, str(r.get("key", "")), r)
        self.workers = max(1, workers)
        self.running: List[str] = []
        self.current = self.claims[0] if self.claims else ""
        self.t0 = self.last_event = time.perf_counter()
        self.bar = None
        self.log: Optional[TextIO] = None  # set when the stream is not a terminal: a line per event
        out = stream if stream is not None else sys.stderr
        if enabled and not _is_terminal(out):
            self.log = out
            self._write(self.text(running=False))
        elif enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.n_done, bar_format="{desc}", leave=False, mininterval=0.5, file=out)
            self.refresh()
            self._stop = threading.Event()
            self._ticker = threading.Thread(target=self._tick, name="dropgeom-progress", daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):  # elapsed time and ETA move between events too
            self.refresh()

    @staticmethod
    def kind(key: str) -> str:
        """The unit's kind: its key without the ``seed=N`` part (``grad/digits-mlp-n300-adam/seed=3`` ->
        ``grad/digits-mlp-n300-adam``)."""
        return re.sub(r"(^|/)seed=\d+(?=/|$)", "", key)

    def _add(self, claim: str, key: str, record: Mapping[str, Any]) -> None:
        secs = float(record.get("seconds", float("nan")))
        if math.isfinite(secs):
            self.seconds[claim].setdefault(self.kind(key), []).append(secs)

    def _estimate(self) -> Tuple[Optional[float], int]:
        """(seconds of work left, summed over the units; units whose kind had no timing), or (None, 0)."""
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        kind_means = {c: {k: mean(xs) for k, xs in ks.items() if xs} for c, ks in self.seconds.items()}
        every = [m for ms in kind_means.values() for m in ms.values()]
        if not every:
            return None, 0
        work, guessed = 0.0, 0
        for claim, keys in self.pending.items():
            means = kind_means.get(claim, {})
            fallback = mean(list(means.values())) if means else mean(every)
            for key in keys:
                m = means.get(self.kind(key))
                guessed += m is None
                work += fallback if m is None else m
        return work, guessed

    def eta(self) -> Optional[float]:
        work, _ = self._estimate()
        if work is None:
            return None
        return max(0.0, work / self.workers - (time.perf_counter() - self.last_event))

    def text(self, running: bool = True) -> str:
        """The line; ``running=False`` leaves out the units running now (a log line says which unit finished)."""
        k = self.claims.index(self.current) + 1 if self.current in self.claims else 0
        eta = self.eta()
        guessed = self._estimate()[1] if eta is not None else 0
        parts = [
            f"{self.current} (claim {k} of {len(self.claims)})",
            f"{self.n_done}/{self.total} units",
            f"elapsed {_duration(time.perf_counter() - self.t0)}",
            f"ETA {_duration(eta) if eta is not None else 'after the first unit'}"
            + (f" ({guessed} units of kinds not timed yet guessed)" if guessed else ""),
        ]
        if running and self.running:
            more = f" (+{len(self.running) - 1})" if len(self.running) > 1 else ""
            parts.append(f"running {self.running[0]}{more}")
        return " | ".join(parts)

    def refresh(self) -> None:
        if self.bar is not None:
            self.bar.set_description_str(self.text(), refresh=True)

    def _write(self, line: str) -> None:
        if self.log is not None:
            self.log.write(line + "\n")
            self.log.flush()

    def set_claim(self, name: str) -> None:
        changed = name != self.current
        self.current = name
        self.refresh()
        if changed:
            self._write(self.text(running=False))

    def start(self, key: str) -> None:
        self.running.append(key)
        self.refresh()

    def done(self, key: str, record: Mapping[str, Any]) -> None:
        if key in self.running:
            self.running.remove(key)
        self.n_done += 1
        claim = next((c for c, keys in self.pending.items() if key in keys), self.current)
        if key in self.pending.get(claim, []):
            self.pending[claim].remove(key)
        self.last_event = time.perf_counter()
        self._add(claim, key, record)
        if self.bar is not None:
            self.bar.update(1)
        self.refresh()
        self._write(f"{self.text(running=False)} | finished {key} ({record.get('status', '?')})")

    def close(self) -> None:
        if self.bar is not None:
            self._stop.set()
            self._ticker.join(2.0)
            self.bar.close()


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _run_unit(mod: Any, config: RunConfig, checkpoints: Path, unit: Dict[str, Any]) -> Dict[str, Any]:
    return mod.run_unit(config, unit, checkpoints / mod.NAME / safe_name(unit["key"]))


def _run_unit_in_worker(
    name: str, config: Dict[str, Any], checkpoints: str, threads: Optional[int], unit: Dict[str, Any]
) -> Dict[str, Any]:
    """One unit in a worker process (picklable: rebuilds the config from its dict)."""
    import torch

    from ..allocator import keep_freed_memory

    keep_freed_memory()
    if threads is not None:
        torch.set_num_threads(int(threads))
    return _run_unit(EXPERIMENTS[name], RunConfig.from_dict(config), Path(checkpoints), unit)
