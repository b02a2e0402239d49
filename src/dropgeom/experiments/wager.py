r"""C3 in Wager et al.'s regime: GLMs with input dropout, where theory is exact to second order.

A logistic (2 classes) or softmax regression ``eta = W x + b`` with Bernoulli
dropout on its inputs (theory.md 4.1). The dropout regularizer does not depend
on the labels and, to second order in the mask noise,

.. math::  R_q(\theta) = \tfrac12 \tfrac{p}{1-p} \sum_j \tfrac1n \sum_i x_{ij}^2\, W_{:,j}^\top \Sigma_i W_{:,j}
           = \tfrac12 V\, \theta^\top \mathrm{diag}(F)\, \theta

(``Sigma_i`` the covariance of the one-hot label at ``eta_i``; for K outputs
the diagonal Fisher is block-diagonal over the K weights leaving feature j).
"Exact to second order" is in the change of ``eta`` that one dropped input
causes (``x_ij W_:j``), not in ``p``: a dropped input is a jump at any rate
(theory.md 4.2), so the ratio to the measured gap tends to 1 when each input
moves ``eta`` little (small weights, many features), and the curve over ``p``
shows how far from that limit a fitted model is.
:func:`wager_quadratic` computes it in closed form, :func:`wager_gap` the
measured gap (exact enumeration of the ``2^d`` input masks up to ``max_masks``,
Monte Carlo beyond), and :func:`wager_curve` both over a grid of ``p``.

Example:
    >>> import torch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> glm = glm_with_input_dropout(4, 3)
    >>> x = torch.randn(30, 4, dtype=torch.float64)
    >>> rows = wager_curve(glm, x, torch.randint(0, 3, (30,)), [0.05, 0.3])
    >>> abs(rows[0]["ratio"] - 1) < 0.01      # small weights: each input moves eta little, second order is exact
    True
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .._utils import check_p

__all__ = ["glm_with_input_dropout", "wager_quadratic", "wager_gap", "wager_curve"]


def glm_with_input_dropout(num_features: int, num_classes: int, p: float = 0.0, seed: int = 0) -> nn.Sequential:
    """``Dropout(p) -> Linear(num_features, num_classes)`` in float64 (zero initialisation plus a seeded jitter).

    Raises:
        ValueError: ``num_features < 1`` or ``num_classes < 2``.

    Example:
        >>> [type(m).__name__ for m in glm_with_input_dropout(3, 2)]
        ['Dropout', 'Linear']
    """
    if num_features < 1 or num_classes < 2:
        raise ValueError(f"a GLM needs num_features >= 1 and num_classes >= 2, got {num_features}, {num_classes}")
    g = torch.Generator().manual_seed(int(seed))
    net = nn.Sequential(nn.Dropout(p), nn.Linear(num_features, num_classes)).to(torch.float64)
    with torch.no_grad():
        net[1].weight.copy_(0.01 * torch.randn(net[1].weight.shape, generator=g, dtype=torch.float64))
        net[1].bias.zero_()
    return net


def _check(model: nn.Module) -> nn.Linear:
    mods = list(model.children()) if isinstance(model, nn.Sequential) else []
    if len(mods) != 2 or not isinstance(mods[0], nn.Dropout) or not isinstance(mods[1], nn.Linear):
        raise ValueError("the Wager regime needs nn.Sequential(nn.Dropout, nn.Linear) (a GLM with input dropout)")
    return mods[1]


def wager_quadratic(model: nn.Sequential, x: Tensor, p: float) -> float:
    r"""``1/2 p/(1-p) theta^T diag(F) theta`` of a softmax GLM with input dropout, in closed form (theory.md 4.1).

    Raises:
        ValueError: ``model`` is not ``Sequential(Dropout, Linear)`` or ``p`` is not in (0, 1).

    Example:
        >>> import torch
        >>> glm = glm_with_input_dropout(2, 2)
        >>> wager_quadratic(glm, torch.zeros(3, 2, dtype=torch.float64), 0.5)   # x = 0: no input to drop
        0.0
    """
    lin = _check(model)
    p = check_p(p, "the input dropout", zero=False)
    with torch.no_grad():
        eta = lin(x)
        pi = torch.softmax(eta, -1)  # [n, K]
        W = lin.weight  # [K, d]
        # W_{:,j}^T Sigma_i W_{:,j} = sum_k pi_ik W_kj^2 - (sum_k pi_ik W_kj)^2
        quad = pi @ (W**2) - (pi @ W) ** 2  # [n, d]
        val = 0.5 * p / (1 - p) * float(((x**2) * quad).sum(1).mean())
    return val


def wager_gap(
    model: nn.Sequential,
    x: Tensor,
    y: Tensor,
    p: float,
    max_masks: int = 2**12,
    n_samples: int = 4000,
    generator: Optional[torch.Generator] = None,
) -> Dict[str, Any]:
    """The measured gap ``R = L_drop - L_clean`` at input-dropout rate ``p``: exact for ``2^d <= max_masks``, else MC.

    Returns ``{"value", "stderr", "method"}``.

    Raises:
        ValueError: ``model`` is not ``Sequential(Dropout, Linear)``.

    Example:
        >>> import torch
        >>> glm = glm_with_input_dropout(3, 2)
        >>> wager_gap(glm, torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1]), 0.2)["method"]
        'exact'
    """
    from ..dropout import gap

    _check(model)
    d = int(x.shape[1])
    if 2**d <= max_masks:
        g = gap(model, x, y, p=p, method="exact", max_masks=max_masks)
    else:
        g = gap(model, x, y, p=p, method="mc", n_samples=n_samples, generator=generator)
    return {"value": float(g.value), "stderr": float(g.stderr), "method": g.method}


def wager_curve(
    model: nn.Sequential, x: Tensor, y: Tensor, p_grid: Sequence[float], generator: Optional[torch.Generator] = None
) -> List[Dict[str, Any]]:
    """For each ``p``: the measured gap, its standard error, ``1/2 V theta^T diag(F) theta`` and their ratio.

    Raises:
        ValueError: from :func:`wager_quadratic` / :func:`wager_gap`.

    Example: see the module docstring.
    """
    rows = []
    for p in p_grid:
        g = wager_gap(model, x, y, float(p), generator=generator)
        q = wager_quadratic(model, x, float(p))
        rows.append(
            {
                "p": float(p),
                "gap": g["value"],
                "stderr": g["stderr"],
                "quadratic": q,
                "ratio": q / g["value"] if g["value"] else float("nan"),
                "method": g["method"],
            }
        )
    return rows
