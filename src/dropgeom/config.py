"""The resolved, validated configuration of a ``dropgeom reproduce`` run.

A :class:`RunConfig` fixes everything a run depends on (data, models, grids,
seeds, training and curvature settings). It is written to ``config.json`` in
the run directory, so a run can be resumed or re-rendered from its directory
alone. :meth:`RunConfig.validate` checks every field up front and raises ONE
:class:`ConfigError` that lists every problem it found.

Presets: ``full`` (the paper-scale sweep), ``quick`` (under 10 minutes on a
2-core CPU) and ``test`` (a few seconds; used by the test suite).

Example:
    >>> from dropgeom.config import RunConfig, ConfigError
    >>> cfg = RunConfig.from_preset("quick", seeds=2)
    >>> cfg.seeds, cfg.dataset
    (2, 'digits')
    >>> try:
    ...     RunConfig.from_dict({"seeds": 0, "c1_p_grid": [0.0, 1.5], "colour": "red"})
    ... except ConfigError as err:
    ...     print(err)
    invalid configuration (3 problem(s)):
      - unknown option 'colour'
      - seeds must be in [1, 1000], got 0
      - c1_p_grid: dropout probability 1.5 is outside [0, 1)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, List, Mapping, Tuple

from .data import BUNDLED, INSTALLED
from .options import CurvatureMethod
from .train.registry import objective_names
from .config_checks import _check, _choices, _integer, _ints, _number, _positive, _probs, _strengths

__all__ = ["RunConfig", "ConfigError", "PRESETS", "ACTIVATIONS", "OBJECTIVES", "EXPERIMENTS"]

#: Hidden-layer activations the experiments know (``identity`` gives a deep linear network).
ACTIVATIONS = ("identity", "tanh", "softplus", "relu")
#: Training objectives C3 can compare: the registered ``dropgeom.train`` objectives (at import time).
OBJECTIVES = objective_names()
#: The paper's claims, one experiment each.
EXPERIMENTS = ("C1", "C2", "C3")
#: ``auto`` (dense while small, else stochastic) or a :class:`dropgeom.options.CurvatureMethod`.
CURVATURE_METHODS = ("auto", *(m.value for m in CurvatureMethod))
#: Parameters the curvature manifold varies: the layers around the first mask, or all.
CURVATURE_PARAMS = ("around_mask", "all")
#: Data sets of a reproduce run: the bundled and the installed ones of :mod:`dropgeom.data`.
DATASETS = BUNDLED + INSTALLED
#: C3b regularizers whose strength is swept (``dropgeom.experiments.regularizers``)
C3_REGULARIZERS = ("l2", "fisher_quadratic", "fisher_divergence", "wkm_noise")
#: C3 architectures (``mlp``: the config's MLP; ``cnn``: a small CNN for image data)
C3_ARCHITECTURES = ("mlp", "cnn")
OPTIMIZERS = ("adam", "sgd")


class ConfigError(ValueError):
    """An invalid configuration; ``problems`` lists every problem found."""

    def __init__(self, problems: List[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid configuration ({len(self.problems)} problem(s)):\n{lines}")


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a reproduce run (see the module docstring)."""

    preset: str = "quick"
    experiments: Tuple[str, ...] = EXPERIMENTS
    dataset: str = "digits"
    #: Standardised input features are projected on their first ``input_dim``
    #: principal components (0: keep all), so curvature is evaluated on
    #: manifolds whose parameter count stays well below n(K-1) (theory.md 3).
    input_dim: int = 10
    #: cap on the training set size (0: use all training samples). A few hundred
    #: digits with 16-unit networks and enough epochs is a regime where plain
    #: training overfits and dropout lowers the test NLL (the regime the claims
    #: are about); with all 1347 training digits and 8 units dropout underfits.
    max_train: int = 300
    #: seeds per setting (the damped curvature of plain solutions varies by an order
    #: of magnitude between seeds: three seeds leave t-intervals too wide to read)
    seeds: int = 5
    epochs: int = 100
    batch_size: int = 64
    lr: float = 0.01
    l2: float = 1e-3
    activation: str = "tanh"
    width: int = 16
    depth: int = 2
    c1_p_grid: Tuple[float, ...] = (0.0, 0.2, 0.4, 0.7)
    #: C1: inputs (training and held-out, each) on which every C1 measure is taken, over all parameters
    c1_inputs: int = 100
    #: C1 matched fit: the plain / L2 control stops at the optimizer step whose clean train NLL is closest
    #: to the dropout solution's, checked every ``c1_match_every`` steps; a pair counts as matched when
    #: ``|log(NLL_control / NLL_dropout)| <= c1_match_tol``
    c1_match_every: int = 1
    c1_match_tol: float = 0.05
    #: C1 L2 control, tuned per p to the same clean train NLL: the first L2 weight tried; every run
    #: trains for all ``epochs`` (the regulariser, not early stopping, sets the fit); the weight moves by
    #: factors of 10 until the final train NLL brackets the dropout solution's, then by regula falsi in
    #: (log weight, log NLL), within ``c1_l2_range``, at most ``c1_l2_fits`` runs; the run closest to the
    #: target is kept (matched when within ``c1_match_tol``)
    c1_l2: float = 1e-2
    c1_l2_range: Tuple[float, float] = (1e-5, 1.0)
    c1_l2_fits: int = 5
    #: C1: inputs (of each set) and parameters (the first Linear layer) of the undamped gamma^2 on the
    #: exact range of J (0: not computed); the inputs must outnumber the layer's parameters / (K-1)
    c1_gamma2_inputs: int = 30
    #: C1 noise floor: at the largest p, a second dropout run from the same initialisation with another
    #: training seed (masks and batch order)
    c1_noise_floor: bool = True
    #: C1 measures: Rademacher noise directions, Hutchinson probes, SAM radius (relative to |theta|) and
    #: ascent steps, common random masks of the dropout mixture (reading b)
    c1_noise_draws: int = 8
    c1_hutchinson_probes: int = 8
    c1_sam_rho: float = 0.05
    c1_sam_steps: int = 3
    c1_mixture_masks: int = 16
    c2_activations: Tuple[str, ...] = ACTIVATIONS
    c2_widths: Tuple[int, ...] = (16,)
    c2_depths: Tuple[int, ...] = (1, 2)
    c2_p: float = 0.2
    #: C2's manipulation: the input layer's weights at initialisation are multiplied by each of
    #: these factors (one architecture, one knob moving curvature; > 0)
    c2_init_scales: Tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    #: C2 data sets (empty: ``dataset``); a data set other than ``dataset`` is named in its settings. C2's MLP sees
    #: ``input_dim`` principal components on every data set, so n(K-1) on ``curvature_inputs`` exceeds its parameters
    c2_datasets: Tuple[str, ...] = ()
    #: C2 training-set size on Fashion-MNIST (0: ``max_train``); the bundled sets always use ``max_train``
    c2_train_size: int = 0
    #: probe samples of C2's stochastic curvature (0: ``curvature_samples``); C2 compares curvatures that
    #: differ by factors, so a few probes suffice in the quick run
    c2_curvature_samples: int = 8
    c3_p_grid: Tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.3)
    c3_p: float = 0.2
    c3_objectives: Tuple[str, ...] = ("none", "l2", "dropout", "fisher_dropout")
    #: C3b: regularizers whose strength is swept, each relative to its nominal strength at ``c3_p``
    c3_regularizers: Tuple[str, ...] = C3_REGULARIZERS
    #: C3b: strength multipliers (a log grid, > 0) applied to each regularizer's nominal strength
    c3_strengths: Tuple[float, ...] = (0.25, 1.0, 4.0)
    #: C3a: Monte Carlo masks for the gradient of the dropout regularizer
    c3_grad_samples: int = 256
    #: C3a/C3b data sets (``fashion_mnist`` needs the Debian package dataset-fashion-mnist)
    c3_datasets: Tuple[str, ...] = ("digits",)
    #: C3 architectures and optimizers (image data: ``cnn`` is a small CNN with dropout between blocks)
    c3_architectures: Tuple[str, ...] = ("mlp",)
    c3_optimizers: Tuple[str, ...] = ("adam",)
    #: learning rate of plain SGD in C3 (``lr`` is Adam's)
    c3_sgd_lr: float = 0.1
    #: C3 training-set sizes on Fashion-MNIST (0: ``max_train``); the bundled sets always use ``max_train``
    c3_train_sizes: Tuple[int, ...] = (0,)
    #: C3 step budget (0: none): every C3 training runs ``min(epochs, max(2, round(c3_max_steps / steps per epoch)))``
    #: epochs, so trainings at 10k and 60k inputs take about as many optimizer steps as at 1k
    c3_max_steps: int = 0
    #: C3a settings (``<data set>-<arch>-n<size>-<optimizer>``, as in the unit keys) with gradient units, and C3b
    #: settings with the strength sweep (``objectives`` units); empty: every setting of :meth:`c3_settings`
    c3_grad_settings: Tuple[str, ...] = ()
    c3_sweep_settings: Tuple[str, ...] = ()
    #: C3a: training inputs on which the gradients and the gaps are compared (0: ``curvature_inputs``)
    c3_grad_inputs: int = 0
    #: C3a: Monte Carlo masks of the measured gap at the solution (0: ``gap_samples``)
    c3_gap_samples: int = 0
    #: C3 Wager regime: logistic (binary) and softmax regression with input dropout, gap vs 1/2 V theta^T diag(F) theta
    c3_wager_datasets: Tuple[str, ...] = ("breast_cancer", "digits")
    c3_wager_p_grid: Tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5)
    #: Monte Carlo masks for the measured dropout gap when exact enumeration is too large
    gap_samples: int = 2000
    #: held-out inputs on which curvature is evaluated (digits has 449 test inputs:
    #: n(K-1) = 4041, about 9x the 448 parameters around the mask of a 16-unit network)
    curvature_inputs: int = 450
    #: ``auto``: dense while the Hessian tensor is small, else stochastic (the
    #: undamped gamma^2 is then skipped: its matrix-free estimate is unreliable on
    #: a badly conditioned g, theory.md 3)
    curvature_method: str = "auto"
    #: parameters the curvature manifold varies: the layers around the first mask, or all
    curvature_params: str = "around_mask"
    curvature_samples: int = 32
    #: conjugate-gradient iterations per solve of the stochastic curvature (0: the
    #: library default 2P + 100); the damped solve converges in far fewer, the
    #: projection onto range(J) is then approximate along the flattest directions of g
    curvature_cg_iter: int = 150
    #: damping of the damped curvature, relative to the largest Fisher eigenvalue
    damping: float = 1e-3
    #: training stops (and is recorded as diverged) when the loss exceeds this or is NaN
    divergence_threshold: float = 1e4

    # -- construction -------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str = "quick", **overrides: Any) -> "RunConfig":
        """The named preset (``full``, ``quick`` or ``test``) with ``overrides`` applied and validated."""
        if name not in PRESETS:
            raise ConfigError([f"unknown preset {name!r}; choose one of {sorted(PRESETS)}"])
        data = dict(PRESETS[name])
        data["preset"] = name
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunConfig":
        """Build and validate a config from a mapping (e.g. a loaded ``config.json``).

        Unknown keys and every invalid value are reported together in one :class:`ConfigError`.
        """
        if not isinstance(data, Mapping):
            raise ConfigError([f"a config must be a mapping, got {type(data).__name__}"])
        names = {f.name: f for f in dataclasses.fields(cls)}
        problems = [f"unknown option {k!r}" for k in data if k not in names]
        kwargs: Dict[str, Any] = {}
        for key, value in data.items():
            if key not in names:
                continue
            default = names[key].default
            if isinstance(default, tuple):
                if isinstance(value, (list, tuple)):
                    value = tuple(value)
                else:
                    problems.append(f"{key} must be a list, got {value!r}")
                    continue
            kwargs[key] = value
        cfg = cls(**kwargs)
        problems += cfg.problems()
        if problems:
            raise ConfigError(problems)
        return cfg

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError([f"config is not valid JSON: {err}"]) from None
        return cls.from_dict(data)

    def to_dict(self) -> Dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> "RunConfig":
        """A validated copy with ``changes`` applied."""
        data = self.to_dict()
        data.update(changes)
        return RunConfig.from_dict(data)

    def c3_settings(self) -> List[str]:
        """C3's settings ``<data set>-<arch>-n<size>-<optimizer>``: every data set x architecture x optimizer, with
        each of ``c3_train_sizes`` on Fashion-MNIST and ``max_train`` on the bundled sets."""
        try:
            return [
                f"{ds}-{arch}-n{size or self.max_train}-{opt}"
                for ds in self.c3_datasets
                for arch in self.c3_architectures
                for size in (self.c3_train_sizes if ds == "fashion_mnist" else (0,))
                for opt in self.c3_optimizers
            ]
        except TypeError:  # invalid fields: reported by problems()
            return []

    # -- validation ---------------------------------------------------------
    def validate(self) -> "RunConfig":
        """Raise one :class:`ConfigError` listing every problem; return ``self`` when valid."""
        problems = self.problems()
        if problems:
            raise ConfigError(problems)
        return self

    def problems(self) -> List[str]:
        """Every problem of this config, as readable sentences (empty when valid), in the order of :data:`CHECKS`."""
        out = [msg for name, check in CHECKS for msg in check(name, getattr(self, name))]
        return out + self._c1_l2_range_problems() + self._c3_setting_problems()

    def _c1_l2_range_problems(self) -> List[str]:
        """``c1_l2_range``: two finite numbers ``0 < lo < c1_l2 < hi`` (it brackets the first L2 weight tried)."""
        lo_hi = self.c1_l2_range
        ok = (
            isinstance(lo_hi, tuple)
            and len(lo_hi) == 2
            and all(_number(v) and v > 0 for v in lo_hi)
            and _number(self.c1_l2)
            and lo_hi[0] < self.c1_l2 < lo_hi[1]
        )
        return [] if ok else [f"c1_l2_range must be two finite numbers 0 < lo < c1_l2 < hi, got {lo_hi!r}"]

    def _c3_setting_problems(self) -> List[str]:
        """``c3_grad_settings`` and ``c3_sweep_settings`` must name settings of :meth:`c3_settings`."""
        settings = self.c3_settings()
        return [
            f"{name}: {tag!r} is not a C3 setting of this config; choose from {settings}"
            for name in ("c3_grad_settings", "c3_sweep_settings")
            for tag in getattr(self, name)
            if tag not in settings
        ]


