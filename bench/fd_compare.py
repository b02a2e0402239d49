"""Does deterministic Fisher-dropout training do what dropout does? ``python bench/fd_compare.py [--seeds 5]``.

Trains the same network on the digits overfitting regime of the ``quick``
preset (300 training digits, 10 principal components, 2 hidden tanh layers of
16 units, Adam, 100 epochs; :mod:`dropgeom.experiments.common` prepares the data
and builds the model) with each objective, over several seeds, and prints test
NLL, accuracy and ECE (eval mode, weight scaling) as mean and 95% t-interval:

* ``none``: the clean loss;
* ``dropout``: Bernoulli dropout at ``p``;
* ``fisher (quadratic|divergence)``: clean loss + the Fisher term of theory.md 4.2
  (``1/2 V sum_j F^mask_jj`` or ``p sum_j K_j``), exact, no mask noise;
* ``... + curvature``: the same plus the matching curvature term
  (``1/2 V sum_j C_jj`` or ``p sum_j B_j``; theory.md 4.4).

Each seed fixes the data split, the initialisation and the mini-batch order for
every objective (paired runs); ``paired d NLL vs none`` / ``vs dropout`` is the
mean difference of test NLL to the run of the same seed without regularisation /
with dropout (negative: lower test NLL). Not part of ``bench/run.py`` (it
measures results, not speed): about a minute per seed on one idle core.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any, Dict, List, Tuple

import torch

from dropgeom.config import RunConfig
from dropgeom.experiments.common import build_mlp, evaluate_model, mean_ci, prepare_data
from dropgeom.train import train

#: (label, objective name, objective options without p)
OBJECTIVES: List[Tuple[str, str, Dict[str, Any]]] = [
    ("none", "none", {}),
    ("dropout", "dropout", {}),
    ("fisher quadratic", "fisher_dropout", {"form": "quadratic"}),
    ("fisher quadratic + curvature", "fisher_dropout", {"form": "quadratic", "curvature": True}),
    ("fisher divergence", "fisher_dropout", {"form": "divergence"}),
    ("fisher divergence + curvature", "fisher_dropout", {"form": "divergence", "curvature": True}),
]


def run_one(config: RunConfig, seed: int, name: str, options: Dict[str, Any], p: float) -> Dict[str, float]:
    data = prepare_data(config, seed)
    model = build_mlp(data.num_features, data.num_outputs, config.width, config.depth, config.activation, p, seed)
    opts = dict(options)
    if name != "none":
        opts["p"] = p
    t0 = time.perf_counter()
    hist = train(
        model,
        (data.x_train, data.y_train, data.x_test, data.y_test),
        name,
        objective_options=opts,
        optimizer="adam",
        lr=config.lr,
        epochs=config.epochs,
        batch_size=config.batch_size,
        seed=seed,
        family=data.family,
        progress=False,
        divergence_threshold=config.divergence_threshold,
    )
    out = evaluate_model(model, data.x_test, data.y_test, data.family)
    out["seconds"] = time.perf_counter() - t0
    out["diverged"] = float(bool(hist.diverged))
    return out


def _cell(values: List[float], digits: int = 3) -> str:
    mean, lo, hi = mean_ci(values)
    if not math.isfinite(mean):
        return "n/a"
    half = (hi - lo) / 2 if math.isfinite(hi) else float("inf")
    return f"{mean:.{digits}f} +- {half:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--p", type=float, default=None, help="drop probability (default: the preset's c3_p)")
    parser.add_argument("--epochs", type=int, default=None, help="default: the preset's")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--only", nargs="*", default=None, help="labels of the objectives to run (default all)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides: Dict[str, Any] = {"dataset": args.dataset}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    config = RunConfig.from_preset("quick", **overrides)
    p = config.c3_p if args.p is None else args.p
    items = [o for o in OBJECTIVES if args.only is None or o[0] in args.only]
    print(
        f"{config.dataset}: {config.max_train} training inputs, {config.input_dim} PCs, {config.depth}x{config.width} "
        f"{config.activation}, adam lr {config.lr}, {config.epochs} epochs, batch {config.batch_size}, p = {p}, "
        f"seeds 0..{args.seeds - 1}",
        flush=True,
    )
    results: Dict[str, List[Dict[str, float]]] = {label: [] for label, _, _ in items}
    for seed in range(args.seeds):
        for label, name, options in items:
            res = run_one(config, seed, name, options, p)
            results[label].append(res)
            print(
                f"  seed {seed} {label:30s} test nll {res['nll']:.4f}  acc {res.get('accuracy', float('nan')):.4f}  "
                f"ece {res.get('ece', float('nan')):.4f}  ({res['seconds']:.1f} s)",
                flush=True,
            )

    def paired(label: str, runs: List[Dict[str, float]], ref_label: str) -> str:
        ref = [r["nll"] for r in results.get(ref_label, [])]
        if not ref or label == ref_label:
            return "-"
        return _cell([r["nll"] - d for r, d in zip(runs, ref)])

    header = ["objective", "test NLL", "accuracy", "ECE", "paired d NLL vs none", "vs dropout", "s / run"]
    rows = []
    for label, runs in results.items():
        rows.append(
            [
                label,
                _cell([r["nll"] for r in runs]),
                _cell([r.get("accuracy", float("nan")) for r in runs]),
                _cell([r.get("ece", float("nan")) for r in runs]),
                paired(label, runs, "none"),
                paired(label, runs, "dropout"),
                f"{sum(r['seconds'] for r in runs) / len(runs):.1f}",
            ]
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n== mean +- half-width of the 95% t-interval over {args.seeds} seeds ==")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
