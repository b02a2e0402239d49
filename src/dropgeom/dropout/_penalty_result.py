r"""The result of :func:`~dropgeom.dropout.penalty`: the penalty and the clean output (theory.md section 4.4).

.. math::  \mathrm{value} = \tfrac12 \sum_l V_l \sum_j F^{mask}_{jj} \ \text{or}\ \sum_l p_l \sum_j K_j,
           \qquad \mathrm{eta} = f(x; \theta) \ \text{(eval mode)}

Example:
    >>> import torch
    >>> r = PenaltyResult(torch.tensor(0.5), torch.zeros(2, 3))
    >>> r.value + 1.0
    tensor(1.5000)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from torch import Tensor

from ._legacy import warn_deprecated

__all__ = ["PenaltyResult"]


class _TensorLike:
    """Deprecated: old callers used ``penalty()``'s result as the penalty tensor itself.

    Attribute access (``.backward()``, ``.item()``), arithmetic, ``float()`` and
    ``torch`` functions reach ``.value`` with a ``DeprecationWarning``.
    """

    value: Tensor

    def _tensor(self) -> Tensor:
        warn_deprecated("using penalty()'s result as a tensor; use its .value (and .eta for the clean output)")
        return self.value

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in ("value", "eta") or not hasattr(Tensor, name):
            raise AttributeError(name)  # only tensor API: copy, pickle and hasattr probes see a plain dataclass
        return getattr(self._tensor(), name)

    def __float__(self) -> float:
        return float(self._tensor())

    def __add__(self, other: Any) -> Tensor:
        return self._tensor() + _plain(other)

    def __radd__(self, other: Any) -> Tensor:
        return _plain(other) + self._tensor()

    def __sub__(self, other: Any) -> Tensor:
        return self._tensor() - _plain(other)

    def __rsub__(self, other: Any) -> Tensor:
        return _plain(other) - self._tensor()

    def __mul__(self, other: Any) -> Tensor:
        return self._tensor() * _plain(other)

    def __rmul__(self, other: Any) -> Tensor:
        return _plain(other) * self._tensor()

    def __truediv__(self, other: Any) -> Tensor:
        return self._tensor() / _plain(other)

    def __neg__(self) -> Tensor:
        return -self._tensor()

    @classmethod
    def __torch_function__(
        cls,
        func: Callable[..., Any],
        types: Tuple[type, ...],
        args: Tuple[Any, ...] = (),
        kwargs: Optional[Dict[str, Any]] = None,
    ) -> Any:
        return func(*(_plain(a) for a in args), **{k: _plain(v) for k, v in (kwargs or {}).items()})


def _plain(x: Any) -> Any:
    return x._tensor() if isinstance(x, _TensorLike) else x


@dataclass(frozen=True)
class PenaltyResult(_TensorLike):
    """The Fisher-dropout penalty and the clean output of the same forward pass.

    Attributes:
        value: the penalty, a scalar tensor differentiable with respect to the model's parameters.
        eta: the clean (eval-mode) output ``[n, K]``, differentiable: the clean loss can reuse it
            (``loss = family.nll(r.eta, y).mean() + r.value``) instead of a second forward pass.
            ``None`` when the penalty was taken over an iterable of batches (the value is then a detached
            mean over the whole data set, and the batches' outputs are not kept).
    """

    value: Tensor
    eta: Optional[Tensor]