# --------------------------------------------------------------------------- per-field checks (config_checks)
def _preset(name: str, v: Any) -> List[str]:
    return [] if v in PRESETS else [f"preset: unknown value {v!r}; choose from {sorted(PRESETS)}"]


#: ``(field, check(name, value) -> problems)`` in the order the problems are reported.
CHECKS: List[Tuple[str, Callable[[str, Any], List[str]]]] = [
    ("preset", _preset),
    ("experiments", partial(_choices, allowed=EXPERIMENTS)),
    ("dataset", partial(_choices, allowed=DATASETS)),
    ("input_dim", partial(_integer, lo=0)),
    ("max_train", partial(_integer, lo=0)),
    ("seeds", partial(_integer, lo=1, hi=1000)),
    ("epochs", partial(_integer, lo=1)),
    ("batch_size", partial(_integer, lo=1)),
    ("lr", _positive),
    ("divergence_threshold", _positive),
    ("l2", _check(lambda v: _number(v) and v >= 0, "l2 must be a finite number >= 0, got {v!r}")),
    ("activation", partial(_choices, allowed=ACTIVATIONS)),
    ("width", partial(_integer, lo=1)),
    ("depth", partial(_integer, lo=2)),
    ("c1_p_grid", _probs),
    ("c1_inputs", partial(_integer, lo=10)),
    ("c1_match_every", partial(_integer, lo=1)),
    ("c1_match_tol", _positive),
    ("c1_l2", _check(lambda v: _number(v) and v > 0, "c1_l2 must be a finite number > 0, got {v!r}")),
    ("c1_noise_floor", _check(lambda v: isinstance(v, bool), "c1_noise_floor must be true or false, got {v!r}")),
    ("c1_noise_draws", partial(_integer, lo=1)),
    ("c1_hutchinson_probes", partial(_integer, lo=2)),
    ("c1_sam_rho", _positive),
    ("c1_sam_steps", partial(_integer, lo=0)),
    ("c1_mixture_masks", partial(_integer, lo=1)),
    ("c1_l2_fits", partial(_integer, lo=2)),
    ("c1_gamma2_inputs", partial(_integer, lo=0)),
    ("c2_activations", partial(_choices, allowed=ACTIVATIONS)),
    ("c2_widths", partial(_ints, lo=1)),
    ("c2_depths", partial(_ints, lo=1)),
    ("c2_p", partial(_probs, allow_zero=False)),
    ("c3_p_grid", partial(_probs, allow_zero=False)),
    ("c3_p", partial(_probs, allow_zero=False)),
    ("c3_objectives", lambda name, v: _choices(name, v, tuple(objective_names()))),
    ("c3_regularizers", partial(_choices, allowed=C3_REGULARIZERS)),
    ("c2_init_scales", _strengths),
    ("c2_curvature_samples", partial(_integer, lo=0)),
    ("c2_curvature_samples", _check(lambda v: v != 1, "c2_curvature_samples must be 0 (use curvature_samples) or >= 2")),
    ("c3_strengths", _strengths),
    ("c3_grad_samples", partial(_integer, lo=10)),
    ("c3_datasets", partial(_choices, allowed=DATASETS)),
    ("c3_architectures", partial(_choices, allowed=C3_ARCHITECTURES)),
    ("c3_optimizers", partial(_choices, allowed=OPTIMIZERS)),
    ("c3_sgd_lr", _positive),
    ("c3_train_sizes", partial(_ints, lo=0)),
    ("c3_wager_datasets", partial(_choices, allowed=DATASETS)),
    ("c3_wager_p_grid", partial(_probs, allow_zero=False)),
    (
        "c3_objectives",
        _check(
            lambda v: "dropout" in v,
            "c3_objectives must include 'dropout' (the reference every other objective is compared with)",
        ),
    ),
    ("c2_datasets", lambda name, v: _choices(name, v, DATASETS) if v else []),
    ("c2_train_size", partial(_integer, lo=0)),
    ("c3_max_steps", partial(_integer, lo=0)),
    ("c3_grad_inputs", partial(_integer, lo=0)),
    ("c3_gap_samples", partial(_integer, lo=0)),
    (
        "c3_gap_samples",
        _check(lambda v: not (_number(v) and 0 < v < 10), "c3_gap_samples must be 0 (use gap_samples) or >= 10, got {v}"),
    ),
    ("gap_samples", partial(_integer, lo=10)),
    ("curvature_inputs", partial(_integer, lo=10)),
    ("curvature_method", partial(_choices, allowed=CURVATURE_METHODS)),
    ("curvature_params", partial(_choices, allowed=CURVATURE_PARAMS)),
    ("curvature_samples", partial(_integer, lo=2)),
    ("curvature_cg_iter", partial(_integer, lo=0)),
    (
        "damping",
        _check(
            lambda v: not isinstance(v, bool) and isinstance(v, (int, float)) and 0 < v < 1,
            "damping must be in (0, 1) (relative to the largest Fisher eigenvalue), got {v!r}",
        ),
    ),
]


