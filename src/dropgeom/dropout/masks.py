r"""Dropout modules and explicit masks (theory.md section 4).

PyTorch convention: ``p`` is the DROP probability and dropout is *inverted*,
so a unit's mask is ``m_j = b_j / (1 - p)`` with ``b_j ~ Bernoulli(1 - p)``,
``E m_j = 1`` and ``Var m_j = p / (1 - p)``. Gaussian dropout uses
``m_j ~ N(1, p / (1 - p))`` (same mean and variance). DropConnect masks the
weights of ``nn.Linear`` layers instead of units.

Supported dropout modules: ``nn.Dropout`` (every element of the layer's input
is a unit) and ``nn.Dropout1d/2d/3d`` (a unit is a channel, the mask is
broadcast over the spatial axes). ``nn.AlphaDropout`` and
``nn.FeatureAlphaDropout`` are not multiplicative (they also shift the
activations) and are rejected when named; dropout applied with
``torch.nn.functional.dropout`` inside ``forward`` cannot be found.

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
import numbers
from typing import Dict, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = [
    "DROPOUT_TYPES",
    "NOISES",
    "MaskEnumeration",
    "find_dropout",
    "resolve_p",
    "unit_shapes",
    "sample_masks",
    "enumerate_masks",
    "mask_variance",
]

#: Module types treated as multiplicative unit dropout.
DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_CHANNEL_TYPES = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_UNSUPPORTED = (nn.AlphaDropout, nn.FeatureAlphaDropout)
NOISES = ("bernoulli", "gaussian", "dropconnect")

PSpec = Union[None, float, Mapping[str, float]]
Inputs = Union[Tensor, Tuple[Tensor, ...]]


def find_dropout(model: nn.Module, layers: Optional[Sequence[str]] = None) -> Dict[str, nn.Module]:
    """The dropout modules of ``model`` by qualified name (``model.named_modules()`` order).

    Args:
        model: any ``nn.Module``.
        layers: restrict to these qualified names (each must name a supported
            dropout module); default: every supported dropout module.

    Raises:
        ValueError: the model has no dropout module, a name is unknown, or it
            names a module that is not (supported) dropout.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1), nn.Linear(2, 2), nn.Dropout(0.2))
        >>> {k: v.p for k, v in find_dropout(net).items()}
        {'1': 0.1, '3': 0.2}
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    modules = dict(model.named_modules())
    found = {k: m for k, m in modules.items() if isinstance(m, DROPOUT_TYPES)}
    if layers is None:
        if not found:
            raise ValueError(
                f"{type(model).__name__} has no dropout modules ({', '.join(t.__name__ for t in DROPOUT_TYPES)}); "
                "add nn.Dropout layers or use noise='dropconnect'"
            )
        return found
    if isinstance(layers, str):
        layers = [layers]
    out: Dict[str, nn.Module] = {}
    for name in layers:
        if name not in modules:
            raise ValueError(f"unknown layer name {name!r}; the model's dropout modules are {list(found)}")
        mod = modules[name]
        if isinstance(mod, _UNSUPPORTED):
            raise ValueError(f"layer {name!r} is {type(mod).__name__}, which is not multiplicative dropout (unsupported)")
        if not isinstance(mod, DROPOUT_TYPES):
            raise ValueError(f"layer {name!r} is a {type(mod).__name__}, not a dropout module; dropout modules: {list(found)}")
        out[name] = mod
    if not out:
        raise ValueError("layers is empty: name at least one dropout module")
    return out


def _check_p(p: float, where: str) -> float:
    if isinstance(p, Tensor):
        p = float(p)
    if not isinstance(p, numbers.Real) or isinstance(p, bool):
        raise TypeError(f"p for {where} must be a float, got {type(p).__name__}")
    p = float(p)
    if not math.isfinite(p) or not (0.0 <= p < 1.0):
        raise ValueError(f"p for {where} must lie in [0, 1) (the drop probability), got {p}")
    return p


def resolve_p(modules: Mapping[str, nn.Module], p: PSpec = None) -> Dict[str, float]:
    """The drop probability of each named layer: from the module, a float for all, or a dict per layer.

    Example:
        >>> from torch import nn
        >>> resolve_p({"a": nn.Dropout(0.3), "b": nn.Dropout(0.1)}, {"b": 0.2})
        {'a': 0.3, 'b': 0.2}
    """
    if isinstance(p, Mapping):
        unknown = [k for k in p if k not in modules]
        if unknown:
            raise ValueError(f"p names unknown layers {unknown}; layers: {list(modules)}")
        out = {}
        for k, mod in modules.items():
            out[k] = _check_p(p[k] if k in p else getattr(mod, "p", None), f"layer {k!r}")
        return out
    out = {}
    for k, mod in modules.items():
        if p is None:
            if not hasattr(mod, "p"):
                raise ValueError(f"layer {k!r} ({type(mod).__name__}) has no drop probability; pass p")
            out[k] = _check_p(mod.p, f"layer {k!r}")
        else:
            out[k] = _check_p(p, f"layer {k!r}")
    return out


