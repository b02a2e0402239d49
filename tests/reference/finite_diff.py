"""Central finite differences: an autograd-free reference for directional derivatives."""

from typing import Callable, Sequence

import torch


def directional_fd(
    value: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], direction: Sequence[torch.Tensor], h: float = 1e-5
) -> float:
    """``(f(theta + h d) - f(theta - h d)) / (2 h)`` with the parameters moved in place and restored."""
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(h * d)
        plus = value().item()
        for p, d in zip(params, direction):
            p.sub_(2 * h * d)
        minus = value().item()
        for p, d in zip(params, direction):
            p.add_(h * d)
    return (plus - minus) / (2 * h)
