"""Run every benchmark: ``python bench/run.py [--quick] [--only NAME ...]``.

Each ``bench/bench_<topic>.py`` exposes ``main(quick: bool) -> None`` and
prints its own table of ratios (against peers and against one forward+backward
pass of the same model, measured in the same run).
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent


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

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} intra-op thread(s)", flush=True)
    sys.path.insert(0, str(HERE))
    topics = sorted(p.stem[len("bench_") :] for p in HERE.glob("bench_*.py"))
    if args.only:
        unknown = set(args.only) - set(topics)
        if unknown:
            parser.error(f"unknown topics {sorted(unknown)}; available: {topics}")
        topics = [t for t in topics if t in args.only]
    for topic in topics:
        t0 = time.perf_counter()
        print(f"\n#### bench_{topic} ####", flush=True)
        importlib.import_module(f"bench_{topic}").main(quick=args.quick)
        print(f"(bench_{topic}: {time.perf_counter() - t0:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