def mask_variance(p: float) -> float:
    """``V = p / (1 - p)``: the variance of an inverted dropout mask (Bernoulli or Gaussian).

    Example:
        >>> mask_variance(0.5)
        1.0
    """
    p = _check_p(p, "the mask")
    return p / (1.0 - p)


def _as_tuple(inputs: Inputs) -> Tuple[Tensor, ...]:
    return inputs if isinstance(inputs, tuple) else (inputs,)


def unit_shapes(model: nn.Module, inputs: Inputs, layers: Optional[Sequence[str]] = None) -> Dict[str, torch.Size]:
    """Per-sample unit shape of each dropout layer, found by one eval-mode forward pass.

    ``nn.Dropout``: the shape of the layer's input without the batch axis;
    ``nn.Dropout1d/2d/3d``: ``(channels,)``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2))
        >>> unit_shapes(net, torch.zeros(2, 3))
        {'1': torch.Size([4])}
    """
    from .explicit import record_dropout_inputs  # local import: explicit imports this module

    mods = find_dropout(model, layers)
    with torch.no_grad():
        rec = record_dropout_inputs(model, inputs, list(mods))
    return {k: _unit_shape(mods[k], rec[k]) for k in mods}


def _unit_shape(mod: nn.Module, h: Tensor) -> torch.Size:
    if isinstance(mod, _CHANNEL_TYPES):
        return torch.Size([h.shape[1]])
    return h.shape[1:]


def _draw(shape: Tuple[int, ...], p: float, noise: str, generator: Optional[torch.Generator], dtype, device) -> Tensor:
    if p == 0.0:
        return torch.ones(shape, dtype=dtype, device=device)
    if noise == "gaussian":
        z = torch.randn(shape, generator=generator, dtype=dtype, device=device)
        return 1.0 + math.sqrt(p / (1.0 - p)) * z
    keep = torch.full(shape, 1.0 - p, dtype=dtype, device=device)
    return torch.bernoulli(keep, generator=generator) / (1.0 - p)


def _check_noise(noise: str) -> str:
    if noise not in NOISES:
        raise ValueError(f"unknown noise {noise!r}; choose one of {NOISES}")
    return noise


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

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.2), nn.Linear(4, 2))
        >>> g = torch.Generator().manual_seed(1)
        >>> m = sample_masks(net, torch.zeros(1000, 3), noise="gaussian", generator=g)["1"]
        >>> round(m.mean().item(), 1), round(m.var().item(), 2)
        (1.0, 0.25)
    """
    _check_noise(noise)
    ref = next(iter(model.parameters()), None)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.get_default_dtype()
    device = ref.device if ref is not None else None
    if noise == "dropconnect":
        mods = _linear_layers(model, layers)
        if p is None:
            raise ValueError("noise='dropconnect' needs p (no module holds a DropConnect probability)")
        ps = resolve_p(mods, p)
        n = inputs_or_n if isinstance(inputs_or_n, int) else _as_tuple(inputs_or_n)[0].shape[0]
        return {
            k: _draw((n, *mods[k].weight.shape), ps[k], "bernoulli", generator, dtype, device) for k in mods
        }
    if isinstance(inputs_or_n, int):
        raise ValueError(
            f"noise={noise!r} needs the inputs (not an int) to find each dropout layer's unit shape"
        )
    mods = find_dropout(model, layers)
    ps = resolve_p(mods, p)
    shapes = unit_shapes(model, inputs_or_n, list(mods))
    n = _as_tuple(inputs_or_n)[0].shape[0]
    return {k: _draw((n, *shapes[k]), ps[k], noise, generator, dtype, device) for k in mods}


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
    model: nn.Module,
    inputs: Inputs,
    p: PSpec = None,
    layers: Optional[Sequence[str]] = None,
    max_masks: int = 2**16,
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
    mods = find_dropout(model, layers)
    ps = resolve_p(mods, p)
    shapes = unit_shapes(model, inputs, list(mods))
    sizes = {k: math.prod(shapes[k]) for k in mods}
    total = sum(sizes.values())
    if total > 62 or 2**total > max_masks:
        raise ValueError(
            f"exact enumeration needs 2^{total} masks ({total} dropout units in {list(mods)}), more than "
            f"max_masks={max_masks}; restrict `layers`, raise max_masks, or use method='mc'"
        )
    ref = next(iter(model.parameters()), None)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.get_default_dtype()
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
