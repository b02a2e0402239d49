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
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

__all__ = ["RunConfig", "ConfigError", "PRESETS", "ACTIVATIONS", "OBJECTIVES", "EXPERIMENTS"]

#: Hidden-layer activations the experiments know (``identity`` gives a deep linear network).
ACTIVATIONS = ("identity", "tanh", "softplus", "relu")
#: Training objectives compared in C3 (names of ``dropgeom.train`` objectives).
OBJECTIVES = ("none", "l2", "dropout", "gaussian_dropout", "fisher_dropout")
#: The paper's claims, one experiment each.
EXPERIMENTS = ("C1", "C2", "C3")
CURVATURE_METHODS = ("auto", "dense", "stochastic")
DATASETS = ("digits", "breast_cancer", "wine", "iris", "fashion_mnist")
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

    # -- validation ---------------------------------------------------------
    def validate(self) -> "RunConfig":
        """Raise one :class:`ConfigError` listing every problem; return ``self`` when valid."""
        problems = self.problems()
        if problems:
            raise ConfigError(problems)
        return self

    def problems(self) -> List[str]:
        """Every problem of this config, as readable sentences (empty when valid)."""
        out: List[str] = []

        def integer(name: str, lo: int, hi: Optional[int] = None) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                out.append(f"{name} must be an integer, got {v!r}")
            elif v < lo or (hi is not None and v > hi):
                out.append(f"{name} must be in [{lo}, {hi if hi is not None else 'inf'}], got {v}")

        def positive(name: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                out.append(f"{name} must be a finite positive number, got {v!r}")

        def probs(name: str, allow_zero: bool = True) -> None:
            v = getattr(self, name)
            values = v if isinstance(v, tuple) else (v,)
            if isinstance(v, tuple) and not v:
                out.append(f"{name} must not be empty")
            for p in values:
                if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= p < 1.0) or (p == 0 and not allow_zero):
                    out.append(f"{name}: dropout probability {p!r} is outside {'[0' if allow_zero else '(0'}, 1)")

        def choices(name: str, allowed: Tuple[str, ...]) -> None:
            v = getattr(self, name)
            values = v if isinstance(v, tuple) else (v,)
            if isinstance(v, tuple) and not v:
                out.append(f"{name} must not be empty")
            for x in values:
                if x not in allowed:
                    out.append(f"{name}: unknown value {x!r}; choose from {list(allowed)}")

        def ints(name: str, lo: int) -> None:
            v = getattr(self, name)
            if not v:
                out.append(f"{name} must not be empty")
            for x in v:
                if isinstance(x, bool) or not isinstance(x, int) or x < lo:
                    out.append(f"{name}: {x!r} must be an integer >= {lo}")

        def strengths(name: str) -> None:
            v = getattr(self, name)
            if not v:
                out.append(f"{name} must not be empty")
            for x in v:
                if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0:
                    out.append(f"{name}: {x!r} is not a positive number (a log grid needs values > 0)")

        if self.preset not in PRESETS:
            out.append(f"preset: unknown value {self.preset!r}; choose from {sorted(PRESETS)}")
        choices("experiments", EXPERIMENTS)
        choices("dataset", DATASETS)
        integer("input_dim", 0)
        integer("max_train", 0)
        integer("seeds", 1, 1000)
        integer("epochs", 1)
        integer("batch_size", 1)
        positive("lr")
        positive("divergence_threshold")
        if isinstance(self.l2, bool) or not isinstance(self.l2, (int, float)) or not math.isfinite(self.l2) or self.l2 < 0:
            out.append(f"l2 must be a finite number >= 0, got {self.l2!r}")
        choices("activation", ACTIVATIONS)
        integer("width", 1)
        integer("depth", 2)
        probs("c1_p_grid")
        integer("c1_inputs", 10)
        integer("c1_match_every", 1)
        positive("c1_match_tol")
        if isinstance(self.c1_l2, bool) or not isinstance(self.c1_l2, (int, float)) or not math.isfinite(self.c1_l2) or self.c1_l2 <= 0:
            out.append(f"c1_l2 must be a finite number > 0, got {self.c1_l2!r}")
        if not isinstance(self.c1_noise_floor, bool):
            out.append(f"c1_noise_floor must be true or false, got {self.c1_noise_floor!r}")
        integer("c1_noise_draws", 1)
        integer("c1_hutchinson_probes", 2)
        positive("c1_sam_rho")
        integer("c1_sam_steps", 0)
        integer("c1_mixture_masks", 1)
        integer("c1_l2_fits", 2)
        integer("c1_gamma2_inputs", 0)
        lo_hi = self.c1_l2_range
        if (not isinstance(lo_hi, tuple) or len(lo_hi) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in lo_hi)
                or not lo_hi[0] < self.c1_l2 < lo_hi[1]):
            out.append(f"c1_l2_range must be two finite numbers 0 < lo < c1_l2 < hi, got {lo_hi!r}")
        choices("c2_activations", ACTIVATIONS)
        ints("c2_widths", 1)
        ints("c2_depths", 1)
        probs("c2_p", allow_zero=False)
        probs("c3_p_grid", allow_zero=False)
        probs("c3_p", allow_zero=False)
        choices("c3_objectives", OBJECTIVES)
        choices("c3_regularizers", C3_REGULARIZERS)
        strengths("c2_init_scales")
        integer("c2_curvature_samples", 0)
        if self.c2_curvature_samples == 1:
            out.append("c2_curvature_samples must be 0 (use curvature_samples) or >= 2")
        strengths("c3_strengths")
        integer("c3_grad_samples", 10)
        choices("c3_datasets", DATASETS)
        choices("c3_architectures", C3_ARCHITECTURES)
        choices("c3_optimizers", OPTIMIZERS)
        positive("c3_sgd_lr")
        ints("c3_train_sizes", 0)
        choices("c3_wager_datasets", DATASETS)
        probs("c3_wager_p_grid", allow_zero=False)
        if "dropout" not in self.c3_objectives:
            out.append("c3_objectives must include 'dropout' (the reference every other objective is compared with)")
        integer("gap_samples", 10)
        integer("curvature_inputs", 10)
        choices("curvature_method", CURVATURE_METHODS)
        choices("curvature_params", ("around_mask", "all"))
        integer("curvature_samples", 2)
        integer("curvature_cg_iter", 0)
        if isinstance(self.damping, bool) or not isinstance(self.damping, (int, float)) or not (0 < self.damping < 1):
            out.append(f"damping must be in (0, 1) (relative to the largest Fisher eigenvalue), got {self.damping!r}")
        return out


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
        c3_strengths=(0.0625, 0.25, 1.0, 4.0, 16.0),
        c3_grad_samples=1024,
        c3_datasets=("digits", "fashion_mnist"),
        c3_architectures=("mlp", "cnn"),
        c3_optimizers=("adam", "sgd"),
        c3_train_sizes=(1000, 10000, 60000),
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
