r"""Training objectives as small composable pieces (theory.md sections 4 and 4.4).

An :class:`Objective` maps ``(model, x, y, family, generator)`` to an
:class:`ObjectiveOutput`: a differentiable scalar ``loss`` and a dict of float
``metrics``. Objectives add up (``NLL() + L2(1e-4)``), so any optimizer can
minimise any combination; nothing here touches the optimizer. All losses use
the mean over the batch (theory.md convention).

The pieces (``l_i = -log p(y_i | eta_i)``, ``p`` the DROP probability):

* :class:`NLL`  -- the clean loss ``(1/n) sum_i l(y_i, f(x_i; theta))`` with every
  dropout module off (weight scaling).
* :class:`L2`  -- ``(lambda / 2) ||theta||^2`` (weight decay as a loss term).
* :class:`DropoutNLL`  -- one Monte Carlo sample of the dropout objective
  ``L_drop = (1/n) sum_i E_m l(y_i, f(x_i; theta, m))`` with inverted Bernoulli
  masks ``m_j = b_j / (1 - p)`` (theory.md 4): either the model's own
  ``nn.Dropout`` modules in train mode, seeded from ``generator``
  (``masks="module"``), or explicit masks from :mod:`dropgeom.dropout`
  (``masks="explicit"``).
* :class:`GaussianDropoutNLL`  -- the same with multiplicative Gaussian masks
  ``m_j ~ N(1, p/(1-p))`` at the dropout modules (explicit masks).
* :class:`FisherPenalty`  -- the deterministic dropout penalty of theory.md 4.4,
  computed by :func:`dropgeom.dropout.penalty`:
  ``1/2 sum_j V_jj F^mask_jj`` with ``V = p/(1-p)`` (``form="quadratic"``) or
  ``p sum_j K_j`` (``form="divergence"``), optionally plus the curvature term
  (``1/2 sum_j V_jj C_jj`` or ``p sum_j B_j``); no mask noise enters the
  gradient. ``estimator="exact"`` (default) is deterministic; ``"mc"`` (one random
  probe ``Sigma^{1/2} xi`` or one dropped unit per input) and ``"unit"`` (one random
  unit per input) are unbiased and cheaper (:func:`dropgeom.dropout.penalty`).
The named objectives (``none``, ``l2``, ``dropout``, ``gaussian_dropout``,
``fisher_dropout``) are registered in :mod:`dropgeom.train.registry`, which
builds them by name (:func:`~dropgeom.train.registry.make_objective`).

References: Srivastava et al. (2014) dropout; Wang & Manning (2013) Gaussian
dropout; Wager, Wang & Liang (2013) and Wei, Kakade & Ma (2020) for the
explicit (Fisher) regulariser; Kimura & Hino (2022) for the geometric reading.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Dropout(0.2), torch.nn.Linear(8, 3))
    >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    >>> obj = NLL() + L2(1e-3)
    >>> out = obj(net, x, y, "categorical", torch.Generator().manual_seed(0))
    >>> sorted(out.metrics)
    ['l2', 'loss', 'nll']
    >>> out.loss.backward()
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .._utils import check_p
from ..families import ExponentialFamily, get_family
from ..options import Estimator, PenaltyForm, parse

__all__ = [
    "ObjectiveOutput",
    "Objective",
    "NLL",
    "L2",
    "DropoutNLL",
    "GaussianDropoutNLL",
    "FisherPenalty",
    "FisherDropout",
    "Sum",
    "dropout_modules",
]

Family = Union[str, ExponentialFamily]


@dataclass
class ObjectiveOutput:
    """The value of an objective on one batch: ``loss`` (differentiable scalar) and float ``metrics``."""

    loss: Tensor
    metrics: Dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def dropout_modules(model: nn.Module, layers: Optional[Sequence[str]] = None) -> List[Tuple[str, nn.Module]]:
    """The model's ``nn.Dropout``-type modules as ``(name, module)``, optionally only the named ``layers``.

    Raises ``ValueError`` for a model without dropout modules or an unknown layer name.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1))
        >>> [n for n, _ in dropout_modules(net)]
        ['1']
    """
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no dropout modules (torch.nn.Dropout); add one after each layer to drop")
    if layers is None:
        return found
    names = [n for n, _ in found]
    unknown = [name for name in layers if name not in names]
    if unknown:
        raise ValueError(f"unknown dropout layer names {unknown}; the model's dropout modules are {names}")
    return [(n, m) for n, m in found if n in set(layers)]


@contextlib.contextmanager
def _dropout_state(model: nn.Module, active: Sequence[nn.Module], p: Optional[float]) -> Iterator[None]:
    """Dropout modules in ``active`` train (with rate ``p`` if given), every other dropout module off."""
    saved = [(m, m.training, m.p) for _, m in model.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    ids = {id(m) for m in active}
    try:
        for m, _, _ in saved:
            m.training = id(m) in ids
            if p is not None and id(m) in ids:
                m.p = p
        yield
    finally:
        for m, t, rate in saved:
            m.training, m.p = t, rate


def _check_p(p: Optional[float]) -> Optional[float]:
    return None if p is None else check_p(p, "the objective")


def _check_batch(model: nn.Module, x: Tensor, y: Tensor) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError("inputs x and targets y must be tensors")
    if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y need the same leading sample axis; got shapes {tuple(x.shape)} and {tuple(y.shape)}")


def _nll(eta: Tensor, y: Tensor, family: ExponentialFamily) -> Tensor:
    if eta.dim() != 2:
        raise ValueError(f"the model must return natural parameters of shape [n, K], got {tuple(eta.shape)}")
    family.check_targets(y, eta.shape[0], eta.shape[1])
    return family.nll(eta, y).mean()


def _dropout_api(name: str) -> Any:
    try:
        from .. import dropout as dmod  # the dropout package (another module of dropgeom)
    except ImportError as err:  # pragma: no cover - only before dropgeom.dropout exists
        raise ImportError(f"this objective needs dropgeom.dropout.{name}, which is not available ({err})") from err
    return getattr(dmod, name)


# ---------------------------------------------------------------------------
# the protocol
# ---------------------------------------------------------------------------


class Objective(ABC):
    """A training objective: ``obj(model, x, y, family, generator) -> ObjectiveOutput``.

    Subclasses implement :meth:`compute`; ``+`` combines objectives into a
    :class:`Sum`. Every output's metrics contain ``loss`` (the total value).
    Randomness (masks) comes only from ``generator``, so a seeded generator
    makes a run reproducible.
    """

    name: str = "objective"

    def __call__(
        self, model: nn.Module, x: Tensor, y: Tensor, family: Family = "categorical", generator: Optional[torch.Generator] = None
    ) -> ObjectiveOutput:
        _check_batch(model, x, y)
        out = self.compute(model, x, y, get_family(family), generator)
        out.metrics["loss"] = float(out.loss.detach())
        return out

    @abstractmethod
    def compute(
        self, model: nn.Module, x: Tensor, y: Tensor, family: ExponentialFamily, generator: Optional[torch.Generator]
    ) -> ObjectiveOutput:
        """The objective's value on one batch (inputs already validated)."""

    def config(self) -> Dict[str, Any]:
        """The settings that define this objective (recorded in checkpoints and run configs)."""
        return {"name": self.name}

    def __add__(self, other: "Objective") -> "Sum":
        if not isinstance(other, Objective):
            return NotImplemented
        return Sum(self, other)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"


