"""Scale: the Fisher streamed over a data loader, against the peers given the same loader, and over 2 gloo processes.

Rows (float32, one torch thread per process, batches of ``BATCH`` = 1,000 inputs; 500 with ``--quick``):

  exact diag  dropgeom ``fisher_streamed(structure="diag")`` | nngeometry ``FIM(PMatDiag)`` | BackPACK
              ``DiagGGNExact`` accumulated over the loader (sum of batch sums / N) | ASDL ``FisherMaker``
              (``FISHER_EXACT``, ``SHAPE_DIAG``, ``accumulate=True`` over the batches)
  kfac        dropgeom ``fisher_streamed(structure="kfac")`` | curvlinops ``KFACLinearOperator`` (type-2, expand,
              factors computed) | nngeometry ``FIM(PMatKFAC)`` | ASDL ``SHAPE_KRON``, accumulated alike

Each row gives seconds, the ratio to one forward+backward pass over the whole loader (the unit of every benchmark
here), ``dropgeom / this`` (dropgeom's time over this library's: the ratio to each peer), and the peak extra memory
(MiB). Every library runs once on its own copy of the model (hooks left on a shared model would slow the others),
after an untimed warm-up on 64 inputs; rows are printed as they are measured. ``strong scaling``: the streamed exact
diagonal over the same data on 1 and 2 gloo processes (127.0.0.1), efficiency ``T1 / (2 T2)``; on a 2-core machine
with other load this is an upper bound on what a cluster gives.

Data: Fashion-MNIST's training images when the Debian package ``dataset-fashion-mnist`` is installed, else synthetic
images of the same shape (the timings do not depend on the pixel values). Commands:

  python bench/bench_scale.py --n 60000 --no-scaling   # issue 12's measurement: all 60,000 images, MLP and CNN
                                                       # (the CNN's peers take most of an hour on one core)
  python bench/bench_scale.py                          # MLP over 10,000 images, CNN over 2,000, and the
                                                       # 2-process part (what ``bench/run.py`` runs)
  python bench/bench_scale.py --quick                  # 1,000 images in batches of 500, the MLP only
                                                       # (``bench/run.py --quick``)
"""

from __future__ import annotations

import copy
import os
import pathlib
import socket
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.multiprocessing as mp
from common import RowPrinter, asdl_fisher, peak_memory
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from dropgeom.streaming import fisher_streamed

BATCH = 1000
FASHION = pathlib.Path("/usr/share/datasets/fashion-mnist")


def _data(n: int) -> Tuple[Tensor, Tensor, str]:
    from dropgeom.data import read_idx

    cands = [FASHION / "train-images-idx3-ubyte", FASHION / "train-images-idx3-ubyte.gz"]
    img = next((p for p in cands if p.exists()), None)
    if img is not None:
        lab = next(p for p in (FASHION / "train-labels-idx1-ubyte", FASHION / "train-labels-idx1-ubyte.gz") if p.exists())
        x = torch.from_numpy(read_idx(img)[:n].astype(np.float32) / 255.0).unsqueeze(1)
        y = torch.from_numpy(read_idx(lab)[:n].astype(np.int64))
        return x, y, "Fashion-MNIST"
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g), "synthetic 28x28"


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 10),
    )


def _fwd_bwd(model: nn.Module, loader: DataLoader) -> Callable[[], None]:
    net = copy.deepcopy(model)
    params = list(net.parameters())

    def run() -> None:
        for x, y in loader:
            torch.autograd.grad(nn.functional.cross_entropy(net(x), y, reduction="sum"), params)

    return run


def _backpack_diag(model: nn.Module, loader: DataLoader) -> Callable[[], object]:
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact

    net = extend(copy.deepcopy(model))
    loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))

    def run() -> object:
        total = [torch.zeros_like(p) for p in net.parameters()]
        n = 0
        for x, y in loader:
            net.zero_grad()
            with backpack(DiagGGNExact()):
                loss_fn(net(x), y).backward()
            for t, p in zip(total, net.parameters()):
                t += p.diag_ggn_exact
            n += x.shape[0]
        for p in net.parameters():  # the last batch's copy stays on the parameters otherwise (and in the next
            del p.diag_ggn_exact  # call's memory baseline): a user keeps the returned total, not it
        return [t / n for t in total]

    return run


