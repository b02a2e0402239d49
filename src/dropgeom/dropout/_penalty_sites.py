"""Which dropout layers the penalty takes, and the forward pass its strategies share (theory.md section 4.4).

Every dropout site is taken (as :func:`~dropgeom.dropout.dropout_sites` lists them): dropout
modules of every kind (``nn.Dropout``, channel dropout, ``DropPath``, alpha dropout) and the
dropout that is not a module -- attention weights of ``nn.MultiheadAttention``,
``F.dropout``-family calls in a custom ``forward``, ``scaled_dot_product_attention(dropout_p>0)``.
Sites that are not modules are found only by running the model, so the generic strategy's
forward pass multiplies every site by an all-ones mask that requires grad
(:class:`~dropgeom._intercept.LazyMasks`, module hooks for modules): the derivatives with
respect to every mask come from that one pass. Alpha dropout is differentiated along its
mask line ``h~ = m (h + ALPHA) - ALPHA`` (:func:`~dropgeom._intercept.alpha_mode`, theory.md
section 4.5).

The chain fast path (``_penalty_chain``) is taken only when every requested layer is a
multiplicative ``torch.nn`` dropout module of a top-level ``nn.Sequential`` and no other
dropout would be left out: with ``layers=None`` a model holding other dropout modules or
attention dropout goes the generic way, and a model with custom modules has its chain pass
watched for functional dropout (found: the generic way).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .._intercept import DropoutInterceptor, DropoutSite, LazyMasks, alpha_mode, apply_mask, reused_dropout_error
from .._intercept import unit_shape as kind_unit_shape
from ..manifold import check_inputs_match, eval_mode
from .chain import Chain, as_chain, run_chain, training_off
from ._train_only import _torch_only, warn_train_only
from .kinds import DROPOUT_TYPES, _rnn_dropout, module_kind, warn_own_forward
from .masks import PSpec, resolve_p, site_p
from .sites import check_sample_axis

__all__: List[str] = []


class Recorded(NamedTuple):
    """The shared forward pass: layer names (in order), their ``p`` and kind, the clean output
    ``eta``, each layer's input ``h`` (``None`` where not recorded), and (generic path) each
    layer's all-ones mask in the graph of ``eta`` (``chain`` set instead on the chain path)."""

    names: List[str]
    ps: Dict[str, float]
    kinds: Dict[str, str]
    eta: Tensor
    hs: Dict[str, Optional[Tensor]]
    masks: Dict[str, Tensor]
    chain: Optional[Chain]


def _requested(model: nn.Module, layers: Optional[Sequence[str]]) -> Tuple[Dict[str, nn.Module], Optional[List[str]]]:
    """``(dropout modules, requested names or None)``; unknown names are refused before any pass."""
    named = dict(model.named_modules())
    modules = {k: m for k, m in named.items() if module_kind(m) is not None}
    if layers is None:
        return modules, None
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise ValueError("layers is empty: name at least one dropout layer")
    for k in names:
        site_like = "#" in k or isinstance(named.get(k), nn.MultiheadAttention)
        if k not in modules and not site_like:
            what = f"a {type(named[k]).__name__}, not a dropout layer" if k in named else "unknown"
            raise ValueError(f"layer name {k!r} is {what}; the model's dropout modules are {list(modules)}")
    return modules, names


def _chain_candidate(model: nn.Module, modules: Dict[str, nn.Module], wanted: Optional[List[str]]) -> Optional[List[str]]:
    """The module names the chain path would take, if every requested layer is multiplicative."""
    if wanted is not None:
        return wanted if all(k in modules and isinstance(modules[k], DROPOUT_TYPES) for k in wanted) else None
    if not modules or not all(isinstance(m, DROPOUT_TYPES) for m in modules.values()):
        return None
    if any(isinstance(m, nn.MultiheadAttention) and m.dropout > 0 for m in model.modules()):
        return None
    return list(modules)


