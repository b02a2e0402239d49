r"""Chain rules for the dropout fast path: one rule object per module type (theory.md 4.2).

The chain path (:mod:`dropgeom.dropout.chain`) runs the quantities of theory.md
4.2 through a top-level ``nn.Sequential`` module by module. Each module type
has a :class:`ChainRule` that says how its input ``v`` (output ``o``) carries

* a state: ``push``, ``v -> o``;
* a probe backwards: ``pull_back``, ``w -> w^T do/dv``;
* a tangent forwards: ``tangent``, ``t -> (do/dv) t``;
* a second-order tangent: ``second``, ``(t, s) -> (o' t, o'' [t, t] + o' s)``
  (``s = None`` stands for zero).

Three kinds carry the closed forms of the chain path: :class:`IdentityRule`
(dropout at mask 1, ``nn.Identity``, ``nn.Flatten`` of ``[n, d]``),
:class:`AffineRule` (``o = v W^T + b``: rank-1 entry of a dropped unit, affine
rests) and :class:`ElementwiseRule` (``o = a(v)`` with ``a'``, ``a''``; ReLU &
co. are piecewise linear, ``a'' = 0`` almost everywhere). :data:`CHAIN_RULES`
maps module types to rules; :func:`chain_rule` looks a module up along its
class hierarchy and :func:`register_chain_rule` adds a type. Activation
derivatives use closed forms for ReLU / Tanh / Sigmoid and ``torch.func.jvp``
of the module otherwise (differentiable, so the penalty's gradient is exact).

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Cube(nn.Module):
    ...     def forward(self, v):
    ...         return v**3
    >>> @register_chain_rule(Cube)
    ... class CubeRule(ElementwiseRule):
    ...     def d1(self, mod, v, out=None):
    ...         return 3 * v * v
    ...     def d2(self, mod, v):
    ...         return 6 * v
    >>> v = torch.tensor([2.0])
    >>> chain_rule(Cube()).second(Cube(), torch.ones(1), None, v, Cube()(v))  # (a'(v) t, a''(v) t^2)
    (tensor([12.]), tensor([12.]))
    >>> del CHAIN_RULES[Cube]
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, Type, TypeVar, Union, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import jvp

from .._registry import lookup, register
from .masks import DROPOUT_TYPES

__all__ = [
    "ChainRule",
    "IdentityRule",
    "FlattenRule",
    "AffineRule",
    "ElementwiseRule",
    "PiecewiseLinearRule",
    "ReLURule",
    "LeakyReLURule",
    "TanhRule",
    "SigmoidRule",
    "CHAIN_RULES",
    "chain_rule",
    "register_chain_rule",
]


class ChainRule:
    """How one module type carries states, probes and tangents through the chain (see the module docstring).

    ``v`` is the module's recorded input and ``out`` its output (``[n, d]``); ``w``,
    ``t`` and ``s`` carry extra leading axes (``[..., n, d]``).
    """

    def supports(self, mod: nn.Module) -> bool:
        """Whether this module's configuration is covered."""
        return True

    def push(self, mod: nn.Module, v: Tensor) -> Tensor:
        raise NotImplementedError

    def pull_back(self, mod: nn.Module, w: Tensor, v: Tensor, out: Tensor) -> Tensor:
        raise NotImplementedError

    def tangent(self, mod: nn.Module, t: Tensor, v: Tensor, out: Tensor) -> Tensor:
        raise NotImplementedError

    def second(self, mod: nn.Module, t: Tensor, s: Optional[Tensor], v: Tensor, out: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        raise NotImplementedError

    def kink_slope(self, mod: nn.Module) -> Optional[float]:
        """``alpha`` if the module is ``a(v) = v`` for ``v > 0`` and ``alpha v`` otherwise (one kink, at 0:
        ReLU, LeakyReLU), else ``None``. The exact divergence form's low-rank path needs it
        (:meth:`~dropgeom.dropout.chain.Chain.relu_shift`)."""
        return None


class IdentityRule(ChainRule):
    """The identity on the chain's states: dropout modules (mask 1), ``nn.Identity``."""

    def push(self, mod: nn.Module, v: Tensor) -> Tensor:
        return v

    def pull_back(self, mod: nn.Module, w: Tensor, v: Tensor, out: Tensor) -> Tensor:
        return w

    def tangent(self, mod: nn.Module, t: Tensor, v: Tensor, out: Tensor) -> Tensor:
        return t

    def second(self, mod: nn.Module, t: Tensor, s: Optional[Tensor], v: Tensor, out: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        return t, s


class FlattenRule(IdentityRule):
    """``nn.Flatten`` of the feature dims, the identity on ``[n, d]`` states."""

    def supports(self, mod: nn.Module) -> bool:
        return getattr(mod, "start_dim", None) in (1, -1) and getattr(mod, "end_dim", None) == -1


class AffineRule(ChainRule):
    """``o = v W^T + b`` (``nn.Linear``); :meth:`weight` and :meth:`bias` name the parameters."""

    def weight(self, mod: nn.Module) -> Tensor:
        weight = mod.weight
        assert isinstance(weight, Tensor)
        return weight

    def bias(self, mod: nn.Module) -> Optional[Tensor]:
        return getattr(mod, "bias", None)

    def push(self, mod: nn.Module, v: Tensor) -> Tensor:
        return F.linear(v, self.weight(mod), self.bias(mod))

    def pull_back(self, mod: nn.Module, w: Tensor, v: Tensor, out: Tensor) -> Tensor:
        return w @ self.weight(mod)

    def tangent(self, mod: nn.Module, t: Tensor, v: Tensor, out: Tensor) -> Tensor:
        return t @ self.weight(mod).t()

    def second(self, mod: nn.Module, t: Tensor, s: Optional[Tensor], v: Tensor, out: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        W = self.weight(mod)
        return t @ W.t(), (None if s is None else s @ W.t())


def _ones(v: Tensor) -> Tensor:
    return torch.ones_like(v)


class ElementwiseRule(ChainRule):
    """``o = a(v)`` elementwise; ``a'`` and ``a''`` by ``torch.func.jvp`` of the module unless overridden."""

    #: ``a'' = 0`` almost everywhere (theory.md 4.2, caveat on ReLU): the second-order term is skipped
    piecewise_linear: bool = False

    def d1(self, mod: nn.Module, v: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """``a'(v)`` (differentiable in ``v``); ``out = a(v)`` when known."""
        return jvp(mod, (v,), (_ones(v),))[1]

    def d2(self, mod: nn.Module, v: Tensor) -> Tensor:
        """``a''(v)``."""
        if self.piecewise_linear:
            return torch.zeros_like(v)
        return jvp(lambda u: jvp(mod, (u,), (_ones(u),))[1], (v,), (_ones(v),))[1]

    def push(self, mod: nn.Module, v: Tensor) -> Tensor:
        return mod(v)

    def pull_back(self, mod: nn.Module, w: Tensor, v: Tensor, out: Tensor) -> Tensor:
        return w * self.d1(mod, v, out)

    def tangent(self, mod: nn.Module, t: Tensor, v: Tensor, out: Tensor) -> Tensor:
        return t * self.d1(mod, v, out)

    def second(self, mod: nn.Module, t: Tensor, s: Optional[Tensor], v: Tensor, out: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        d1 = self.d1(mod, v, out)
        if not self.piecewise_linear:
            q = self.d2(mod, v) * t * t
            s = q if s is None else q + d1 * s
        elif s is not None:
            s = d1 * s
        return d1 * t, s


class PiecewiseLinearRule(ElementwiseRule):
    """ReLU6, Hardtanh (and ReLU, LeakyReLU below): ``a''`` is zero almost everywhere."""

    piecewise_linear = True


class ReLURule(PiecewiseLinearRule):
    """``a'(v) = 1[v > 0]``; one kink at 0 with slope 0 below it."""

    def d1(self, mod: nn.Module, v: Tensor, out: Optional[Tensor] = None) -> Tensor:
        return (v > 0).to(v.dtype)

    def kink_slope(self, mod: nn.Module) -> Optional[float]:
        return 0.0


class LeakyReLURule(PiecewiseLinearRule):
    """``a'(v) = 1`` for ``v > 0``, else ``negative_slope``; one kink at 0."""

    def d1(self, mod: nn.Module, v: Tensor, out: Optional[Tensor] = None) -> Tensor:
        return torch.where(v > 0, v.new_ones(()), v.new_full((), self.kink_slope(mod)))  # in v's dtype

    def kink_slope(self, mod: nn.Module) -> float:
        return float(cast(nn.LeakyReLU, mod).negative_slope)


class TanhRule(ElementwiseRule):
    """``a' = 1 - y^2``, ``a'' = -2 y (1 - y^2)`` with ``y = tanh(v)``."""

    def d1(self, mod: nn.Module, v: Tensor, out: Optional[Tensor] = None) -> Tensor:
        y = torch.tanh(v) if out is None else out
        return 1.0 - y * y

    def d2(self, mod: nn.Module, v: Tensor) -> Tensor:
        y = torch.tanh(v)
        return -2.0 * y * (1.0 - y * y)


class SigmoidRule(ElementwiseRule):
    """``a' = y (1 - y)`` with ``y = sigmoid(v)``."""

    def d1(self, mod: nn.Module, v: Tensor, out: Optional[Tensor] = None) -> Tensor:
        y = torch.sigmoid(v) if out is None else out
        return y * (1.0 - y)


#: module type -> its rule (looked up along the class hierarchy by :func:`chain_rule`)
CHAIN_RULES: Dict[type, ChainRule] = {}

T_rule = TypeVar("T_rule", bound=Union[ChainRule, Type[ChainRule]])


def register_chain_rule(*module_types: type) -> Callable[[T_rule], T_rule]:
    """Decorator: register a :class:`ChainRule` subclass (instantiated without arguments) or instance for ``module_types``.

    Subclasses that keep a registered type's ``forward`` inherit its rule.

    Raises:
        TypeError: a type is not an ``nn.Module`` subclass, or the decorated object is not a chain rule.

    Example:
        >>> from torch import nn
        >>> class Swish(nn.Module):
        ...     def forward(self, v):
        ...         return v * v.sigmoid()
        >>> chain_rule(Swish()) is None
        True
        >>> _ = register_chain_rule(Swish)(ElementwiseRule)  # a' and a'' by torch.func.jvp
        >>> type(chain_rule(Swish())).__name__
        'ElementwiseRule'
        >>> del CHAIN_RULES[Swish]
    """
    bad = [t for t in module_types if not (isinstance(t, type) and issubclass(t, nn.Module))]
    if bad or not module_types:
        raise TypeError(f"a chain rule is registered for nn.Module subclasses, got {bad or 'none'}")

    def decorate(rule: T_rule) -> T_rule:
        instance = rule() if isinstance(rule, type) and issubclass(rule, ChainRule) else rule
        for module_type in module_types:
            register(CHAIN_RULES, module_type, instance, ChainRule)
        return rule

    return decorate


def chain_rule(mod: nn.Module) -> Optional[ChainRule]:
    """The rule covering ``mod`` (its type's, or an ancestor's with the same ``forward``), or ``None``.

    Raises:
        TypeError: ``mod`` is not an ``nn.Module`` instance (e.g. the class ``nn.Tanh`` itself, which found no rule).

    Example:
        >>> from torch import nn
        >>> type(chain_rule(nn.Tanh())).__name__, chain_rule(nn.LayerNorm(3))
        ('TanhRule', None)
        >>> chain_rule(nn.Flatten(0)) is None  # flattens the batch axis: not covered
        True
    """
    if not isinstance(mod, nn.Module):
        what = f"the class {mod.__name__}; pass an instance" if isinstance(mod, type) else type(mod).__name__
        raise TypeError(f"chain_rule() needs an nn.Module instance, got {what}")
    rule = lookup(CHAIN_RULES, mod)
    return rule if rule is not None and rule.supports(mod) else None


register_chain_rule(*DROPOUT_TYPES, nn.Identity)(IdentityRule)
register_chain_rule(nn.Flatten)(FlattenRule)
register_chain_rule(nn.Linear)(AffineRule)
register_chain_rule(nn.ReLU)(ReLURule)
register_chain_rule(nn.Tanh)(TanhRule)
register_chain_rule(nn.Sigmoid)(SigmoidRule)
register_chain_rule(nn.LeakyReLU)(LeakyReLURule)
register_chain_rule(nn.Hardtanh, nn.ReLU6)(PiecewiseLinearRule)
register_chain_rule(nn.Softplus, nn.GELU, nn.SiLU, nn.ELU, nn.CELU, nn.SELU, nn.Mish, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid)(
    ElementwiseRule
)
