"""Training under DistributedDataParallel (2 gloo processes) equals one process on the full batch (float64)."""

import torch
import torch.multiprocessing as mp
from torch import nn

from dropgeom.train import train
from dropgeom.train.metrics import evaluate
from reference.gloo import free_port, gloo_rank

OBJECTIVES = [("none", {}), ("l2", {}), ("fisher_dropout", {"p": 0.3}), ("fisher_dropout", {"p": 0.3, "form": "divergence"})]
RANDOM = [("dropout", {"p": 0.3}), ("fisher_dropout", {"p": 0.3, "estimator": "mc"})]


def _make() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(40, 5, dtype=torch.float64, generator=g), torch.randint(0, 3, (40,), generator=g)


def _flat(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def _worker(rank: int, world: int, port: int, out: str) -> None:
    def body() -> None:
        x, y = _data()
        shard = slice(rank * 20, (rank + 1) * 20)  # equal shards: DDP averages the ranks' mean gradients
        res = {}
        for i, (name, opts) in enumerate(OBJECTIVES + RANDOM):
            net = _make()
            ddp = nn.parallel.DistributedDataParallel(net)
            train(
                ddp,
                (x[shard], y[shard]),
                name,
                objective_options=opts,
                epochs=3,
                batch_size=20,
                progress=False,
                lr=0.01,
                seed=rank,
            )
            res[i] = _flat(net)
        torch.save(res, f"{out}.{rank}")

    gloo_rank(rank, world, port, body)


def test_ddp_two_processes_equal_one_full_batch(tmp_path):
    out = str(tmp_path / "params")
    mp.spawn(_worker, args=(2, free_port(), out), nprocs=2, join=True)
    r0, r1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    x, y = _data()
    for i, (name, opts) in enumerate(OBJECTIVES):
        net = _make()
        train(net, (x, y), name, objective_options=opts, epochs=3, batch_size=40, progress=False, lr=0.01)
        torch.testing.assert_close(r0[i], _flat(net), atol=1e-10, rtol=0, msg=f"{name} {opts}")
        assert not torch.equal(r0[i], _flat(_make()))  # training moved the parameters
    for i in range(len(OBJECTIVES), len(OBJECTIVES) + len(RANDOM)):
        torch.testing.assert_close(r0[i], r1[i], atol=0, rtol=0)  # random objectives: ranks stay in sync


def _unequal_worker(rank: int, world: int, port: int, out: str) -> None:
    """Rank 0 holds 3 batches of 8, rank 1 two: ``train`` must refuse before the first step (not hang)."""
    import datetime
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30))
    x, y = _data()
    shard = slice(0, 24) if rank == 0 else slice(24, 40)
    messages = []
    # unequal shards; then equal shards with a test split on rank 0 only (the epoch records, summed over ranks key
    # by key, would not line up)
    for data in ((x[shard], y[shard]), (x[:16], y[:16]) + ((x[:4], y[:4]) if rank == 0 else ())):
        try:
            train(nn.parallel.DistributedDataParallel(_make()), data, "none", epochs=1, batch_size=8, progress=False)
            messages.append("trained")
        except Exception as err:  # noqa: BLE001 -- the test reads the kind and message
            messages.append(f"{type(err).__name__}: {err}")
    with open(f"{out}.{rank}", "w") as fh:
        fh.write("\n".join(messages))
    dist.destroy_process_group()
    os._exit(0)


def test_ddp_unequal_shards_are_refused_on_every_rank(tmp_path):
    out = str(tmp_path / "msg")
    mp.spawn(_unequal_worker, args=(2, free_port(), out), nprocs=2, join=True)
    for rank in (0, 1):
        msg, split = open(f"{out}.{rank}").read().split("\n")
        assert msg.startswith("ValueError: DistributedDataParallel needs the same number of optimizer steps"), msg
        assert "rank 0: 3 (24 inputs), rank 1: 2 (16 inputs)" in msg
        assert (
            split
            == "ValueError: under DistributedDataParallel every rank needs a test split, or none (rank 0: a test split, rank 1: none)"
        )


