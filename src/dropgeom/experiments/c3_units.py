r"""Running C3's units (:mod:`~dropgeom.experiments.c3_fisher_regularizer` plans and summarizes them).

* :func:`run_grad` (C3a): trains with dropout at ``c3_p`` and, at initialisation, mid-training and the
  solution, compares the gradients of the Fisher forms with the Monte Carlo gradient of dropout's regularizer
  (:func:`~dropgeom.experiments.c3_gradients.compare_gradients`, theory.md 4.2 and 4.4); on MLPs also the
  measured gap against both forms over ``c3_p_grid``;
* :func:`run_wager`: a GLM with input dropout, the gap against ``1/2 V theta^T diag(F) theta``
  (:mod:`~dropgeom.experiments.wager`);
* :func:`run_objectives` (C3b): from one initialisation, dropout, its noise floor (another mask and batch seed),
  the other objectives and every regularizer at every strength; test NLL, clean train NLL and
  ``KL(p_dropout || p_obj)`` on the test inputs.

Example:
    >>> from dropgeom.config import RunConfig
    >>> cfg = RunConfig.from_preset("test", c3_wager_p_grid=[0.2], epochs=2)
    >>> rec = run_wager(cfg, {"dataset": "iris", "seed": 0}, None)
    >>> rec["num_classes"], [row["p"] for row in rec["rows"]]
    (3, [0.2])
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch

from ..config import RunConfig
from ..train.registry import run_options
from .common import _ckpt, evaluate_model, set_dropout

__all__ = ["run_grad", "run_wager", "run_objectives", "STAGES"]

#: the training stages at which C3a compares gradients
STAGES = ("init", "mid", "solution")


def _grad_inputs(config: RunConfig, data: Any) -> Any:
    n = min(config.c3_grad_inputs or config.curvature_inputs, data.x_train.shape[0])
    return data.x_train[:n], data.y_train[:n]


def run_grad(config: RunConfig, unit: Mapping[str, Any]) -> Dict[str, Any]:
    from ..dropout import gap
    from .c2_curvature_strength import dropout_terms
    from .c3_gradients import compare_gradients
    from .regularizers import c3_data, c3_epochs, c3_model, c3_train

    seed, p = unit["seed"], config.c3_p
    data = c3_data(config, unit["dataset"], unit["arch"], unit["size"], seed)
    model = c3_model(config, data, unit["dataset"], unit["arch"], p, seed)
    x, y = _grad_inputs(config, data)
    rec: Dict[str, Any] = {k: unit[k] for k in ("part", "seed", "dataset", "arch", "size", "optimizer", "tag")}
    stages: Dict[str, Any] = {}

    def measure(stage: str) -> None:
        gen = torch.Generator().manual_seed(31 * seed + STAGES.index(stage))
        stages[stage] = compare_gradients(
            model,
            x,
            y,
            data.family,
            p,
            "mc",
            config.c3_grad_samples,
            16,
            gen,
            divergence_estimator="unit" if unit["arch"] == "cnn" else None,
        )

    measure("init")
    mid = max(1, c3_epochs(config, int(data.x_train.shape[0])) // 2)

    def callback(record: Mapping[str, Any], _m: Any) -> None:
        if int(record.get("epoch", -1)) == mid and "mid" not in stages:
            measure("mid")

    diverged, hist = c3_train(model, data, "dropout", config, seed, unit["optimizer"], {"p": p}, None, callback)
    rec["epochs_run"] = len(hist)
    if diverged:
        rec["status"] = "diverged"
        return rec
    measure("solution")
    rec["stages"] = stages
    if unit["arch"] == "mlp":
        t = dropout_terms(model, data, config.replace(curvature_inputs=int(x.shape[0])))  # the gap's inputs
        rec["terms"] = t
        rows = []
        for i, q in enumerate(config.c3_p_grid):
            g = gap(
                model,
                x,
                y,
                family=data.family,
                p=q,
                noise="bernoulli",
                method="mc",
                n_samples=config.c3_gap_samples or config.gap_samples,
                generator=torch.Generator().manual_seed(1000 * seed + i),
            )
            rows.append(
                {
                    "p": float(q),
                    "measured": float(g.value),
                    "stderr": float(g.stderr),
                    "fisher_term": q * t["divergence"],
                    "bernoulli_law": q * (t["divergence"] + t["curvature_bernoulli"]),
                    "quadratic_fisher": 0.5 * q / (1 - q) * t["fisher"],
                }
            )
        rec["gap"] = rows
    return rec


def run_wager(config: RunConfig, unit: Mapping[str, Any], workdir: Optional[Path]) -> Dict[str, Any]:
    from .regularizers import c3_data, c3_train
    from .wager import glm_with_input_dropout, wager_curve

    seed = unit["seed"]
    data = c3_data(config, unit["dataset"], "mlp", 0, seed)
    glm = glm_with_input_dropout(int(data.x_train.shape[1]), data.num_outputs, config.c3_p, seed)
    diverged, hist = c3_train(glm, data, "dropout", config, seed, "adam", {"p": config.c3_p}, _ckpt(workdir, "glm"))
    rec: Dict[str, Any] = {
        "part": "wager",
        "dataset": unit["dataset"],
        "seed": seed,
        "num_classes": data.num_outputs,
        "epochs_run": len(hist),
    }
    if diverged:
        rec["status"] = "diverged"
        return rec
    x, y = _grad_inputs(config, data)
    rec["rows"] = wager_curve(glm, x, y, config.c3_wager_p_grid, torch.Generator().manual_seed(seed))
    return rec


def _estimator(unit: Mapping[str, Any]) -> str:
    """The Fisher penalties' estimator: ``exact`` on the small MLP of the bundled sets, ``unit`` (one sampled unit per
    input, unbiased) on the CNN and the Fashion-MNIST MLP, where the exact divergence form costs one forward per unit
    (about 25 plain steps per step on the 784-256-256-10 MLP, measured)."""
    return "exact" if unit["arch"] == "mlp" and unit["dataset"] != "fashion_mnist" else "unit"


def _probs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    from ..manifold import eval_mode

    with torch.no_grad(), eval_mode(model):
        return torch.softmax(model(x), dim=-1)


def _kl(ref: torch.Tensor, q: torch.Tensor) -> float:
    return float((ref * (ref.clamp_min(1e-300).log() - q.clamp_min(1e-300).log())).sum(-1).mean())


def run_objectives(config: RunConfig, unit: Mapping[str, Any], workdir: Optional[Path]) -> Dict[str, Any]:
    from .regularizers import c3_data, c3_model, c3_train, make_regularizer

    seed, p = unit["seed"], config.c3_p
    data = c3_data(config, unit["dataset"], unit["arch"], unit["size"], seed)
    init = c3_model(config, data, unit["dataset"], unit["arch"], p, seed)
    rec: Dict[str, Any] = {k: unit[k] for k in ("part", "seed", "dataset", "arch", "size", "optimizer", "tag")}
    rec["objectives"] = {}
    plan: List[Any] = [("dropout", "dropout", {"p": p}, seed), ("dropout_floor", "dropout", {"p": p}, seed + 100_000)]
    for o in config.c3_objectives:
        if o == "dropout":
            continue
        opts: Dict[str, Any] = run_options(o, p=p, l2=config.l2)
        if o == "fisher_dropout" and _estimator(unit) == "unit":
            opts["estimator"] = "unit"
        plan.append((o, o, opts, seed))
    for reg in config.c3_regularizers:
        for s in config.c3_strengths:
            plan.append((f"{reg}@{s:g}", make_regularizer(reg, s, p, config.l2, _estimator(unit)), {}, seed))
    models = {}
    for name, obj, opts, train_seed in plan:
        model = copy.deepcopy(init)
        set_dropout(model, p)
        diverged, hist = c3_train(
            model, data, obj, config, train_seed, unit["optimizer"], opts, _ckpt(workdir, name.replace("@", "_"))
        )
        entry: Dict[str, Any] = {"epochs_run": len(hist), "diverged": diverged}
        if "@" in name:
            entry["regularizer"], entry["strength"] = name.split("@")[0], float(name.split("@")[1])
        if not diverged:
            entry["test"] = evaluate_model(model, data.x_test, data.y_test, data.family)
            entry["train_nll"] = evaluate_model(model, data.x_train, data.y_train, data.family)["nll"]
            models[name] = model
        rec["objectives"][name] = entry
    if "dropout" not in models:
        rec["status"] = "diverged"
        return rec
    if data.family == "categorical":
        ref = _probs(models["dropout"], data.x_test)
        for name, model in models.items():
            q = _probs(model, data.x_test)
            rec["objectives"][name]["kl_from_dropout"] = _kl(ref, q)
            rec["objectives"][name]["agreement"] = float((q.argmax(-1) == ref.argmax(-1)).double().mean())
    return rec
