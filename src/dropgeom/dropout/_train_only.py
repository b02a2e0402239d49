"""Dropout that runs only in training mode, which dropgeom's eval-mode passes cannot see (theory.md section 4).

dropgeom finds the dropout that is not a module by one eval-mode forward pass. A custom ``forward``
that decides in Python whether to drop -- ``F.scaled_dot_product_attention(q, k, v,
dropout_p=self.p if self.training else 0.0)`` (the usual way to write it), ``if self.training:
x = F.dropout(x, p)`` -- calls no dropout in eval mode, so that dropout would be left out in
silence. :func:`warn_train_only` runs one more pass with the model's modules in training mode
(dropout modules and normalisation layers kept in eval mode, every dropout call the identity, the
random state, the buffers and the training flags restored) and warns, naming each site that only
this pass meets. Only models with modules outside ``torch.nn`` are probed: ``torch.nn``'s own
forwards call dropout through modules or with ``training`` as an argument.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .._evaluation import autodiff_kernels
from .._intercept import _FUNCTIONAL, _SIGS, MODULE_DROPOUT, DropoutInterceptor, DropoutSite
from .kinds import module_kind

__all__ = ["probe_training_mode", "warn_train_only"]

Found = Tuple[Dict[str, str], Dict[str, str], Dict[str, str]]

_KEEP_EVAL = (nn.modules.batchnorm._NormBase,)
# {model: {(input shapes and dtypes, eval-mode site names): train-only sites}}: one probe per model and input
# signature, so a training loop calling the penalty every step pays for one extra forward pass once.
_PROBED: "weakref.WeakKeyDictionary[nn.Module, Dict[tuple, Found]]" = weakref.WeakKeyDictionary()


#: Random draws by which a custom ``forward`` may drop in training mode (timm's ``DropPath``:
#: ``x.new_empty(shape).bernoulli_(keep)``; torchvision's ``stochastic_depth``: ``torch.empty(...).bernoulli_``).
_RANDOM = {
    torch.bernoulli: "torch.bernoulli",
    Tensor.bernoulli_: "Tensor.bernoulli_",
    torch.rand: "torch.rand",
    torch.rand_like: "torch.rand_like",
    torch.randn: "torch.randn",
    torch.randn_like: "torch.randn_like",
    Tensor.uniform_: "Tensor.uniform_",
    Tensor.normal_: "Tensor.normal_",
}


class _TrainingProbe(DropoutInterceptor):
    """Records the sites met; ``never``: functional dropout called with ``training=False`` although
    the module calling it is in training mode (torch never drops there); ``random``: the modules that
    draw random numbers themselves (stochastic regularisation dropgeom cannot make a mask of)."""

    def __init__(self, model: nn.Module, record: Dict[str, DropoutSite]) -> None:
        super().__init__(model, record=record)
        self.never: Dict[str, str] = {}
        self.random: Dict[str, str] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        what = _RANDOM.get(func)
        if what is not None and self._attn is None:
            self.random.setdefault(self._owner or "<root>", what)
        return super().__torch_function__(func, types, args, kwargs)

    def _functional(self, func, args, kwargs):
        b = _SIGS[func].bind(*args, **kwargs)
        b.apply_defaults()
        owner = self._mods.get(self._owner)
        skip = self._attn is not None or isinstance(owner, MODULE_DROPOUT) or float(b.arguments["p"]) == 0.0
        if not skip and owner is not None and owner.training and not b.arguments["training"]:
            fname = _FUNCTIONAL[func]
            name = f"{self._owner}#{fname}{self._counts.get((self._owner, fname), 0)}"
            self.never[name] = f"{name!r}: F.{fname}(p={float(b.arguments['p']):g}, training=False)"
        return super()._functional(func, args, kwargs)


def _torch_only(model: nn.Module) -> bool:
    """Every module is a ``torch.nn`` class: their forwards call dropout only through modules (MHA aside) or
    with ``training`` as an argument, never branching on ``self.training`` (no probe needed)."""
    return all(type(m).__module__.startswith("torch.nn.") for m in model.modules())


def probe_training_mode(model: nn.Module, args: Tuple[Tensor, ...], eval_sites: Mapping[str, DropoutSite]) -> Found:
    """``(train-only sites, never-dropping sites, random draws)``, each ``{name: description}``: the dropout
    a training-mode pass meets and ``eval_sites`` lacks, the functional dropout in ``eval_sites`` that is
    called with ``training=False`` even in training mode (torch never drops there, dropgeom would), and
    ``{module: the random draw}`` for each module that draws random numbers itself (its own stochastic
    depth or noise: no explicit mask, left out).

    A model whose training-mode pass fails on these inputs gives ``({}, {}, {})`` (nothing can be said).
    """
    if _torch_only(model):
        return {}, {}, {}
    key = (tuple((tuple(getattr(a, "shape", ())), getattr(a, "dtype", type(a))) for a in args), tuple(sorted(eval_sites)))
    cache = _PROBED.setdefault(model, {})
    if key not in cache:
        cache[key] = _probe(model, args, eval_sites)
    return cache[key]


def _probe(model: nn.Module, args: Tuple[Tensor, ...], eval_sites: Mapping[str, DropoutSite]) -> Found:
    """The training-mode pass of :func:`probe_training_mode` (uncached)."""
    flags = [(m, m.training) for m in model.modules()]
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    seen: Dict[str, DropoutSite] = {}
    devices = sorted({q.device.index or 0 for q in model.parameters() if q.device.type == "cuda"})
    try:
        for m in model.modules():
            m.training = not (module_kind(m) is not None or isinstance(m, _KEEP_EVAL))
        with torch.no_grad(), torch.random.fork_rng(devices=devices), autodiff_kernels():
            with _TrainingProbe(model, seen) as probe:
                model(*args)
    except Exception:  # noqa: BLE001 -- a probe only: the eval-mode analysis goes on regardless
        return {}, {}, {}
    finally:
        for m, flag in flags:
            m.training = flag
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)
    left = {k: f"{s.kind} dropout (p={s.p:g}) in module {s.owner or '<root>'!r}" for k, s in seen.items() if k not in eval_sites}
    return left, {k: v for k, v in probe.never.items() if k in eval_sites}, dict(probe.random)


def warn_train_only(
    model: nn.Module,
    args: Tuple[Tensor, ...],
    eval_sites: Mapping[str, DropoutSite],
    where: str,
    chosen: Optional[Sequence[str]] = None,
) -> None:
    """A ``RuntimeWarning`` naming the dropout that only a training-mode pass meets, and one naming the
    functional dropout called with ``training=False`` in training mode too (see the module docstring).
    ``chosen``: the layers the caller named (``None``: all); then only those are named, train-only ones not."""
    left, never, random = probe_training_mode(model, args, eval_sites)
    if chosen is not None:
        left, never, random = {}, {k: v for k, v in never.items() if k in chosen}, {}
    if random:
        warnings.warn(
            f"{where}: modules that draw random numbers themselves in training mode (their own stochastic depth, "
            "DropPath or noise, e.g. timm's DropPath) are left out, evaluated as in eval mode: "
            + "; ".join(f"{k!r} ({v})" for k, v in random.items())
            + ". Use dropgeom.dropout.DropPath / StochasticDepth or nn.Dropout to include them.",
            RuntimeWarning,
            stacklevel=3,
        )
    if never:
        warnings.warn(
            f"{where}: functional dropout called with training=False even when its module is in training mode "
            "never drops in torch, but dropgeom counts it as a dropout site: "
            + "; ".join(never.values())
            + ". Pass training=self.training to make it dropout, or leave it out with layers=.",
            RuntimeWarning,
            stacklevel=3,
        )
    if left:
        warnings.warn(
            f"{where}: dropout that the model's forward runs only in training mode (e.g. "
            "dropout_p=p if self.training else 0.0) is left out: "
            + "; ".join(left.values())
            + ". dropgeom finds dropout by an eval-mode pass; to include it pass the drop probability "
            "unconditionally with training=self.training (F.dropout) or use an nn.Dropout module.",
            RuntimeWarning,
            stacklevel=3,
        )
