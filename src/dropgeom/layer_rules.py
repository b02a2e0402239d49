r"""Layer rules for the Fisher fast paths: one rule object per module type (theory.md section 2).

A layer rule describes a module whose output at each of ``T`` positions is
affine in its parameters with one shared weight,

.. math::

    o_{it} = W a_{it} + b, \qquad t = 1, \dots, T,

with ``W`` the module's ``weight`` flattened to ``[d_out, d_in]`` and ``b`` its
optional ``bias``. Given the inputs unfolded to ``a`` (``[n, T, d_in]``) and the
columns of the factor ``S`` back-propagated to the outputs, ``g``
(``[R, n, T, d_out]``), the per-sample gradient of column ``r`` is
``G_ir = sum_t g_irt a_it^T`` (bias: ``sum_t g_irt``), so

* the diagonal is ``sum_{i,r} G_ir ** 2`` (:meth:`LayerRule.diagonal`);
* the Kronecker factors are ``A = (1/(nT)) sum_{i,t} a~_it a~_it^T`` and
  ``B = c sum_{i,r,t} g_irt g_irt^T`` (:meth:`LayerRule.kronecker`; KFAC, and KFC
  "expand" for convolutions); the engine calls :meth:`LayerRule.input_factor` once
  and :meth:`LayerRule.gradient_factor` once per column ``r``.

A rule supplies the unfolding and the layout of the output columns; the
arithmetic is shared. :data:`LAYER_RULES` maps module types to rules
(BackPACK's ``module_exts`` pattern); :func:`layer_rule` looks a module up
along its class hierarchy, and :func:`register_layer_rule` adds a type.
Built in: ``nn.Linear`` (inputs ``[n, ..., d_in]``) and ``nn.Conv1d`` /
``nn.Conv2d`` / ``nn.Conv3d`` (``groups=1``, symmetric zero padding).

Example:
    >>> import torch
    >>> from torch import nn
    >>> conv = nn.Conv3d(2, 3, 2)
    >>> rule = layer_rule(conv)
    >>> x = torch.randn(4, 2, 3, 3, 3)
    >>> a = rule.unfold(conv, x)
    >>> a.shape  # [n, T output positions, C_in * prod(kernel)]
    torch.Size([4, 8, 16])
    >>> out = a @ conv.weight.reshape(3, -1).T + conv.bias  # o_t = W a_t + b
    >>> torch.allclose(rule.columns(conv, conv(x).unsqueeze(0))[0], out, atol=1e-6)
    True
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple, Type, TypeVar, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._registry import lookup, register
from .linalg import outer_sum

__all__ = [
    "LayerRule",
    "LinearRule",
    "ConvRule",
    "Conv1dRule",
    "Conv2dRule",
    "Conv3dRule",
    "LAYER_RULES",
    "layer_rule",
    "register_layer_rule",
    "layer_diagonal",
    "diagonal_from_squares",
    "kronecker_factors",
    "input_factor",
    "gradient_factor",
]


def layer_diagonal(
    a: Tensor, g: Tensor, has_bias: bool, scale: float = 1.0, max_bytes: int = 128 * 1024**2
) -> Tuple[Tensor, Optional[Tensor]]:
    """``scale * sum_{i,r} diag(G_ir G_ir^T)`` for one layer, with the per-sample gradient
    ``G_ir = sum_t g_irt a_it^T`` (``[d_out, d_in]``) and bias gradient ``sum_t g_irt``.

    ``T = 1``: ``(sum_r g_ir^2)^T a_i^2`` without per-sample gradients. ``T > 1``
    (convolutions, Linear on ``[n, T, d]``): per-sample gradients in chunks of
    samples (``<= max_bytes`` alive). The diagonal of the Fisher block of theory.md section 2.

    Raises:
        ValueError: ``a`` is not ``[n, T, d_in]``, or ``g`` not ``[R, n, T, d_out]`` with the same ``n`` and ``T``.

    Example:
        >>> a, g = torch.randn(2, 3, 4), torch.randn(1, 2, 3, 5)  # n = 2 inputs, T = 3 positions, 4 -> 5, R = 1
        >>> dw, db = layer_diagonal(a, g, True)
        >>> G = torch.einsum("rnto,nti->rnoi", g, a)  # per-sample gradients G_ir = sum_t g_irt a_it^T
        >>> torch.allclose(dw, G.square().sum((0, 1))), torch.allclose(db, g.sum(2).square().sum((0, 1)))
        (True, True)
    """
    if a.dim() != 3 or g.dim() != 4 or tuple(g.shape[1:3]) != tuple(a.shape[:2]):
        raise ValueError(
            f"layer_diagonal takes a [n, T, d_in] and g [R, n, T, d_out] (the same n and T); "
            f"got {tuple(a.shape)}, {tuple(g.shape)}"
        )
    R, n, T, d_out = g.shape
    if T == 1:
        g0 = g[:, :, 0]
        return diagonal_from_squares(a, (g0 * g0).sum(0) if g0.shape[0] > 1 else g0[0] * g0[0], has_bias, scale)
    d_in = a.shape[2]
    step = max(1, int(max_bytes // max(1, R * d_out * d_in * a.element_size())))
    dw = torch.zeros(d_out, d_in, dtype=a.dtype, device=a.device)
    db = torch.zeros(d_out, dtype=a.dtype, device=a.device) if has_bias else None
    for s in range(0, n, step):
        # per-sample gradients as one batched matmul [c, R*out, T] @ [c, T, in] (about 1.5x faster than
        # the equivalent einsum on conv layers), squared in place
        gc = g[:, s : s + step]
        G = torch.bmm(gc.permute(1, 0, 3, 2).reshape(gc.shape[1], R * d_out, T), a[s : s + step])
        dw += G.square_().sum(0).reshape(R, d_out, d_in).sum(0)
        if db is not None:
            gb = g[:, s : s + step].sum(2)
            db += (gb * gb).sum((0, 1))
    if scale != 1.0:
        dw *= scale
        if db is not None:
            db *= scale
    return dw, db


def diagonal_from_squares(a: Tensor, g2: Tensor, has_bias: bool, scale: float = 1.0) -> Tuple[Tensor, Optional[Tensor]]:
    """:func:`layer_diagonal` of a ``T = 1`` layer from its columns' summed squares ``g2 = sum_r g_r^2`` (``[n, d_out]``).

    ``scale * sum_i g2_i a_i^2`` (weight part) and ``scale * sum_i g2_i`` (bias part): with one position the
    per-sample gradient ``g_ir a_i^T`` is rank one, so the diagonal needs the columns only through ``g2``, which
    the Fisher engine accumulates one column at a time (no ``[R, n, d_out]`` stack; theory.md section 2).

    Raises:
        ValueError: ``a`` is not ``[n, 1, d_in]`` or ``g2`` not ``[n, d_out]``.

    Example:
        >>> a, g = torch.randn(5, 1, 3), torch.randn(4, 5, 1, 2)  # 4 columns, 5 inputs, 3 -> 2
        >>> dw, db = diagonal_from_squares(a, g[:, :, 0].pow(2).sum(0), True)
        >>> ref_w, ref_b = layer_diagonal(a, g, True)
        >>> torch.allclose(dw, ref_w) and torch.allclose(db, ref_b)
        True
    """
    if a.dim() != 3 or a.shape[1] != 1 or g2.dim() != 2 or g2.shape[0] != a.shape[0]:
        raise ValueError(f"diagonal_from_squares takes a [n, 1, d_in] and g2 [n, d_out]; got {tuple(a.shape)}, {tuple(g2.shape)}")
    if scale != 1.0:
        g2 = g2 * scale
    a0 = a[:, 0]
    return g2.T @ (a0 * a0), (g2.sum(0) if has_bias else None)


def input_factor(a: Tensor, has_bias: bool, n: int) -> Tensor:
    """``A = (1/(n T)) sum_{i,t} a~_it a~_it^T`` (``a~ = [a; 1]`` with a bias) by :func:`~dropgeom.linalg.outer_sum`
    (no transposed copy of channel-first patches); the bias row is the sum of the inputs and its corner ``n T``, so no
    column of ones is appended. The input factor of the KFAC block of theory.md section 2.

    Raises:
        ValueError: ``a`` is not ``[n, T, d_in]``; ``n`` is not a positive int.

    Example:
        >>> a = torch.randn(2, 3, 4)  # n = 2 inputs, T = 3 positions, d_in = 4
        >>> at = torch.cat([a, torch.ones(2, 3, 1)], -1)  # a~ = [a; 1]
        >>> torch.allclose(input_factor(a, True, 2), torch.einsum("nti,ntj->ij", at, at) / 6)
        True
    """
    if a.dim() != 3:
        raise ValueError(f"input_factor takes a [n, T, d_in], got {tuple(a.shape)}")
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n (the number of inputs the factor averages over) must be a positive int, got {n!r}")
    T, d = a.shape[1], a.shape[2]
    Aw = outer_sum(a)  # a fresh matrix: scaled in place (no second [d, d])
    if not has_bias:
        return Aw.div_(n * T)
    A = Aw.new_empty(d + 1, d + 1)
    A[:d, :d] = Aw
    A[d, :d] = A[:d, d] = a.sum((0, 1))
    A[d, d] = a.shape[0] * T
    return A.div_(n * T)


def gradient_factor(g: Tensor, scale: float) -> Tensor:
    """``B = scale * sum_{i,r,t} g_irt g_irt^T`` by :func:`~dropgeom.linalg.outer_sum` (a sum over the columns ``r``,
    so it may be accumulated one column at a time). The gradient factor of the KFAC block of theory.md section 2.

    Raises:
        ValueError: ``g`` has fewer than 2 dims (from :func:`~dropgeom.linalg.outer_sum`).

    Example:
        >>> g = torch.randn(1, 2, 3, 5)  # R = 1 column, n = 2, T = 3, d_out = 5
        >>> torch.allclose(gradient_factor(g, 0.5), 0.5 * torch.einsum("rnti,rntj->ij", g, g))
        True
    """
    return outer_sum(g).mul_(scale)  # a fresh matrix: scaled in place


def kronecker_factors(a: Tensor, g: Tensor, has_bias: bool, n: int, scale: float) -> Tuple[Tensor, Tensor]:
    """``(A, B)``: :func:`input_factor` and :func:`gradient_factor`, the KFAC block ``B (x) A`` on ``vec([W | b])``
    (theory.md section 2).

    Raises:
        ValueError: as :func:`input_factor` and :func:`gradient_factor`.

    Example:
        >>> A, B = kronecker_factors(torch.randn(2, 1, 4), torch.randn(3, 2, 1, 5), True, 2, 0.5)
        >>> A.shape, B.shape  # the bias adds a row and column to A
        (torch.Size([5, 5]), torch.Size([5, 5]))
    """
    return input_factor(a, has_bias, n), gradient_factor(g, scale)


class LayerRule:
    """The fast-path rule of one module type: ``o_t = W a_t (+ b)`` at ``T`` positions per sample.

    Subclasses implement :meth:`unfold` and :meth:`columns` (and may narrow
    :meth:`supports` and :meth:`accepts`); :meth:`diagonal` and :meth:`kronecker`
    are shared. The module must hold ``weight`` (flattening to ``[d_out, d_in]``
    in the order of :meth:`unfold`'s last axis) and, optionally, ``bias``
    (``[d_out]``), and must be called once per forward with the batch first.
    """

    #: the input's number of dims, batch included (``None``: any ``>= 2``)
    input_dim: Optional[int] = None

    def supports(self, mod: nn.Module) -> bool:
        """Whether this module's configuration is covered (checked once, before any forward)."""
        return True

    def accepts(self, mod: nn.Module, x: Tensor) -> bool:
        """Whether the recorded input ``x`` (batch first) is covered; otherwise the layer takes the generic path."""
        return x.dim() >= 2 and (self.input_dim is None or x.dim() == self.input_dim)

    def has_bias(self, mod: nn.Module) -> bool:
        return getattr(mod, "bias", None) is not None

    def unfold(self, mod: nn.Module, x: Tensor) -> Tensor:
        """The input as ``[n, T, d_in]`` rows ``a_t`` with ``o_t = W_flat a_t (+ b)``."""
        raise NotImplementedError

    def columns(self, mod: nn.Module, g: Tensor) -> Tensor:
        """Back-propagated columns ``[R, n, *output dims]`` as ``[R, n, T, d_out]`` (positions as in :meth:`unfold`)."""
        raise NotImplementedError

    def diagonal(self, a: Tensor, g: Tensor, has_bias: bool, scale: float) -> Tuple[Tensor, Optional[Tensor]]:
        """The diagonal of the layer's block, ``(weight part [d_out, d_in], bias part or None)``."""
        return layer_diagonal(a, g, has_bias, scale)

    def kronecker(self, a: Tensor, g: Tensor, has_bias: bool, n: int, scale: float) -> Tuple[Tensor, Tensor]:
        """The Kronecker factors ``(A, B)`` of the layer's block ``B (x) A`` on ``vec([W | b])``."""
        return self.input_factor(a, has_bias, n), self.gradient_factor(g, scale)

    def input_factor(self, a: Tensor, has_bias: bool, n: int) -> Tensor:
        """The input factor ``A`` of :meth:`kronecker` (what the Fisher engine calls, once per layer)."""
        return input_factor(a, has_bias, n)

    def gradient_factor(self, g: Tensor, scale: float) -> Tensor:
        """The gradient factor ``B`` of :meth:`kronecker`, additive over the columns ``r`` (the Fisher engine calls it
        once per column, ``g`` of shape ``[1, n, T, d_out]``, and adds the results)."""
        return gradient_factor(g, scale)


class LinearRule(LayerRule):
    """``nn.Linear`` on ``[n, ..., d_in]``: the extra (weight-sharing) dims are the ``T`` positions."""

    def unfold(self, mod: nn.Module, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def columns(self, mod: nn.Module, g: Tensor) -> Tensor:
        return g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])


