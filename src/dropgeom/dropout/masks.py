r"""Dropout modules and explicit masks (theory.md section 4).

PyTorch convention: ``p`` is the DROP probability and dropout is *inverted*,
so a unit's mask is ``m_j = b_j / (1 - p)`` with ``b_j ~ Bernoulli(1 - p)``,
``E m_j = 1`` and ``Var m_j = p / (1 - p)``. Gaussian dropout uses
``m_j ~ N(1, p / (1 - p))`` (same mean and variance). DropConnect masks the
weights of ``nn.Linear`` layers instead of units.

Dropout layers (*sites*, :func:`dropout_sites`), each with a mask law:

* ``nn.Dropout``: every element of the layer's input is a unit;
* ``nn.Dropout1d/2d/3d``: a unit is a channel, the mask is broadcast over the spatial axes;
* :class:`~dropgeom.dropout.DropPath` (inside :class:`~dropgeom.dropout.StochasticDepth`):
  one unit per sample (unit shape ``()``);
* ``nn.AlphaDropout`` / ``nn.FeatureAlphaDropout`` (units: elements / channels): *not*
  multiplicative. With the same mask ``m = b / (1 - p)``, ``b ~ Bernoulli(1 - p)``,
  the layer computes ``h~ = a (b h - alpha (1 - b)) + c`` with ``alpha = 1.7581``
  (SELU's ``-lambda alpha``), ``a = ((1 - p)(1 + p alpha^2))^{-1/2}``, ``c = a alpha p``
  (torch's own law); the ``p`` in this map is always the module's;
* dropout that is not a module, found by one forward pass (``dropgeom._intercept``):
  the attention weights of ``nn.MultiheadAttention`` (site: the module's name, unit
  shape ``[heads, L, S]``), ``F.dropout``-family calls in a custom ``forward``
  (``"<module>#dropout0"``, ...) and ``F.scaled_dot_product_attention(dropout_p>0)``
  (``"<module>#sdpa0"``).

:func:`find_dropout` returns the multiplicative ``torch.nn`` modules only (what the
fast paths and the dropout-mixture manifold take) and warns, naming them, about the
dropout it leaves out; :func:`dropout_sites` returns every site (what ``gap``, ``terms``,
``mixture`` and ``penalty`` take).

Masks are per sample: a layer with unit shape ``U`` gets a mask of shape
``[n, *U]`` (a leading axis of 1 broadcasts one mask over every sample).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from dropgeom.dropout import find_dropout, sample_masks
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Dropout(0.5), nn.Linear(4, 2))
    >>> list(find_dropout(net))
    ['2']
    >>> g = torch.Generator().manual_seed(0)
    >>> m = sample_masks(net, torch.zeros(5, 3), generator=g)
    >>> m["2"].shape, sorted(set(m["2"].flatten().tolist()))
    (torch.Size([5, 4]), [0.0, 2.0])
"""

from __future__ import annotations

import itertools
import math
from typing import Dict, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .._intercept import DropoutSite
from .._utils import as_tuple as _as_tuple
from .._utils import check_p
from ..options import Noise, parse
from .kinds import _CHANNEL_TYPES, ALPHA_KINDS, DROPOUT_TYPES, MODULE_KINDS, find_dropout, module_kind  # noqa: F401
from .sites import dropout_sites, unit_shapes

__all__ = [
    "DROPOUT_TYPES",
    "dropout_sites",
    "MaskEnumeration",
    "find_dropout",
    "resolve_p",
    "unit_shapes",
    "sample_masks",
    "enumerate_masks",
    "mask_variance",
]

PSpec = Union[None, float, Mapping[str, float]]
Inputs = Union[Tensor, Tuple[Tensor, ...]]


