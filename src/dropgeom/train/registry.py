r"""The named training objectives: one registration each, from which everything else derives.

A named objective is an :class:`ObjectiveSpec`: its name, a one-line
description, the options it takes and a factory that builds the
:class:`~dropgeom.train.objectives.Objective`. :func:`register_objective` adds
one (a decorator on the factory); the names (:func:`objective_names`,
:class:`ObjectiveName`), :func:`make_objective`'s option checks, the config
validation, the ``dropgeom train --objective`` choices and the translation of a
run's shared settings (:func:`run_options`) all read this registry, so a new
objective is one registration. The built-in ones (theory.md section 4 for the
dropout objectives, theory.md section 4.4 for Fisher-dropout):

* ``none`` = :class:`~dropgeom.train.objectives.NLL`, the clean loss;
* ``l2`` = ``NLL + L2``, the clean loss plus ``(weight / 2) ||theta||^2``;
* ``dropout`` = :class:`~dropgeom.train.objectives.DropoutNLL`, one Bernoulli mask sample per step;
* ``gaussian_dropout`` = :class:`~dropgeom.train.objectives.GaussianDropoutNLL`, masks ``N(1, p/(1-p))``;
* ``fisher_dropout`` = :class:`~dropgeom.train.objectives.FisherDropout`, the clean loss plus the
  deterministic dropout penalty.

Example:
    >>> make_objective("fisher_dropout", p=0.3, form="divergence")
    FisherDropout(p=0.3, form='divergence', curvature=False, estimator='exact', layers=None, weight=1.0)
    >>> objective_spec("l2").options
    ('weight', 'biases')
    >>> run_options("l2", p=0.3, l2=1e-4), run_options("dropout", p=0.3, l2=1e-4)
    ({'weight': 0.0001}, {'p': 0.3})
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Type, Union

from .objectives import L2, NLL, DropoutNLL, FisherDropout, GaussianDropoutNLL, Objective

__all__ = [
    "ObjectiveSpec",
    "register_objective",
    "objective_spec",
    "objective_names",
    "make_objective",
    "run_options",
    "ObjectiveName",
    "SHARED_SETTINGS",
]

#: The settings a run shares between its objectives (the CLI's ``--p`` and ``--weight``, the
#: config's ``p`` grids and ``l2``): ``p`` the dropout rate, ``l2`` the weight-decay strength.
SHARED_SETTINGS = ("p", "l2")


@dataclass(frozen=True)
class ObjectiveSpec:
    """One named objective.

    Attributes:
        name: the name :func:`make_objective`, the config and the CLI accept (lower case).
        description: one line for help texts and the guide.
        factory: ``factory(**options) -> Objective``.
        options: the keyword options ``factory`` takes (read from its signature).
        settings: which of a run's :data:`SHARED_SETTINGS` this objective takes, and as which
            option: ``{"p": "p"}`` for a dropout objective, ``{"l2": "weight"}`` for weight decay.
    """

    name: str
    description: str
    factory: Callable[..., Objective]
    options: Tuple[str, ...]
    settings: Mapping[str, str] = field(default_factory=dict)

    @property
    def uses_dropout(self) -> bool:
        """Whether the objective trains with the run's dropout rate (the model needs dropout modules)."""
        return "p" in self.settings


_REGISTRY: Dict[str, ObjectiveSpec] = {}


def _keyword_options(factory: Callable[..., Any]) -> Tuple[str, ...]:
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(n for n, prm in inspect.signature(factory).parameters.items() if prm.kind in kinds)


