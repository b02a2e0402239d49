r"""Shared pieces of the experiments: data, models, training, curvature, statistics, verdicts.

Models are small float64 MLPs ``in -> width -> ... -> K`` with a
``torch.nn.Dropout`` after every hidden layer, so that dropout between two
hidden layers bends the outputs along the mask directions (theory.md 4.2: a
mask right before the linear output layer is e-flat). Inputs are the data
set's standardised features projected on their first ``input_dim`` principal
components (fitted on the training split), which keeps the parameter count
well below ``n (K - 1)`` on the curvature inputs (theory.md 3).

Statistics: a mean with a two-sided 95% Student-t confidence interval over
seeds; correlations are Spearman's rank correlation with its permutation-free
p-value from scipy.

Example:
    >>> mean, lo, hi = mean_ci([1.0, 2.0, 3.0])
    >>> round(mean, 3), round(lo, 3), round(hi, 3)
    (2.0, -0.484, 4.484)
    >>> net = build_mlp(4, 3, width=5, depth=2, activation="tanh", p=0.2, seed=0)
    >>> [type(m).__name__ for m in net]
    ['Linear', 'Tanh', 'Dropout', 'Linear', 'Tanh', 'Dropout', 'Linear']
    >>> mask_directions(net)[0].shape   # one direction per unit of the first dropout layer
    torch.Size([5, 5])
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from ..config import RunConfig

__all__ = [
    "ExperimentData",
    "prepare_data",
    "build_mlp",
    "fit",
    "evaluate_model",
    "curvature_measures",
    "mask_directions",
    "curvature_params",
    "mean_ci",
    "spearman",
    "finite",
    "Verdict",
    "VerdictLabel",
    "fmt",
    "fmt_ci",
    "log_scale_ok",
    "style_axes",
    "seed_legend_handles",
    "save_figure",
    "quantity_name",
    "QUANTITY_NAMES",
    "FIGURE_DPI",
]

DTYPE = torch.float64
ACT = {"identity": nn.Identity, "tanh": nn.Tanh, "softplus": nn.Softplus, "relu": nn.ReLU}


# --------------------------------------------------------------------------- data
@dataclass
class ExperimentData:
    """Train/test tensors (float64, PCA-projected) and the inputs curvature is evaluated on."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    x_curv: Tensor
    y_curv: Tensor
    family: str
    num_outputs: int

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])


def prepare_data(config: RunConfig, seed: int) -> ExperimentData:
    """Load ``config.dataset`` with the split fixed by ``seed``; project on ``input_dim`` principal components.

    The curvature inputs are the first ``config.curvature_inputs`` test inputs
    (held out from training).
    """
    from ..data import load_dataset

    ds = load_dataset(config.dataset, seed=seed, dtype=DTYPE, max_train=config.max_train or None)
    xtr, xte = ds.x_train.to(DTYPE), ds.x_test.to(DTYPE)
    if config.input_dim and config.input_dim < xtr.shape[1]:
        xtr, xte = project_pca(xtr, xte, config.input_dim)
    k = ds.num_outputs if hasattr(ds, "num_outputs") else (ds.num_classes or 1)
    nc = min(config.curvature_inputs, xte.shape[0])
    return ExperimentData(xtr, ds.y_train, xte, ds.y_test, xte[:nc], ds.y_test[:nc], ds.family, int(k))


def project_pca(xtr: Tensor, xte: Tensor, dim: int) -> Tuple[Tensor, Tensor]:
    """Both splits projected on the first ``dim`` principal components of the training inputs, each component
    scaled to unit variance on the training split (fitted on the training inputs only).

    Example:
        >>> a, b = project_pca(torch.randn(50, 6, dtype=torch.float64), torch.randn(7, 6, dtype=torch.float64), 2)
        >>> a.shape, b.shape, bool(torch.allclose(a.std(0), torch.ones(2, dtype=torch.float64)))
        (torch.Size([50, 2]), torch.Size([7, 2]), True)
    """
    mu = xtr.mean(0)
    _, _, vt = torch.linalg.svd(xtr - mu, full_matrices=False)
    basis = vt[:dim].T
    xtr, xte = (xtr - mu) @ basis, (xte - mu) @ basis
    scale = xtr.std(0).clamp_min(1e-12)
    return xtr / scale, xte / scale


