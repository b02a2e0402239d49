r"""Evaluation metrics for trained models: NLL, accuracy and expected calibration error.

* NLL: ``(1/n) sum_i -log p(y_i | eta_i)`` with the family's own likelihood
  (theory.md section 1; mean over inputs).
* accuracy: share of argmax predictions equal to the label (classification;
  the ``bernoulli`` family thresholds ``sigmoid(eta)`` at 1/2).
* expected calibration error (Guo et al. 2017, "On calibration of modern
  neural networks"): with the confidence ``c_i = max_k p_ik`` binned into
  ``B`` equal-width bins ``b`` on ``[0, 1]``,
  ``ECE = sum_b (|b| / n) |acc(b) - conf(b)|``.

Example:
    >>> import torch
    >>> eta = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    >>> y = torch.tensor([0, 0])
    >>> m = classification_metrics(eta, y, "categorical")
    >>> round(m["accuracy"], 3), round(m["ece"], 3)
    (0.5, 0.381)
"""

from __future__ import annotations

from typing import Dict, Optional, Union

import torch
from torch import Tensor, nn

from .._utils import training_off
from ..families import ExponentialFamily, get_family

__all__ = ["expected_calibration_error", "classification_metrics", "evaluate"]


def expected_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """Expected calibration error of class probabilities ``probs`` ``[n, C]`` for labels ``[n]``.

    ``ECE = sum_b (|b|/n) |acc(b) - conf(b)|`` over ``n_bins`` equal-width
    confidence bins (Guo et al. 2017); a confidence on a bin edge goes to the
    lower bin, as in ``(lo, hi]``.

    Raises:
        ValueError: ``probs`` is not ``[n, C]`` or ``labels`` not ``[n]``; ``n_bins`` is not a
            positive int; ``n = 0``.

    Example:
        >>> expected_calibration_error(torch.tensor([[0.9, 0.1], [0.9, 0.1]]), torch.tensor([0, 1]))
        0.4
    """
    if probs.dim() != 2 or labels.shape != (probs.shape[0],):
        raise ValueError(f"probs must be [n, C] and labels [n]; got {tuple(probs.shape)} and {tuple(labels.shape)}")
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    n = probs.shape[0]
    if n == 0:
        raise ValueError("cannot compute a calibration error on 0 samples")
    probs = probs.detach().double()
    conf, pred = probs.max(dim=1)
    correct = (pred == labels.long()).double()
    # bin index: ceil(conf * B) - 1, clamped, so that a bin is (lo, hi]
    idx = (torch.ceil(conf * n_bins) - 1).clamp(0, n_bins - 1).long()
    acc = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, correct)
    cs = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, conf)
    return float((acc - cs).abs().sum() / n)


def classification_metrics(
    eta: Tensor, y: Tensor, family: Union[str, ExponentialFamily] = "categorical", n_bins: int = 15
) -> Dict[str, float]:
    """``nll`` (mean), and for classification families ``accuracy`` and ``ece``, from outputs ``eta`` ``[n, K]``.

    ``nll = (1/n) sum_i -log p(y_i | eta_i)`` (theory.md section 1); ``ece`` as in
    :func:`expected_calibration_error`.

    Raises:
        ValueError: an unknown ``family``; ``eta`` not ``[n, K]`` (or not valid for the family);
            targets of the wrong shape, dtype or range for the family; ``n_bins`` not a positive int
            or ``n = 0`` (classification families).
        TypeError: ``y`` is not a tensor.

    Example:
        >>> m = classification_metrics(torch.tensor([[0.0, 0.0]]), torch.tensor([0]))
        >>> round(m["nll"], 4), m["accuracy"], m["ece"]
        (0.6931, 1.0, 0.5)
    """
    fam = get_family(family)
    fam.check_eta(eta)
    eta = eta.detach()
    nll = fam.nll(eta, y).mean()
    out = {"nll": float(nll)}
    classes = fam.class_probs(eta, y)  # None unless the labels are classes
    if classes is not None:
        probs, labels = classes
        out["accuracy"] = float((probs.argmax(-1) == labels).double().mean())
        out["ece"] = expected_calibration_error(probs, labels, n_bins)
    return out


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    family: Union[str, ExponentialFamily] = "categorical",
    batch_size: Optional[int] = 4096,
    n_bins: int = 15,
) -> Dict[str, float]:
    """Metrics of ``model`` in eval mode (dropout off: weight scaling) on ``(x, y)``.

    Returns ``nll`` and, for classification, ``accuracy`` and ``ece`` (see
    :func:`classification_metrics`); only ``{"nll": nan}`` when an output is not finite.
    The model's training flags are restored afterwards.

    Raises:
        ValueError: ``x`` and ``y`` differ in number of samples; ``batch_size`` is not ``None`` or
            a positive int; and what :func:`classification_metrics` raises (an unknown ``family``,
            outputs or targets of the wrong shape).
        TypeError: ``x`` or ``y`` is not a tensor.

    Example:
        >>> net = torch.nn.Linear(3, 2)
        >>> sorted(evaluate(net, torch.randn(10, 3), torch.randint(0, 2, (10,))))
        ['accuracy', 'ece', 'nll']
    """
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"x and y must be tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{x.shape[0]} inputs but {y.shape[0]} labels")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be None or a positive int, got {batch_size!r}")
    with training_off(model):
        if batch_size is None or x.shape[0] <= batch_size:
            eta = model(x)
        else:
            eta = torch.cat([model(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])
    if not torch.isfinite(eta).all():
        return {"nll": float("nan")}
    return classification_metrics(eta, y, family, n_bins)
