"""Shared timing and memory helpers for the benchmarks (not part of the package).

Every benchmark reports times as ratios to one forward+backward pass of the
same model on the same batch, measured in the same run, so numbers from
different machines are comparable.
"""

from __future__ import annotations

import contextlib
import gc
import os
import resource
import statistics
import sys
import threading
import time
import tracemalloc
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch


def median_time(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time (seconds) of ``fn()`` over ``repeat`` runs after ``warmup`` runs, with the
    garbage collector paused (as ``timeit`` does; one full ``gc.collect()`` before, not one per run:
    with torch and its compiler stack imported a collection takes 0.1-0.5 s)."""
    for _ in range(warmup):
        fn()
    times = []
    with gc_paused():
        for _ in range(repeat):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """One ``gc.collect()``, then no automatic collection inside the block (restored after)."""
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def forward_backward(
    model: torch.nn.Module, x: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor]
) -> Callable[[], None]:
    """A closure running one forward+backward pass (the unit all ratios use)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def run() -> None:
        loss = loss_fn(model(x))
        torch.autograd.grad(loss, params)

    return run


def _rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc``; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return 0


_MALLOPT_DONE = False


def _static_mmap_threshold() -> None:
    """glibc raises its mmap threshold after large frees, so freed tensors stay
    resident and a later peak is invisible in the RSS. Fix the threshold at
    256 KiB (``mallopt(M_MMAP_THRESHOLD)``), once, so large tensors come and go
    with the RSS. No effect where glibc is absent."""
    global _MALLOPT_DONE
    if _MALLOPT_DONE:
        return
    _MALLOPT_DONE = True
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _trim_heap() -> None:
    """Give the heap's free pages back to the system (glibc ``malloc_trim(0)``), so that what ``fn`` allocates
    shows in the RSS whatever this process freed before: without it, the same call's peak read 223 or 157 MiB
    depending on which libraries had run earlier in the process (2026-12-05). No effect where glibc is absent."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _peak_here(fn: Callable[[], object], warm: bool = True) -> float:
    """:func:`peak_memory` in this process (it changes the allocator for good: see there)."""
    if not torch.cuda.is_available():
        _static_mmap_threshold()
    if warm:
        fn()
        getattr(fn, "clear", lambda: None)()  # a runner that keeps its result between calls drops it here
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    _trim_heap()
    base = _rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(2e-4)

    th = threading.Thread(target=sample, daemon=True)
    tracemalloc.start()
    th.start()
    try:
        fn()
    finally:
        stop.set()
        th.join()
        _, py_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    peak[0] = max(peak[0], _rss_bytes())
    return max((peak[0] - base) / 2**20, py_peak / 2**20)


def in_child(fn: Callable[[], float]) -> float:
    """``fn()`` run in a forked child process; its float result comes back through a pipe (``nan`` on error).

    Memory measurements change the process for good (a static glibc mmap threshold makes every large tensor
    an mmap with fresh page faults; ``tracemalloc`` and a sampler thread slow Python), which slowed every
    later timing in the same process by up to 2x (measured 2026-12-05: bench_train's CNN rows read 8x or 17x
    a dropout step depending on which topic ran before). In a child, the timings of the parent are untouched.
    Falls back to running in this process where ``os.fork`` does not exist.
    """
    if not hasattr(os, "fork"):
        return fn()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: measure, report, exit without running the parent's cleanup
        try:
            os.close(r)
            value = float(fn())
        except BaseException:  # noqa: BLE001 - any failure reads as nan in the parent
            value = float("nan")
        os.write(w, repr(value).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while True:
        chunk = os.read(r, 4096)
        if not chunk:
            break
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    try:
        return float(data.decode() or "nan")
    except ValueError:
        return float("nan")


def peak_memory(fn: Callable[[], object], warm: bool = True) -> float:
    """Peak extra memory (MiB) while running ``fn``: CUDA allocator peak on GPU;
    on CPU the peak resident set size above its value at the start, sampled
    every ~0.2 ms by a background thread (plus Python-tracked allocations, which
    catch short-lived peaks the sampler might miss only for Python objects),
    measured in a forked child (:func:`in_child`) so that this process's later
    timings are not slowed by the measurement. ``fn`` runs once more for it
    (twice with ``warm``): time it separately.

    ``warm`` (default) runs ``fn`` once before the measured call (then ``fn.clear()``
    where the runner has one, so that a result it keeps between calls, such as
    ASDL's factors on the modules, is not in the baseline), so that what a
    process pays once (lazy imports, first-use initialisation) is not charged to
    the call: PyTorch's first ``autograd.grad`` with a ``grad_outputs`` tensor
    imports sympy (``torch.fx.experimental.symbolic_shapes``, ~50 MiB resident),
    and a library whose first call takes that path would otherwise read 50 MiB
    heavier than one that does not (measured 2026-12-05)."""
    if torch.cuda.is_available():
        return _peak_here(fn, warm)
    return in_child(lambda: _peak_here(fn, warm))


def print_table(rows: List[Dict[str, object]], columns: Optional[List[str]] = None, title: str = "") -> None:
    """Print rows of dicts as an aligned text table, flushed at once (so a long run shows each table as it is measured)."""
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
    sys.stdout.flush()


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


class RowPrinter:
    """Print a table one row at a time, flushed (for measurements that take minutes per row):
    ``RowPrinter({"column": width, ...}).row({...})``; the header comes with the first row."""

    def __init__(self, widths: Dict[str, int]) -> None:
        self.widths = widths
        self.started = False

    def row(self, values: Dict[str, object]) -> None:
        if not self.started:
            self.started = True
            print("  ".join(c.ljust(w) for c, w in self.widths.items()))
            print("  ".join("-" * max(w, len(c)) for c, w in self.widths.items()))
        print("  ".join(_fmt(values.get(c, "")).ljust(max(w, len(c))) for c, w in self.widths.items()), flush=True)


def asdl_fisher(
    model: torch.nn.Module, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], fisher_type: str, shape: str, n: int
) -> Callable[[], List[Any]]:
    """ASDL's (PyPI ``asdfghjkl``) cross-entropy Fisher of one type and shape on its own copy of ``model``: a call runs
    its ``FisherMaker`` over ``batches`` (accumulated; ``data_size = n``, the mean) and returns the modules holding
    the result (``module.fisher``), in module order. The maker is built once, outside the timed call."""
    import copy

    import asdl

    net = copy.deepcopy(model)
    cfg = asdl.FisherConfig(fisher_type=fisher_type, fisher_shapes=[shape], loss_type=asdl.LOSS_CROSS_ENTROPY, data_size=n)
    maker = asdl.get_fisher_maker(net, cfg)

    def run() -> List[Any]:
        for i, (x, y) in enumerate(batches):
            maker.setup_loss_call(torch.nn.functional.cross_entropy, maker.setup_model_call(net, x), y)
            maker.forward_and_backward(accumulate=i > 0)
        return [m for m in net.modules() if hasattr(m, "fisher")]

    def clear() -> None:
        """Drop the result ASDL keeps on the modules (``peak_memory`` calls it between its warm and measured calls:
        with it in the baseline, the measured call freed the old factors as it made new ones and read 25 instead
        of 44 MiB for streamed KFAC on 784-1024-1024-10, whose live tensors peak at 45 MiB like dropgeom's)."""
        for m in net.modules():
            if hasattr(m, "fisher"):
                delattr(m, "fisher")

    run.clear = clear  # type: ignore[attr-defined]
    return run