class Sum(Objective):
    """The sum of objectives; metrics are merged (a repeated key is suffixed ``_2``, ``_3``, ...).

    Example:
        >>> net = torch.nn.Linear(3, 2)
        >>> out = (NLL() + L2(0.1))(net, torch.randn(5, 3), torch.randint(0, 2, (5,)))
        >>> abs(out.metrics["loss"] - out.metrics["nll"] - out.metrics["l2"]) < 1e-6
        True
    """

    name = "sum"

    def __init__(self, *terms: Objective) -> None:
        flat: List[Objective] = []
        for t in terms:
            if not isinstance(t, Objective):
                raise TypeError(f"Sum takes Objective instances, got {type(t).__name__}")
            flat.extend(t.terms if isinstance(t, Sum) else [t])
        if not flat:
            raise ValueError("Sum needs at least one objective")
        self.terms: Tuple[Objective, ...] = tuple(flat)

    def compute(self, model, x, y, family, generator):  # type: ignore[no-untyped-def]
        total: Optional[Tensor] = None
        metrics: Dict[str, float] = {}
        for t in self.terms:
            out = t.compute(model, x, y, family, generator)
            total = out.loss if total is None else total + out.loss
            for k, v in out.metrics.items():
                key, i = k, 2
                while key in metrics:
                    key, i = f"{k}_{i}", i + 1
                metrics[key] = v
        assert total is not None
        return ObjectiveOutput(total, metrics)

    def config(self) -> Dict[str, Any]:
        return {"name": self.name, "terms": [t.config() for t in self.terms]}

    def __repr__(self) -> str:
        return " + ".join(repr(t) for t in self.terms)


