"""The dropout sites of a model, found by one eval-mode forward pass (theory.md section 4).

A *site* is a dropout module of any kind or dropout that is not a module (attention weights,
``F.dropout`` calls, ``scaled_dot_product_attention(dropout_p>0)``), with its kind, drop
probability and per-sample unit (mask) shape. :mod:`dropgeom.dropout.masks` re-exports
:func:`dropout_sites` and :func:`unit_shapes`.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    >>> list(dropout_sites(net, torch.zeros(2, 3)))
    ['1']
"""

from __future__ import annotations

import warnings
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from .._intercept import DropoutSite, SiteRecord, unit_shape as _kind_unit_shape
from .._utils import Inputs
from .._utils import as_tuple as _as_tuple
from .explicit import record_dropout_inputs
from ._train_only import warn_train_only
from .kinds import _rnn_dropout, module_kind, warn_own_forward

__all__ = ["dropout_sites", "unit_shapes", "check_sample_axis"]


def dropout_sites(model: nn.Module, inputs: "Inputs", layers: Optional[Sequence[str]] = None) -> Dict[str, DropoutSite]:
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

    Warns:
        RuntimeWarning: dropout that cannot be made an explicit mask (inside a fused RNN kernel), or that
            the forward runs only in training mode (``dropout_p=p if self.training else 0.0``), is left out;
            a dropout module whose class overrides ``forward`` is analysed with its base class's law.

    Raises:
        ValueError: no dropout at all, an unknown name, a named dropout module that
            the forward pass never runs, or a dropout module whose input's first axis is not the samples.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv1d(2, 3, 1), nn.Dropout1d(0.1), nn.Flatten(), nn.Linear(12, 2))
        >>> s = dropout_sites(net, torch.zeros(5, 2, 4))
        >>> {k: (v.kind, v.p, tuple(v.unit_shape)) for k, v in s.items()}
        {'1': ('channel', 0.1, (3,))}
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    modules = {k: m for k, m in model.named_modules() if module_kind(m) is not None}
    record = SiteRecord()
    args = _as_tuple(inputs)
    with torch.no_grad():
        rec = record_dropout_inputs(model, args, list(modules), sites=record, strict=False)
    rec.update(record.inputs)  # functional sites: their inputs, for the sample-axis check
    sites: Dict[str, DropoutSite] = {}
    for k, m in modules.items():
        if k in rec:
            kind = module_kind(m)
            sites[k] = DropoutSite(k, kind, float(m.p), k, _kind_unit_shape(kind, rec[k]))
    sites.update(record)
    warn_own_forward(model, "dropout_sites")
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
        warn_train_only(model, args, sites, "dropout_sites")
        _check_sample_axes(rec, sites, args[0].shape[0])
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
    warn_train_only(model, args, sites, "dropout_sites", chosen=list(out))
    _check_sample_axes(rec, out, args[0].shape[0])
    return out


def _check_sample_axes(rec: Dict[str, torch.Tensor], chosen: Dict[str, DropoutSite], n: int) -> None:
    """:func:`check_sample_axis` for each chosen dropout module."""
    for k in chosen:
        if k in rec:
            check_sample_axis(k, rec[k], n)


def check_sample_axis(name: str, h: torch.Tensor, n: int) -> None:
    """Refuse a dropout layer (module or functional site) whose input's first axis is not the ``n`` samples.

    dropgeom's masks are per sample along the first axis (``[n or 1, *unit_shape]``); on a
    sequence-first input ``[L, n, d]`` (``batch_first=False``) one mask would be shared by the
    ``L`` positions, which torch drops independently.

    Raises:
        ValueError: ``h.shape[0] != n``.
    """
    if h.dim() == 0 or h.shape[0] != n:
        raise ValueError(
            f"dropout layer {name!r} gets an input of shape {tuple(h.shape)} whose first axis is not the {n} samples "
            "(a sequence-first layout, batch_first=False?): dropgeom's dropout masks are per sample along the first "
            "axis, so its elements would not be dropped independently. Put the samples first (batch_first=True)."
        )


def unit_shapes(model: nn.Module, inputs: Inputs, layers: Optional[Sequence[str]] = None) -> Dict[str, torch.Size]:
    """Per-sample unit shape of each dropout site (:func:`dropout_sites`), found by one eval-mode forward pass.

    ``nn.Dropout``: the shape of the layer's input without the batch axis;
    ``nn.Dropout1d/2d/3d``: ``(channels,)``; ``DropPath``: ``()``; attention: ``(heads, L, S)``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: as :func:`dropout_sites`: no dropout at all, an unknown name in ``layers``, or a named
            dropout module the forward pass never runs. What the forward pass raises on unfit inputs passes through.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2))
        >>> unit_shapes(net, torch.zeros(2, 3))
        {'1': torch.Size([4])}
    """
    return {k: s.unit_shape for k, s in dropout_sites(model, inputs, layers).items()}
