r"""Small dropout modules that ``torch.nn`` lacks (theory.md section 4).

* :class:`DropPath`: drops a whole sample's input (``m_i = b_i / (1 - p)``,
  ``b_i ~ Bernoulli(1 - p)``, one mask per sample, broadcast over every other axis);
  identity in eval mode. The "row" mode of torchvision's ``stochastic_depth``.
* :class:`StochasticDepth`: a residual block ``x + DropPath(branch(x))`` whose branch
  is dropped per sample (Huang et al. 2016, inverted scaling).

dropgeom treats the inner :class:`DropPath` as a dropout layer with one unit per
sample (unit shape ``()``): its masks have shape ``[n]``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> blk = StochasticDepth(nn.Linear(3, 3), p=0.5)
    >>> x = torch.randn(4, 3)
    >>> torch.equal(blk.eval()(x), x + blk.branch(x))
    True
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

__all__ = ["DropPath", "StochasticDepth"]


def _valid_p(p: float) -> float:
    if not isinstance(p, numbers.Real) or isinstance(p, bool) or not math.isfinite(p) or not 0.0 <= p < 1.0:
        raise ValueError(f"drop probability p must lie in [0, 1), got {p!r}")
    return float(p)


class DropPath(nn.Module):
    """Per-sample dropout of the whole input: ``y_i = x_i * b_i / (1 - p)`` in training, ``x`` in eval mode.

    Args:
        p: drop probability in ``[0, 1)``.

    Raises:
        ValueError: ``p`` outside ``[0, 1)``.

    Example:
        >>> import torch
        >>> d = DropPath(0.5).train()
        >>> y = d(torch.ones(1000, 2))
        >>> sorted(set(y[:, 0].tolist())), bool(torch.equal(y[:, 0], y[:, 1]))
        ([0.0, 2.0], True)
    """

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        self.p = _valid_p(p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.full((x.shape[0],) + (1,) * (x.dim() - 1), 1.0 - self.p, dtype=x.dtype, device=x.device)
        return x * torch.bernoulli(keep) / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class StochasticDepth(nn.Module):
    """A residual block with a per-sample dropped branch: ``y = x + DropPath(p)(branch(x))``.

    Args:
        branch: the residual branch (output shaped like its input).
        p: the probability that a sample's branch is dropped.

    Raises:
        ValueError: ``p`` outside ``[0, 1)``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from dropgeom.dropout import find_dropout
        >>> net = nn.Sequential(StochasticDepth(nn.Linear(2, 2), 0.2), nn.Linear(2, 3))
        >>> list(find_dropout(net, all_kinds=True))
        ['0.drop']
    """

    def __init__(self, branch: nn.Module, p: float = 0.1) -> None:
        super().__init__()
        self.branch = branch
        self.drop = DropPath(p)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop(self.branch(x))
