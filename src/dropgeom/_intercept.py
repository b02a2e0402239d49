r"""Dropout that is not an ``nn.Dropout`` module, made explicit (theory.md section 4).

PyTorch drops activations in places no module hook can see:

* ``torch.nn.functional.dropout`` (and ``dropout1d/2d/3d``, ``alpha_dropout``,
  ``feature_alpha_dropout``) called inside a custom ``forward``;
* the attention weights of ``nn.MultiheadAttention`` (its ``dropout`` is a float,
  applied inside ``F.multi_head_attention_forward``);
* ``F.scaled_dot_product_attention(..., dropout_p=...)``.

:class:`DropoutInterceptor` is a ``torch.overrides.TorchFunctionMode`` active
during dropgeom's evaluations (:func:`dropgeom.manifold.eval_mode`). Each such
call is a *dropout site* named after the module running it:

* ``"<module>"`` for the attention weights of an ``nn.MultiheadAttention``;
* ``"<module>#dropout<i>"`` (``#dropout1d<i>``, ``#alpha_dropout<i>``, ...) for the
  ``i``-th functional dropout call in that module's own ``forward`` (``<module>`` is
  empty for the root model);
* ``"<module>#sdpa<i>"`` for the ``i``-th ``scaled_dot_product_attention`` call with
  ``dropout_p > 0``.

A site with a mask in ``masks`` applies it explicitly (``h~ = h * m``; for attention
the post-softmax weights are multiplied: ``A~ = softmax(q k^T / sqrt(d) + bias) * m``,
then ``A~ v``). A site without a mask is the identity (eval mode) and, when
``warn=True``, a ``RuntimeWarning`` names it and says that the quantity leaves it
out -- never silence. Hand-written: no library turns these calls into explicit
masks.

Example:
    >>> import torch
    >>> import torch.nn.functional as F
    >>> from torch import nn
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.lin = nn.Linear(3, 2)
    ...     def forward(self, x):
    ...         return self.lin(F.dropout(x, 0.5, self.training))
    >>> net = Net()
    >>> seen = {}
    >>> with DropoutInterceptor(net, record=seen):
    ...     _ = net(torch.ones(4, 3))
    >>> {k: (s.kind, s.p, tuple(s.unit_shape)) for k, s in seen.items()}
    {'#dropout0': ('dropout', 0.5, (3,))}
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import math
import threading
import warnings
from typing import Dict, Iterator, List, Mapping, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DropoutSite",
    "DropoutInterceptor",
    "ALPHA",
    "alpha_affine",
    "alpha_mode",
    "LazyMasks",
    "MODULE_DROPOUT",
    "reused_dropout_error",
    "SiteRecord",
]

#: SELU's ``-lambda * alpha``: the value a dropped unit of alpha dropout takes before the affine correction.
ALPHA = 1.7580993408473766

#: torch.nn dropout modules: their own ``F.dropout`` calls are handled by module hooks, not here.
MODULE_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)

_FUNCTIONAL = {
    F.dropout: "dropout",
    F.dropout1d: "dropout1d",
    F.dropout2d: "dropout2d",
    F.dropout3d: "dropout3d",
    F.alpha_dropout: "alpha_dropout",
    F.feature_alpha_dropout: "feature_alpha_dropout",
}
_SIGS = {f: inspect.signature(f) for f in list(_FUNCTIONAL) + [F.multi_head_attention_forward]}
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class DropoutSite(NamedTuple):
    """One dropout call found during a forward pass.

    ``kind``: ``dropout`` (elementwise), ``channel`` (``dropout1d/2d/3d``, unit = channel),
    ``alpha``, ``feature_alpha`` or ``attention`` (post-softmax attention weights, unit
    shape ``[heads, L, S]``); ``owner``: the qualified name of the module whose
    ``forward`` made the call; ``unit_shape``: the per-sample mask shape.
    """

    name: str
    kind: str
    p: float
    owner: str
    unit_shape: torch.Size


def reused_dropout_error(name: str, what: str) -> ValueError:
    """The error for a dropout module run more than once in one forward pass (one explicit mask per
    module cannot stand for torch's independent mask at each call).

    Example:
        >>> "'enc.drop'" in str(reused_dropout_error("enc.drop", "nn.Dropout"))
        True
    """
    return ValueError(
        f"dropout module {name!r} ({what}) runs more than once in one forward pass: torch draws an independent "
        "mask at each call, but dropgeom gives a module one explicit mask (it would reuse it at every call and "
        "get the gap, terms and penalty wrong). Use a separate dropout module for each call."
    )


def alpha_affine(p: float) -> Tuple[float, float]:
    """``(a, c)`` of alpha dropout: ``h~ = a (b h - ALPHA (1 - b)) + c`` with ``b ~ Bernoulli(1 - p)``.

    ``a = ((1 - p)(1 + p ALPHA^2))^{-1/2}``, ``c = a ALPHA p`` (torch's ``alpha_dropout``;
    it keeps zero mean and unit variance of standardised inputs).

    Example:
        >>> a, c = alpha_affine(0.0)
        >>> a, c
        (1.0, 0.0)
    """
    a = 1.0 / math.sqrt((ALPHA * ALPHA * p + 1.0) * (1.0 - p))
    return a, a * ALPHA * p


#: How alpha dropout reads an explicit mask (:func:`alpha_mode`); per thread / task.
_ALPHA_MODE: contextvars.ContextVar[str] = contextvars.ContextVar("dropgeom_alpha_mode", default="law")
ALPHA_MODES = ("law", "line", "scale")


@contextlib.contextmanager
def alpha_mode(mode: str) -> Iterator[None]:
    """How :func:`apply_mask` reads an alpha-dropout mask ``m`` for the duration (theory.md section 4.5).

    * ``"law"`` (default): torch's law at the layer's ``p``, ``h~ = a (b h - ALPHA (1 - b)) + c``,
      ``b = m (1 - p)`` (what ``gap`` and ``mixture`` sample);
    * ``"line"``: the ``p -> 0`` mask line ``h~ = m (h + ALPHA) - ALPHA`` (``m = 1``: eval mode,
      ``m = 0``: the dropped value ``-ALPHA``), along which ``terms`` and ``penalty`` differentiate;
    * ``"scale"``: ``h~ = m h``, whose mask derivative ``g_j h_j`` gives the drift term.

    A ``contextvars`` variable: other threads keep their own mode.

    Raises:
        ValueError: an unknown mode.

    Example:
        >>> import torch
        >>> h, m = torch.tensor([[0.5]]), torch.tensor([[0.0]])
        >>> with alpha_mode("line"):
        ...     round(apply_mask("alpha", h, m, 0.2, "a").item(), 4)
        -1.7581
    """
    if mode not in ALPHA_MODES:
        raise ValueError(f"alpha_mode: mode must be one of {ALPHA_MODES}, got {mode!r}")
    token = _ALPHA_MODE.set(mode)
    try:
        yield
    finally:
        _ALPHA_MODE.reset(token)


def _kind_of(fname: str) -> str:
    if fname == "dropout":
        return "dropout"
    if fname.startswith("dropout"):
        return "channel"
    return "alpha" if fname == "alpha_dropout" else "feature_alpha"


def unit_shape(kind: str, h: Tensor) -> torch.Size:
    """Per-sample mask shape of a dropout of ``kind`` acting on ``h`` (leading sample axis)."""
    if kind in ("channel", "feature_alpha"):
        return torch.Size([h.shape[1]])
    if kind == "sample":
        return torch.Size([])
    return h.shape[1:]


def apply_mask(kind: str, h: Tensor, m: Tensor, p: float, name: str) -> Tensor:
    """``h~`` for a dropout of ``kind`` at explicit mask ``m`` (``[n or 1, *unit_shape]``).

    Multiplicative kinds: ``h * m``. Alpha kinds: ``m = b / (1 - p)`` as for the others,
    and ``h~ = a (b h - ALPHA (1 - b)) + c`` (:func:`alpha_affine`), or the mask line /
    scaling of :func:`alpha_mode`.
    """
    shape = unit_shape(kind, h)
    if m.dim() != len(shape) + 1 or tuple(m.shape[1:]) != tuple(shape):
        raise ValueError(
            f"mask for dropout layer {name!r} must have shape [n or 1, {', '.join(map(str, shape))}], got {tuple(m.shape)}"
        )
    if m.shape[0] not in (1, h.shape[0]):
        raise ValueError(f"mask for layer {name!r} has {m.shape[0]} rows for a batch of {h.shape[0]} samples")
    m = m.reshape(*m.shape, *([1] * (h.dim() - m.dim())))
    if kind in ("alpha", "feature_alpha"):
        mode = _ALPHA_MODE.get()
        if mode == "line":
            return m * (h + ALPHA) - ALPHA
        if mode == "scale":
            return h * m
        a, c = alpha_affine(p)
        b = m * (1.0 - p)
        return a * (b * h - ALPHA * (1.0 - b)) + c
    return h * m


def _attention(q: Tensor, k: Tensor, v: Tensor, attn_mask, is_causal: bool, scale, gqa: bool, m: Tensor) -> Tensor:
    """``(softmax(q k^T * scale + bias) * m) v``: SDPA's math back-end with an explicit dropout mask."""
    if gqa and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
    s = (1.0 / math.sqrt(q.shape[-1])) if scale is None else scale
    logits = (q @ k.transpose(-2, -1)) * s
    L, S = q.shape[-2], k.shape[-2]
    if is_causal:
        keep = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        logits = logits.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask
    w = torch.softmax(logits, -1)
    m = m.reshape(*m.shape[:1], *([1] * (w.dim() - m.dim())), *m.shape[1:])
    return (w * m) @ v


class SiteRecord(dict):
    """``{site name: DropoutSite}`` (a ``record`` for :class:`DropoutInterceptor`) that also keeps, in
    ``inputs``, the input of each functional dropout site (whose first axis must be the samples)."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: Dict[str, Tensor] = {}


class LazyMasks(dict):
    """``{site name: mask}`` that creates an all-ones mask (requiring grad) for every site met.

    Given as ``masks`` to :class:`DropoutInterceptor` (or ``eval_mode``), every attention /
    functional dropout site of the forward pass is multiplied by a fresh ``[n, *unit_shape]``
    mask of ones, so derivatives with respect to the masks of sites that are found only by
    running the model come from the same pass (the penalty's generic path). ``inputs[name]``
    keeps the site's input ``h`` (functional sites).
    """

    def __init__(self, n: int, dtype: torch.dtype, device: Optional[torch.device]) -> None:
        super().__init__()
        self.n, self.dtype, self.device = n, dtype, device
        self.inputs: Dict[str, Tensor] = {}

    def create(self, name: str, shape: torch.Size, h: Tensor) -> Tensor:
        """The ones mask of site ``name`` (made on the first call)."""
        if name not in self:
            self[name] = torch.ones(self.n, *shape, dtype=self.dtype, device=self.device, requires_grad=True)
            self.inputs[name] = h
        return self[name]


# F.multi_head_attention_forward checks ``F.has_torch_function`` (a module global) before its body;
# while a masked MHA call runs that check must say False *in this thread only*. The global is swapped
# for a guard that consults a thread-local counter while any thread needs it (reference-counted under
# a lock), so other threads see torch's own answer throughout. Hand-written: torch offers no per-call switch.
_BYPASS = threading.local()
_BYPASS_LOCK = threading.Lock()
_BYPASS_USERS = [0]
_HAS_TORCH_FUNCTION = F.has_torch_function


def _guarded_has_torch_function(*args) -> bool:
    if getattr(_BYPASS, "depth", 0):
        return False
    return _HAS_TORCH_FUNCTION(*args)


@contextlib.contextmanager
def _bypass_override_check() -> Iterator[None]:
    with _BYPASS_LOCK:
        if _BYPASS_USERS[0] == 0:
            F.has_torch_function = _guarded_has_torch_function
        _BYPASS_USERS[0] += 1
    _BYPASS.depth = getattr(_BYPASS, "depth", 0) + 1
    try:
        yield
    finally:
        _BYPASS.depth -= 1
        with _BYPASS_LOCK:
            _BYPASS_USERS[0] -= 1
            if _BYPASS_USERS[0] == 0:
                F.has_torch_function = _HAS_TORCH_FUNCTION


class DropoutInterceptor(torch.overrides.TorchFunctionMode):
    """Turn functional and attention dropout into explicit masks (see the module docstring).

    Args:
        model: the network (its modules name the sites).
        masks: ``{site name: mask [n or 1, *unit_shape]}`` to apply, or a :class:`LazyMasks`
            that gives every site met an all-ones mask.
        record: a dict filled with ``{site name: DropoutSite}`` for every site seen.
        warn: warn about every site evaluated without a mask.
    """

    def __init__(
        self,
        model: Optional[nn.Module],
        masks: Optional[Mapping[str, Tensor]] = None,
        record: Optional[Dict[str, DropoutSite]] = None,
        warn: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.masks = masks if isinstance(masks, LazyMasks) else dict(masks or {})
        self.record = record
        self.warn = warn
        self._stack: List[str] = []
        self._counts: Dict[Tuple[str, str], int] = {}
        self._handles: List = []
        self._depth = 0
        self._attn: Optional[Tuple[str, int]] = None  # inside an MHA call with a mask: (site, heads)
        self._attention_calls: set = set()  # the nn.MultiheadAttention sites run in this pass
        self._names = {id(m): k for k, m in model.named_modules()} if model is not None else {}
        self._mods = dict(model.named_modules()) if model is not None else {}

    # -- which module is running ------------------------------------------------
    def __enter__(self):
        self._depth += 1
        if self._depth > 1:  # re-entered for an attention call with a mask
            return super().__enter__()
        names_needed = self.masks or isinstance(self.masks, LazyMasks) or self.record is not None or self.warn
        if self.model is not None and names_needed:
            for mod in self._mods.values():
                self._handles.append(mod.register_forward_pre_hook(self._push))
                self._handles.append(mod.register_forward_hook(self._pop, always_call=True))
        self._counts.clear()
        self._attention_calls.clear()
        return super().__enter__()

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth > 0:
            return super().__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._stack.clear()
        return super().__exit__(*exc)

    def _push(self, mod: nn.Module, args) -> None:
        self._stack.append(self._names.get(id(mod), "?"))

    def _pop(self, mod: nn.Module, args, out) -> None:
        if self._stack:
            self._stack.pop()

    @property
    def _owner(self) -> str:
        return self._stack[-1] if self._stack else ""

    def _site(self, tag: str) -> str:
        owner = self._owner
        i = self._counts.get((owner, tag), 0)
        self._counts[(owner, tag)] = i + 1
        return f"{owner}#{tag}{i}"

    def _seen(self, name: str, kind: str, p: float, shape: torch.Size, what: str, h: Tensor) -> Optional[Tensor]:
        if self.record is not None and name not in self.record:
            self.record[name] = DropoutSite(name, kind, float(p), self._owner, torch.Size(shape))
            if isinstance(self.record, SiteRecord) and kind != "attention":
                self.record.inputs[name] = h
        mask = self.masks.create(name, torch.Size(shape), h) if isinstance(self.masks, LazyMasks) else self.masks.get(name)
        if mask is None and self.warn:
            where = f"module {self._owner!r}" if self._owner else "the model's forward"
            warnings.warn(
                f"{what} (p={float(p):g}) in {where} is not an nn.Dropout module and gets no explicit mask "
                f"here: this quantity leaves it out (evaluated as identity). dropgeom.dropout.gap, terms, "
                f"mixture and penalty include it as layer {name!r}.",
                RuntimeWarning,
                stacklevel=3,
            )
        return mask

    # -- the interception ---------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FUNCTIONAL:
            return self._functional(func, args, kwargs)
        if func is F.scaled_dot_product_attention:
            return self._sdpa(func, args, kwargs)
        if func is F.multi_head_attention_forward:
            return self._mha(func, args, kwargs)
        return func(*args, **kwargs)

    def _functional(self, func, args, kwargs):
        b = _SIGS[func].bind(*args, **kwargs)
        b.apply_defaults()
        h, p = b.arguments["input"], float(b.arguments["p"])
        owner_mod = self._mods.get(self._owner)
        if self._attn is not None and func is F.dropout:  # MHA's need_weights path: weights [n*heads, L, S]
            name, heads = self._attn
            mask = self.masks[name]
            L, S = h.shape[-2:]
            m = mask.expand(h.shape[0] // heads, heads, L, S) if mask.shape[0] == 1 else mask
            return h * m.reshape(h.shape)
        if isinstance(owner_mod, MODULE_DROPOUT) or p == 0.0:
            return func(*args, **kwargs)  # a dropout module (hooks handle it) or no dropout at all
        fname = _FUNCTIONAL[func]
        kind = _kind_of(fname)
        name = self._site(fname)
        mask = self._seen(name, kind, p, unit_shape(kind, h), f"F.{fname}", h)
        if mask is None:
            return h  # eval mode: the identity
        return apply_mask(kind, h, mask, p, name)

    def _sdpa(self, func, args, kwargs):
        b = dict(zip(_SDPA_ARGS, args))
        b.update(kwargs)
        p = float(b.get("dropout_p", 0.0) or 0.0)
        if p == 0.0:
            return func(*args, **kwargs)
        q, k = b["query"], b["key"]
        if self._attn is not None:
            name = self._attn[0]
            mask = self.masks[name]
        else:
            name = self._site("sdpa")
            mask = self._seen(
                name, "attention", p, torch.Size([*q.shape[1:-1], k.shape[-2]]), "scaled_dot_product_attention dropout", q
            )
        if mask is None:
            return (
                func(*args, **{**kwargs, "dropout_p": 0.0})
                if "dropout_p" in kwargs
                else func(*args[:4], 0.0, *args[5:], **kwargs)
            )
        return _attention(
            q,
            k,
            b["value"],
            b.get("attn_mask"),
            bool(b.get("is_causal", False)),
            b.get("scale"),
            bool(b.get("enable_gqa", False)),
            mask,
        )

    def _mha(self, func, args, kwargs):
        b = _SIGS[func].bind(*args, **kwargs)
        b.apply_defaults()
        p = float(b.arguments["dropout_p"])
        if p == 0.0 or self._attn is not None:
            return func(*args, **kwargs)
        owner_mod = self._mods.get(self._owner)
        name = self._owner if isinstance(owner_mod, nn.MultiheadAttention) else self._site("mha")
        if name in self._attention_calls:
            raise reused_dropout_error(name, "nn.MultiheadAttention attention-weight dropout")
        self._attention_calls.add(name)
        q, k = b.arguments["query"], b.arguments["key"]
        heads = int(b.arguments["num_heads"])
        if q.dim() != 3:
            raise ValueError(f"attention dropout of {name!r}: unbatched inputs are not supported; add a batch axis")
        s = k.shape[0] + (b.arguments["bias_k"] is not None) + bool(b.arguments["add_zero_attn"])
        mask = self._seen(name, "attention", p, torch.Size([heads, q.shape[0], s]), "attention-weight dropout", q)
        if mask is None:
            return func(*args, **kwargs)
        b.arguments["training"] = True
        self._attn = (name, heads)
        # Run the body of F.multi_head_attention_forward with this mode active so that its
        # inner dropout / SDPA call reaches us; its own override check is bypassed for the
        # duration, in this thread only (it would dispatch back here).
        try:
            with _bypass_override_check(), self:
                return func(*b.args, **b.kwargs)
        finally:
            self._attn = None
