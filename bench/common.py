"""Shared timing and memory helpers for the benchmarks (not part of the package).

Every benchmark reports times as ratios to one forward+backward pass of the
same model on the same batch, measured in the same run, so numbers from
different machines are comparable.
"""

from __future__ import annotations

import gc
import resource
import statistics
import time
import tracemalloc
from typing import Callable, Dict, List, Optional

import torch


def median_time(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time (seconds) of ``fn()`` over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def forward_backward(model: torch.nn.Module, x: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
    """A closure running one forward+backward pass (the unit all ratios use)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def run() -> None:
        loss = loss_fn(model(x))
        torch.autograd.grad(loss, params)

    return run


def peak_memory(fn: Callable[[], object]) -> float:
    """Peak extra memory (MiB) while running ``fn``: CUDA allocator peak on GPU,
    otherwise the peak of Python-tracked allocations plus the growth of the
    process's max RSS (a lower bound on CPU)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(peak / 2**20, (rss1 - rss0) / 1024)


def print_table(rows: List[Dict[str, object]], columns: Optional[List[str]] = None, title: str = "") -> None:
    """Print rows of dicts as an aligned text table."""
    if not rows:
        return
    columns = columns or list(rows[0])
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    if title:
        print(f"\n== {title} ==")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)