def _peers(model: nn.Module, loader: DataLoader) -> Dict[str, Dict[str, Callable[[], object]]]:
    import asdl
    from curvlinops import KFACLinearOperator
    from nngeometry.metrics import FIM
    from nngeometry.object import PMatDiag, PMatKFAC

    ng = copy.deepcopy(model)
    cl = copy.deepcopy(model)
    ours = copy.deepcopy(model)

    def curvlinops_kfac() -> object:
        op = KFACLinearOperator(
            cl,
            nn.CrossEntropyLoss(),
            list(cl.parameters()),
            loader,
            fisher_type="type-2",
            separate_weight_and_bias=False,
            check_deterministic=False,
        )
        op.compute_kronecker_factors()
        return op

    return {
        "exact diag": {
            "dropgeom": lambda: fisher_streamed(ours, loader, structure="diag"),
            "nngeometry": lambda: FIM(ng, loader, PMatDiag, variant="classif_logits").get_diag(),
            "backpack": _backpack_diag(model, loader),
            "asdl": asdl_fisher(model, loader, asdl.FISHER_EXACT, asdl.SHAPE_DIAG, len(loader.dataset)),
        },
        "kfac": {
            "dropgeom": lambda: fisher_streamed(ours, loader, structure="kfac"),
            "curvlinops": curvlinops_kfac,
            "nngeometry": lambda: FIM(ng, loader, PMatKFAC, variant="classif_logits"),
            "asdl": asdl_fisher(model, loader, asdl.FISHER_EXACT, asdl.SHAPE_KRON, len(loader.dataset)),
        },
    }


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _streamed_diag(rank: int, world: int, n: int, make: str) -> float:
    """Seconds for this rank's share of the streamed exact diagonal (all-reduced), between barriers."""
    import torch.distributed as dist

    x, y, _ = _data(n)
    model = _mlp() if make == "mlp" else _cnn()
    shard = slice(rank * n // world, (rank + 1) * n // world)
    loader = DataLoader(TensorDataset(x[shard], y[shard]), batch_size=BATCH)
    fisher_streamed(model, [(x[shard][:64], y[shard][:64])], structure="diag")  # warm-up
    dist.barrier()
    t0 = time.perf_counter()
    fisher_streamed(model, loader, structure="diag")
    dist.barrier()
    return time.perf_counter() - t0


def _fd_epoch(rank: int, world: int, n: int) -> float:
    """Seconds for one Fisher-dropout epoch (mc estimator) under DDP, between barriers."""
    import torch.distributed as dist

    from dropgeom.train import train

    x, y, _ = _data(n)
    x = x.flatten(1)
    shard = slice(rank * n // world, (rank + 1) * n // world)
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(784, 256), nn.ReLU(), nn.Dropout(0.2), nn.Linear(256, 256), nn.ReLU(), nn.Dropout(0.2), nn.Linear(256, 10)
    )
    ddp = nn.parallel.DistributedDataParallel(net)
    opts = {"p": 0.2, "estimator": "mc"}
    times = []
    for data in ((x[shard][:256], y[shard][:256]), (x[shard], y[shard])):  # warm-up, then the timed epoch
        dist.barrier()
        t0 = time.perf_counter()
        train(ddp, data, "fisher_dropout", objective_options=opts, epochs=1, batch_size=256 // world, progress=False, seed=rank)
        dist.barrier()
        times.append(time.perf_counter() - t0)
    return times[-1]


def _parallel_worker(rank: int, world: int, port: int, jobs: List[Tuple[str, int]], out: str) -> None:
    """One process group per world size runs every job (process start-up is paid once): ("fd", n) is a
    Fisher-dropout epoch, ("mlp" | "cnn", n) the streamed exact diagonal. Rank 0 writes the seconds."""
    import json

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        took = [_fd_epoch(rank, world, n) if job == "fd" else _streamed_diag(rank, world, n, job) for job, n in jobs]
        if rank == 0:
            pathlib.Path(out).write_text(json.dumps(took))
        dist.barrier()  # both ranks done communicating before either tears gloo down
    finally:
        dist.destroy_process_group()


def _parallel_times(jobs: List[Tuple[str, int]]) -> Dict[int, List[float]]:
    """world size (1, 2) -> seconds of each job."""
    import json
    import tempfile

    out: Dict[int, List[float]] = {}
    for world in (1, 2):
        f = os.path.join(tempfile.mkdtemp(), "t")
        mp.spawn(_parallel_worker, args=(world, _free_port(), jobs, f), nprocs=world, join=True)
        out[world] = json.loads(pathlib.Path(f).read_text())
    return out


def _tiny_unit(i: int) -> float:
    return float(torch.randn(64, 64).matmul(torch.randn(64, 64)).sum()) + i


def _executor_overhead(kinds: Tuple[str, ...], units: int = 20) -> Dict[str, Tuple[float, float]]:
    """Seconds to start each executor, and seconds per tiny unit once started (2 workers)."""
    from dropgeom.executors import make_pool

    out: Dict[str, Tuple[float, float]] = {}
    for kind in kinds:
        try:
            t0 = time.perf_counter()
            with make_pool(_tiny_unit, workers=2, kind=kind) as pool:
                list(pool.imap_unordered([-1, -2]))  # workers up
                started = time.perf_counter() - t0
                t1 = time.perf_counter()
                list(pool.imap_unordered(range(units)))
                out[kind] = (started, (time.perf_counter() - t1) / units)
        except ImportError as err:
            print(f"  {kind}: {err}", flush=True)
    return out


PEER_NAMES = ("nngeometry", "backpack", "curvlinops", "asdl")
MODELS = {"mlp": ("MLP 784-1024-1024-10", _mlp), "cnn": ("CNN conv16-pool-conv32-pool-linear", _cnn)}


def _warm_up(model: nn.Module, x: Tensor, y: Tensor) -> None:
    """First calls pay one-time costs (torch.func / dynamo imports, hooks): one call of each on 64 inputs, untimed."""
    warm = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=64)
    for impls in _peers(model, warm).values():
        for fn in impls.values():
            try:
                fn()
            except Exception:  # noqa: BLE001 - reported in the timed run
                pass


def compare(name: str, model: nn.Module, x: Tensor, y: Tensor, batch: int = BATCH) -> None:
    """Time and peak memory of dropgeom and each peer over one loader; one row printed as soon as measured."""
    loader = DataLoader(TensorDataset(x, y), batch_size=batch)
    t0 = time.perf_counter()
    # memory on the first two batches, each in a child forked from this process (common.peak_memory; streamed,
    # the peak does not grow with the number of batches), all before any timing: a child inherits its parent's
    # heap, and after the timed loops the same call read up to 110 MiB more (CNN diagonal: 317 vs 428 MiB)
    short = DataLoader(TensorDataset(x[: 2 * batch], y[: 2 * batch]), batch_size=batch)
    mems = {(q, lib): peak_memory(fn) for q, impls in _peers(model, short).items() for lib, fn in impls.items()}
    _warm_up(model, x, y)
    unit = _timed(_fwd_bwd(model, loader))
    print(f"\n== {name}, {len(x)} inputs, batch {batch} (fwd+bwd over the loader: {unit:.2f} s) ==", flush=True)
    print("'dropgeom / this' = dropgeom's time over this library's (below 1: dropgeom is faster)", flush=True)
    out = RowPrinter({"quantity": 10, "library": 10, "seconds": 9, "x fwd+bwd": 9, "dropgeom / this": 15, "peak MiB": 8})
    for quantity, impls in _peers(model, loader).items():
        ours = float("nan")
        for lib, fn in impls.items():
            took: List[float] = [float("nan")]
            try:
                took[0] = _timed(fn)
            except Exception as err:  # a peer that cannot do this model is reported, not fatal
                print(f"  {lib} {quantity}: {type(err).__name__}: {str(err)[:120]}", flush=True)
                continue
            mem = mems[(quantity, lib)]
            if lib == "dropgeom":
                ours = took[0]
            out.row(
                {
                    "quantity": quantity,
                    "library": lib,
                    "seconds": took[0],
                    "x fwd+bwd": took[0] / unit,
                    "dropgeom / this": ours / took[0],
                    "peak MiB": mem,
                }
            )
    print(f"({name}: {time.perf_counter() - t0:.0f} s)", flush=True)


def parallel(n: int, quick: bool) -> None:
    """Strong scaling over 2 gloo processes (one DDP Fisher-dropout epoch over ``n`` inputs, the streamed
    diagonal over ``n // 2`` (MLP) and ``n // 8`` (CNN, full mode only)) and the executors' overheads (Ray's, whose
    start and shutdown take about 8 s, in full mode only)."""
    jobs = [("fd", n), ("mlp", n // 2)] + ([] if quick else [("cnn", n // 8)])
    t = _parallel_times(jobs)
    for i, (job, m) in enumerate(jobs):
        what = (
            f"one Fisher-dropout epoch (mc estimator, MLP 784-256-256-10, {m} inputs, global batch 256, DDP)"
            if job == "fd"
            else f"streamed exact diag ({job}, {m} inputs, batch {BATCH})"
        )
        print(
            f"strong scaling, {what}: 1 process {t[1][i]:.2f} s, 2 gloo processes {t[2][i]:.2f} s, "
            f"efficiency {t[1][i] / (2 * t[2][i]):.2f}",
            flush=True,
        )
    for kind, (start, per_unit) in _executor_overhead(("process",) if quick else ("process", "ray")).items():
        print(f"executor {kind}: start {start:.2f} s, {1000 * per_unit:.1f} ms per tiny unit (20 units, 2 workers)", flush=True)


#: inputs per model when ``n`` is not given: the CNN's six runs cost about 18 CPU-seconds per 1,000 images,
#: several times the MLP's (measured 2026-12-04), so full mode streams 10,000 images through the MLP and 2,000 through the CNN
DEFAULT_N = {True: {"mlp": 1000}, False: {"mlp": 10000, "cnn": 2000}}


def main(quick: bool = False, n: Optional[int] = None, models: Optional[List[str]] = None, scaling: bool = True) -> None:
    """``quick``: 1,000 inputs in batches of 500, the MLP only. Else the MLP over 10,000 inputs and the CNN over 2,000, or every
    model over ``n`` (the measurement of issue 12 is ``n=60000``); ``scaling=False`` leaves out the
    multi-process part."""
    sizes = {k: n or DEFAULT_N[quick].get(k, DEFAULT_N[False][k]) for k in (models or DEFAULT_N[quick])}
    x, y, source = _data(max(sizes.values()))
    batch = BATCH // 2 if quick else BATCH
    print(f"{source}, batches of {batch}, float32, one thread, every library on its own model copy", flush=True)
    for key, m in sizes.items():
        name, make = MODELS[key]
        compare(name, make(), x[:m], y[:m], batch)
    if scaling:
        parallel(2048 if quick else 8192, quick)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1,000 inputs in batches of 500, the MLP only")
    parser.add_argument(
        "--n", type=int, default=None, help="inputs streamed through every model (default: MLP 10,000, CNN 2,000; 60000 = all)"
    )
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None, help="default: mlp cnn")
    parser.add_argument("--no-scaling", action="store_true", help="leave out the 2-process and executor part")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    main(quick=args.quick, n=args.n, models=args.models, scaling=not args.no_scaling)