def register_objective(
    name: str, description: str, *, settings: Optional[Mapping[str, str]] = None
) -> Callable[[Callable[..., Objective]], Callable[..., Objective]]:
    """Register ``factory`` (the decorated function or Objective class) as the objective ``name``.

    Its keyword parameters are the objective's options. ``settings`` maps the run's shared
    settings (:data:`SHARED_SETTINGS`: ``p``, ``l2``) to the option that receives them.

    Raises:
        ValueError: ``name`` is empty, not lower case or already registered; ``settings`` names an
            unknown shared setting or an option the factory does not take.

    Example:
        >>> @register_objective("doc_example_l2_only", "L2 alone (no data term)", settings={"l2": "weight"})
        ... def _l2_only(weight: float = 1e-4) -> Objective:
        ...     return L2(weight)
        >>> make_objective("doc_example_l2_only", weight=0.5)
        L2(weight=0.5, biases=True)
        >>> _ = _REGISTRY.pop("doc_example_l2_only")  # keep the doctest from changing the registry
    """
    if not isinstance(name, str) or not name or name != name.lower() or not name.isidentifier():
        raise ValueError(f"an objective name must be a lower-case identifier, got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"objective {name!r} is already registered")
    settings = dict(settings or {})

    def decorate(factory: Callable[..., Objective]) -> Callable[..., Objective]:
        options = _keyword_options(factory)
        for role, option in settings.items():
            if role not in SHARED_SETTINGS:
                raise ValueError(f"objective {name!r}: unknown shared setting {role!r}; choose from {list(SHARED_SETTINGS)}")
            if option not in options:
                raise ValueError(
                    f"objective {name!r}: setting {role!r} goes to option {option!r}, which it does not take {options}"
                )
        _REGISTRY[name] = ObjectiveSpec(name, description, factory, options, settings)
        return factory

    return decorate


def objective_names() -> Tuple[str, ...]:
    """The names of the registered objectives, in registration order (built-in ones first).

    Raises:
        Nothing of its own: it only reads the registry.

    Example:
        >>> objective_names()[:3]
        ('none', 'l2', 'dropout')
    """
    return tuple(_REGISTRY)


def objective_spec(name: Union[str, Enum]) -> ObjectiveSpec:
    """The registration of the objective ``name`` (any case; an :class:`ObjectiveName` member works too).

    Raises:
        ValueError: no objective of that name is registered; the message lists the names.

    Example:
        >>> objective_spec("Dropout").settings
        {'p': 'p'}
    """
    raw = name.value if isinstance(name, Enum) else name
    key = raw.lower() if isinstance(raw, str) else raw
    if key not in _REGISTRY:
        raise ValueError(f"unknown objective {name!r}; choose one of {list(_REGISTRY)}")
    return _REGISTRY[key]


def make_objective(name: Union[str, Enum, Objective], **options: Any) -> Objective:
    """Build a registered objective (see :func:`objective_names`); an :class:`Objective` passes through.

    Raises:
        ValueError: an unknown name, an option the objective does not take, options given with an
            Objective instance, or an invalid option value (from the objective).

    Example:
        >>> make_objective("none")
        NLL()
        >>> make_objective("l2", weight=1e-3)
        NLL() + L2(weight=0.001, biases=True)
    """
    if isinstance(name, Objective):
        if options:
            raise ValueError("options cannot be given with an Objective instance")
        return name
    spec = objective_spec(name)
    bad = sorted(set(options) - set(spec.options))
    if bad:
        raise ValueError(f"objective {spec.name!r} takes options {list(spec.options)}; got unknown {bad}")
    return spec.factory(**options)


def run_options(name: Union[str, Enum], *, p: float, l2: float) -> Dict[str, Any]:
    """The options objective ``name`` takes from a run's shared settings: dropout rate ``p``, L2 weight ``l2``.

    One translation for the command line and the experiments: ``l2`` gets ``weight=l2``, a dropout
    objective ``p=p``, ``none`` nothing (as declared by each registration's ``settings``).

    Raises:
        ValueError: an unknown objective name.

    Example:
        >>> run_options("none", p=0.3, l2=1e-4), run_options("fisher_dropout", p=0.3, l2=1e-4)
        ({}, {'p': 0.3})
    """
    spec = objective_spec(name)
    values = {"p": p, "l2": l2}
    return {option: values[role] for role, option in spec.settings.items()}


# --------------------------------------------------------------------------- the built-in objectives
@register_objective("none", "clean loss (dropout off)")
def _none() -> Objective:
    return NLL()


@register_objective("l2", "clean loss + (weight/2) ||theta||^2", settings={"l2": "weight"})
def _l2(weight: float = 1e-4, biases: bool = True) -> Objective:
    return NLL() + L2(weight=weight, biases=biases)


register_objective("dropout", "Bernoulli dropout (one mask sample per step)", settings={"p": "p"})(DropoutNLL)
register_objective("gaussian_dropout", "Gaussian dropout, masks N(1, p/(1-p))", settings={"p": "p"})(GaussianDropoutNLL)
register_objective("fisher_dropout", "clean loss + Fisher (quadratic) or divergence dropout penalty", settings={"p": "p"})(
    FisherDropout
)


class _Named(str, Enum):
    """Base of :class:`ObjectiveName`: prints as its value and carries the registration's description."""

    def __str__(self) -> str:
        return str(self.value)

    @property
    def description(self) -> str:
        """The registered one-line description."""
        return objective_spec(self.value).description

    @property
    def options(self) -> Tuple[str, ...]:
        """The options the objective takes."""
        return objective_spec(self.value).options


#: The built-in objectives as a ``str, Enum`` (``ObjectiveName.FISHER_DROPOUT == "fisher_dropout"``),
#: derived from the registrations above; objectives registered later are accepted by name.
ObjectiveName: Type[_Named] = _Named("ObjectiveName", {n.upper(): n for n in _REGISTRY}, module=__name__)  # type: ignore[call-overload]
ObjectiveName.__doc__ = "The built-in named objectives (values: the names :func:`make_objective` accepts)."
