"""Rule tables keyed by module type, looked up along the class hierarchy.

The fast paths keep one table each (BackPACK's ``module_exts`` pattern): the
Fisher layer rules (:mod:`dropgeom.layer_rules`) and the dropout chain rules
(:mod:`dropgeom.dropout.chain_rules`). A module finds the rule of the first
class in its method resolution order that has one, provided it runs that
class's own ``forward``: a subclass that overrides ``forward`` computes
something else, so it has no rule until one is registered for it.

Example:
    >>> from torch import nn
    >>> table = {}
    >>> register(table, nn.Linear, "the Linear rule", object)
    'the Linear rule'
    >>> class Wide(nn.Linear):
    ...     pass
    >>> lookup(table, Wide(2, 3))
    'the Linear rule'
    >>> class Odd(nn.Linear):
    ...     def forward(self, x):
    ...         return super().forward(x) ** 2
    >>> lookup(table, Odd(2, 3)) is None
    True
"""

from __future__ import annotations

from typing import Dict, Optional, Type, TypeVar

from torch import nn

__all__ = ["register", "lookup"]

R = TypeVar("R")


def register(table: Dict[type, R], module_type: type, rule: R, base: type) -> R:
    """Put ``rule`` (an instance of ``base``) into ``table`` for ``module_type``; returns ``rule``.

    Raises:
        TypeError: ``module_type`` is not an ``nn.Module`` subclass, or ``rule`` is not a ``base``.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"a rule is registered for an nn.Module subclass, got {module_type!r}")
    if not isinstance(rule, base):
        raise TypeError(f"the rule for {module_type.__name__} must be a {base.__name__}, got {type(rule).__name__}")
    table[module_type] = rule
    return rule


def lookup(table: Dict[type, R], module: nn.Module) -> Optional[R]:
    """The rule of the first class in ``type(module).__mro__`` with one, if ``module`` runs that class's ``forward``."""
    cls: Type[nn.Module] = type(module)
    for owner in cls.__mro__:
        rule = table.get(owner)
        if rule is not None:
            return rule if getattr(cls, "forward", None) is getattr(owner, "forward", None) else None
    return None