# --------------------------------------------------------------------------- models
def build_mlp(
    in_dim: int, out_dim: int, width: int, depth: int, activation: str = "tanh", p: float = 0.0, seed: int = 0
) -> nn.Sequential:
    """``depth`` hidden layers of ``width`` units, each followed by ``activation`` and ``Dropout(p)`` (float64)."""
    if activation not in ACT:
        raise ValueError(f"unknown activation {activation!r}; choose from {sorted(ACT)}")
    if depth < 1 or width < 1:
        raise ValueError(f"depth and width must be >= 1, got depth={depth}, width={width}")
    g = torch.Generator().manual_seed(int(seed))
    layers: List[nn.Module] = []
    d = in_dim
    for _ in range(depth):
        layers += [nn.Linear(d, width), ACT[activation](), nn.Dropout(p)]
        d = width
    layers.append(nn.Linear(d, out_dim))
    net = nn.Sequential(*layers).to(DTYPE)
    with torch.no_grad():  # seeded initialisation independent of the global RNG
        for m in net:
            if isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.in_features)
                m.weight.copy_(torch.empty_like(m.weight).uniform_(-bound, bound, generator=g))
                m.bias.copy_(torch.empty_like(m.bias).uniform_(-bound, bound, generator=g))
    return net


def set_dropout(model: nn.Module, p: float) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = float(p)
    return model


def mask_directions(model: nn.Sequential) -> List[Tensor]:
    """For each dropout layer followed by a Linear layer: that layer's weight (``[out, units]``).

    Masking unit ``j`` scales column ``j`` of the next layer's weight, so the
    mask direction in parameter space is that column placed in the weight's
    slot (theory.md 4.2, "Link to section 3").
    """
    out = []
    mods = list(model)
    for i, m in enumerate(mods):
        if isinstance(m, nn.Dropout):
            nxt = next((x for x in mods[i + 1 :] if isinstance(x, nn.Linear)), None)
            if nxt is not None:
                out.append(nxt.weight.detach())
    return out


# --------------------------------------------------------------------------- training
def fit(
    model: nn.Module,
    data: ExperimentData,
    objective: str,
    config: RunConfig,
    seed: int,
    p: float = 0.0,
    checkpoint_dir: Optional[Path] = None,
    stop_at_train_nll: Optional[float] = None,
    *,
    match_every: int = 0,
    weight_decay: Optional[float] = None,
) -> Dict[str, Any]:
    """Train ``model`` in place with :func:`dropgeom.train.train` (Adam, ``config`` settings).

    ``objective`` is a ``dropgeom.train`` objective name; ``p`` its dropout rate
    (also written into the model's dropout modules). With ``checkpoint_dir`` a
    killed training resumes from its last checkpoint. With
    ``stop_at_train_nll`` training stops after the first epoch whose clean
    (eval-mode) train NLL is at or below that value (a solution at matched
    fit). Returns ``{"diverged", "divergence", "epochs_run", "history"}``.

    Step-granular matching (``match_every > 0`` with ``stop_at_train_nll``):
    the clean train NLL is evaluated after every ``match_every`` optimizer
    steps; at the first check at or below the target the parameters of that
    check or of the previous one -- whichever is closer to the target -- are
    kept (frozen for the rest of the epoch), and training stops. The result
    then also carries ``"steps"`` and ``"matched_nll"``. ``weight_decay``
    trains the ``l2`` objective with that weight instead of ``config.l2``.
    """
    from ..train import run_options, train

    set_dropout(model, p)
    options = run_options(objective, p=p, l2=config.l2 if weight_decay is None else weight_decay)
    matcher = None
    optimizer: Any = "adam"
    if stop_at_train_nll is not None and match_every > 0:
        matcher = _StepMatcher(model, data.x_train, data.y_train, data.family, stop_at_train_nll, match_every, config.lr)
        optimizer = matcher.optimizer
    hist = train(
        model,
        (data.x_train, data.y_train, data.x_test, data.y_test),
        objective,
        objective_options=options,
        optimizer=optimizer,
        lr=config.lr,
        epochs=config.epochs,
        batch_size=config.batch_size,
        seed=seed,
        family=data.family,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=max(1, config.epochs // 4),
        progress=False,
        divergence_threshold=config.divergence_threshold,
        callback=None
        if stop_at_train_nll is None
        else (
            (lambda rec, _m: matcher.done)
            if matcher is not None
            else (lambda rec, _m: float(rec.get("train_nll", math.inf)) <= stop_at_train_nll)
        ),
    )
    records = [dict(r) for r in hist.records]
    last = records[-1] if records else {}
    diverged = bool(hist.diverged) or not all(math.isfinite(float(v)) for v in last.values() if isinstance(v, (int, float)))
    keep = ("epoch", "train_nll", "test_nll", "test_accuracy", "objective_loss")  # a light history
    out = {
        "diverged": diverged,
        "divergence": hist.divergence,
        "epochs_run": len(records),
        "history": [{k: r[k] for k in keep if k in r} for r in records],
    }
    if matcher is not None:
        out["steps"] = matcher.kept_step
        out["matched_nll"] = matcher.kept_nll
    return out


class _StepMatcher:
    """Checks the clean train NLL every ``every`` optimizer steps (an Adam post-step hook) and
    freezes the parameters at the check closest to ``target`` once it is reached (see :func:`fit`)."""

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, family: str, target: float, every: int, lr: float) -> None:
        self.model, self.x, self.y, self.family, self._lr = model, x, y, family, lr
        self.target, self.every = float(target), int(every)
        self.steps = 0
        self.done = False
        self.prev: Optional[Tuple[int, float, List[Tensor]]] = None
        self.frozen: Optional[List[Tensor]] = None
        self.kept_step = 0
        self.kept_nll = float("nan")

    def _nll(self) -> float:
        from ..families import get_family
        from ..manifold import eval_mode

        with torch.no_grad(), eval_mode(self.model):
            return float(get_family(self.family).nll(self.model(self.x), self.y).mean())

    def _hook(self, opt: Any, args: Any, kwargs: Any) -> None:
        params = [q for q in self.model.parameters()]
        if self.done:
            with torch.no_grad():
                for q, f in zip(params, self.frozen or []):
                    q.copy_(f)
            return
        self.steps += 1
        if self.steps % self.every:
            return
        nll = self._nll()
        now = (self.steps, nll, [q.detach().clone() for q in params])
        if nll <= self.target:
            best = now
            if self.prev is not None and abs(math.log(self.prev[1] / self.target)) < abs(math.log(nll / self.target)):
                best = self.prev
            self.kept_step, self.kept_nll, self.frozen = best
            self.done = True
            with torch.no_grad():
                for q, f in zip(params, self.frozen):
                    q.copy_(f)
        else:
            self.prev = now
            self.kept_step, self.kept_nll = self.steps, nll

    def optimizer(self, params: Any) -> torch.optim.Optimizer:
        opt = torch.optim.Adam(params, lr=self._lr)
        opt.register_step_post_hook(self._hook)
        return opt


