"""Scale: the Fisher streamed over a data loader, against the peers given the same loader, and over 2 gloo processes.

Rows (float32, one torch thread per process, batches of ``BATCH`` inputs):

  exact diag  dropgeom ``fisher_streamed(structure="diag")`` | nngeometry ``FIM(PMatDiag)`` | BackPACK
              ``DiagGGNExact`` accumulated over the loader (sum of batch sums / N)
  kfac        dropgeom ``fisher_streamed(structure="kfac")`` | curvlinops ``KFACLinearOperator`` (type-2, expand,
              factors computed) | nngeometry ``FIM(PMatKFAC)``

Each row gives seconds, the ratio to the fastest peer, the ratio to one forward+backward pass over the whole loader
(the unit of every benchmark here), and the peak extra memory (MiB). ``strong scaling``: the streamed exact diagonal
over the same data on 1 and 2 gloo processes (127.0.0.1), efficiency ``T1 / (2 T2)``; on a 2-core machine with other
load this is an upper bound on what a cluster gives.

Data: Fashion-MNIST's 60,000 training images when the Debian package ``dataset-fashion-mnist`` is installed, else
synthetic images of the same shape (the timings do not depend on the pixel values). ``--quick`` uses 2,000 inputs
and the MLP only (the CNN over 60,000 images takes most of an hour on one core).
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
from common import peak_memory, print_table
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
        return [t / n for t in total]

    return run


def _peers(model: nn.Module, loader: DataLoader) -> Dict[str, Dict[str, Callable[[], object]]]:
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
        },
        "kfac": {
            "dropgeom": lambda: fisher_streamed(ours, loader, structure="kfac"),
            "curvlinops": curvlinops_kfac,
            "nngeometry": lambda: FIM(ng, loader, PMatKFAC, variant="classif_logits"),
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


def _scaling_worker(rank: int, world: int, port: int, n: int, out: str, make: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, y, _ = _data(n)
        model = _mlp() if make == "mlp" else _cnn()
        shard = slice(rank * n // world, (rank + 1) * n // world)
        loader = DataLoader(TensorDataset(x[shard], y[shard]), batch_size=BATCH)
        fisher_streamed(model, [next(iter(loader))], structure="diag")  # warm-up
        dist.barrier()
        t0 = time.perf_counter()
        fisher_streamed(model, loader, structure="diag")
        dist.barrier()
        if rank == 0:
            pathlib.Path(out).write_text(str(time.perf_counter() - t0))
    finally:
        dist.destroy_process_group()


def _scaling(n: int, make: str) -> Dict[int, float]:
    import tempfile

    out: Dict[int, float] = {}
    for world in (1, 2):
        f = os.path.join(tempfile.mkdtemp(), "t")
        mp.spawn(_scaling_worker, args=(world, _free_port(), n, f, make), nprocs=world, join=True)
        out[world] = float(pathlib.Path(f).read_text())
    return out


def _fd_epoch_worker(rank: int, world: int, port: int, n: int, out: str) -> None:
    import torch.distributed as dist

    from dropgeom.train import train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, y, _ = _data(n)
        x = x.flatten(1)
        shard = slice(rank * n // world, (rank + 1) * n // world)
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Linear(784, 256), nn.ReLU(), nn.Dropout(0.2), nn.Linear(256, 256), nn.ReLU(), nn.Dropout(0.2), nn.Linear(256, 10)
        )
        ddp = nn.parallel.DistributedDataParallel(net)
        opts = {"p": 0.2, "estimator": "mc"}
        train(
            ddp,
            (x[shard][:256], y[shard][:256]),
            "fisher_dropout",
            objective_options=opts,
            epochs=1,
            batch_size=256 // world,
            progress=False,
            seed=rank,
        )
        dist.barrier()
        t0 = time.perf_counter()
        train(
            ddp,
            (x[shard], y[shard]),
            "fisher_dropout",
            objective_options=opts,
            epochs=1,
            batch_size=256 // world,
            progress=False,
            seed=rank,
        )
        dist.barrier()
        if rank == 0:
            pathlib.Path(out).write_text(str(time.perf_counter() - t0))
    finally:
        dist.destroy_process_group()


def _tiny_unit(i: int) -> float:
    return float(torch.randn(64, 64).matmul(torch.randn(64, 64)).sum()) + i


def _executor_overhead(units: int = 20) -> Dict[str, Tuple[float, float]]:
    """Seconds to start each executor, and seconds per tiny unit once started (2 workers)."""
    from dropgeom.executors import make_pool

    out: Dict[str, Tuple[float, float]] = {}
    for kind in ("process", "ray"):
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


def main(quick: bool = False) -> None:
    torch.set_num_threads(1)
    n = 2000 if quick else 60000
    x, y, source = _data(n)
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH)
    print(f"{source}: {n} inputs, batches of {BATCH}, float32, one thread", flush=True)
    models = [("MLP 784-1024-1024-10", _mlp)] + ([] if quick else [("CNN conv16-pool-conv32-pool-linear", _cnn)])
    for name, make in models:
        model = make()
        unit = _timed(_fwd_bwd(model, loader))
        warm = DataLoader(TensorDataset(x[:BATCH], y[:BATCH]), batch_size=BATCH)
        for impls in _peers(model, warm).values():  # first calls pay one-time costs (torch.func / dynamo imports, hooks)
            for fn in impls.values():
                try:
                    fn()
                except Exception:  # noqa: BLE001 - reported in the timed run below
                    pass
        rows: List[Dict[str, object]] = []
        for quantity, impls in _peers(model, loader).items():
            times: Dict[str, float] = {}
            mems: Dict[str, float] = {}
            for lib, fn in impls.items():
                try:
                    fn_result: List[Optional[float]] = [None]

                    def timed(fn: Callable[[], object] = fn) -> None:
                        fn_result[0] = _timed(fn)

                    mems[lib] = peak_memory(timed)
                    times[lib] = float(fn_result[0] or float("nan"))
                except Exception as err:  # a peer that cannot do this model is reported, not fatal
                    print(f"  {lib} {quantity}: {type(err).__name__}: {str(err)[:120]}", flush=True)
            peers = [t for k, t in times.items() if k != "dropgeom"]
            best = min(peers) if peers else float("nan")
            for lib, t in times.items():
                rows.append(
                    {
                        "quantity": quantity,
                        "library": lib,
                        "seconds": t,
                        "x fastest peer": t / best,
                        "x fwd+bwd": t / unit,
                        "peak MiB": mems[lib],
                    }
                )
        print_table(rows, title=f"{name}, {n} inputs (fwd+bwd over the loader: {unit:.2f} s)")
    import tempfile

    m = 4096 if quick else 16384
    t_fd: Dict[int, float] = {}
    for world in (1, 2):
        f = os.path.join(tempfile.mkdtemp(), "t")
        mp.spawn(_fd_epoch_worker, args=(world, _free_port(), m, f), nprocs=world, join=True)
        t_fd[world] = float(pathlib.Path(f).read_text())
    print(
        f"\nstrong scaling, one Fisher-dropout epoch (mc estimator, MLP 784-256-256-10, {m} inputs, global batch 256, DDP): "
        f"1 process {t_fd[1]:.2f} s, 2 gloo processes {t_fd[2]:.2f} s, efficiency {t_fd[1] / (2 * t_fd[2]):.2f}",
        flush=True,
    )
    for kind, (start, per_unit) in _executor_overhead().items():
        print(f"executor {kind}: start {start:.2f} s, {1000 * per_unit:.1f} ms per tiny unit (20 units, 2 workers)", flush=True)
    for make in ("mlp",) if quick else ("mlp", "cnn"):
        t = _scaling(n // 2 if quick else n // 4, make)
        print(
            f"\nstrong scaling, streamed exact diag ({make}, {n // 2 if quick else n // 4} inputs): 1 process {t[1]:.2f} s, "
            f"2 gloo processes {t[2]:.2f} s, efficiency {t[1] / (2 * t[2]):.2f}",
            flush=True,
        )


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    main(quick="--quick" in sys.argv)
