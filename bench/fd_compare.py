"""Does deterministic Fisher-dropout training do what dropout does? ``python bench/fd_compare.py [--data D] [--seeds 5]``.

Trains one network per seed with each objective and prints test NLL, accuracy
and ECE (eval mode, weight scaling) as mean and 95% t-interval, with the
paired differences of each to no regularization and to dropout. Two regimes,
both built by C3's code (:func:`dropgeom.experiments.regularizers.c3_data`,
``c3_model``, ``c3_train``: Adam at lr 0.01, batches of 64, 100 epochs,
``p = 0.2``, tanh):

* ``--data digits`` (default): the ``quick`` preset's overfitting regime,
  300 training digits on 10 principal components, 2x16 tanh, 449 test digits;
* ``--data fashion_mnist``: C3's Fashion-MNIST MLP, 784-256-256-10 tanh on all
  784 standardized pixels, 1,000 training images (C3's ``n1000`` setting),
  tested on the 10,000 test images. Needs the Debian package
  ``dataset-fashion-mnist``; without it the script stops at once with the
  loader's one-line install hint. Without regularization this MLP overfits:
  its test NLL climbs from about 0.8 in the first ten epochs to 1.3-1.4 at
  epoch 100 while its train NLL falls to about 0.13.

tanh as in C3: with a smooth activation the curvature terms are not zero (a
ReLU MLP's Gaussian curvature term vanishes in closed form, so "+ curvature"
would change nothing in the quadratic form).

Objectives:

* ``none``: the clean loss;
* ``dropout``: Bernoulli dropout at ``p``;
* ``fisher (quadratic|divergence)``: clean loss + the Fisher term of theory.md 4.2
  (``1/2 V sum_j F^mask_jj`` or ``p sum_j K_j``), no mask noise;
* ``... + curvature``: the same plus the matching curvature term
  (``1/2 V sum_j C_jj`` or ``p sum_j B_j``; theory.md 4.4).

The Fisher rows use the deterministic ``exact`` estimator unless
``--estimator`` says otherwise (``--divergence-estimator`` for the divergence
rows alone: its exact form costs one forward pass per hidden unit).

Each seed fixes the data split (the training subset), the initialisation and
the mini-batch order (and dropout's masks) for every objective (paired runs).
``--json FILE`` writes every run's metrics; ``--merge FILE ...`` prints the
table of several such files (seeds run in separate processes, ``--first-seed``).
Not part of ``bench/run.py``: it measures results, not speed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from dropgeom.config import ACTIVATIONS, RunConfig
from dropgeom.experiments.common import evaluate_model, mean_ci
from dropgeom.experiments.regularizers import MissingDatasetError, c3_data, c3_model, c3_train, require_datasets

#: (label, objective name, objective options without p)
OBJECTIVES: List[Tuple[str, str, Dict[str, Any]]] = [
    ("none", "none", {}),
    ("dropout", "dropout", {}),
    ("fisher quadratic", "fisher_dropout", {"form": "quadratic"}),
    ("fisher quadratic + curvature", "fisher_dropout", {"form": "quadratic", "curvature": True}),
    ("fisher divergence", "fisher_dropout", {"form": "divergence"}),
    ("fisher divergence + curvature", "fisher_dropout", {"form": "divergence", "curvature": True}),
]
#: the data sets and their default training-set sizes (0: the preset's ``max_train``)
DATA = {"digits": 0, "fashion_mnist": 1000}
ESTIMATORS = ("exact", "unit", "mc")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", "--dataset", dest="data", choices=sorted(DATA), default="digits")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--p", type=float, default=None, help="drop probability (default: the preset's c3_p, 0.2)")
    parser.add_argument("--epochs", type=int, default=None, help="default: the preset's (100)")
    parser.add_argument("--lr", type=float, default=None, help="Adam's step size (default: the preset's, 0.01)")
    parser.add_argument(
        "--activation", choices=ACTIVATIONS, default=None, help="of the hidden layers (default: the preset's, tanh)"
    )
    parser.add_argument("--train-size", type=int, default=None, help="training inputs (default: 300 digits, 1000 images)")
    parser.add_argument("--estimator", choices=ESTIMATORS, default="exact", help="of the Fisher rows")
    parser.add_argument("--divergence-estimator", choices=ESTIMATORS, default=None, help="default: --estimator")
    parser.add_argument("--only", nargs="*", default=None, help="labels of the objectives to run (default all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="write every run's metrics to this file")
    parser.add_argument("--merge", nargs="+", default=None, help="only print the table of these --json files")
    args = parser.parse_args(argv)
    labels = [o[0] for o in OBJECTIVES]
    unknown = [x for x in args.only or [] if x not in labels]
    if unknown:
        parser.error(f"--only: unknown objective(s) {unknown}; choose from {labels}")
    if args.seeds < 1 or (args.train_size is not None and args.train_size < 1):
        parser.error("--seeds and --train-size must be >= 1")
    return args


def run_one(
    config: RunConfig, data_name: str, size: int, seed: int, name: str, options: Dict[str, Any], p: float
) -> Dict[str, float]:
    """Train C3's MLP of ``data_name`` on ``size`` inputs with one objective; its test (and train) metrics."""
    data = c3_data(config, data_name, "mlp", size, seed)
    model = c3_model(config, data, data_name, "mlp", p, seed)
    opts = dict(options)
    if name != "none":
        opts["p"] = p
    t0, c0 = time.perf_counter(), time.process_time()
    diverged, _ = c3_train(model, data, name, config, seed, "adam", opts)
    out = evaluate_model(model, data.x_test, data.y_test, data.family)
    out["train_nll"] = evaluate_model(model, data.x_train, data.y_train, data.family)["nll"]
    out["seconds"] = time.perf_counter() - t0
    out["cpu_seconds"] = time.process_time() - c0
    out["diverged"] = float(diverged)
    return out