def conv_padding(mod: Any) -> Optional[Tuple[int, ...]]:
    """Symmetric zero padding per spatial dim; ``None`` where ``padding="same"`` pads unevenly."""
    if not isinstance(mod.padding, str):
        return tuple(mod.padding)
    if mod.padding == "valid":
        return (0,) * len(mod.kernel_size)
    total = [d * (k - 1) for d, k in zip(mod.dilation, mod.kernel_size)]  # "same" (stride 1)
    return None if any(t % 2 for t in total) else tuple(t // 2 for t in total)


class ConvGeometry(NamedTuple):
    """Kernel size, dilation, stride and symmetric zero padding of a convolution, per spatial dim."""

    kernel: Tuple[int, ...]
    dilation: Tuple[int, ...]
    stride: Tuple[int, ...]
    padding: Tuple[int, ...]


def conv_geometry(mod: Any) -> ConvGeometry:
    """The geometry of a convolution that :meth:`ConvRule.supports` accepts."""
    padding = conv_padding(mod)
    if padding is None:
        raise ValueError(f"{type(mod).__name__} pads unevenly (padding='same' with an even extent): no layer rule")
    return ConvGeometry(tuple(mod.kernel_size), tuple(mod.dilation), tuple(mod.stride), padding)


class ConvRule(LayerRule):
    """Convolutions with ``groups=1`` and symmetric zero padding (KFC, Grosse & Martens 2016).

    :meth:`unfold` gives the patches (``T`` output positions, ``d_in = C_in * prod(kernel)``
    in the order of ``weight.reshape(out, -1)``); this base class unfolds any number of
    spatial dims with ``Tensor.unfold``.
    """

    #: number of spatial dims (the input is ``[n, C_in, *spatial]``)
    spatial: int = 0

    def supports(self, mod: nn.Module) -> bool:
        return getattr(mod, "groups", 0) == 1 and getattr(mod, "padding_mode", "") == "zeros" and conv_padding(mod) is not None

    def unfold(self, mod: nn.Module, x: Tensor) -> Tensor:
        n, c = x.shape[:2]
        geo = conv_geometry(mod)
        x = F.pad(x, [p for q in reversed(geo.padding) for p in (q, q)])
        for i, (k, d, s) in enumerate(zip(geo.kernel, geo.dilation, geo.stride)):
            x = x.unfold(2 + i, d * (k - 1) + 1, s)[..., ::d]  # window appended as the last dim
        m = self.spatial  # [n, C, *out positions, *kernel] -> [n, *out positions, C, *kernel]
        x = x.permute(0, *range(2, 2 + m), 1, *range(2 + m, 2 + 2 * m))
        return x.reshape(n, -1, c * math.prod(geo.kernel))

    def columns(self, mod: nn.Module, g: Tensor) -> Tensor:
        return g.reshape(g.shape[0], g.shape[1], g.shape[2], -1).transpose(2, 3)


class Conv1dRule(ConvRule):
    """``nn.Conv1d`` through ``F.unfold`` on a height-1 image."""

    spatial, input_dim = 1, 3

    def unfold(self, mod: nn.Module, x: Tensor) -> Tensor:
        geo = conv_geometry(mod)
        cols = F.unfold(
            x.unsqueeze(-2),
            (1, geo.kernel[0]),
            dilation=(1, geo.dilation[0]),
            padding=(0, geo.padding[0]),
            stride=(1, geo.stride[0]),
        )
        return cols.transpose(1, 2)


class Conv2dRule(ConvRule):
    """``nn.Conv2d`` through ``F.unfold``."""

    spatial, input_dim = 2, 4

    def unfold(self, mod: nn.Module, x: Tensor) -> Tensor:
        geo = conv_geometry(mod)
        cols = F.unfold(x, geo.kernel, dilation=geo.dilation, padding=geo.padding, stride=geo.stride)
        return cols.transpose(1, 2)


class Conv3dRule(ConvRule):
    """``nn.Conv3d``: :class:`ConvRule`'s ``Tensor.unfold`` patches (``F.unfold`` is 2-d only)."""

    spatial, input_dim = 3, 5


#: module type -> its rule (looked up along the class hierarchy by :func:`layer_rule`)
LAYER_RULES: Dict[type, LayerRule] = {}

T_rule = TypeVar("T_rule", bound=Union[LayerRule, Type[LayerRule]])


def register_layer_rule(module_type: type) -> Callable[[T_rule], T_rule]:
    """Decorator: register a :class:`LayerRule` subclass (instantiated without arguments) or instance for ``module_type``.

    Subclasses of ``module_type`` that keep its ``forward`` inherit the rule;
    registering a type again replaces its rule.

    Raises:
        TypeError: ``module_type`` is not an ``nn.Module`` subclass, or the decorated object is not a layer rule.

    Example:
        >>> from torch import nn
        >>> class Affine(nn.Linear):
        ...     def forward(self, x):
        ...         return x @ self.weight.T + self.bias
        >>> layer_rule(Affine(2, 3)) is None  # forward overridden: no inherited rule
        True
        >>> register_layer_rule(Affine)(LinearRule)
        <class 'dropgeom.layer_rules.LinearRule'>
        >>> type(layer_rule(Affine(2, 3))).__name__
        'LinearRule'
        >>> del LAYER_RULES[Affine]
    """

    def decorate(rule: T_rule) -> T_rule:
        instance = rule() if isinstance(rule, type) and issubclass(rule, LayerRule) else rule
        register(LAYER_RULES, module_type, instance, LayerRule)
        return rule

    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"a layer rule is registered for an nn.Module subclass, got {module_type!r}")
    return decorate


def layer_rule(mod: nn.Module) -> Optional[LayerRule]:
    """The rule covering ``mod`` (its type's, or an ancestor's with the same ``forward``), or ``None``.

    Raises:
        TypeError: ``mod`` is not an ``nn.Module`` instance (e.g. the class ``nn.Linear`` itself, which found no rule).

    Example:
        >>> from torch import nn
        >>> type(layer_rule(nn.Linear(2, 3))).__name__, layer_rule(nn.LayerNorm(3))
        ('LinearRule', None)
        >>> layer_rule(nn.Conv2d(2, 3, 3, groups=1, padding_mode="circular")) is None  # configuration not covered
        True
    """
    if not isinstance(mod, nn.Module):
        what = f"the class {mod.__name__}; pass an instance" if isinstance(mod, type) else type(mod).__name__
        raise TypeError(f"layer_rule() needs an nn.Module instance, got {what}")
    rule = lookup(LAYER_RULES, mod)
    return rule if rule is not None and rule.supports(mod) else None


register_layer_rule(nn.Linear)(LinearRule)
register_layer_rule(nn.Conv1d)(Conv1dRule)
register_layer_rule(nn.Conv2d)(Conv2dRule)
register_layer_rule(nn.Conv3d)(Conv3dRule)