def record(model: nn.Module, args: Tuple[Tensor, ...], layers: Optional[Sequence[str]], p: PSpec, fast: bool) -> Recorded:
    """Choose the strategy's layers and run the one forward pass they share (see the module docstring).

    Raises:
        ValueError: no dropout at all, an unknown or never-run layer, ``p`` outside ``[0, 1)``
            (or imposed on alpha dropout), a dropout module run more than once in the forward pass.

    Warns:
        RuntimeWarning: (``layers=None``) dropout the forward runs only in training mode is left out.
    """
    modules, wanted = _requested(model, layers)
    warn_own_forward(model, "penalty")
    if wanted is None and _rnn_dropout(model):
        warnings.warn(
            "penalty: dropout inside a fused RNN kernel cannot be made an explicit mask and is left out: "
            + "; ".join(f"{k!r}: {v}" for k, v in _rnn_dropout(model).items()),
            RuntimeWarning,
            stacklevel=4,
        )
    names = _chain_candidate(model, modules, wanted) if fast and len(args) == 1 else None
    chain_mods = as_chain(model, names) if names else None
    if chain_mods is not None and names is not None:
        seen: Dict[str, DropoutSite] = {}
        watch = DropoutInterceptor(model, record=seen) if wanted is None and not _torch_only(model) else None
        try:
            with training_off(model), watch if watch is not None else contextlib.nullcontext():
                chain = run_chain(model, chain_mods, args[0], names)
        except RuntimeError as err:  # name the input whose dtype / device does not fit, if that is why
            check_inputs_match(model, args, err)
            raise
        if chain is not None and not seen:
            if watch is not None:
                warn_train_only(model, args, seen, "penalty")
            ps = resolve_p({k: modules[k] for k in names}, p)
            hs: Dict[str, Optional[Tensor]] = {k: chain.h(k) for k in names}
            kinds = {k: str(module_kind(modules[k])) for k in names}
            return Recorded(names, ps, kinds, chain.eta, hs, {}, chain)
    return _generic_forward(model, args, modules, wanted, p)


@contextlib.contextmanager
def _module_masks(
    modules: Dict[str, nn.Module], store: Dict[str, Tuple[Tensor, Tensor]], n: int, wanted: Optional[List[str]]
) -> Iterator[None]:
    """Apply a fresh all-ones mask (requiring grad) to each dropout module's input; record ``(h, mask)``.

    Raises:
        ValueError: a module (of ``wanted``, default all) run twice or on an input whose first axis is not the ``n`` samples.
    """
    handles = []

    def make(name: str, mod: nn.Module):
        kind = str(module_kind(mod))

        def hook(module: nn.Module, args: Tuple[Tensor, ...], output: Tensor) -> Tensor:
            h = args[0]
            if name in store:
                raise reused_dropout_error(name, type(module).__name__)
            if wanted is None or name in wanted:
                check_sample_axis(name, h, n)
            m = torch.ones(h.shape[0], *kind_unit_shape(kind, h), dtype=h.dtype, device=h.device, requires_grad=True)
            store[name] = (h, m)
            return apply_mask(kind, h, m, float(module.p), name)

        return hook

    try:
        for name, mod in modules.items():
            handles.append(mod.register_forward_hook(make(name, mod)))
        yield
    finally:
        for h in handles:
            h.remove()


def _generic_forward(
    model: nn.Module, args: Tuple[Tensor, ...], modules: Dict[str, nn.Module], wanted: Optional[List[str]], p: PSpec
) -> Recorded:
    """One eval-mode forward with every dropout module and site multiplied by an all-ones mask."""
    ref = next((q for q in model.parameters() if q.is_floating_point()), None)
    dtype = ref.dtype if ref is not None else args[0].dtype
    lazy = LazyMasks(args[0].shape[0], dtype, ref.device if ref is not None else args[0].device)
    seen: Dict[str, DropoutSite] = {}
    store: Dict[str, Tuple[Tensor, Tensor]] = {}
    try:
        with (
            alpha_mode("line"),
            eval_mode(model, masks=lazy, sites=seen, warn=False),
            _module_masks(modules, store, args[0].shape[0], wanted),
        ):
            eta = model(*args)
    except RuntimeError as err:  # name the input whose dtype / device does not fit, if that is why
        check_inputs_match(model, args, err)
        raise
    sites: Dict[str, DropoutSite] = {}
    for k, m in modules.items():
        if k in store:
            kind = str(module_kind(m))
            sites[k] = DropoutSite(k, kind, float(m.p), k, torch.Size(store[k][1].shape[1:]))
    sites.update(seen)
    if wanted is None:
        warn_train_only(model, args, sites, "penalty")
        if not sites:
            raise ValueError(
                f"{type(model).__name__} has no dropout modules, and its forward pass calls no F.dropout or "
                "attention dropout; add dropout layers"
            )
        names = list(sites)
    else:
        for k in wanted:
            if k in modules and k not in store:
                raise ValueError(f"dropout module {k!r} is never run by the model's forward pass on these inputs")
            if k not in sites:
                raise ValueError(f"unknown layer name {k!r}; the model's dropout layers are {list(sites)}")
        names = wanted
    chosen = {k: sites[k] for k in names}
    ps = site_p(chosen, p)
    kinds = {k: s.kind for k, s in chosen.items()}
    hs = {k: (store[k][0] if k in store else lazy.inputs.get(k)) for k in names}
    masks = {k: (store[k][1] if k in store else lazy[k]) for k in names}
    return Recorded(names, ps, kinds, eta, hs, masks, None)
