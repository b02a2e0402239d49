"""Run every benchmark: ``python bench/run.py [--quick] [--only NAME ...]``.

Each ``bench/bench_<topic>.py`` exposes ``main(quick: bool) -> None`` and
prints its own tables of ratios (against peers and against one forward+backward
pass of the same model, measured in the same run) as it measures them, then its
elapsed time; this script prints the total against the goals: ``--quick``
under 2 minutes and full mode under 10 on an idle 2-core machine with one
torch thread. Each topic runs in a fresh Python process, so that no topic
inherits another's allocator state (glibc's mmap threshold moves with the
blocks a process has freed, which changed the exact Fisher-dropout steps'
ratios by up to 25% between ``--only train`` and a full run) or its
leftover gloo and Ray processes. ``DROPGEOM_MALLOC=heap`` applies
:func:`dropgeom.allocator.keep_freed_memory` in every topic's process.
The 60,000-image streamed Fisher (issue 12) is a separate, longer command:
``python bench/bench_scale.py --n 60000 --no-scaling``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import resource
import subprocess
import sys
import time
from typing import List

HERE = pathlib.Path(__file__).resolve().parent


GOAL_S = {True: 120.0, False: 600.0}  # --quick, full mode


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (the 2-process runs): with one torch
    thread, near the wall time an idle machine would take, so a run on a loaded machine still
    says whether the goal would be met."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


#: what each topic's process runs: its threads and allocator set, then ``bench_<topic>.main(quick)``
_CHILD = """
import sys
here, topic, threads, quick = sys.argv[1:5]
sys.path.insert(0, here)
import torch
torch.set_num_threads(int(threads))
from dropgeom.allocator import keep_freed_memory
keep_freed_memory()
__import__("bench_" + topic).main(quick=quick == "True")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller configurations")
    parser.add_argument("--only", nargs="*", default=None, help="topics to run, e.g. fisher curvature dropout train")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared 2-core machine two OpenMP threads spin-wait "
        "on each other and a small MLP's forward+backward went from 4 ms to 195 ms)",
    )
    args = parser.parse_args()
    import torch

    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    malloc = os.environ.get("DROPGEOM_MALLOC", "system")
    print(
        f"torch {torch.__version__}, {args.threads} intra-op thread(s), allocator {malloc} (DROPGEOM_MALLOC), "
        f"one process per topic, load average {load}",
        flush=True,
    )
    # scale last: its gloo process groups and Ray workers take seconds to wind down after it returns, and a
    # topic timed right after it (train, measured on 2026-12-05) read up to 2x slow
    topics = sorted((p.stem[len("bench_") :] for p in HERE.glob("bench_*.py")), key=lambda t: (t == "scale", t))
    if args.only:
        unknown = set(args.only) - set(topics)
        if unknown:
            parser.error(f"unknown topics {sorted(unknown)}; available: {topics}")
        topics = [t for t in topics if t in args.only]
    t_all = time.perf_counter()
    took = {}
    cpu_all = _cpu_seconds()
    failed: List[str] = []
    for topic in topics:
        t0, c0 = time.perf_counter(), _cpu_seconds()
        print(f"\n#### bench_{topic} ####", flush=True)
        # a fresh process per topic; a broken topic (traceback on stderr) must not lose the others' tables
        if subprocess.run([sys.executable, "-c", _CHILD, str(HERE), topic, str(args.threads), str(args.quick)]).returncode:
            failed.append(topic)
        took[topic] = time.perf_counter() - t0
        print(f"(bench_{topic}: {took[topic]:.1f} s wall, {_cpu_seconds() - c0:.1f} s CPU)", flush=True)
    total, cpu = time.perf_counter() - t_all, _cpu_seconds() - cpu_all
    goal = GOAL_S[args.quick]
    per_topic = ", ".join(f"{k} {v:.0f} s" for k, v in took.items())
    print(f"\ntotal {total:.0f} s ({per_topic}); load average now {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    scope = "" if args.only is None else " (a subset of topics)"
    if failed:
        print(f"FAILED topics: {failed}")
    print(
        f"goal: {'--quick' if args.quick else 'full mode'} under {goal / 60:.0f} min on an idle 2-core machine{scope}: "
        f"{'met' if total <= goal else 'not met'} by the wall time ({total:.0f} s); "
        f"{'met' if cpu <= goal else 'not met'} by the CPU time ({cpu:.0f} s, the closer guess on a shared machine)",
        flush=True,
    )
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
