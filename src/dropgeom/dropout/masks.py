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
import numbers
import warnings
from typing import Dict, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .._intercept import DropoutSite, unit_shape as _kind_unit_shape
from .modules import DropPath

__all__ = [
    "DROPOUT_TYPES",
    "dropout_sites",
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
#: Dropout module types and their kind (first match wins; order matters for subclasses).
MODULE_KINDS = (
    (nn.Dropout1d, "channel"), (nn.Dropout2d, "channel"), (nn.Dropout3d, "channel"),
    (nn.FeatureAlphaDropout, "feature_alpha"), (nn.AlphaDropout, "alpha"),
    (DropPath, "sample"), (nn.Dropout, "dropout"),
)
ALPHA_KINDS = ("alpha", "feature_alpha")


def module_kind(mod: nn.Module) -> Optional[str]:
    """The dropout kind of a module (``None`` if it is no dropout module).

    Example:
        >>> from torch import nn
        >>> module_kind(nn.Dropout2d(0.1)), module_kind(nn.Linear(2, 2))
        ('channel', None)
    """
    for cls, kind in MODULE_KINDS:
        if isinstance(mod, cls):
            return kind
    return None


def _left_out(model: nn.Module) -> Dict[str, str]:
    """Dropout the multiplicative-module view leaves out: ``{name: description}``."""
    out = {}
    for k, m in model.named_modules():
        kind = module_kind(m)
        if kind is not None and not isinstance(m, DROPOUT_TYPES):
            out[k] = f"{type(m).__name__}(p={m.p})"
        elif isinstance(m, nn.MultiheadAttention) and m.dropout > 0:
            out[k] = f"attention-weight dropout of nn.MultiheadAttention (p={m.dropout})"
    out.update(_rnn_dropout(model))
    return out


def _rnn_dropout(model: nn.Module) -> Dict[str, str]:
    """Dropout between the layers of ``nn.RNN/LSTM/GRU``: inside a fused kernel, no explicit mask possible."""
    return {
        k: f"{type(m).__name__} inter-layer dropout (p={m.dropout}), inside a fused kernel"
        for k, m in model.named_modules()
        if isinstance(m, nn.RNNBase) and m.dropout > 0 and m.num_layers > 1
    }

PSpec = Union[None, float, Mapping[str, float]]
Inputs = Union[Tensor, Tuple[Tensor, ...]]


def find_dropout(
    model: nn.Module, layers: Optional[Sequence[str]] = None, *, all_kinds: bool = False
) -> Dict[str, nn.Module]:
    """The dropout modules of ``model`` by qualified name (``model.named_modules()`` order).

    Args:
        model: any ``nn.Module``.
        layers: restrict to these qualified names (each must name a supported
            dropout module); default: every supported dropout module.
        all_kinds: also return ``nn.AlphaDropout``, ``nn.FeatureAlphaDropout`` and
            :class:`~dropgeom.dropout.DropPath` modules. Without it only the
            multiplicative ``torch.nn`` modules (``DROPOUT_TYPES``) are returned and a
            ``RuntimeWarning`` names every other dropout of the model (those modules,
            ``nn.MultiheadAttention`` attention dropout) that the caller leaves out.
            Dropout that is not a module at all is found by :func:`dropout_sites`.

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
    ok = (lambda m: module_kind(m) is not None) if all_kinds else (lambda m: isinstance(m, DROPOUT_TYPES))
    found = {k: m for k, m in modules.items() if ok(m)}
    if layers is None:
        if not all_kinds:
            left = _left_out(model)
            if left:
                warnings.warn(
                    "this quantity takes nn.Dropout/Dropout1d/2d/3d modules only and leaves out "
                    + "; ".join(f"{k!r}: {v}" for k, v in left.items())
                    + " (dropgeom.dropout.gap, terms, mixture and penalty include them)",
                    RuntimeWarning,
                    stacklevel=2,
                )
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
        if not all_kinds and module_kind(mod) is not None and not isinstance(mod, DROPOUT_TYPES):
            raise ValueError(
                f"layer {name!r} is {type(mod).__name__}, which is not multiplicative nn.Dropout; "
                "this quantity does not support it (dropgeom.dropout.gap, terms, mixture and penalty do)"
            )
        if not ok(mod):
            raise ValueError(f"layer {name!r} is a {type(mod).__name__}, not a dropout module; dropout modules: {list(found)}")
        out[name] = mod
    if not out:
        raise ValueError("layers is empty: name at least one dropout module")
    return out


def dropout_sites(
    model: nn.Module, inputs: "Inputs", layers: Optional[Sequence[str]] = None
) -> Dict[str, DropoutSite]:
    """Every dropout site of ``model`` on ``inputs``, found by one eval-mode forward pass.

    Sites: dropout modules of every kind (named as modules) in ``named_modules()``
    order, then the dropout that is not a module -- ``nn.MultiheadAttention``
    attention weights (the module's name), ``F.dropout``-family calls
    (``"<module>#dropout<i>"``) and ``F.scaled_dot_product_attention`` with
    ``dropout_p > 0`` (``"<module>#sdpa<i>"``) -- in call order. Each site carries
    its kind, drop probability and per-sample unit (mask) shape.

    Args:
        model: the network.
        inputs: its inputs (leading sample axis).
        layers: restrict to these site names (in this order).

    Raises:
        ValueError: no dropout at all, an unknown name, or a named dropout module that
            the forward pass never runs.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv1d(2, 3, 1), nn.Dropout1d(0.1), nn.Flatten(), nn.Linear(12, 2))
        >>> s = dropout_sites(net, torch.zeros(5, 2, 4))
        >>> {k: (v.kind, v.p, tuple(v.unit_shape)) for k, v in s.items()}
        {'1': ('channel', 0.1, (3,))}
    """
    from .explicit import record_dropout_inputs  # local import: explicit imports this module

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    modules = {k: m for k, m in model.named_modules() if module_kind(m) is not None}
    record: Dict[str, DropoutSite] = {}
    with torch.no_grad():
        rec = record_dropout_inputs(model, inputs, list(modules), sites=record, strict=False)
    sites: Dict[str, DropoutSite] = {}
    for k, m in modules.items():
        if k in rec:
            kind = module_kind(m)
            sites[k] = DropoutSite(k, kind, float(m.p), k, _kind_unit_shape(kind, rec[k]))
    sites.update(record)
    fused = _rnn_dropout(model)
    if fused:
        warnings.warn(
            "dropout that cannot be made an explicit mask is left out (evaluated as in eval mode): "
            + "; ".join(f"{k!r}: {v}" for k, v in fused.items())
            + ". Build the stack from single-layer modules with nn.Dropout between them to include it.",
            RuntimeWarning,
            stacklevel=2,
        )
    if layers is None:
        if not sites:
            raise ValueError(
                f"{type(model).__name__} has no dropout modules, and its forward pass calls no F.dropout or "
                "attention dropout; add dropout layers or use noise='dropconnect'"
            )
        return sites
    if isinstance(layers, str):
        layers = [layers]
    if not layers:
        raise ValueError("layers is empty: name at least one dropout layer")
    out = {}
    for name in layers:
        if name in sites:
            out[name] = sites[name]
        elif name in modules:
            raise ValueError(f"dropout module {name!r} is never run by the model's forward pass on these inputs")
        else:
            raise ValueError(f"unknown layer name {name!r}; the model's dropout layers are {list(sites)}")
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
    """Per-sample unit shape of each dropout site (:func:`dropout_sites`), found by one eval-mode forward pass.

    ``nn.Dropout``: the shape of the layer's input without the batch axis;
    ``nn.Dropout1d/2d/3d``: ``(channels,)``; ``DropPath``: ``()``; attention: ``(heads, L, S)``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2))
        >>> unit_shapes(net, torch.zeros(2, 3))
        {'1': torch.Size([4])}
    """
    return {k: s.unit_shape for k, s in dropout_sites(model, inputs, layers).items()}


def _unit_shape(mod: nn.Module, h: Tensor) -> torch.Size:
    return _kind_unit_shape(module_kind(mod) or "dropout", h)


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
    model: nn.Module,
    inputs: Inputs,
    layers: Optional[Sequence[str]] = None,
    p: PSpec = None,
    noise: str = "bernoulli",
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
    _check_noise(noise)
    if noise == "dropconnect":
        mods = _linear_layers(model, layers)
        if p is None:
            raise ValueError("noise='dropconnect' needs p (no module holds a DropConnect probability)")
        ps = resolve_p(mods, p)
        return MaskSpec({k: m.weight.shape for k, m in mods.items()}, ps, {k: "dropconnect" for k in mods})
    sites = dropout_sites(model, inputs, layers)
    ps = site_p(sites, p, noise)
    return MaskSpec({k: s.unit_shape for k, s in sites.items()}, ps, {k: s.kind for k, s in sites.items()})
