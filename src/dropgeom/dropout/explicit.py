r"""Evaluate a model at explicit dropout masks, functionally.

``forward_with_masks(model, inputs, masks)`` runs the model with every module
in eval mode, except that each named dropout module multiplies its input by
the given mask (``h~ = h * m``, theory.md section 4) and each named
``nn.Linear`` (DropConnect) uses the weights ``W * M_i`` for sample ``i``.
The model's ``training`` flags are restored afterwards; the mask is applied by
a forward hook registered for the duration of the call (hand-written: no
library evaluates ``nn.Dropout`` at a given mask), so the call composes with
``torch.func`` (``vmap`` over masks, ``jvp``/``vjp`` with respect to masks).
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from torch import Tensor, nn
from torch.func import functional_call

from .._intercept import DropoutSite, apply_mask, reused_dropout_error
from .._utils import as_tuple as _as_tuple
from ..manifold import check_inputs_match, eval_mode
from .kinds import module_kind

__all__ = ["forward_with_masks", "record_dropout_inputs"]

Inputs = Union[Tensor, Tuple[Tensor, ...]]


def _unit_mask_hook(mod: nn.Module, name: str, mask: Tensor):
    kind = module_kind(mod)
    if kind is None:
        raise ValueError(f"module {name!r} ({type(mod).__name__}) is not a dropout module; it cannot take a unit mask")
    p = float(mod.p)  # type: ignore[arg-type]  # every dropout kind stores p as a float

    def hook(module: nn.Module, args: Tuple[Tensor, ...], output: Tensor) -> Tensor:
        return apply_mask(kind, args[0], mask, p, name)

    return hook


def _dropconnect_hook(name: str, mask: Tensor, weight_name: str, params: Optional[Mapping[str, Tensor]]):
    def hook(module: nn.Linear, args: Tuple[Tensor, ...], output: Tensor) -> Tensor:
        x = args[0]
        w = params[weight_name] if params is not None and weight_name in params else module.weight
        if mask.dim() != 3 or tuple(mask.shape[1:]) != tuple(w.shape) or mask.shape[0] not in (1, x.shape[0]):
            raise ValueError(
                f"DropConnect mask for {name!r} must have shape [n or 1, {w.shape[0]}, {w.shape[1]}], got {tuple(mask.shape)}"
            )
        if x.dim() != 2:
            raise ValueError(f"DropConnect on {name!r} supports inputs [n, in], got {tuple(x.shape)}")
        out = ((w * mask) @ x.unsqueeze(-1)).squeeze(-1)
        bias = params.get(name + ".bias" if name else "bias") if params is not None else None
        if bias is None:
            bias = module.bias
        return out + bias if bias is not None else out

    return hook


def _split(model: nn.Module, masks: Mapping[str, Tensor]) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
    """``(module masks, site masks)``: dropout modules and DropConnect Linear layers take module
    hooks; attention and functional dropout sites take the interceptor."""
    modules = dict(model.named_modules())
    by_module, by_site = {}, {}
    for name, mask in masks.items():
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask for {name!r} must be a tensor, got {type(mask).__name__}")
        mod = modules.get(name)
        if mod is not None and (module_kind(mod) is not None or isinstance(mod, nn.Linear)):
            by_module[name] = mask
        elif isinstance(mod, nn.MultiheadAttention) or (mod is None and "#" in name):
            by_site[name] = mask
        elif mod is None:
            dropout = [k for k, m in modules.items() if module_kind(m) is not None]
            raise ValueError(f"unknown layer name {name!r} in masks; the model's dropout modules are {dropout}")
        else:
            raise ValueError(
                f"layer {name!r} is a {type(mod).__name__}: masks apply to dropout modules, attention / functional "
                "dropout sites (dropgeom.dropout.dropout_sites) or nn.Linear (DropConnect)"
            )
    return by_module, by_site


@contextlib.contextmanager
def _hooks(model: nn.Module, masks: Mapping[str, Tensor], params: Optional[Mapping[str, Tensor]]) -> Iterator[None]:
    modules = dict(model.named_modules())
    handles = []
    try:
        for name, mask in masks.items():
            mod = modules[name]
            if module_kind(mod) is not None:
                handles.append(mod.register_forward_hook(_unit_mask_hook(mod, name, mask)))
            else:
                wname = f"{name}.weight" if name else "weight"
                handles.append(mod.register_forward_hook(_dropconnect_hook(name, mask, wname, params)))
        yield
    finally:
        for h in handles:
            h.remove()


def forward_with_masks(
    model: nn.Module, inputs: Inputs, masks: Mapping[str, Tensor], params: Optional[Mapping[str, Tensor]] = None
) -> Tensor:
    """The model's output with each named dropout layer replaced by multiplication with its mask.

    ``h~ = h * m`` at every dropout module named in ``masks`` (mask shape
    ``[n or 1, *unit_shape]``; channel dropout ``[n or 1, C]``; ``DropPath`` ``[n or 1]``;
    alpha dropout: the affine law of :mod:`~dropgeom.dropout.masks`) and at every
    attention / functional dropout site (:func:`~dropgeom.dropout.dropout_sites`; for
    attention the post-softmax weights are masked, ``[n or 1, heads, L, S]``); ``W_i = W * M_i``
    for an ``nn.Linear`` named in ``masks`` (DropConnect, mask ``[n or 1, out, in]``).
    Every other module, including dropout modules not named, runs in eval mode
    (identity). The model's ``training`` flags are untouched afterwards.

    Args:
        model: the network.
        inputs: a tensor (or tuple of tensors) with leading sample axis ``n``.
        masks: ``{layer name: mask}``; ``{}`` gives the eval-mode output.
        params: optional ``{name: tensor}`` overriding the model's parameters
            (``torch.func.functional_call``); default: the module's own, so
            ``.backward()`` reaches ``model.parameters()``.

    Returns:
        The model's output (``[n, K]`` for the models dropgeom analyses).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; ``masks`` is not a mapping or holds a non-tensor.
        ValueError: a mask named for an unknown layer or for a module that takes none; a mask of the wrong shape
            (or with neither 1 nor ``n`` rows); DropConnect on inputs other than ``[n, in]``; an attention /
            functional dropout site the forward pass never runs; inputs whose dtype or device differ from the
            parameters'. What the model itself raises passes through.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Dropout(0.5), nn.Linear(4, 2)).double()
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> ones = {"2": torch.ones(5, 4, dtype=torch.float64)}
        >>> torch.equal(forward_with_masks(net, x, ones), net.eval()(x))
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a dict {{layer name: tensor}}, got {type(masks).__name__}")
    return _run(model, _as_tuple(inputs), masks, params, None)


