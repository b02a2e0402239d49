r"""Efron's statistical curvature of a one-parameter model (theory.md section 3)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..manifold import ModelManifold
from ._common import check_manifold

__all__ = ["statistical_curvature"]


def statistical_curvature(manifold: ModelManifold) -> Tensor:
    r"""Efron's statistical curvature ``gamma^2`` of a one-parameter manifold (``P = 1``).

    With ``eta' = d eta / d theta`` and ``eta'' = d^2 eta / d theta^2`` (all ``n``
    outputs stacked) and the sum-convention metric ``G = blockdiag(Sigma_i)``:

    .. math::

        \nu_{20} = \langle \eta', \eta' \rangle_G,\quad
        \nu_{11} = \langle \eta', \eta'' \rangle_G,\quad
        \nu_{02} = \langle \eta'', \eta'' \rangle_G,\qquad
        \gamma^2 = \frac{\nu_{20}\nu_{02} - \nu_{11}^2}{\nu_{20}^3}

    (theory.md section 3; Efron 1975, "Defining the curvature of a statistical problem", eq. 3.5).
    Invariant under reparametrisation of theta; zero iff the curve is e-flat.
    For ``n`` i.i.d. inputs of one model ``gamma_n^2 = gamma_1^2 / n``.

    Args:
        manifold: a model manifold with exactly one free parameter.

    Returns:
        0-dim tensor ``gamma^2``.

    Raises:
        TypeError: ``manifold`` is not a :class:`~dropgeom.ModelManifold` (a ``StreamedManifold`` included).
        ValueError: the manifold has ``P != 1`` parameters; the Fisher information ``nu_20`` is not
            positive and finite (the parameter does not move the distribution at this point).

    Example:
        >>> import torch
        >>> from dropgeom import ModelManifold
        >>> c, th = 0.5, torch.tensor([1.3], dtype=torch.float64)   # N(theta, c theta^2): 2c^2/(1+2c)^3
        >>> m = ModelManifold.from_function(
        ...     lambda t: torch.stack([1 / (c * t), -1 / (2 * c * t**2)], -1), th, "normal")
        >>> round(float(statistical_curvature(m)), 10), 2 * c**2 / (1 + 2 * c) ** 3
        (0.0625, 0.0625)
    """
    check_manifold(manifold, "statistical_curvature")
    if manifold.num_params != 1:
        raise ValueError(
            f"statistical_curvature needs a one-parameter manifold (P = 1), got P={manifold.num_params}; "
            "use embedding_curvature(manifold) for several parameters"
        )
    e = torch.ones(1, dtype=manifold.dtype, device=manifold.device)
    eta = manifold.eta()
    d1 = manifold.jvp(e)
    d2 = manifold.d2(e)
    fam = manifold.family
    g1 = fam.cov_mv(eta, d1)
    nu20 = (d1 * g1).sum()
    nu11 = (d2 * g1).sum()
    nu02 = (d2 * fam.cov_mv(eta, d2)).sum()
    if not torch.isfinite(nu20) or nu20 <= 0:
        raise ValueError(
            f"statistical_curvature: the Fisher information <eta', eta'>_G = {float(nu20):.3g} is not positive; "
            "the parameter does not move the distribution at this point"
        )
    return (nu20 * nu02 - nu11**2) / nu20**3