def _stopping_worker(rank: int, world: int, port: int, out: str) -> None:
    """Three ways one rank alone would stop: early stopping on its own test split, a divergence in its shard,
    its callback. ``train`` must take each decision on every rank together (same epoch, same batch)."""
    import datetime
    import json
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30))
    x, y = _data()
    xs, ys = x[rank * 20 : (rank + 1) * 20], y[rank * 20 : (rank + 1) * 20]
    noisy = torch.randint(0, 3, (20,), generator=torch.Generator().manual_seed(7))
    res = {}
    cases = {
        # rank 0 is tested on its training data (its test NLL keeps falling), rank 1 on random labels (rises soon)
        "early": dict(data=(xs, ys, xs, ys if rank == 0 else noisy), epochs=12, early_stopping=1, lr=0.3),
        # a NaN in rank 1's shard: its first loss is not finite, rank 0's is
        "diverge": dict(data=(xs + (float("nan") if rank == 1 else 0.0), ys), epochs=3),
        # rank 0's callback asks to stop after epoch 2, rank 1's never does
        "callback": dict(data=(xs, ys), epochs=5, callback=lambda rec, m: rank == 0 and rec["epoch"] == 2),
    }
    for name, kw in cases.items():
        net = _make()
        try:
            h = train(nn.parallel.DistributedDataParallel(net), kw.pop("data"), "none", batch_size=10, progress=False, **kw)
            res[name] = dict(
                epochs=len(h),
                diverged=h.diverged,
                why=h.divergence,
                early=h.stopped_early,
                cb=h.stopped_by_callback,
                best=h.best_epoch,
                last=h[-1] if len(h) else {},
                w=_flat(net).tolist(),
                # the independent reference for the records: the final parameters on all 40 inputs at once
                full=evaluate(net, x, y),
            )
        except Exception as err:  # noqa: BLE001 -- the test reads it
            res[name] = {"error": f"{type(err).__name__}: {err}"}
    for r in res.values():
        if "last" in r:
            r["last"] = {k: v for k, v in r["last"].items() if k != "seconds"}
    with open(f"{out}.{rank}", "w") as fh:
        json.dump(res, fh)
    dist.destroy_process_group()
    os._exit(0)


def test_ddp_ranks_stop_together(tmp_path):
    """Early stopping decides on the whole data's test metrics, a divergence on any rank or a callback's stop on
    any rank stops every rank at the same point: the old loop let one rank stop alone (the other then waited in
    DDP's all-reduce until gloo's timeout, or crashed)."""
    import json

    out = str(tmp_path / "res")
    mp.spawn(_stopping_worker, args=(2, free_port(), out), nprocs=2, join=True)
    r0, r1 = (json.load(open(f"{out}.{r}")) for r in (0, 1))
    for name in ("early", "diverge", "callback"):
        assert "error" not in r0[name] and "error" not in r1[name], (r0[name], r1[name])
        for key in ("epochs", "diverged", "early", "cb", "best", "last", "w"):
            assert r0[name][key] == r1[name][key], (name, key, r0[name][key], r1[name][key])
    assert r0["early"]["early"] and r0["early"]["epochs"] < 12
    assert r0["diverge"]["diverged"] and r0["diverge"]["epochs"] == 0
    assert r1["diverge"]["why"] == "non-finite loss (nan) at epoch 1, batch 0"
    assert r0["diverge"]["why"] == "another rank's batch diverged at epoch 1, batch 0"
    assert r0["callback"]["cb"] and r0["callback"]["epochs"] == 2
    # the last record (no early stopping: the parameters are the final ones) is the whole data's, not a shard's
    for k in ("nll", "accuracy"):
        assert abs(r0["callback"]["last"][f"train_{k}"] - r0["callback"]["full"][k]) < 1e-12, k
