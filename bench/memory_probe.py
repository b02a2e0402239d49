"""Peak memory of the Fisher engine against nngeometry, one model at a time, nothing timed before.

For the MLP 784-1024-1024-10 (one ``fisher()`` call on 1,000 inputs, and ``fisher_streamed`` over two batches of
1,000) and the CNN conv16-pool-conv32-pool-linear (streamed, two batches of 1,000): the exact diagonal and KFAC,
and nngeometry's ``FIM(PMatDiag / PMatKFAC)`` on the same data. Each number is the resident-memory growth of a
warm second call in a child forked from this process before anything else ran in it (``common.peak_memory``), so
the figures are what a fresh process would see; ``bench_scale`` measures its streamed rows the same way but after
the previous model's part. ``--profile`` adds the live-tensor peak of each dropgeom call from the torch
profiler's memory timeline (tensors only, no allocator effects: where the memory goes; it agrees with the
resident figures on the MLP and over-counts on the CNN, 641 against 221 MiB on 2026-12-05).

Usage:
  python bench/memory_probe.py              # the table (about a minute)
  python bench/memory_probe.py --profile    # and the live-tensor peaks
"""

from __future__ import annotations

import argparse
import warnings
from typing import Callable, Dict, Tuple

import torch
from torch.utils.data import DataLoader, TensorDataset

from bench_scale import MODELS  # the same two models as the streamed benchmark
from common import in_child, peak_memory

from dropgeom import ModelManifold, fisher
from dropgeom.streaming import fisher_streamed


def cases() -> Dict[str, Tuple[Callable[[], object], Callable[[], object]]]:
    """``{row: (dropgeom call, nngeometry call)}``; every library on its own model copy."""
    from nngeometry.metrics import FIM
    from nngeometry.object import PMatDiag, PMatKFAC

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2000, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (2000,), generator=g)
    one = DataLoader(TensorDataset(x[:1000], y[:1000]), batch_size=1000)
    two = DataLoader(TensorDataset(x, y), batch_size=1000)
    out: Dict[str, Tuple[Callable[[], object], Callable[[], object]]] = {}
    for model_name, (_, make) in (("MLP", MODELS["mlp"]), ("CNN", MODELS["cnn"])):
        ours, ng = make(), make()
        m = ModelManifold(ours, x[:1000])
        for structure, rep in (("diag", PMatDiag), ("kfac", PMatKFAC)):
            # every name bound now (default arguments): the loop rebinds m, ours and ng for the next model
            ng_one = lambda rep=rep, ng=ng: FIM(ng, one, rep, variant="classif_logits")  # noqa: E731
            ng_two = lambda rep=rep, ng=ng: FIM(ng, two, rep, variant="classif_logits")  # noqa: E731
            if model_name == "MLP":
                out[f"{model_name} {structure}, one call on 1,000"] = (lambda s=structure, m=m: fisher(m, "exact", s), ng_one)
            out[f"{model_name} {structure}, streamed 2 x 1,000"] = (
                lambda s=structure, net=ours: fisher_streamed(net, two, structure=s),
                ng_two,
            )
    return out


def live_tensor_peak(fn: Callable[[], object]) -> float:
    """Peak MiB of live tensors while ``fn`` runs (warm call), from the torch profiler's memory timeline."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    fn()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    live: Dict[object, int] = {}
    cur = best = 0
    for _, action, (key, _version), size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            live[key] = size
            cur += size
        elif action == Action.DESTROY:
            cur -= live.pop(key, 0)
        best = max(best, cur)
    return best / 2**20


def main(profile: bool = False) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    rows = cases()
    print("peak resident-memory growth of a warm call, MiB (each in a child forked before anything was timed)")
    print(f"{'case':36s} {'dropgeom':>9s} {'nngeometry':>11s}" + (f" {'live tensors':>13s}" if profile else ""))
    for name, (ours, ng) in rows.items():
        line = f"{name:36s} {peak_memory(ours):9.1f} {peak_memory(ng):11.1f}"
        if profile:  # in a child too: the profiler leaves this process's heap larger
            line += f" {in_child(lambda fn=ours: live_tensor_peak(fn)):13.1f}"
        print(line, flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", action="store_true", help="add each dropgeom call's live-tensor peak (slower)")
    main(**vars(parser.parse_args()))
