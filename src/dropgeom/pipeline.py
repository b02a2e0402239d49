"""``reproduce`` and ``report`` end to end: run the experiments, build their typed summary, render the report.

The layers stay one-way (issue #8, item 5): the experiments run the units and build a
:class:`~dropgeom.summary.RunSummary` (:mod:`dropgeom.experiments`), the report renders it
(:mod:`dropgeom.report`) without importing experiment code, and this module, above both (with the CLI),
calls one after the other.

Example:
    >>> import tempfile
    >>> render_run(tempfile.mkdtemp())  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileNotFoundError: ... is not a run directory (no config.json); run `dropgeom reproduce --out ...` first
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

from .config import RunConfig
from .experiments import run_experiments, summarize_run
from .report import render_report

__all__ = ["reproduce", "render_run"]


def reproduce(
    config: RunConfig,
    out: Union[str, Path],
    progress: bool = True,
    on_compute: Optional[Callable[[str], None]] = None,
    render: bool = True,
    threads: Optional[int] = 1,
    workers: int = 1,
    executor: str = "process",
    address: Optional[str] = None,
) -> Path:
    """Run (or resume) every experiment of ``config`` into ``out`` and render the report; return the ``report.md`` path.

    The arguments are those of :func:`dropgeom.experiments.run_experiments`, plus ``render``: write
    ``figures/``, ``summary.json``, ``report.md`` and ``report.html`` at the end (:func:`render_run`).

    Raises:
        ConfigError: ``config`` is invalid.
        RunDirError: ``out`` is not a folder dropgeom may write into, another process works in it, or it holds a
            run whose config differs in an option other than ``experiments`` (the claims run may differ).
        KeyboardInterrupt: on Ctrl-C, after the finished units are saved and the workers killed.
        ImportError: ``executor="ray"`` without Ray installed.
        ConnectionError: ``address`` cannot be reached.
        OSError: a file of the report cannot be written.
    """
    root = run_experiments(
        config,
        out,
        progress=progress,
        on_compute=on_compute,
        threads=threads,
        workers=workers,
        executor=executor,
        address=address,
    )
    return render_run(root) if render else root / "report.md"


def render_run(run_dir: Union[str, Path], experiments: Optional[Mapping[str, Any]] = None) -> Path:
    """Render figures, ``summary.json``, ``report.md`` and ``report.html`` of ``run_dir``; return the ``report.md`` path.

    Reads only the run directory (nothing is recomputed). ``experiments`` maps claim names to experiment
    modules (default: :data:`dropgeom.experiments.EXPERIMENTS`).

    Raises:
        FileNotFoundError: ``run_dir`` holds no run (no ``config.json``).
        OSError: a file of the report cannot be written (e.g. a read-only folder).
    """
    return render_report(summarize_run(run_dir, experiments))
