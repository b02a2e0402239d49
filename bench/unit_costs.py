"""Measured cost of each kind of unit of the full preset's C2 and C3 (``dropgeom reproduce``), for the run-time estimate.

Each unit runs in this process through the experiment's own ``run_unit`` (one torch thread, as ``reproduce`` runs
it), with its phases timed in CPU seconds (``time.process_time``): every training (objective, optimizer steps) and
every measurement (gradient comparisons, gaps, dropout terms, curvature). A unit is run with ``--epochs E`` epochs
per training (default: the preset's own); the printed estimate then replaces each training's measured CPU time by its
CPU time per step times the steps it takes in the full preset (``c3_epochs``: 100 epochs at 1k inputs, 10 at 10k, 2
at 60k, i.e. about 1,600 steps), and keeps the rest as measured. One JSON line per kind. Usage::

    PYTHONPATH=src python bench/unit_costs.py [--epochs E] KIND [KIND ...]     # KIND: see UNITS
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import time

import torch

import dropgeom.dropout as dropout_pkg
from dropgeom.config import RunConfig
from dropgeom.experiments import c2_curvature_strength as c2
from dropgeom.experiments import c3_fisher_regularizer as c3
from dropgeom.experiments import c3_gradients, regularizers

FULL = RunConfig.from_preset("full")


def _c3(part: str, tag: str) -> dict:
    ds, arch, n, opt = tag.split("-")
    size = int(n[1:]) if ds == "fashion_mnist" else 0
    return {
        "key": f"{part}/{tag}/seed=0",
        "part": part,
        "seed": 0,
        "dataset": ds,
        "arch": arch,
        "size": size,
        "optimizer": opt,
        "tag": tag,
    }


def _c2(ds: str, act: str, depth: int) -> dict:
    setting = f"{act}-w16-d{depth}" if ds == FULL.dataset else f"{ds}-{act}-w16-d{depth}"
    return {
        "key": f"{setting}/s=1/seed=0",
        "setting": setting,
        "dataset": ds,
        "activation": act,
        "width": 16,
        "depth": depth,
        "init_scale": 1.0,
        "seed": 0,
    }


UNITS = {
    "c2/digits-tanh-d2": (c2, _c2("digits", "tanh", 2)),
    "c2/digits-softplus-d3": (c2, _c2("digits", "softplus", 3)),
    "c2/fashion-tanh-d2": (c2, _c2("fashion_mnist", "tanh", 2)),
    "c2/fashion-softplus-d3": (c2, _c2("fashion_mnist", "softplus", 3)),
    "c3/wager-digits": (c3, {"key": "wager/digits/seed=0", "part": "wager", "dataset": "digits", "seed": 0}),
    "c3/wager-breast_cancer": (c3, {"key": "wager/breast_cancer/seed=0", "part": "wager", "dataset": "breast_cancer", "seed": 0}),
    **{f"c3/{part}-{tag}": (c3, _c3(part, tag)) for part in ("grad", "objectives") for tag in FULL.c3_settings()},
}

PHASES = collections.defaultdict(float)
TRAININGS = []


def _timed(name, fn):
    def wrapper(*args, **kwargs):
        t = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            PHASES[name] += time.process_time() - t

    return wrapper


def _timed_train(fn):
    def wrapper(model, data, objective, config, *args, **kwargs):
        t, inner = time.process_time(), sum(PHASES.values())
        out = fn(model, data, objective, config, *args, **kwargs)
        n = int(data.x_train.shape[0])
        cpu = (
            time.process_time() - t - (sum(PHASES.values()) - inner)
        )  # less the measurements taken during training (C3a's mid stage)
        TRAININGS.append(
            {
                "cpu": cpu,
                "steps": len(out[1]) * math.ceil(n / config.batch_size),
                "full_steps": regularizers.c3_epochs(FULL, n) * math.ceil(n / config.batch_size),
            }
        )
        return out

    return wrapper


def _timed_fit(fn):
    def wrapper(model, data, objective, config, *args, **kwargs):
        t = time.process_time()
        out = fn(model, data, objective, config, *args, **kwargs)
        n = int(data.x_train.shape[0])
        steps = out["epochs_run"] * math.ceil(n / config.batch_size)
        TRAININGS.append({"cpu": time.process_time() - t, "steps": steps, "full_steps": steps})  # C2 runs as configured
        return out

    return wrapper


def _patch() -> None:
    regularizers.c3_train = _timed_train(regularizers.c3_train)
    c3_gradients.compare_gradients = _timed("compare_gradients", c3_gradients.compare_gradients)
    dropout_pkg.gap = _timed("gap", dropout_pkg.gap)
    c2.dropout_terms = _timed("dropout_terms", c2.dropout_terms)
    c2.fit = _timed_fit(c2.fit)
    c2.curvature_measures = _timed("curvature", c2.curvature_measures)


def measure(kind: str, epochs: int) -> dict:
    mod, unit = UNITS[kind]
    cfg = FULL if not epochs or kind.startswith("c2/") else FULL.replace(epochs=epochs, c3_max_steps=0)
    PHASES.clear()
    TRAININGS.clear()
    c0, w0 = time.process_time(), time.perf_counter()
    rec = mod.run_unit(cfg, unit, None)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    assert rec.get("status", "ok") == "ok", rec.get("status")
    train = sum(t["cpu"] for t in TRAININGS)
    full_train = sum(t["cpu"] / max(t["steps"], 1) * t["full_steps"] for t in TRAININGS)
    return {
        "kind": kind,
        "measured_cpu_s": round(cpu, 1),
        "measured_wall_s": round(wall, 1),
        "trainings": len(TRAININGS),
        "steps_run": sum(t["steps"] for t in TRAININGS),
        "full_steps": sum(t["full_steps"] for t in TRAININGS),
        "training_cpu_s": round(train, 1),
        "phases_cpu_s": {k: round(v, 1) for k, v in PHASES.items()},
        "full_cpu_s": round(cpu - train + full_train, 1),
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=0, help="epochs per C3 training (0: the preset's)")
    ap.add_argument("kinds", nargs="+", choices=sorted(UNITS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    _patch()
    for kind in args.kinds:
        print(json.dumps(measure(kind, args.epochs)), flush=True)
