r"""C1's measures of one model: invariant curvatures and coordinate-dependent sharpness (theory.md sections 3 and 5).

Used by :mod:`dropgeom.experiments.c1_flatness`; :data:`FLATNESS_MEASURES` lists
every measure with its words and invariance status (theory.md 5).
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..config import RunConfig

__all__ = ["FLATNESS_MEASURES", "flatness_measures"]


#: C1's measures: (key, words, invariance status); the invariant ones decide the verdict
FLATNESS_MEASURES: Tuple[Tuple[str, str, str], ...] = (
    ("mask_e", "e-curvature along the mask directions", "invariant"),
    ("mask_m", "m-curvature along the mask directions", "invariant"),
    ("natural_gradient_fs_e", "e-curvature along the natural-gradient direction, function-space regularised", "invariant"),
    ("noise_e", "e-curvature along dropout-noise tangent directions", "invariant"),
    ("gamma2", "undamped scalar e-curvature gamma^2 (exact range of J; first layer, first inputs)", "invariant"),
    (
        "natural_gradient_e",
        "e-curvature along the plain natural-gradient direction (volatile on a badly conditioned g)",
        "invariant (rank J = P)",
    ),
    ("fisher_trace", "Fisher trace", "coordinate-dependent"),
    ("fisher_top", "top Fisher eigenvalue", "coordinate-dependent"),
    ("hessian_trace", "Hessian trace (Hutchinson)", "coordinate-dependent"),
    ("hessian_top", "top Hessian eigenvalue", "coordinate-dependent"),
    ("sam", "SAM sharpness", "coordinate-dependent"),
)


def flatness_measures(
    model: nn.Sequential,
    x: Tensor,
    y: Tensor,
    family: str,
    config: RunConfig,
    seed: int,
    *,
    reference: Optional[Tensor] = None,
    mixture: bool = False,
    sharpness: bool = True,
    gamma2: bool = True,
) -> Dict[str, Any]:
    """C1's measures of one model on the inputs ``x`` (labels ``y``), over **all** its parameters.

    Invariant (theory.md 3; :mod:`dropgeom.curvature.invariant`): mean normal
    e- and m-curvature along the mask directions of the first dropout layer
    (``mask_e``, ``mask_m``), along ``config.c1_noise_draws`` Rademacher
    combinations of the mask directions of every dropout layer (``noise_e``),
    along the natural-gradient direction of the NLL, plain (``natural_gradient_e``)
    and with the function-space regulariser on the ``reference`` inputs
    (``natural_gradient_fs_e``, weight 1: the Fisher of both input sets;
    :mod:`dropgeom.curvature.natural_gradient`); with ``gamma2`` and
    ``config.c1_gamma2_inputs > 0`` the undamped ``gamma2`` on the exact range of
    ``J`` of the first Linear layer's parameters on the first
    ``config.c1_gamma2_inputs`` inputs (dense; the same subset for every model).
    Coordinate-dependent (:mod:`dropgeom.curvature.sharpness`): Fisher trace and
    top eigenvalue, Hessian trace (``config.c1_hutchinson_probes`` probes), top Hessian
    eigenvalue, SAM sharpness (radius ``config.c1_sam_rho |theta|``). With ``mixture=True`` the invariant
    measures are taken on the manifold of the m-mixture of the dropout model
    (``config.c1_mixture_masks`` common random masks, the same masks for every
    input set; theory.md 4.3) instead. Also ``param_norm`` and ``seconds``.
    """
    import time

    from .. import ModelManifold
    from ..curvature import curvature_profile, dropout_mixture_manifold, dropout_tangent_directions, embedding_curvature

    def manifold(inputs: Tensor, names: Optional[List[str]] = None, g: Optional[torch.Generator] = None) -> ModelManifold:
        if mixture:  # a generator with the same seed: the same common random masks on every input set
            g = torch.Generator().manual_seed(20_000 + seed) if g is None else g
            return dropout_mixture_manifold(
                model, inputs, family, "m", masks=config.c1_mixture_masks, generator=g, param_names=names
            )
        return ModelManifold(model, inputs, family, param_names=names)

    t0 = time.process_time()
    gen = torch.Generator().manual_seed(20_000 + seed)
    m = manifold(x, g=gen)
    out: Dict[str, Any] = {"num_params": m.num_params, "n_inputs": m.n}
    out["param_norm"] = float(m.theta.norm())
    dirs = dropout_tangent_directions(m)
    U = torch.cat(dirs)
    xi = torch.randint(0, 2, (config.c1_noise_draws, U.shape[0]), generator=gen).to(U.dtype) * 2 - 1
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*vmap.*")
        # one Jacobian SVD for every direction set (noise_m comes along for free and is dropped)
        prof = curvature_profile(
            m,
            {"mask": dirs[0], "noise": xi @ U},
            {"e": 1.0, "m": -1.0},
            targets=y,
            reference=None if reference is None else manifold(reference),
        )
        if gamma2 and config.c1_gamma2_inputs:
            first = next(k for k, mod in model.named_children() if isinstance(mod, nn.Linear))
            sub = manifold(x[: config.c1_gamma2_inputs], [f"{first}.weight", f"{first}.bias"])
            out["gamma2"] = float(embedding_curvature(sub).gamma2)
    out.update(
        {k: v for k, v in prof.items() if k in ("mask_e", "mask_m", "natural_gradient_e", "natural_gradient_fs_e", "noise_e")}
    )
    if sharpness and not mixture:
        out.update(_coordinate_measures(m, y, config, gen))
    out["seconds"] = time.process_time() - t0
    return out


def _coordinate_measures(m: Any, y: Tensor, config: RunConfig, gen: torch.Generator) -> Dict[str, float]:
    """The coordinate-dependent measures (:mod:`dropgeom.curvature.sharpness`): described, never deciding."""
    from ..curvature import fisher_top_eigenvalue, fisher_trace, hessian_top_eigenvalue, hessian_trace, sam_sharpness

    return {
        "fisher_trace": fisher_trace(m),
        "fisher_top": fisher_top_eigenvalue(m),
        "hessian_trace": hessian_trace(m, y, n_probes=config.c1_hutchinson_probes, generator=gen).value,
        "hessian_top": hessian_top_eigenvalue(m, y, tol=1e-3),
        "sam": sam_sharpness(m, y, rho=config.c1_sam_rho, steps=config.c1_sam_steps),
    }