def resolve_p(modules: Mapping[str, nn.Module], p: PSpec = None) -> Dict[str, float]:
    """The drop probability of each named layer: from the module, a float for all, or a dict per layer.

    Each ``p_l`` lies in ``[0, 1)`` (theory.md section 4: the mask variance ``p_l / (1 - p_l)`` is finite).

    Raises:
        TypeError: ``modules`` is not a mapping; a ``p`` is not a real number (or, with a dict ``p``, a layer
            it leaves out has no ``p`` of its own).
        ValueError: a ``p`` outside ``[0, 1)``, a bool or not finite; a dict ``p`` naming unknown layers;
            ``p=None`` and a layer without a drop probability.

    Example:
        >>> from torch import nn
        >>> resolve_p({"a": nn.Dropout(0.3), "b": nn.Dropout(0.1)}, {"b": 0.2})
        {'a': 0.3, 'b': 0.2}
    """
    if not isinstance(modules, Mapping):
        raise TypeError(f"modules must be a mapping {{layer name: module}}, got {type(modules).__name__}")
    if isinstance(p, Mapping):
        unknown = [k for k in p if k not in modules]
        if unknown:
            raise ValueError(f"p names unknown layers {unknown}; layers: {list(modules)}")
        out = {}
        for k, mod in modules.items():
            out[k] = check_p(p[k] if k in p else getattr(mod, "p", None), f"layer {k!r}")
        return out
    out = {}
    for k, mod in modules.items():
        if p is None:
            if not hasattr(mod, "p"):
                raise ValueError(f"layer {k!r} ({type(mod).__name__}) has no drop probability; pass p")
            out[k] = check_p(mod.p, f"layer {k!r}")
        else:
            out[k] = check_p(p, f"layer {k!r}")
    return out


def mask_variance(p: float) -> float:
    """``V = p / (1 - p)``: the variance of an inverted dropout mask (Bernoulli or Gaussian; theory.md section 4).

    Raises:
        TypeError: ``p`` is not a real number.
        ValueError: ``p`` outside ``[0, 1)``, a bool or not finite.

    Example:
        >>> mask_variance(0.5)
        1.0
    """
    p = check_p(p, "the mask")
    return p / (1.0 - p)


def _draw(shape: Tuple[int, ...], p: float, noise: str, generator: Optional[torch.Generator], dtype, device) -> Tensor:
    if p == 0.0:
        return torch.ones(shape, dtype=dtype, device=device)
    if noise == "gaussian":
        z = torch.randn(shape, generator=generator, dtype=dtype, device=device)
        return 1.0 + math.sqrt(p / (1.0 - p)) * z
    keep = torch.full(shape, 1.0 - p, dtype=dtype, device=device)
    return torch.bernoulli(keep, generator=generator) / (1.0 - p)


def _check_noise(noise: Union[str, Noise]) -> str:
    """The value of the :class:`~dropgeom.options.Noise` named by ``noise`` (a plain string, as recorded)."""
    return parse(Noise, noise).value


def sample_masks(
    model: nn.Module,
    inputs_or_n: Union[Inputs, int],
    noise: str = "bernoulli",
    p: PSpec = None,
    layers: Optional[Sequence[str]] = None,
    generator: Optional[torch.Generator] = None,
) -> Dict[str, Tensor]:
    """Draw one mask per sample for each dropout layer (or each ``nn.Linear`` for DropConnect).

    * ``bernoulli``: ``m = b / (1 - p)``, ``b ~ Bernoulli(1 - p)``  (inverted dropout)
    * ``gaussian``:  ``m ~ N(1, p / (1 - p))``
    * ``dropconnect``: Bernoulli masks ``b / (1 - p)`` on the weights of the
      ``nn.Linear`` modules named in ``layers`` (default: all), shape ``[n, out, in]``;
      ``p`` must be given (no module holds it).

    Args:
        model: the network.
        inputs_or_n: the inputs (the unit shapes are read from one eval-mode
            forward pass; masks get their batch size), or an int ``n``
            (DropConnect only, where the shapes are the weights').
        noise: ``"bernoulli"``, ``"gaussian"`` or ``"dropconnect"``.
        p: drop probability; default each module's ``p``; a float for all or a dict per layer.
        layers: restrict to these layer names.
        generator: a seeded ``torch.Generator`` for reproducible masks.

    Returns:
        ``{layer name: mask [n, *unit_shape]}`` in the dtype of the model's parameters.

    Raises:
        ValueError: an unknown ``noise``; ``p`` outside ``[0, 1)`` (or, per layer, naming unknown layers);
            ``noise="dropconnect"`` without ``p``, with an unknown or non-``nn.Linear`` layer, on a model without
            ``nn.Linear``, or with a negative ``n``; an int ``n`` with another noise; a model without dropout,
            an unknown layer name, or ``p`` / Gaussian noise imposed on alpha dropout.
        TypeError: ``inputs_or_n`` is neither an int nor a tensor (or tuple of tensors); ``p`` is not a real number.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.2), nn.Linear(4, 2))
        >>> g = torch.Generator().manual_seed(1)
        >>> m = sample_masks(net, torch.zeros(1000, 3), noise="gaussian", generator=g)["1"]
        >>> round(m.mean().item(), 1), round(m.var().item(), 2)
        (1.0, 0.25)
    """
    noise = _check_noise(noise)
    if isinstance(inputs_or_n, bool) or not isinstance(inputs_or_n, (int, Tensor, tuple)):
        raise TypeError(
            f"inputs_or_n must be the inputs (a tensor or a tuple of tensors) or an int n, got {type(inputs_or_n).__name__}"
        )
    ref = next(iter(model.parameters()), None)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.get_default_dtype()
    device = ref.device if ref is not None else None
    if noise == "dropconnect":
        mods = _linear_layers(model, layers)
        if p is None:
            raise ValueError("noise='dropconnect' needs p (no module holds a DropConnect probability)")
        ps = resolve_p(mods, p)
        if isinstance(inputs_or_n, int) and inputs_or_n < 0:
            raise ValueError(f"the number of samples n must be >= 0, got {inputs_or_n}")
        n = inputs_or_n if isinstance(inputs_or_n, int) else _as_tuple(inputs_or_n)[0].shape[0]
        return {k: _draw((n, *mods[k].weight.shape), ps[k], "bernoulli", generator, dtype, device) for k in mods}
    if isinstance(inputs_or_n, int):
        raise ValueError(f"noise={noise!r} needs the inputs (not an int) to find each dropout layer's unit shape")
    sites = dropout_sites(model, inputs_or_n, layers)
    ps = site_p(sites, p, noise)
    n = _as_tuple(inputs_or_n)[0].shape[0]
    return {k: _draw((n, *sites[k].unit_shape), ps[k], noise, generator, dtype, device) for k in sites}


