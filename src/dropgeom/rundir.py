"""A run directory with atomic writes and resume.

Layout of a run directory::

    config.json                 the resolved RunConfig (written once)
    units/<experiment>/<key>.json   one record per unit of work (experiment x setting x seed)
    metrics/<experiment>.jsonl  every record of an experiment, one JSON object per line
    metrics/<experiment>.csv    the same as a flat table
    figures/*.png               figures; report.md, report.html
    timings.json                one entry per invocation (written when it starts, updated as it runs)
    .dropgeom-run               marks a folder dropgeom created (it writes into no other non-empty folder)
    .lock                       held (``flock``) by the one process working in the folder, with its pid

Every file is written to a temporary file in the same folder and moved into
place with :func:`os.replace`, which is atomic on POSIX and Windows: a killed
run leaves either the old file or the new one, never half of one. A unit
counts as finished when its record exists with status ``ok`` or ``diverged``
(a diverged training is a result, not a failure); running the same command
again skips finished units and recomputes the rest. Records with status
``error`` (an exception) are shown in the report and retried on resume.

Ownership: :meth:`RunDir.claim` refuses a folder that is neither empty, nor
new, nor a dropgeom run, and :meth:`RunDir.lock` lets one process at a time
work in a run (a second one gets a one-line :class:`RunDirError` naming the
first one's pid; the lock of a killed process is released by the kernel and
taken over).

Example:
    >>> import tempfile
    >>> from dropgeom.rundir import RunDir
    >>> d = RunDir(tempfile.mkdtemp())
    >>> d.is_done("C1", "p=0.1/seed=0")
    False
    >>> d.save_unit("C1", "p=0.1/seed=0", {"status": "ok", "gamma2": 0.5})
    >>> d.is_done("C1", "p=0.1/seed=0"), d.records("C1")[0]["gamma2"]
    (True, 0.5)
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Union

from ._utils import atomic_write_bytes, to_jsonable  # to_jsonable is re-exported here
from .config import EXPERIMENTS, RunConfig

__all__ = [
    "RunDir",
    "RunDirError",
    "safe_name",
    "prepare_output_dir",
    "timed_call",
    "atomic_write_text",
    "atomic_write_bytes",
    "atomic_write_json",
    "FINISHED",
    "to_jsonable",
]

#: statuses of a finished unit (not recomputed on resume)
FINISHED = ("ok", "diverged")
#: the file that marks a folder as a dropgeom run directory
MARKER = ".dropgeom-run"
LOCK = ".lock"


class RunDirError(RuntimeError):
    """A run directory that cannot be used (not ours, in use, not writable); the message says what to do."""


def prepare_output_dir(root: Union[str, Path], what: str = "--out", allowed: Callable[[str], bool] = lambda name: False) -> Path:
    """Create ``root`` (with parents) or check that it is a writable folder dropgeom may write into.

    A folder is ours when it is new or empty, holds :data:`MARKER`, or holds
    only files for which ``allowed(name)`` is true (hidden temporary files are
    always allowed).

    Raises:
        RunDirError: ``root`` is a file, lies under a file, cannot be created or
            written, or is a non-empty folder dropgeom did not create.

    Example:
        >>> import tempfile
        >>> prepare_output_dir(Path(tempfile.mkdtemp()) / "new" / "run").name
        'run'
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise RunDirError(f"{what} {root} is a file, not a folder; choose a new folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except (NotADirectoryError, FileExistsError):
        raise RunDirError(f"{what} {root} lies under a file, not a folder; choose another path") from None
    except PermissionError:
        raise RunDirError(f"cannot create {what} {root}: permission denied; choose a folder you can write to") from None
    except OSError as err:
        raise RunDirError(f"cannot create {what} {root}: {err.strerror or err}") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise RunDirError(f"{what} {root} is not writable (read-only); choose a folder you can write to")
    names = [n for n in os.listdir(root) if n not in (LOCK, MARKER) and not (n.startswith(".") and n.endswith(".tmp"))]
    if names and not (root / MARKER).exists() and not all(allowed(n) for n in names):
        raise RunDirError(
            f"{what} {root} is a non-empty folder that dropgeom did not create (it holds {', '.join(sorted(names)[:3])}"
            f"{', ...' if len(names) > 3 else ''}); choose a new or empty folder"
        )
    return root


def atomic_write_text(path: Union[str, Path], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically.

    Raises:
        TypeError: ``text`` is not a str.
        OSError: the folder cannot be created or written (the old file, if any, is left as it was).

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "a.txt"
        >>> atomic_write_text(path, "hi"); path.read_text()
        'hi'
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Union[str, Path], obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically (after :func:`to_jsonable`).

    Raises:
        TypeError: ``obj`` holds a value JSON cannot store (nothing is written).
        OSError: the folder cannot be created or written.

    Example:
        >>> import json, tempfile
        >>> path = Path(tempfile.mkdtemp()) / "a.json"
        >>> atomic_write_json(path, {"gamma2": float("inf")}); json.loads(path.read_text())
        {'gamma2': 'inf'}
    """
    atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=True) + "\n")


def safe_name(key: str) -> str:
    """A file-name-safe form of a unit key (``/`` and other odd characters become ``__``).

    Raises:
        TypeError: ``key`` is not a str (from :func:`re.sub`).

    Example:
        >>> safe_name("p=0.1/seed=0")
        'p=0.1__seed=0'
    """
    return re.sub(r"[^A-Za-z0-9_.=-]+", "__", key)


class RunDir:
    """One run's folder: config, per-unit records, metrics tables, figures and report."""

    def __init__(self, root: Union[str, Path]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    # -- ownership ------------------------------------------------------------
    @classmethod
    def claim(cls, root: Union[str, Path]) -> "RunDir":
        """The run directory ``root``, created or checked to be ours (see :func:`prepare_output_dir`) and marked.

        A folder from an earlier dropgeom version (``config.json`` and ``units/``, no marker) counts as ours.

        Raises:
            RunDirError: the folder is not writable or holds files dropgeom did not write.
        """
        root = Path(root)
        legacy = (root / "config.json").is_file() and (root / "units").is_dir()
        prepare_output_dir(root, allowed=lambda name: legacy)
        self = cls(root)
        if not (self.root / MARKER).exists():
            try:
                atomic_write_text(self.root / MARKER, "a dropgeom run directory\n")
            except OSError as err:
                raise RunDirError(f"cannot write into {self.root}: {err.strerror or err}") from None
        return self

    @contextlib.contextmanager
    def lock(self) -> Iterator["RunDir"]:
        """Hold the folder's lock for the duration (one process per run directory).

        Uses ``fcntl.flock`` where available: the kernel releases it when the
        holder dies, even on ``kill -9``, so a stale lock file is taken over.
        The holder's pid is written into the file for the error message.

        Raises:
            RunDirError: another live process holds the lock, or the lock file cannot be written.
        """
        path = self.root / LOCK
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise RunDirError(f"cannot write into {self.root}: {err.strerror or err}; choose a folder you can write to") from None
        try:
            try:
                import fcntl
            except ImportError:  # pragma: no cover - Windows: a pid file checked for liveness
                fcntl = None  # type: ignore[assignment]
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    raise RunDirError(self._in_use_message(path)) from None
            else:  # pragma: no cover
                holder = _read_pid(path)
                if holder not in (None, os.getpid()) and _alive(holder):
                    raise RunDirError(self._in_use_message(path))
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            yield self
        finally:
            os.close(fd)  # releases the flock

    def _in_use_message(self, path: Path) -> str:
        pid = _read_pid(path)
        who = f"another dropgeom process (pid {pid})" if pid else "another dropgeom process"
        return f"{self.root} is in use by {who}; wait for it to finish or stop it, or choose another --out folder"

    # -- paths ----------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.root / "config.json"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def unit_path(self, experiment: str, key: str) -> Path:
        return self.root / "units" / experiment / f"{safe_name(key)}.json"

    # -- config ---------------------------------------------------------------
    def init(self, config: RunConfig) -> RunConfig:
        """Write ``config.json``, or check it matches the one already there (resume); return the stored config.

        The claims run (``config.experiments``, the CLI's ``--only``) are not part of a run's identity: a
        folder holding a run of the same config with other claims is reused, and the stored config then lists
        every claim run in the folder (in the order of :data:`dropgeom.config.EXPERIMENTS`), so the report
        shows them all. Every other option must match.

        Raises:
            RunDirError: the folder holds a run whose config differs in another option (use another ``--out``
                folder, or the options of that run to resume or extend it).
            ConfigError: the stored ``config.json`` is not a valid config.
            OSError: ``config.json`` cannot be written.
        """
        if not self.config_path.exists():
            atomic_write_text(self.config_path, config.to_json() + "\n")
            return config
        old = self.load_config()
        old_d, new_d = old.to_dict(), config.to_dict()
        diff = sorted(k for k in new_d if k != "experiments" and old_d.get(k) != new_d[k])
        if diff:
            raise RunDirError(
                f"{self.root} already holds a run of another config (it differs in {', '.join(diff)}); choose another "
                "--out folder for this one, or give the options of that run to resume it (--only may differ: "
                "a later run adds its claims to the folder)"
            )
        claims = set(old.experiments) | set(config.experiments)
        union = tuple(name for name in EXPERIMENTS if name in claims)
        if set(old.experiments) != claims:
            old = old.replace(experiments=list(union))
            atomic_write_text(self.config_path, old.to_json() + "\n")
        return old

    def load_config(self) -> RunConfig:
        if not self.config_path.exists():
            raise FileNotFoundError(f"{self.root} is not a run directory (no config.json)")
        return RunConfig.from_json(self.config_path.read_text())

    # -- units ----------------------------------------------------------------
    def load_unit(self, experiment: str, key: str) -> Optional[Dict[str, Any]]:
        path = self.unit_path(experiment, key)
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:  # cannot happen with atomic writes; recompute if it does
            return None

    def is_done(self, experiment: str, key: str) -> bool:
        rec = self.load_unit(experiment, key)
        return rec is not None and rec.get("status") in FINISHED

    def save_unit(self, experiment: str, key: str, record: Mapping[str, Any]) -> None:
        """Store one unit's record atomically (``key`` and ``experiment`` are added)."""
        rec = dict(record)
        rec.setdefault("status", "ok")
        rec["experiment"], rec["key"] = experiment, key
        atomic_write_json(self.unit_path(experiment, key), rec)

    def records(self, experiment: str) -> List[Dict[str, Any]]:
        """Every stored record of ``experiment`` (sorted by key)."""
        folder = self.root / "units" / experiment
        out = []
        for path in sorted(folder.glob("*.json")) if folder.exists() else []:
            try:
                out.append(json.loads(path.read_text()))
            except json.JSONDecodeError:
                continue
        return out

    def run_units(
        self,
        experiment: str,
        units: Sequence[Mapping[str, Any]],
        fn: Callable[[Mapping[str, Any]], Mapping[str, Any]],
        progress: Any = True,
        on_compute: Optional[Callable[[str], None]] = None,
        workers: int = 1,
        on_done: Optional[Callable[[str, Mapping[str, Any]], None]] = None,
        executor: str = "process",
        address: Optional[str] = None,
    ) -> Dict[str, int]:
        """Run ``fn(unit)`` for each unit (a mapping with a ``key``) not finished yet.

        Exceptions inside ``fn`` are recorded (status ``error``, with the
        message) and do not stop the sweep; ``KeyboardInterrupt`` does (the
        finished units are kept, worker processes are killed at once). With
        ``workers > 1`` the units run in that many spawned processes (a
        :class:`~dropgeom.pool.WorkerPool`; ``fn`` must be picklable); records
        are still written by this process, one atomic file each. ``executor="ray"`` runs the units as Ray tasks
        instead (:class:`~dropgeom.executors.RayPool`: a local Ray with ``workers`` CPUs, or the cluster at
        ``address``); this process stays the only writer.

        ``progress``: ``True`` for a tqdm bar of this experiment, ``False`` for
        none, or an object with ``start(key)`` and ``done(key, record)`` methods
        (the sweep's overall progress line). ``on_compute(key)`` is called just
        before a unit starts, ``on_done(key, record)`` after its record is stored.
        Returns counts of computed, skipped and failed units.
        """
        from .executors import ExecutorKind, make_pool
        from .pool import exit_on_next_interrupt

        counts = {"computed": 0, "skipped": 0, "errors": 0}
        todo = [u for u in units if not self.is_done(experiment, u["key"])]
        counts["skipped"] = len(units) - len(todo)
        reporter = (
            progress if hasattr(progress, "done") else _TqdmReporter(experiment, len(todo), counts["skipped"], bool(progress))
        )

        def start(unit: Mapping[str, Any]) -> None:
            if on_compute is not None:
                on_compute(unit["key"])
            reporter.start(unit["key"])

        def store(unit: Mapping[str, Any], record: Dict[str, Any]) -> None:
            record["unit"] = {k: v for k, v in unit.items() if k != "key"}
            self.save_unit(experiment, unit["key"], record)
            counts["computed"] += 1
            counts["errors"] += record["status"] == "error"
            reporter.done(unit["key"], record)
            if on_done is not None:
                on_done(unit["key"], record)

        kind = ExecutorKind(executor)
        pool: Any = None
        try:
            if not todo:
                pass
            elif kind is ExecutorKind.PROCESS and (workers <= 1 or len(todo) <= 1):
                for unit in todo:
                    start(unit)
                    store(unit, timed_call(fn, unit))
            else:
                pool = make_pool(functools.partial(timed_call, fn), min(workers, len(todo)), kind, address)
                for unit, result in pool.imap_unordered(todo, on_start=start):
                    if isinstance(result, BaseException):
                        result = {"status": "error", "error": f"{type(result).__name__}: {result}", "seconds": float("nan")}
                    store(unit, result)
                pool.close()
                pool = None
        except KeyboardInterrupt:
            exit_on_next_interrupt()  # a second Ctrl-C while cleaning up exits at once
            raise
        finally:
            if pool is not None:
                pool.terminate()
            if not hasattr(progress, "done"):
                reporter.close()
        return counts

    # -- tables -----------------------------------------------------------------
    def write_metrics(self, experiment: str) -> List[Dict[str, Any]]:
        """Write ``metrics/<experiment>.jsonl`` and ``.csv`` from the stored records; return the records."""
        records = self.records(experiment)
        lines = "".join(json.dumps(to_jsonable(r), sort_keys=True) + "\n" for r in records)
        atomic_write_text(self.root / "metrics" / f"{experiment}.jsonl", lines)
        flat = [_flatten(r) for r in records]
        columns: List[str] = []
        for row in flat:
            for c in row:
                if c not in columns:
                    columns.append(c)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        for row in flat:
            writer.writerow(row)
        atomic_write_text(self.root / "metrics" / f"{experiment}.csv", buf.getvalue())
        return records


class _TqdmReporter:
    """A tqdm bar over one experiment's units (used when no overall progress line is given)."""

    def __init__(self, experiment: str, total: int, skipped: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=f"{experiment} ({skipped} done before)", unit="run", disable=not enabled, leave=False)

    def start(self, key: str) -> None:
        self.bar.set_postfix_str(f"running {key}")

    def done(self, key: str, record: Mapping[str, Any]) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _read_pid(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:  # pragma: no cover - only without fcntl
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def timed_call(fn: Callable[[Mapping[str, Any]], Mapping[str, Any]], unit: Mapping[str, Any]) -> Dict[str, Any]:
    """``fn(unit)`` as a record with ``status`` and ``seconds``; an exception becomes status ``error``.

    Raises:
        KeyboardInterrupt: passed on, as is every ``BaseException`` that is not an ``Exception``.

    Example:
        >>> timed_call(lambda u: {"y": u["x"] + 1}, {"x": 1})["y"], timed_call(lambda u: 1 / 0, {})["error"]
        (2, 'ZeroDivisionError: division by zero')
    """
    t0 = time.perf_counter()
    try:
        record = dict(fn(unit))
    except KeyboardInterrupt:
        raise
    except Exception as err:  # recorded and shown in the report; retried on resume
        record = {"status": "error", "error": f"{type(err).__name__}: {err}"}
    record.setdefault("status", "ok")
    record["seconds"] = time.perf_counter() - t0
    return record


def _flatten(rec: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in rec.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, name + "."))
        elif isinstance(v, (list, tuple)):
            if all(isinstance(x, (int, float, str)) for x in v) and len(v) <= 8:
                out[name] = ";".join(str(x) for x in v)
        else:
            out[name] = v
    return out
