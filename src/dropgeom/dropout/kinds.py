"""Which modules are dropout, of which kind: the dropout module types and :func:`find_dropout`.

``module_kind`` maps a module to its dropout kind (``dropout``, ``channel``, ``sample``, ``alpha``,
``feature_alpha``) or ``None``; :func:`find_dropout` returns the multiplicative ``torch.nn`` dropout
modules of a model by name and warns about the dropout it leaves out (theory.md section 4).
:mod:`dropgeom.dropout.masks` re-exports all of them.

Example:
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout2d(0.1))
    >>> [(k, module_kind(m)) for k, m in net.named_modules() if module_kind(m)]
    [('1', 'channel')]
"""

from __future__ import annotations

import warnings
from typing import Dict, Optional, Sequence

from torch import nn

from .modules import DropPath

__all__ = ["DROPOUT_TYPES", "MODULE_KINDS", "ALPHA_KINDS", "module_kind", "find_dropout"]

#: Module types treated as multiplicative unit dropout.
DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_CHANNEL_TYPES = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_UNSUPPORTED = (nn.AlphaDropout, nn.FeatureAlphaDropout)
#: Dropout module types and their kind (first match wins; order matters for subclasses).
MODULE_KINDS = (
    (nn.Dropout1d, "channel"),
    (nn.Dropout2d, "channel"),
    (nn.Dropout3d, "channel"),
    (nn.FeatureAlphaDropout, "feature_alpha"),
    (nn.AlphaDropout, "alpha"),
    (DropPath, "sample"),
    (nn.Dropout, "dropout"),
)
ALPHA_KINDS = ("alpha", "feature_alpha")


def module_kind(mod: nn.Module) -> Optional[str]:
    """The dropout kind of a module (``None`` if it is no dropout module).

    Kinds: ``dropout`` (elementwise), ``channel`` (``nn.Dropout1d/2d/3d``), ``sample`` (:class:`DropPath`),
    ``alpha`` and ``feature_alpha`` (the affine mask law of theory.md section 4.5).

    Raises:
        TypeError: ``mod`` is not an ``nn.Module`` instance (e.g. the class ``nn.Dropout`` itself).

    Example:
        >>> from torch import nn
        >>> module_kind(nn.Dropout2d(0.1)), module_kind(nn.Linear(2, 2))
        ('channel', None)
    """
    if not isinstance(mod, nn.Module):
        what = f"the class {mod.__name__}; pass an instance" if isinstance(mod, type) else type(mod).__name__
        raise TypeError(f"module_kind() needs an nn.Module instance, got {what}")
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


def _own_forward(model: nn.Module) -> Dict[str, str]:
    """Dropout modules of a subclass with its own ``forward``: their mask law may not be their base's."""
    out = {}
    for k, m in model.named_modules():
        base = next((cls for cls, _ in MODULE_KINDS if isinstance(m, cls)), None)
        if base is not None and type(m) is not base and type(m).forward is not base.forward:
            out[k] = f"{type(m).__name__} (a {base.__name__} with its own forward)"
    return out


def warn_own_forward(model: nn.Module, where: str) -> None:
    """A ``RuntimeWarning`` naming the dropout modules :func:`_own_forward` finds."""
    own = _own_forward(model)
    if own:
        warnings.warn(
            f"{where}: dropout modules whose class overrides forward are analysed with their base class's mask law "
            "on their input (their own forward is not run): "
            + "; ".join(f"{k!r}: {v}" for k, v in own.items())
            + ". If that forward draws another mask (shared over an axis, locked over time), the numbers are wrong.",
            RuntimeWarning,
            stacklevel=3,
        )


def _rnn_dropout(model: nn.Module) -> Dict[str, str]:
    """Dropout between the layers of ``nn.RNN/LSTM/GRU``: inside a fused kernel, no explicit mask possible."""
    return {
        k: f"{type(m).__name__} inter-layer dropout (p={m.dropout}), inside a fused kernel"
        for k, m in model.named_modules()
        if isinstance(m, nn.RNNBase) and m.dropout > 0 and m.num_layers > 1
    }


def find_dropout(model: nn.Module, layers: Optional[Sequence[str]] = None, *, all_kinds: bool = False) -> Dict[str, nn.Module]:
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