# ---------------------------------------------------------------------------
# the pieces
# ---------------------------------------------------------------------------


class NLL(Objective):
    """Clean loss ``(1/n) sum_i -log p(y_i | f(x_i; theta))`` with every dropout module off; metric ``nll``."""

    name = "nll"

    def compute(self, model, x, y, family, generator):  # type: ignore[no-untyped-def]
        drops = [m for _, m in model.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
        with _dropout_state(model, [], None) if drops else contextlib.nullcontext():
            loss = _nll(model(x), y, family)
        return ObjectiveOutput(loss, {"nll": float(loss.detach())})


class L2(Objective):
    """``(weight / 2) * sum_k ||theta_k||^2`` over the trainable parameters; metric ``l2``.

    ``biases=False`` leaves out one-dimensional parameters (biases, norms).
    The gradient is ``weight * theta``: the same as ``weight_decay=weight`` in SGD.
    """

    name = "l2"

    def __init__(self, weight: float = 1e-4, biases: bool = True) -> None:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"L2 weight must be a finite number >= 0, got {weight!r}")
        self.weight, self.biases = float(weight), bool(biases)

    def compute(self, model, x, y, family, generator):  # type: ignore[no-untyped-def]
        params = [p for p in model.parameters() if p.requires_grad and (self.biases or p.dim() > 1)]
        if not params:
            raise ValueError("L2: the model has no trainable parameters to penalise")
        sq = torch.stack([(p * p).sum() for p in params]).sum()
        loss = 0.5 * self.weight * sq
        return ObjectiveOutput(loss, {"l2": float(loss.detach())})

    def config(self) -> Dict[str, Any]:
        return {"name": self.name, "weight": self.weight, "biases": self.biases}


class DropoutNLL(Objective):
    """One Monte Carlo sample of the Bernoulli dropout loss; metric ``nll_dropout``.

    Args:
        p: drop probability; ``None`` reads each dropout module's own ``p``.
        masks: ``"module"`` runs the model's ``nn.Dropout`` modules in train
            mode with torch's RNG seeded from ``generator`` (the global RNG
            state is restored afterwards); ``"explicit"`` samples inverted
            Bernoulli masks with :func:`dropgeom.dropout.sample_masks` and
            evaluates :func:`dropgeom.dropout.forward_with_masks`.
        layers: names of the dropout modules to use (others off); ``None``: all.

    Its expectation over masks is ``L_drop`` (theory.md 4).
    """

    name = "dropout"

    def __init__(self, p: Optional[float] = None, masks: str = "module", layers: Optional[Sequence[str]] = None) -> None:
        if masks not in ("module", "explicit"):
            raise ValueError(f"masks must be 'module' or 'explicit', got {masks!r}")
        self.p, self.masks = _check_p(p), masks
        self.layers = None if layers is None else tuple(layers)

    def compute(self, model, x, y, family, generator):  # type: ignore[no-untyped-def]
        if self.masks == "explicit":
            masks = _dropout_api("sample_masks")(model, x, noise="bernoulli", p=self.p, layers=self.layers, generator=generator)
            eta = _dropout_api("forward_with_masks")(model, x, masks)
        else:
            active = [m for _, m in dropout_modules(model, self.layers)]
            with _dropout_state(model, active, self.p), _seeded(generator, x.device):
                eta = model(x)
        loss = _nll(eta, y, family)
        return ObjectiveOutput(loss, {"nll_dropout": float(loss.detach())})

    def config(self) -> Dict[str, Any]:
        return {"name": self.name, "p": self.p, "masks": self.masks, "layers": self.layers}


@contextlib.contextmanager
def _seeded(generator: Optional[torch.Generator], device: torch.device) -> Iterator[None]:
    """Run with torch's global RNG seeded from ``generator`` (restored afterwards); no-op without one."""
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class GaussianDropoutNLL(Objective):
    """One Monte Carlo sample of the Gaussian dropout loss, masks ``m_j ~ N(1, p/(1-p))``; metric ``nll_gaussian_dropout``.

    Masks are sampled by :func:`dropgeom.dropout.sample_masks` (``noise="gaussian"``)
    at the model's dropout modules and applied by
    :func:`dropgeom.dropout.forward_with_masks`. ``p=None`` reads each module's ``p``.
    """

    name = "gaussian_dropout"

    def __init__(self, p: Optional[float] = None, layers: Optional[Sequence[str]] = None) -> None:
        self.p = _check_p(p)
        self.layers = None if layers is None else tuple(layers)

    def compute(self, model, x, y, family, generator):  # type: ignore[no-untyped-def]
        masks = _dropout_api("sample_masks")(model, x, noise="gaussian", p=self.p, layers=self.layers, generator=generator)
        eta = _dropout_api("forward_with_masks")(model, x, masks)
        loss = _nll(eta, y, family)
        return ObjectiveOutput(loss, {"nll_gaussian_dropout": float(loss.detach())})

    def config(self) -> Dict[str, Any]:
        return {"name": self.name, "p": self.p, "layers": self.layers}


