"""How dropgeom evaluates a network: every submodule in eval mode, autodiff-friendly kernels, explicit dropout.

:func:`eval_mode` switches every submodule to eval mode (dropout off, weight scaling), reroutes the fused
kernels that have no forward-mode or ``vmap`` rule (:func:`autodiff_kernels`) and intercepts the dropout that
is not a module (``dropgeom._intercept``). :func:`check_inputs_match` names an input whose dtype or device
does not fit the model. :mod:`dropgeom.manifold` re-exports all three.

Example:
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train()
    >>> with eval_mode(net):
    ...     net[1].training
    False
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ._intercept import DropoutInterceptor, DropoutSite
from ._utils import training_off

__all__ = ["eval_mode", "autodiff_kernels", "check_inputs_match", "check_not_meta", "output_numel"]


@contextlib.contextmanager
def eval_mode(
    module: nn.Module,
    *,
    masks: Optional[Mapping[str, Tensor]] = None,
    sites: Optional[Dict[str, DropoutSite]] = None,
    warn: bool = True,
) -> Iterator[None]:
    """Put every submodule in eval mode for the duration, then restore each flag.

    Also switches off PyTorch's fused inference fast paths -- ``nn.MultiheadAttention``,
    ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` (and so ``nn.Transformer``),
    all gated by ``torch.backends.mha`` -- whose kernels have no forward-mode or ``vmap``
    rule; the regular path computes the same function (see :func:`autodiff_kernels`).

    Dropout that is not an ``nn.Dropout`` module -- ``F.dropout`` in a custom ``forward``,
    attention-weight dropout, ``scaled_dot_product_attention(dropout_p>0)`` -- is
    intercepted (``dropgeom._intercept``): a site named in ``masks`` applies that mask,
    every other one is the identity, as in eval mode (``F.dropout(x, p)`` with its
    default ``training=True`` included: dropgeom never draws random masks behind your
    back). ``sites`` collects the sites met; ``warn`` warns about each unmasked one.

    Raises:
        ValueError: ``module`` is not an ``nn.Module``.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train()
        >>> with eval_mode(net):
        ...     net[1].training
        False
        >>> net[1].training
        True
    """
    if not isinstance(module, nn.Module):
        raise ValueError(f"eval_mode needs a torch.nn.Module, got {type(module).__name__}")
    with training_off(module), autodiff_kernels(), DropoutInterceptor(module, masks, sites, warn):
        yield


def _composite_layer_norm(x: Tensor, shape, weight=None, bias=None, eps: float = 1e-5) -> Tensor:
    dims = tuple(range(-len(shape), 0))
    mu = x.mean(dims, keepdim=True)
    var = ((x - mu) ** 2).mean(dims, keepdim=True)
    out = (x - mu) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def _batch_stat_norm(x: Tensor, dims: Tuple[int, ...], weight, bias, eps: float) -> Tensor:
    """Normalise over ``dims`` with batch statistics, then the per-channel affine map (channel axis 1)."""
    mu = x.mean(dims, keepdim=True)
    var = ((x - mu) ** 2).mean(dims, keepdim=True)
    out = (x - mu) * torch.rsqrt(var + eps)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    return out


def _composite_batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    if not training or running_mean is not None or running_var is not None:
        return None  # running statistics used or updated: leave it to the fused kernel
    return _batch_stat_norm(input, (0,) + tuple(range(2, input.dim())), weight, bias, eps)


def _composite_instance_norm(
    input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True, momentum=0.1, eps=1e-5
):
    if not use_input_stats or running_mean is not None or running_var is not None:
        return None
    return _batch_stat_norm(input, tuple(range(2, input.dim())), weight, bias, eps)


def _composite_embedding(
    input, weight, padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False, sparse=False
) -> Optional[Tensor]:
    """``F.embedding`` whose derivative is the same in forward and reverse mode; ``None`` where the kernel's already is.

    The kernel's backward gives the ``padding_idx`` row no gradient (torch's documented convention, which BackPACK
    and curvlinops follow), but its forward-mode derivative moves that row: ``J v`` and ``J^T w`` then belong to two
    different Jacobians (a non-symmetric implicit Fisher). Here that row enters as a constant in both modes.
    ``scale_grad_by_freq`` divides the backward by how often each index occurs in the batch -- a training heuristic,
    not a derivative of the model, and different for one input alone than for a batch -- and ``sparse`` only changes
    the layout of the gradient: both are dropped, so every transform differentiates the function itself."""
    if padding_idx is None and not scale_grad_by_freq and not sparse:
        return None
    if padding_idx is not None:
        row = padding_idx % weight.shape[0]
        constant = torch.zeros(weight.shape[0], 1, dtype=torch.bool, device=weight.device)
        constant[row] = True
        weight = torch.where(constant, weight.detach(), weight)
    return torch.nn.functional.embedding(input, weight, None, max_norm, norm_type)


def _rnn_cell(kind: str, x: Tensor, h: Tensor, c: Optional[Tensor], w: Sequence[Tensor], has_bias: bool):
    """One time step of an RNN / LSTM / GRU layer (torch's gate order and formulas)."""
    w_ih, w_hh = w[0], w[1]
    b_ih, b_hh = (w[2], w[3]) if has_bias else (None, None)
    gi = x @ w_ih.T + (b_ih if b_ih is not None else 0.0)
    gh = h @ w_hh.T + (b_hh if b_hh is not None else 0.0)
    if kind == "lstm":
        i, f, g, o = (gi + gh).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        w_hr = w[4] if len(w) == (5 if has_bias else 3) else None
        if w_hr is not None:
            h = h @ w_hr.T
        return h, c
    if kind == "gru":
        i_r, i_z, i_n = gi.chunk(3, -1)
        h_r, h_z, h_n = gh.chunk(3, -1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return (1.0 - z) * n + z * h, None
    act = torch.tanh if kind == "rnn_tanh" else torch.relu
    return act(gi + gh), None


def _composite_rnn(kind: str, args: tuple, kwargs: dict):
    """``torch.lstm/gru/rnn_*`` (padded, not packed input) from per-step differentiable ops, so
    that ``vmap`` batches per-sample products (the fused kernel has no batching rule); ``None``
    for what it does not cover (packed sequences, training-mode inter-layer dropout)."""
    if kwargs or len(args) != 9 or not isinstance(args[2], (list, tuple)):
        return None
    inp, hx, params, has_bias, layers, dropout, train, bidir, batch_first = args
    if train and dropout > 0 and layers > 1:
        return None
    x = inp.transpose(0, 1) if batch_first else inp  # [T, B, I]
    if kind == "lstm":
        h0, c0 = hx
    else:
        h0, c0 = hx, None
    dirs = 2 if bidir else 1
    per = len(params) // (layers * dirs)
    hs, cs = [], []
    for layer in range(layers):
        outs = []
        for d in range(dirs):
            idx = layer * dirs + d
            w = params[idx * per : (idx + 1) * per]
            h, c = h0[idx], (c0[idx] if c0 is not None else None)
            steps = range(x.shape[0] - 1, -1, -1) if d == 1 else range(x.shape[0])
            seq = [None] * x.shape[0]
            for t in steps:
                h, c = _rnn_cell(kind, x[t], h, c, w, has_bias)
                seq[t] = h
            outs.append(torch.stack(seq))
            hs.append(h)
            if c is not None:
                cs.append(c)
        x = torch.cat(outs, -1) if dirs == 2 else outs[0]
    out = x.transpose(0, 1) if batch_first else x
    if kind == "lstm":
        return out, torch.stack(hs), torch.stack(cs)
    return out, torch.stack(hs)


_RNN_FUNCS = {torch.lstm: "lstm", torch.gru: "gru", torch.rnn_tanh: "rnn_tanh", torch.rnn_relu: "rnn_relu"}


class _CompositeNorms(torch.overrides.TorchFunctionMode):
    """Hand-written (no library does this): computes normalisations with *statistics of the
    input* -- ``F.layer_norm``, ``F.instance_norm`` and ``F.batch_norm`` with batch statistics
    (no running statistics involved) -- from their composite definitions. PyTorch's fused
    kernels (``native_layer_norm``, ``native_batch_norm``) have wrong second-order
    forward-mode derivatives (torch 2.13: forward-over-forward and forward-over-reverse
    ``D2 eta[u, v]`` disagree with finite differences and with reverse-over-reverse);
    the composite ops are differentiated correctly by every transform. Eval-mode batch norm
    (running statistics, an affine map) keeps the fused kernel. Recurrent layers
    (``torch.lstm/gru/rnn_tanh/rnn_relu`` on padded input) run step by step from the same
    differentiable ops, because the fused kernels have no ``vmap`` batching rule: per-sample
    products are then batched instead of looped over samples."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.layer_norm:
            return _composite_layer_norm(*args, **kwargs)
        if func is torch.nn.functional.batch_norm:
            out = _composite_batch_norm(*args, **kwargs)
            if out is not None:
                return out
        if func is torch.nn.functional.instance_norm:
            out = _composite_instance_norm(*args, **kwargs)
            if out is not None:
                return out
        if func is torch.nn.functional.embedding:
            out = _composite_embedding(*args, **kwargs)
            if out is not None:
                return out
        if func in _RNN_FUNCS:
            out = _composite_rnn(_RNN_FUNCS[func], args, kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


@contextlib.contextmanager
def autodiff_kernels() -> Iterator[None]:
    """Route attention and layer norm through kernels that every ``torch.func`` transform differentiates.

    PyTorch's fused inference kernels -- the ``nn.MultiheadAttention`` fast path
    and the flash / memory-efficient ``scaled_dot_product_attention`` back-ends --
    have no forward-mode, double-backward or ``vmap`` rules. Inside this context
    the fast path is off and SDPA uses its math back-end (the same function,
    composed of differentiable ops); both settings are restored on exit.
    Layer, instance and batch-statistics batch norm are computed from their composite
    definitions, because the fused kernels' second-order forward-mode derivatives are
    wrong (see ``_CompositeNorms``).

    Example:
        >>> x, u = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
        >>> ln = lambda z: torch.nn.functional.layer_norm(z, (5,))
        >>> with autodiff_kernels():
        ...     d2 = torch.func.jvp(lambda z: torch.func.jvp(ln, (z,), (u,))[1], (x,), (u,))[1]
        >>> h = 1e-4
        >>> fd = (ln(x + h * u) - 2 * ln(x) + ln(x - h * u)) / h**2
        >>> bool(torch.allclose(d2, fd, atol=1e-5))
        True
    """
    mha = getattr(torch.backends, "mha", None)
    fast = mha.get_fastpath_enabled() if mha is not None else None
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        sdpa = sdpa_kernel(SDPBackend.MATH)
    except ImportError:  # older torch: no backend selection, nothing to route
        sdpa = contextlib.nullcontext()
    try:
        if mha is not None:
            mha.set_fastpath_enabled(False)
        with sdpa, _CompositeNorms():
            yield
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(fast)


def check_inputs_match(model: nn.Module, inputs: Sequence[Tensor], cause: Optional[BaseException] = None) -> None:
    """Raise a clear error if floating-point inputs differ in dtype, or any input in device, from the parameters.

    Without it torch reports ``mat1 and mat2 must have the same dtype`` from deep inside the model.
    dropgeom calls it when a forward pass fails (``cause``: that error), so models that cast their
    inputs themselves keep working.

    Raises:
        ValueError: naming the input, both dtypes (devices) and the fix.

    Example:
        >>> net = nn.Linear(2, 2).double()
        >>> check_inputs_match(net, (torch.zeros(3, 2),))
        Traceback (most recent call last):
        ...
        ValueError: inputs[0] has dtype torch.float32 but the model's parameters are torch.float64; convert one of them, e.g. inputs.to(torch.float64) or model.to(torch.float32)
    """
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    if ref is None:
        return
    for i, t in enumerate(inputs):
        if t.device != ref.device:
            raise ValueError(
                f"inputs[{i}] is on device {t.device} but the model's parameters are on {ref.device}; "
                f"move one of them, e.g. inputs.to({str(ref.device)!r}) or model.to({str(t.device)!r})"
            ) from cause
        if t.is_floating_point() and t.dtype != ref.dtype:
            raise ValueError(
                f"inputs[{i}] has dtype {t.dtype} but the model's parameters are {ref.dtype}; convert one of them, "
                f"e.g. inputs.to({ref.dtype}) or model.to({t.dtype})"
            ) from cause


def check_not_meta(model: nn.Module, inputs: Tuple[Tensor, ...]) -> None:
    """Raise a clear error for parameters, buffers or inputs on the ``meta`` device (shapes without values).

    Raises:
        ValueError: naming the first such tensor and the fix.
    """
    named = [(f"inputs[{i}]", t) for i, t in enumerate(inputs)]
    named += [(f"parameter {k!r}", p) for k, p in model.named_parameters()]
    named += [(f"buffer {k!r}", b) for k, b in model.named_buffers()]
    for what, t in named:
        if t.is_meta:
            raise ValueError(
                f"{what} is on the 'meta' device: it has a shape but no values, and the Fisher information and the "
                "curvature are functions of the values. Materialise the model first (model.to_empty(device='cpu') and "
                "load its weights) and pass real inputs"
            )


def output_numel(model: nn.Module, run: Callable[[], Any]) -> int:
    """Elements of every leaf module's output during ``run()`` (a forward pass of ``model``, without gradients)."""
    sizes: List[int] = []

    def hook(_m: nn.Module, _i: Any, out: Any) -> None:
        sizes.append(out.numel() if isinstance(out, Tensor) else 0)

    leaves = [m for m in model.modules() if not list(m.children())] or [model]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return int(sum(sizes))