def evaluate_model(model: nn.Module, x: Tensor, y: Tensor, family: str) -> Dict[str, float]:
    """Test NLL, accuracy and ECE in eval mode (weight scaling)."""
    from ..train.metrics import evaluate

    out = evaluate(model, x, y, family)
    return {k: float(v) for k, v in dict(out).items()}


def _ckpt(workdir: Optional[Path], name: str) -> Optional[Path]:
    return None if workdir is None else Path(workdir) / name


# --------------------------------------------------------------------------- curvature
def curvature_params(model: nn.Sequential, which: str = "around_mask") -> Optional[List[str]]:
    """Parameter names the curvature is evaluated on: the Linear layers right before and right
    after the first dropout layer (``around_mask``, theory.md 3: a subset of parameters around a
    mask), or ``None`` for all parameters (``all``)."""
    if which == "all":
        return None
    mods = list(model)
    i = next(k for k, m in enumerate(mods) if isinstance(m, nn.Dropout))
    before = max(k for k in range(i) if isinstance(mods[k], nn.Linear))
    after = next(k for k in range(i + 1, len(mods)) if isinstance(mods[k], nn.Linear))
    return [f"{before}.weight", f"{before}.bias", f"{after}.weight", f"{after}.bias"]


#: dense curvature is used while the Hessian tensor [n, K, P, P] stays below this many bytes
DENSE_BYTES = 400 * 2**20


