"""The sweep runner behind ``dropgeom reproduce``: every unit of every experiment, resumable.

:func:`reproduce` writes the resolved config to the run directory (or checks
it against the one there), runs each experiment's units that are not finished
yet (experiment x setting x seed; each record written atomically), writes the
metrics tables and renders the report. Interrupt it at any point and run it
again: finished units are skipped.

Example:
    >>> sorted(EXPERIMENTS)
    ['C1', 'C2', 'C3']
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

from ..config import RunConfig
from ..rundir import RunDir, atomic_write_json, safe_name
from . import c1_flatness, c2_curvature_strength, c3_fisher_regularizer

__all__ = ["EXPERIMENTS", "reproduce"]

#: claim name -> experiment module
EXPERIMENTS = {"C1": c1_flatness, "C2": c2_curvature_strength, "C3": c3_fisher_regularizer}


def reproduce(
    config: RunConfig,
    out: Union[str, Path],
    progress: bool = True,
    on_compute: Optional[Callable[[str], None]] = None,
    render: bool = True,
    threads: Optional[int] = 1,
    workers: int = 1,
) -> Path:
    """Run (or resume) every experiment of ``config`` into the folder ``out``; return the report path.

    Args:
        config: a validated :class:`~dropgeom.config.RunConfig`.
        out: the run directory (created if missing). If it already holds a run,
            its config must be the same (that run is resumed).
        progress: show tqdm progress bars.
        on_compute: called with each unit key just before it is computed
            (finished units are skipped and never reach it).
        render: write figures, ``report.md`` and ``report.html`` at the end.
        threads: torch intra-op threads while running (``None``: leave as is).
            The models are tiny: one thread per process is fastest.
        workers: run the units of each experiment in this many processes.
    """
    import torch

    config.validate()
    for name in config.experiments:  # missing inputs (e.g. a data set that is not installed) fail at once
        getattr(EXPERIMENTS[name], "check_inputs", lambda _c: None)(config)
    if threads is not None:
        torch.set_num_threads(int(threads))
    rd = RunDir(out)
    config = rd.init(config)
    timings_path = rd.root / "timings.json"
    timings: Dict[str, Any] = json.loads(timings_path.read_text()) if timings_path.exists() else {"sessions": []}
    session: Dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "experiments": {}}
    t_all = time.perf_counter()
    for name in config.experiments:
        mod = EXPERIMENTS[name]
        t0 = time.perf_counter()
        if workers > 1:
            fn = functools.partial(_run_unit_in_worker, name, config.to_dict(), str(rd.checkpoints), threads)
        else:
            fn = functools.partial(_run_unit, mod, config, rd.checkpoints)
        counts = rd.run_units(name, mod.units(config), fn, progress, on_compute, workers=workers)
        rd.write_metrics(name)
        session["experiments"][name] = {**counts, "seconds": time.perf_counter() - t0}
        session["seconds"] = time.perf_counter() - t_all
        atomic_write_json(timings_path, {"sessions": timings["sessions"] + [session]})
    timings["sessions"].append(session)
    atomic_write_json(timings_path, timings)
    if not render:
        return rd.root / "report.md"
    from ..report import render_report

    return render_report(rd.root)


def _run_unit(mod: Any, config: RunConfig, checkpoints: Path, unit: Dict[str, Any]) -> Dict[str, Any]:
    return mod.run_unit(config, unit, checkpoints / mod.NAME / safe_name(unit["key"]))


def _run_unit_in_worker(name: str, config: Dict[str, Any], checkpoints: str, threads: Optional[int], unit: Dict[str, Any]) -> Dict[str, Any]:
    """One unit in a worker process (picklable: rebuilds the config from its dict)."""
    import torch

    if threads is not None:
        torch.set_num_threads(int(threads))
    return _run_unit(EXPERIMENTS[name], RunConfig.from_dict(config), Path(checkpoints), unit)
