r"""Exponential-family output distributions (theory.md section 1).

A network maps an input ``x_i`` to ``eta_i`` in ``R^K``, the *natural parameter*
of an exponential family for the label

.. math::  p(y \mid \eta) = h(y) \exp(\langle \eta, t(y) \rangle - A(\eta)).

Every family here is batched over a leading sample axis (``eta`` has shape
``[n, K]``), works in float32 and float64 and is numerically stable at extreme
natural parameters. Each provides

* ``log_partition(eta)``        ``A(eta)``                      shape ``[n]``
* ``mean(eta)``                 ``mu = A'(eta) = E t(y)``       shape ``[n, K]``
* ``cov_mv(eta, v)``            ``Sigma v = A''(eta) v``        shape ``[n, K]``
* ``cov_sqrt(eta)``             ``S`` with ``S S^T = Sigma``     shape ``[n, K, R]``
* ``third_cumulant(eta, u, v)`` ``A'''(eta)[u, v, .]``          shape ``[n, K]``
* ``sufficient_statistic(y)``   ``t(y)``                        shape ``[n, K]``
* ``sample(eta, generator)``    labels ``y`` in the target format
* ``nll(eta, y)``               ``-log p(y | eta)``             shape ``[n]``
* ``kl(eta, eta2)``             ``KL(p_eta || p_eta2) = A(eta2) - A(eta) - <mu, eta2 - eta>``

Target formats: class indices ``[n]`` (int64) for ``categorical``; float
tensors shaped like the outputs ``[n, K]`` for ``bernoulli``, ``gaussian`` and
``poisson``; the scalar observation ``[n]`` or ``[n, 1]`` for ``normal`` (whose
sufficient statistic is ``(y, y^2)``).

Example:
    >>> import torch
    >>> from dropgeom.families import get_family
    >>> fam = get_family("categorical")
    >>> eta = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    >>> fam.mean(eta)
    tensor([[0.5000, 0.5000]], dtype=torch.float64)
    >>> fam.cov_mv(eta, torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    tensor([[ 0.2500, -0.2500]], dtype=torch.float64)
"""

from __future__ import annotations

from typing import Union

from .base import ExponentialFamily
from .categorical import Categorical
from .elementwise import Bernoulli, Gaussian, Poisson
from .normal import Normal

__all__ = ["ExponentialFamily", "Categorical", "Bernoulli", "Gaussian", "Poisson", "Normal", "get_family", "FAMILIES"]


FAMILIES = {"categorical": Categorical, "bernoulli": Bernoulli, "gaussian": Gaussian, "poisson": Poisson, "normal": Normal}


def get_family(family: Union[str, ExponentialFamily]) -> ExponentialFamily:
    """Return a family instance from its name (or pass an instance through).

    Names: ``categorical``, ``bernoulli``, ``gaussian`` (sigma=1; use
    ``Gaussian(sigma)`` for another), ``poisson``, ``normal`` (any case). Each is an exponential family
    ``p(y | eta) = h(y) exp(<eta, t(y)> - A(eta))`` (theory.md section 1).

    Raises:
        ValueError: an unknown name, or something that is neither a name nor an :class:`ExponentialFamily`
            instance (a family class such as ``Gaussian`` itself included); the message lists the names.

    Example:
        >>> get_family("poisson")
        Poisson()
        >>> get_family("Categorical").name
        'categorical'
    """
    if isinstance(family, ExponentialFamily):
        return family
    if isinstance(family, str) and family.lower() in FAMILIES:
        return FAMILIES[family.lower()]()
    raise ValueError(f"unknown family {family!r}; choose one of {sorted(FAMILIES)} or pass an ExponentialFamily")