def curvature_measures(
    model: nn.Sequential, data: ExperimentData, config: RunConfig, seed: int, raw: bool = True
) -> Dict[str, Any]:
    """Curvature of the model manifold over the held-out curvature inputs (theory.md 3).

    The manifold varies the parameters of :func:`curvature_params` (the layers
    around the first dropout mask by default; the others stay fixed).

    * ``gamma2``: the scalar e-embedding curvature (sum convention) and
      ``gamma2_per_sample = n gamma2``; only with the dense method (the
      matrix-free estimate of the undamped value samples ``N(0, g^+)``, which
      on a badly conditioned ``g`` is slow and heavy-tailed, theory.md 3);
    * ``gamma2_damped`` (and its ``gamma2_damped_stderr``, 0 when dense): the
      same with ``g^+`` replaced by ``(g + lambda I)^{-1}``,
      ``lambda = config.damping x lambda_max(g)``;
    * ``mask_normal_curvature``: mean over the units of the first dropout layer
      of the normal curvature ``|N(v_j, v_j)|_G / |J v_j|_G^2`` along the mask
      direction ``v_j`` (column ``j`` of the next layer's weight);
    * ``param_norm``: the Euclidean norm of the parameters the manifold varies
      (curvature is not invariant under rescaling the weights: a larger norm
      saturates tanh units and bends the outputs more).

    ``raw=False`` skips the undamped ``gamma2`` also with the dense method.
    """
    from .. import ModelManifold
    from ..curvature import embedding_curvature, normal_curvature

    names = curvature_params(model, config.curvature_params)
    m = ModelManifold(model, data.x_curv, data.family, param_names=names)
    method = config.curvature_method
    if method == "auto":
        dense_bytes = m.n * m.num_outputs * m.num_params**2 * 8
        method = "dense" if dense_bytes <= DENSE_BYTES and m.num_params <= 2000 else "stochastic"
    gen = torch.Generator().manual_seed(10_000 + seed)
    out: Dict[str, Any] = {"num_params": m.num_params, "n_inputs": m.n, "num_outputs": m.num_outputs, "method": method}
    out["param_norm"] = float(torch.sqrt(sum((t.detach() ** 2).sum() for t in m.params.values())))
    kw: Dict[str, Any] = dict(alpha=1.0, method=method, n_samples=config.curvature_samples, generator=gen)
    if method == "stochastic":
        kw["batch_size"] = config.curvature_samples
        if config.curvature_cg_iter:
            kw["cg_max_iter"] = config.curvature_cg_iter
    if raw and method == "dense":
        res = embedding_curvature(m, **kw)
        out["gamma2"] = float(res.gamma2)
        out["gamma2_per_sample"] = float(res.gamma2_per_sample)
        out["gamma2_stderr"] = float(res.stderr)
        if res.normal_dim is not None:
            out["normal_dim"] = int(res.normal_dim)
    with warnings.catch_warnings():
        # capped CG (config.curvature_cg_iter) is a documented choice; the report states it
        warnings.filterwarnings("ignore", message=".*conjugate gradients stopped.*")
        res_d = embedding_curvature(m, damping=config.damping, **kw)
    out["gamma2_damped"] = float(res_d.gamma2)
    out["gamma2_damped_stderr"] = float(res_d.stderr) if method == "stochastic" else 0.0
    if method == "stochastic":  # above max(1e3 tol, 1e-6) the projections did not converge: gamma^2 too large
        out["projection_residual"] = float(res_d.projection_residual or 0.0)
        out["solver"] = res_d.solver  # "svd": exact solves and projections; "cg": capped conjugate gradients
        out["n_samples"] = int(res_d.n_samples)
    out["damping_abs"] = float(res_d.damping_abs) if res_d.damping_abs is not None else float("nan")
    mods = list(model)
    i = next(k for k, mod in enumerate(mods) if isinstance(mod, nn.Dropout))
    after = next(k for k in range(i + 1, len(mods)) if isinstance(mods[k], nn.Linear))
    name = f"{after}.weight"
    if after == len(mods) - 1:
        # the mask feeds the linear output layer: eta is affine in it (e-flat, theory.md 4.2)
        out["mask_normal_curvature"] = 0.0
        return out
    W = dict(model.named_parameters())[name].detach()
    vals = []
    for j in range(W.shape[1]):
        if float(W[:, j].abs().max()) == 0.0:
            continue
        v = {k: torch.zeros_like(t) for k, t in m.params.items()}
        v[name][:, j] = W[:, j]
        vals.append(float(normal_curvature(m, v, alpha=1.0)))
    out["mask_normal_curvature"] = float(np.mean(vals)) if vals else float("nan")
    return out


# statistics, verdicts and figures live in their own modules; re-exported here for the experiments' convenience
from .figures import FIGURE_DPI, QUANTITY_NAMES, log_scale_ok, quantity_name, save_figure, seed_legend_handles, style_axes  # noqa: E402
from .stats import finite, mean_ci, spearman  # noqa: E402
from .verdicts import Verdict, VerdictLabel, fmt, fmt_ci  # noqa: E402