def site_p(sites: Mapping[str, DropoutSite], p: PSpec = None, noise: str = "bernoulli") -> Dict[str, float]:
    """:func:`resolve_p` for dropout sites, refusing what alpha dropout cannot take.

    Alpha dropout's affine correction is computed from the layer's own ``p`` and its law is
    Bernoulli, so a different ``p`` or ``noise='gaussian'`` is refused for it.

    Raises:
        ValueError: ``p`` outside ``[0, 1)``; a ``p`` or Gaussian noise for an alpha-dropout site.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> sites = dropout_sites(nn.Sequential(nn.AlphaDropout(0.2), nn.Linear(2, 2)), torch.zeros(1, 2))
        >>> site_p(sites)
        {'0': 0.2}
    """
    ps = resolve_p(sites, p)
    for k, s in sites.items():
        if s.kind in ALPHA_KINDS:
            if noise != "bernoulli":
                raise ValueError(f"layer {k!r} is alpha dropout, whose masks are Bernoulli; use noise='bernoulli'")
            if abs(ps[k] - s.p) > 0:
                raise ValueError(
                    f"layer {k!r} is alpha dropout with p={s.p}; its affine correction uses the module's own p, "
                    f"so p={ps[k]} cannot be imposed (set the module's p instead)"
                )
    return ps


def _linear_layers(model: nn.Module, layers: Optional[Sequence[str]]) -> Dict[str, nn.Linear]:
    modules = dict(model.named_modules())
    if layers is None:
        out = {k: m for k, m in modules.items() if isinstance(m, nn.Linear)}
        if not out:
            raise ValueError("noise='dropconnect' needs nn.Linear modules; the model has none")
        return out
    out = {}
    for name in [layers] if isinstance(layers, str) else layers:
        if name not in modules:
            raise ValueError(f"unknown layer name {name!r}")
        if not isinstance(modules[name], nn.Linear):
            raise ValueError(f"DropConnect layer {name!r} must be nn.Linear, got {type(modules[name]).__name__}")
        out[name] = modules[name]
    return out


class MaskEnumeration(NamedTuple):
    """Every Bernoulli mask of some layers, with its probability.

    ``masks[name]``: ``[M, *unit_shape]`` (values 0 or ``1/(1-p)``), one row per
    joint mask; ``probs``: ``[M]``, summing to 1.
    """

    masks: Dict[str, Tensor]
    probs: Tensor


