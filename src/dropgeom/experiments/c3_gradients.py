r"""C3a at the level the claim is made: the gradient of dropout's regularizer against the Fisher forms.

Training follows the gradient, so a regularizer "corresponds" to dropout when
its gradient points the same way and has the same size. At parameters
``theta`` (initialisation, mid-training, the solution) and the training rate
``p``, over inputs ``x`` with labels ``y`` (theory.md 4, 4.2, 4.4):

* ``R(theta) = L_drop(theta) - L_clean(theta)``, the Bernoulli dropout
  regularizer; its gradient ``grad R`` by Monte Carlo over per-input masks
  (:func:`mc_regularizer_gradient`: ``G`` groups of draws, the standard error
  of every coordinate from the spread of the group means) or exactly by
  enumerating all ``2^U`` joint masks of a small layer
  (:func:`exact_regularizer_gradient`);
* ``Q(theta) = 1/2 V sum_j F^mask_jj`` with ``V = p/(1-p)`` (the Fisher
  quadratic form, Wei, Kakade & Ma's explicit regularizer) and
  ``D(theta) = p sum_j K_j`` (the divergence form), both from
  :func:`dropgeom.dropout.penalty` and differentiated by autograd.

:func:`compare_gradients` returns the cosine and the norm ratio of ``grad Q``
and of ``grad D`` against ``grad R``, the value ratios ``Q/R`` and ``D/R``, the
Monte Carlo relative standard error ``|se(grad R)| / |grad R|`` and jackknife
standard errors of the cosines (leave one group out).

Example:
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Dropout(0.2), nn.Linear(4, 3)).double()
    >>> x, y = torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 3, (20,))
    >>> value, grad = exact_regularizer_gradient(net, x, y, p=0.2)
    >>> c = compare_gradients(net, x, y, p=0.2, method="exact")
    >>> abs(c["value_R"] - value) < 1e-12, -1.0 <= c["cos_quadratic"] <= 1.0
    (True, True)
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .._utils import check_p
from ..families import ExponentialFamily

__all__ = ["exact_regularizer_gradient", "mc_regularizer_gradient", "form_gradient", "compare_gradients"]

Family = Union[str, ExponentialFamily]


def _params(model: nn.Module) -> List[Tensor]:
    return [q for q in model.parameters() if q.requires_grad]


def _flat(grads: Tuple[Optional[Tensor], ...], params: List[Tensor]) -> Tensor:
    return torch.cat([(g if g is not None else torch.zeros_like(q)).reshape(-1) for g, q in zip(grads, params)])


def _clean_loss(model: nn.Module, x: Tensor, y: Tensor, fam: ExponentialFamily) -> Tensor:
    from ..dropout import forward_with_masks

    return fam.nll(forward_with_masks(model, x, {}), y).mean()


def exact_regularizer_gradient(
    model: nn.Module, x: Tensor, y: Tensor, family: Family = "categorical", p: float = 0.5, max_masks: int = 2**12
) -> Tuple[float, Tensor]:
    r"""``(R, grad R)`` exactly: ``R = sum_m P(m) L(theta; m) - L_clean(theta)`` over all ``2^U`` joint masks.

    The mean over inputs of ``E_m l_i(m)`` is the same whether masks are drawn per input or
    shared, so enumerating shared masks gives the exact expectation (theory.md 4).

    Raises:
        ValueError: ``p`` outside (0, 1), or more than ``max_masks`` masks (use :func:`mc_regularizer_gradient`).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Dropout(0.3), torch.nn.Linear(2, 2)).double()
        >>> x, y = torch.randn(5, 2, dtype=torch.float64), torch.randint(0, 2, (5,))
        >>> r, g = exact_regularizer_gradient(net, x, y, p=0.3)
        >>> r > 0, g.shape
        (True, torch.Size([6]))
    """
    from ..dropout import enumerate_masks, forward_with_masks
    from ..families import get_family

    p = check_p(p, "the regularizer", zero=False)
    fam = get_family(family)
    enum = enumerate_masks(model, x, p, max_masks=max_masks)
    params = _params(model)
    with torch.enable_grad():
        total = -_clean_loss(model, x, y, fam)
        for i in range(enum.probs.shape[0]):
            masks = {k: v[i : i + 1] for k, v in enum.masks.items()}
            total = total + enum.probs[i] * fam.nll(forward_with_masks(model, x, masks), y).mean()
        grads = torch.autograd.grad(total, params, allow_unused=True)
    return float(total.detach()), _flat(grads, params).detach()


def mc_regularizer_gradient(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    family: Family = "categorical",
    p: float = 0.5,
    n_samples: int = 256,
    groups: int = 16,
    generator: Optional[torch.Generator] = None,
) -> Dict[str, Any]:
    r"""Monte Carlo ``grad R``: ``n_samples`` independent mask draws per input, in ``groups`` groups.

    Group ``g`` gives the unbiased estimate ``grad [ mean_{draws in g} mean_i l_i(m) - L_clean ]``;
    the estimate is the mean of the group estimates and its per-coordinate standard error
    ``sd_g / sqrt(G)``. Returns ``{"value", "value_se", "grad", "grad_se", "group_grads"}``.

    Raises:
        ValueError: ``p`` outside (0, 1), ``groups < 2`` or ``n_samples < groups``.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Dropout(0.3), torch.nn.Linear(2, 2)).double()
        >>> x, y = torch.randn(5, 2, dtype=torch.float64), torch.randint(0, 2, (5,))
        >>> out = mc_regularizer_gradient(net, x, y, p=0.3, n_samples=64, groups=8, generator=torch.Generator().manual_seed(0))
        >>> out["group_grads"].shape, bool((out["grad_se"] >= 0).all())
        (torch.Size([8, 6]), True)
    """
    from ..dropout import forward_with_masks, sample_masks
    from ..families import get_family

    p = check_p(p, "the regularizer", zero=False)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 2:
        raise ValueError(f"groups must be an int >= 2 (the standard error needs two), got {groups!r}")
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < groups:
        raise ValueError(f"n_samples must be an int >= groups={groups}, got {n_samples!r}")
    fam = get_family(family)
    params = _params(model)
    per = [n_samples // groups + (1 if g < n_samples % groups else 0) for g in range(groups)]
    values, grads = [], []
    with torch.enable_grad():
        for d in per:
            xr = x.repeat(d, *([1] * (x.dim() - 1)))
            yr = y.repeat(d, *([1] * (y.dim() - 1)))
            masks = sample_masks(model, xr, noise="bernoulli", p=p, generator=generator)
            val = fam.nll(forward_with_masks(model, xr, masks), yr).mean() - _clean_loss(model, x, y, fam)
            grads.append(_flat(torch.autograd.grad(val, params, allow_unused=True), params).detach())
            values.append(float(val.detach()))
    gg = torch.stack(grads)
    w = torch.tensor(per, dtype=gg.dtype) / float(n_samples)
    mean = (w[:, None] * gg).sum(0)
    vals = torch.tensor(values, dtype=gg.dtype)
    se = gg.std(0, unbiased=True) / math.sqrt(groups)
    return {
        "value": float((w * vals).sum()),
        "value_se": float(vals.std(unbiased=True) / math.sqrt(groups)),
        "grad": mean,
        "grad_se": se,
        "group_grads": gg,
    }


def form_gradient(
    model: nn.Module, x: Tensor, family: Family = "categorical", p: float = 0.5, form: str = "quadratic", estimator: str = "exact"
) -> Tuple[float, Tensor]:
    r"""``(value, gradient)`` of the Fisher quadratic form ``1/2 V sum_j F^mask_jj`` (``form="quadratic"``)
    or the divergence form ``p sum_j K_j`` (``form="divergence"``), from :func:`dropgeom.dropout.penalty`.

    Raises:
        ValueError: ``p`` outside (0, 1) or an unknown ``form`` (from :func:`~dropgeom.dropout.penalty`).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(3, 2)).double()
        >>> v, g = form_gradient(net, torch.randn(4, 3, dtype=torch.float64), p=0.2)
        >>> v > 0, g.shape
        (True, torch.Size([8]))
    """
    from ..dropout import penalty

    p = check_p(p, "the regularizer", zero=False)
    params = _params(model)
    with torch.enable_grad():
        val = penalty(model, x, family=family, p=p, form=form, method=estimator).value
        grads = torch.autograd.grad(val, params, allow_unused=True)
    return float(val.detach()), _flat(grads, params).detach()


def _cos(a: Tensor, b: Tensor) -> float:
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else float("nan")


def compare_gradients(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    family: Family = "categorical",
    p: float = 0.5,
    method: str = "mc",
    n_samples: int = 256,
    groups: int = 16,
    generator: Optional[torch.Generator] = None,
    estimator: str = "exact",
    divergence_estimator: Optional[str] = None,
) -> Dict[str, float]:
    r"""Cosines, norm ratios and value ratios of the Fisher forms against dropout's regularizer.

    Keys: ``value_R`` (and ``value_R_se``), ``value_quadratic``, ``value_divergence``,
    ``ratio_quadratic = Q/R``, ``ratio_divergence = D/R``, ``cos_quadratic``,
    ``cos_divergence`` (cosine of the gradient with ``grad R``), ``norm_quadratic =
    |grad Q|/|grad R|``, ``norm_divergence``, ``grad_rel_se = |se(grad R)|/|grad R|`` and
    ``cos_quadratic_se``, ``cos_divergence_se`` (jackknife over the Monte Carlo groups; 0 for
    ``method="exact"``). ``estimator`` is the forms' :func:`~dropgeom.dropout.penalty` estimator,
    ``divergence_estimator`` the divergence form's when it differs (``"unit"`` on a CNN, whose exact
    divergence form costs one forward pass per unit).

    Raises:
        ValueError: unknown ``method`` (``"mc"`` or ``"exact"``) or invalid ``p``.

    Example: see the module docstring.
    """
    if method not in ("mc", "exact"):
        raise ValueError(f"method must be 'mc' or 'exact', got {method!r}")
    out: Dict[str, float] = {}
    if method == "exact":
        out["value_R"], g = exact_regularizer_gradient(model, x, y, family, p)
        out["value_R_se"], rel_se, groups_g = 0.0, 0.0, None
    else:
        mc = mc_regularizer_gradient(model, x, y, family, p, n_samples, groups, generator)
        g, groups_g = mc["grad"], mc["group_grads"]
        out["value_R"], out["value_R_se"] = mc["value"], mc["value_se"]
        rel_se = float(mc["grad_se"].norm() / g.norm()) if float(g.norm()) > 0 else float("nan")
    out["grad_rel_se"] = rel_se
    for form in ("quadratic", "divergence"):
        est = divergence_estimator if form == "divergence" and divergence_estimator else estimator
        val, gf = form_gradient(model, x, family, p, form, est)
        out[f"value_{form}"] = val
        out[f"ratio_{form}"] = val / out["value_R"] if out["value_R"] else float("nan")
        out[f"cos_{form}"] = _cos(gf, g)
        out[f"norm_{form}"] = float(gf.norm() / g.norm()) if float(g.norm()) > 0 else float("nan")
        if groups_g is None:
            out[f"cos_{form}_se"] = 0.0
        else:
            G = groups_g.shape[0]
            jack = [_cos(gf, (groups_g.sum(0) - groups_g[k]) / (G - 1)) for k in range(G)]
            m = sum(jack) / G
            out[f"cos_{form}_se"] = math.sqrt((G - 1) / G * sum((j - m) ** 2 for j in jack))
    return out