class FisherPenalty(Objective):
    r"""The deterministic dropout penalty of theory.md 4.4, from :func:`dropgeom.dropout.penalty`; metric ``penalty``.

    ``form="quadratic"``: ``1/2 sum_j V_jj F^mask_jj`` with ``V = p/(1-p)``;
    ``form="divergence"``: ``p sum_j K_j``. With ``curvature=True`` the
    matching curvature term is added (it needs the targets): ``1/2 V sum_j C_jj``
    or ``p sum_j B_j`` (theory.md 4.2), by the same path and estimator. ``weight``
    multiplies the penalty (1 = the small-noise law).

    Raises:
        ValueError: ``p`` outside ``[0, 1)``, an unknown ``form`` or ``estimator``, a
            negative or non-finite ``weight``; at call time, the errors of
            :func:`dropgeom.dropout.penalty` (e.g. the curvature term with a layer or
            family it does not support, named in the message).
    """

    name = "fisher_penalty"

    def __init__(
        self,
        p: Optional[float] = None,
        form: Union[str, PenaltyForm] = "quadratic",
        curvature: bool = False,
        estimator: Union[str, Estimator] = "exact",
        layers: Optional[Sequence[str]] = None,
        weight: float = 1.0,
    ) -> None:
        form, estimator = parse(PenaltyForm, form), parse(Estimator, estimator)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"penalty weight must be a finite number >= 0, got {weight!r}")
        self.p, self.form, self.curvature, self.estimator = _check_p(p), form, bool(curvature), estimator
        self.layers = None if layers is None else tuple(layers)
        self.weight = float(weight)

    def compute(self, model, x, y, family, generator):  # type: ignore[no-untyped-def]
        loss, _ = self._penalty(model, x, y, family, generator)
        return ObjectiveOutput(loss, {"penalty": float(loss.detach())})

    def _penalty(self, model, x, y, family, generator):  # type: ignore[no-untyped-def]
        """``(weighted penalty, clean eta)`` from one forward pass of :func:`dropgeom.dropout.penalty`."""
        # enable_grad: the exact penalty differentiates with respect to the masks
        # internally, so it also works when the caller evaluates under no_grad.
        with torch.enable_grad():
            res = _dropout_api("penalty")(
                model,
                x,
                y if self.curvature else None,
                family=family,
                p=self.p,
                form=self.form,
                curvature=self.curvature,
                layers=self.layers,
                method=self.estimator,
                generator=generator,
            )
        pen = res.value
        return (pen if self.weight == 1.0 else self.weight * pen), res.eta

    def config(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "p": self.p,
            "form": self.form.value,
            "curvature": self.curvature,
            "estimator": self.estimator.value,
            "layers": self.layers,
            "weight": self.weight,
        }


class FisherDropout(FisherPenalty):
    r"""Deterministic Fisher-dropout training (theory.md 4.4): clean NLL + :class:`FisherPenalty`.

    ``L_clean + 1/2 sum_j V_jj F^mask_jj`` (``form="quadratic"``) or
    ``L_clean + p sum_j K_j`` (``form="divergence"``), optionally with the
    curvature term. Equal in value and gradient to ``NLL() + FisherPenalty(...)``,
    but the clean loss reuses the penalty's forward pass (one forward fewer per
    step); the clean output is the eval-mode output. Metrics ``nll`` and ``penalty``.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Dropout(0.5), torch.nn.Linear(4, 2))
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> a = FisherDropout(form="divergence")(net, x, y).metrics
        >>> b = (NLL() + FisherPenalty(form="divergence"))(net, x, y).metrics
        >>> abs(a["loss"] - b["loss"]) < 1e-6
        True
    """

    name = "fisher_dropout"

    def compute(self, model, x, y, family, generator):  # type: ignore[no-untyped-def]
        pen, eta = self._penalty(model, x, y, family, generator)
        nll = _nll(eta, y, family)
        return ObjectiveOutput(nll + pen, {"nll": float(nll.detach()), "penalty": float(pen.detach())})