def enumerate_masks(
    model: nn.Module, inputs: Inputs, p: PSpec = None, layers: Optional[Sequence[str]] = None, max_masks: int = 2**16
) -> MaskEnumeration:
    """All ``2^U`` joint Bernoulli masks of the named dropout layers (``U`` units in total).

    The probability of a mask with ``k`` dropped units is ``p^k (1-p)^(U-k)``
    (per layer ``p``). Masks are shared by all samples (a leading axis 1 broadcasts
    them in :func:`~dropgeom.dropout.forward_with_masks`).

    Raises:
        ValueError: more than ``max_masks`` masks; restrict ``layers`` or use Monte Carlo.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.5), nn.Linear(2, 2))
        >>> e = enumerate_masks(net, torch.zeros(1, 3))
        >>> e.masks["1"].tolist(), e.probs.tolist()
        ([[0.0, 0.0], [0.0, 2.0], [2.0, 0.0], [2.0, 2.0]], [0.25, 0.25, 0.25, 0.25])
    """
    sites = dropout_sites(model, inputs, layers)
    ps = site_p(sites, p)
    ref = next(iter(model.parameters()), None)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.get_default_dtype()
    return enumerate_shapes({k: s.unit_shape for k, s in sites.items()}, ps, dtype, max_masks)


def enumerate_shapes(
    shapes: Mapping[str, torch.Size], ps: Mapping[str, float], dtype: torch.dtype = torch.float64, max_masks: int = 2**16
) -> MaskEnumeration:
    """All joint Bernoulli masks ``b / (1 - p)`` of layers with the given unit shapes (see :func:`enumerate_masks`).

    Raises:
        ValueError: more than ``max_masks`` masks.

    Example:
        >>> e = enumerate_shapes({"w": torch.Size([1, 2])}, {"w": 0.5})
        >>> e.masks["w"].shape, e.probs.sum().item()
        (torch.Size([4, 1, 2]), 1.0)
    """
    mods = list(shapes)
    sizes = {k: math.prod(shapes[k]) for k in mods}
    total = sum(sizes.values())
    if total > 62 or 2**total > max_masks:
        raise ValueError(
            f"exact enumeration needs 2^{total} masks ({total} dropout units in {mods}), more than "
            f"max_masks={max_masks}; restrict `layers`, raise max_masks, or use method='mc'"
        )
    bits = torch.tensor(list(itertools.product((0.0, 1.0), repeat=total)), dtype=dtype).reshape(2**total, total)
    masks, probs, start = {}, torch.ones(2**total, dtype=torch.float64), 0
    for k in mods:
        b = bits[:, start : start + sizes[k]]
        start += sizes[k]
        q = ps[k]
        kept = b.sum(1).double()
        probs = probs * (1 - q) ** kept * q ** (sizes[k] - kept)
        masks[k] = (b / (1 - q)).reshape(2**total, *shapes[k])
    return MaskEnumeration(masks, probs.to(dtype))


class MaskSpec(NamedTuple):
    """What a quantity draws masks for: per layer the unit (mask) shape, drop probability and kind
    (``dropconnect`` for the weights of an ``nn.Linear``)."""

    shapes: Dict[str, torch.Size]
    p: Dict[str, float]
    kinds: Dict[str, str]


def mask_spec(
    model: nn.Module, inputs: Inputs, layers: Optional[Sequence[str]] = None, p: PSpec = None, noise: str = "bernoulli"
) -> MaskSpec:
    """The layers a dropout quantity takes: every dropout site (:func:`dropout_sites`), or for
    ``noise='dropconnect'`` the ``nn.Linear`` layers (unit shape: the weight's, ``p`` required).

    Raises:
        ValueError: unknown noise, no dropout, unknown or never-run layer names, ``p`` outside
            ``[0, 1)``, DropConnect without ``p``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 2))
        >>> s = mask_spec(net, torch.zeros(4, 3), layers=["2"], p=0.1, noise="dropconnect")
        >>> s.shapes, s.p, s.kinds
        ({'2': torch.Size([2, 2])}, {'2': 0.1}, {'2': 'dropconnect'})
    """
    noise = _check_noise(noise)
    if noise == "dropconnect":
        mods = _linear_layers(model, layers)
        if p is None:
            raise ValueError("noise='dropconnect' needs p (no module holds a DropConnect probability)")
        ps = resolve_p(mods, p)
        return MaskSpec({k: m.weight.shape for k, m in mods.items()}, ps, {k: "dropconnect" for k in mods})
    sites = dropout_sites(model, inputs, layers)
    ps = site_p(sites, p, noise)
    return MaskSpec({k: s.unit_shape for k, s in sites.items()}, ps, {k: s.kind for k, s in sites.items()})