def _run(
    model: nn.Module,
    args: Tuple[Tensor, ...],
    masks: Mapping[str, Tensor],
    params: Optional[Mapping[str, Tensor]],
    sites: Optional[Dict[str, DropoutSite]],
) -> Tensor:
    by_module, by_site = _split(model, masks)
    seen: Dict[str, DropoutSite] = {} if sites is None else sites
    try:
        with eval_mode(model, masks=by_site, sites=seen, warn=False), _hooks(model, by_module, params):
            out = model(*args) if params is None else functional_call(model, dict(params), args)
    except RuntimeError as err:  # name the input whose dtype / device does not fit, if that is why
        check_inputs_match(model, args, err)
        raise
    unused = [k for k in by_site if k not in seen]
    if unused:
        raise ValueError(
            f"dropout layers {unused} were never run by the model's forward pass; its attention / functional "
            f"dropout sites are {list(seen)}"
        )
    return out


def record_dropout_inputs(
    model: nn.Module,
    inputs: Inputs,
    layers: Sequence[str],
    masks: Optional[Mapping[str, Tensor]] = None,
    params: Optional[Mapping[str, Tensor]] = None,
    *,
    sites: Optional[Dict[str, DropoutSite]] = None,
    strict: bool = True,
) -> Dict[str, Tensor]:
    """The input ``h`` of each named dropout module during one masked forward pass (plus ``"__out__"``, the output).

    ``sites``: a dict filled with the attention / functional dropout sites the pass
    met (``dropgeom._intercept``). ``strict``: raise if a named module never runs.

    Raises:
        ValueError: an unknown name, (``strict``) a named module that never runs, or a named module (or an
            ``nn.MultiheadAttention`` with dropout) that runs more than once in the pass (torch would draw an
            independent mask at each call; one explicit mask per module cannot stand for that).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2))
        >>> rec = record_dropout_inputs(net, torch.zeros(2, 3), ["1"])
        >>> rec["1"].shape, rec["__out__"].shape
        (torch.Size([2, 4]), torch.Size([2, 2]))
    """
    modules = dict(model.named_modules())
    rec: Dict[str, Tensor] = {}
    handles: List = []

    def make(name: str):
        def pre(module: nn.Module, args: Tuple[Tensor, ...]) -> None:
            if name in rec:
                raise reused_dropout_error(name, type(module).__name__)
            rec[name] = args[0]

        return pre

    try:
        for name in layers:
            if name not in modules:
                raise ValueError(f"unknown layer name {name!r}")
            handles.append(modules[name].register_forward_pre_hook(make(name)))
        rec["__out__"] = _run(model, _as_tuple(inputs), masks or {}, params, sites)
    finally:
        for h in handles:
            h.remove()
    missing = [k for k in layers if k not in rec]
    if missing and strict:
        raise ValueError(f"dropout layers {missing} were not used by the model's forward pass")
    return rec