PRESETS: Dict[str, Dict[str, Any]] = {
    "full": dict(
        seeds=10,
        c1_p_grid=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7),
        c1_inputs=300,
        c1_noise_draws=16,
        c1_hutchinson_probes=32,
        c1_sam_steps=10,
        c1_mixture_masks=64,
        c2_widths=(16,),
        c2_depths=(2, 3),
        c3_p_grid=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5),
        c3_objectives=("none", "l2", "dropout", "gaussian_dropout", "fisher_dropout"),
        c2_activations=("tanh", "softplus"),
        c2_init_scales=(0.25, 0.5, 1.0, 2.0, 4.0),
        c2_curvature_samples=0,
        # C2 also on Fashion-MNIST (its MLP on input_dim principal components, 1,000 training images)
        c2_datasets=("digits", "fashion_mnist"),
        c2_train_size=1000,
        c3_strengths=(0.0625, 0.25, 1.0, 4.0, 16.0),
        c3_grad_samples=512,
        c3_grad_inputs=200,
        c3_gap_samples=1000,
        c3_datasets=("digits", "fashion_mnist"),
        c3_architectures=("mlp", "cnn"),
        c3_optimizers=("adam", "sgd"),
        c3_train_sizes=(1000, 10000, 60000),
        # every training takes about 1,600 optimizer steps: 100 epochs at 1k, 10 at 10k, 2 at 60k
        c3_max_steps=1600,
        # C3a: the MLP and the CNN at every size with both optimizers, and the digits settings;
        # C3b (the strength sweeps, 26 trainings per unit) on the MLPs at 300 digits and 1k / 10k images
        c3_grad_settings=(
            "digits-mlp-n300-adam",
            "digits-mlp-n300-sgd",
            "digits-cnn-n300-adam",
            "digits-cnn-n300-sgd",
            "fashion_mnist-mlp-n1000-adam",
            "fashion_mnist-mlp-n1000-sgd",
            "fashion_mnist-mlp-n10000-adam",
            "fashion_mnist-mlp-n10000-sgd",
            "fashion_mnist-mlp-n60000-adam",
            "fashion_mnist-mlp-n60000-sgd",
            "fashion_mnist-cnn-n1000-adam",
            "fashion_mnist-cnn-n10000-adam",
            "fashion_mnist-cnn-n60000-adam",
            "fashion_mnist-cnn-n1000-sgd",
            "fashion_mnist-cnn-n10000-sgd",
            "fashion_mnist-cnn-n60000-sgd",
        ),
        c3_sweep_settings=(
            "digits-mlp-n300-adam",
            "digits-mlp-n300-sgd",
            "fashion_mnist-mlp-n1000-adam",
            "fashion_mnist-mlp-n1000-sgd",
            "fashion_mnist-mlp-n10000-adam",
        ),
        curvature_samples=64,
        gap_samples=5000,
    ),
    "quick": dict(c2_activations=("tanh",), c2_depths=(2,), c3_objectives=("none", "dropout")),
    "test": dict(
        seeds=2,
        epochs=3,
        batch_size=128,
        lr=0.02,
        max_train=200,
        input_dim=8,
        width=6,
        c1_p_grid=(0.0, 0.5),
        c1_inputs=30,
        c1_noise_draws=2,
        c1_hutchinson_probes=2,
        c1_sam_steps=1,
        c1_mixture_masks=2,
        c2_activations=("tanh",),
        c2_widths=(6,),
        c2_depths=(2,),
        c3_p_grid=(0.05, 0.2),
        c3_objectives=("none", "dropout", "fisher_dropout"),
        c2_init_scales=(0.5, 2.0),
        c3_regularizers=("l2", "fisher_quadratic", "wkm_noise"),
        c3_strengths=(1.0,),
        c3_grad_samples=32,
        c3_wager_datasets=("iris",),
        c3_wager_p_grid=(0.1, 0.3),
        gap_samples=200,
        c2_p=0.3,
        c3_p=0.3,
        curvature_inputs=60,
        curvature_samples=8,
    ),
}