def _cell(values: List[float], digits: int = 3) -> str:
    mean, lo, hi = mean_ci(values)
    if not math.isfinite(mean):
        return "n/a"
    half = (hi - lo) / 2 if math.isfinite(hi) else float("inf")
    return f"{mean:.{digits}f} +- {half:.{digits}f}"


def table(results: Dict[str, List[Dict[str, float]]]) -> List[List[str]]:
    """Rows: objective, test NLL / accuracy / ECE (mean +- 95% half-width), paired d NLL vs none and vs dropout."""

    def paired(label: str, key: str, ref_label: str) -> str:
        ref = [r[key] for r in results.get(ref_label, [])]
        if not ref or label == ref_label:
            return "-"
        return _cell([r[key] - d for r, d in zip(results[label], ref)])

    rows = [["objective", "test NLL", "accuracy", "ECE", "d NLL vs none", "d NLL vs dropout"]]
    rows[0] += ["d acc vs dropout", "d ECE vs dropout", "train NLL", "s / run"]
    for label, runs in results.items():
        rows.append(
            [label]
            + [_cell([r.get(k, float("nan")) for r in runs]) for k in ("nll", "accuracy", "ece")]
            + [paired(label, "nll", "none"), paired(label, "nll", "dropout")]
            + [paired(label, "accuracy", "dropout"), paired(label, "ece", "dropout")]
            + [_cell([r["train_nll"] for r in runs]), f"{sum(r['seconds'] for r in runs) / len(runs):.1f}"]
        )
    return rows


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, List[Dict[str, float]]]:
    args = parse_args(argv)
    if args.merge:
        return _merge(args.merge)
    try:
        require_datasets([args.data])
    except MissingDatasetError as err:
        sys.exit(f"fd_compare: {err}")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        results = _run(args)
    finally:
        torch.set_num_threads(threads)
    return results


def _run(args: argparse.Namespace) -> Dict[str, List[Dict[str, float]]]:
    overrides = {k: v for k, v in (("epochs", args.epochs), ("lr", args.lr), ("activation", args.activation)) if v is not None}
    config = RunConfig.from_preset("quick", **overrides)
    p = config.c3_p if args.p is None else args.p
    size = args.train_size or DATA[args.data] or config.max_train
    items = [o for o in OBJECTIVES if args.only is None or o[0] in args.only]
    print(
        f"{args.data}: {size} training inputs, C3's MLP ({config.activation}), adam lr {config.lr}, {config.epochs} "
        f"epochs, batch {config.batch_size}, p = {p}, Fisher estimator {args.estimator} (divergence: "
        f"{args.divergence_estimator or args.estimator}), seeds {args.first_seed}..{args.first_seed + args.seeds - 1}",
        flush=True,
    )
    results: Dict[str, List[Dict[str, float]]] = {label: [] for label, _, _ in items}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for label, name, options in items:
            opts = dict(options)
            if name == "fisher_dropout":
                div = opts.get("form") == "divergence" and args.divergence_estimator
                opts["estimator"] = div or args.estimator
            res = {"seed": float(seed), **run_one(config, args.data, size, seed, name, opts, p)}
            results[label].append(res)
            print(
                f"  seed {seed} {label:30s} test nll {res['nll']:.4f}  acc {res.get('accuracy', float('nan')):.4f}  "
                f"ece {res.get('ece', float('nan')):.4f}  train nll {res['train_nll']:.4f}  "
                f"({res['seconds']:.1f} s, {res['cpu_seconds']:.1f} CPU s){'  DIVERGED' if res['diverged'] else ''}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": results}, fh, indent=1)
    _print_table(results)
    return results


def _merge(paths: Sequence[str]) -> Dict[str, List[Dict[str, float]]]:
    """The runs of several ``--json`` files, objective by objective, in the order of the files."""
    results: Dict[str, List[Dict[str, float]]] = {}
    for path in paths:
        with open(path) as fh:
            for label, runs in json.load(fh)["results"].items():
                results.setdefault(label, []).extend(runs)
    for runs in results.values():  # paired by seed
        runs.sort(key=lambda r: r["seed"])
    _print_table(results)
    return results


def _print_table(results: Dict[str, List[Dict[str, float]]]) -> None:
    rows = table(results)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    seeds = max(len(runs) for runs in results.values())
    cpu = sum(r.get("cpu_seconds", 0.0) for runs in results.values() for r in runs)
    print(f"\n== mean +- half-width of the 95% t-interval over {seeds} seeds (d: paired difference); {cpu:.0f} CPU s ==")
    for k, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        if k == 0:
            print("  ".join("-" * w for w in widths))


if __name__ == "__main__":
    main()
