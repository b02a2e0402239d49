r"""The model manifold: a network, the inputs it is evaluated on, and an output family.

theory.md section 1: stacking the outputs of all ``n`` inputs, the map
``theta -> H(theta) = (eta_1(theta), ..., eta_n(theta))`` in ``R^{nK}`` embeds the
parameter space into the natural parameters of the product exponential family
``S``; its image is a curved exponential family (the *model manifold*). Every
quantity dropgeom computes -- Fisher information, embedding curvature, dropout
terms -- is a function of a :class:`ModelManifold`.

Derivatives are matrix-free and use :mod:`torch.func`:

* ``jvp(v)``       ``J v``                    (``[n, K]``), forward mode
* ``vjp(w)``       ``J^T w``                  (``[P]``), reverse mode
* ``d2(u, v)``     ``D2 eta[u, v] = sum_ab u_a v_b d_a d_b eta``, forward over forward
* ``per_sample_vjp(S)``  ``J_i^T S_i`` for every sample (``[n, R, P]``), the
  building block of every Fisher representation; never forms ``J``.
* ``jacobian()``   dense ``J`` (``[n, K, P]``), only on request and size-checked.

Parameters are exposed as a flat vector in ``model.parameters()`` order (the
order of :func:`torch.nn.utils.parameters_to_vector`) and as named tensors.

Dropout is never guessed: the module is evaluated with every submodule in eval
mode (deterministic, weight scaling), unless a custom ``forward`` -- for
example one that applies explicit dropout masks -- is supplied.

Example:
    >>> import torch
    >>> from dropgeom import ModelManifold
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    >>> m = ModelManifold(net, torch.randn(5, 3, dtype=torch.float64))
    >>> m.n, m.num_outputs, m.num_params
    (5, 2, 26)
    >>> J = m.jacobian()
    >>> v = torch.randn(26, dtype=torch.float64)
    >>> torch.allclose(m.jvp(v), torch.einsum("nkp,p->nk", J, v))
    True
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

from ._evaluation import autodiff_kernels, check_inputs_match, check_not_meta, eval_mode, output_numel
from ._utils import DEFAULT_CHUNK_BYTES, DEFAULT_MEMORY_LIMIT, as_tuple, check_finite, check_outputs_finite, memory_guard
from .families import ExponentialFamily, get_family

__all__ = [
    "ModelManifold",
    "eval_mode",
    "check_inputs_match",
    "autodiff_kernels",
    "memory_guard",
    "DEFAULT_MEMORY_LIMIT",
    "DEFAULT_CHUNK_BYTES",
]

Params = Dict[str, Tensor]
Inputs = Union[Tensor, Tuple[Tensor, ...]]
ForwardFn = Callable[[Params, Inputs], Tensor]


class ModelManifold:
    """The model manifold ``theta -> (eta_1, ..., eta_n)`` of theory.md section 1.

    Args:
        model: any ``torch.nn.Module`` whose output on ``inputs`` is ``[n, K]``
            (the natural parameters), built from standard layers.
        inputs: a tensor with leading sample axis ``n`` (or a tuple of them).
        family: the output family (name or :class:`~dropgeom.families.ExponentialFamily`).
        param_names: restrict the manifold to these parameters (the others
            are held fixed); default: every parameter with ``requires_grad``.
        forward: optional ``forward(params, inputs) -> eta`` replacing the
            default eval-mode ``functional_call``; ``params`` holds every named
            parameter (free and fixed).

    The model is evaluated in eval mode; its own ``training`` flags are left
    untouched. Samples must not interact (as in eval mode), which is what the
    per-sample products assume.
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Inputs,
        family: Union[str, ExponentialFamily] = "categorical",
        *,
        param_names: Optional[Sequence[str]] = None,
        forward: Optional[ForwardFn] = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.inputs: Tuple[Tensor, ...] = as_tuple(inputs)
        if not self.inputs or not all(isinstance(t, Tensor) for t in self.inputs):
            raise TypeError("inputs must be a tensor or a tuple of tensors")
        n = self.inputs[0].shape[0] if self.inputs[0].dim() > 0 else 0
        for t in self.inputs:
            if t.dim() == 0 or t.shape[0] != n:
                raise ValueError(
                    f"every input tensor needs the same leading sample axis; got shapes {[tuple(x.shape) for x in self.inputs]}"
                )
        check_not_meta(model, self.inputs)
        for t in self.inputs:
            check_finite("inputs", t)
        if n == 0:
            raise ValueError("inputs are empty (n = 0)")
        self.family = get_family(family)

        all_params = dict(model.named_parameters())
        if param_names is None:
            names = [k for k, p in all_params.items() if p.requires_grad]
        else:
            if isinstance(param_names, str):
                param_names = [param_names]
            unknown = [k for k in param_names if k not in all_params]
            if unknown:
                raise ValueError(f"unknown parameter names {unknown}; the model has {list(all_params)}")
            chosen = set(param_names)
            names = [k for k in all_params if k in chosen]  # model.parameters() order, whatever the given order
        if not names:
            raise ValueError("the manifold has no free parameters")
        self.param_names: Tuple[str, ...] = tuple(names)
        self._fixed: Params = {k: p.detach() for k, p in all_params.items() if k not in self.param_names}
        self._buffers: Params = {k: b.detach() for k, b in model.named_buffers()}
        params = {k: all_params[k].detach() for k in self.param_names}
        for k, p in params.items():
            check_finite(f"parameter {k!r}", p)
        self._params = params
        self._forward = forward
        self._is_function = False
        self._eta_fn: Optional[Callable[[Tensor], Tensor]] = None
        self._post_init()

    # -- construction -------------------------------------------------------
    @classmethod
    def from_function(
        cls, eta_fn: Callable[[Tensor], Tensor], theta: Tensor, family: Union[str, ExponentialFamily] = "categorical"
    ) -> "ModelManifold":
        """A manifold from a closed-form map ``eta_fn(theta) -> [n, K]``.

        Example:
            >>> import torch
            >>> x = torch.linspace(-1, 1, 4, dtype=torch.float64)[:, None]
            >>> m = ModelManifold.from_function(lambda th: x * th, torch.tensor([2.0], dtype=torch.float64), "gaussian")
            >>> m.eta().squeeze(-1)
            tensor([-2.0000, -0.6667,  0.6667,  2.0000], dtype=torch.float64)
        """
        if not isinstance(theta, Tensor) or theta.dim() != 1:
            raise ValueError("theta must be a 1-D tensor of parameters")
        check_finite("theta", theta)
        self = cls.__new__(cls)
        self.model = None  # type: ignore[assignment]
        self.inputs = ()
        self.family = get_family(family)
        self.param_names = ("theta",)
        self._fixed = {}
        self._buffers = {}
        self._params = {"theta": theta.detach()}
        self._forward = None
        self._is_function = True
        self._eta_fn = eta_fn
        self._post_init()
        return self

    def _post_init(self) -> None:
        self._shapes = {k: p.shape for k, p in self._params.items()}
        self._numels = {k: p.numel() for k, p in self._params.items()}
        with torch.no_grad():
            try:
                eta = self.forward(self._params)
            except RuntimeError as err:  # name the input whose dtype / device does not fit, if that is why
                if self.model is not None:
                    check_inputs_match(self.model, self.inputs, err)
                raise
        if not isinstance(eta, Tensor) or eta.dim() != 2:
            raise ValueError(
                f"the model must return natural parameters of shape [n, K]; got "
                f"{tuple(eta.shape) if isinstance(eta, Tensor) else type(eta).__name__}"
            )
        if self.inputs and eta.shape[0] != self.inputs[0].shape[0]:
            raise ValueError(f"the model returned {eta.shape[0]} rows for {self.inputs[0].shape[0]} inputs")
        self.family.check_eta(eta)
        check_outputs_finite(eta)
        self._eta0 = eta
        self.n, self.num_outputs = int(eta.shape[0]), int(eta.shape[1])
        self.num_params = sum(self._numels.values())

    # -- basic properties ---------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self._eta0.dtype

    @property
    def device(self) -> torch.device:
        return self._eta0.device

    @property
    def params(self) -> Params:
        """The free parameters as named (detached) tensors."""
        return dict(self._params)

    @property
    def theta(self) -> Tensor:
        """The free parameters as one flat vector, in ``model.parameters()`` order."""
        return self.flatten(self._params)

    @property
    def param_shapes(self) -> Dict[str, torch.Size]:
        return dict(self._shapes)

    def flatten(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """Concatenate named tensors shaped like the parameters into a flat vector."""
        return torch.cat([tensors[k].reshape(-1) for k in self.param_names])

    def unflatten(self, vec: Tensor) -> Params:
        """Split a flat vector ``[P]`` (or ``[..., P]``) into named tensors."""
        if vec.shape[-1] != self.num_params:
            raise ValueError(f"expected a vector with {self.num_params} entries (P), got shape {tuple(vec.shape)}")
        out, i = {}, 0
        lead = vec.shape[:-1]
        for k in self.param_names:
            out[k] = vec[..., i : i + self._numels[k]].reshape(*lead, *self._shapes[k])
            i += self._numels[k]
        return out

    def param_slices(self) -> Dict[str, slice]:
        """Where each named parameter sits in the flat vector."""
        out, i = {}, 0
        for k in self.param_names:
            out[k] = slice(i, i + self._numels[k])
            i += self._numels[k]
        return out

    def _as_params(self, v: Union[Tensor, Mapping[str, Tensor]], name: str = "direction") -> Params:
        if isinstance(v, Mapping):
            missing = [k for k in self.param_names if k not in v]
            if missing:
                raise ValueError(f"{name} is missing parameters {missing}")
            bad = [k for k in self.param_names if tuple(v[k].shape) != tuple(self._shapes[k])]
            if bad:
                raise ValueError(
                    f"{name}: parameter {bad[0]!r} must have shape {tuple(self._shapes[bad[0]])}, got {tuple(v[bad[0]].shape)}"
                )
            return {k: v[k].to(self.dtype) for k in self.param_names}
        if not isinstance(v, Tensor) or v.dim() != 1 or v.numel() != self.num_params:
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"{name} must be a flat vector with P={self.num_params} entries, got {shape}")
        return self.unflatten(v.to(self.dtype))

    # -- evaluation ---------------------------------------------------------
    def forward(self, params: Params, inputs: Optional[Tuple[Tensor, ...]] = None) -> Tensor:
        """``eta`` as a function of the free parameters (pure; used by every derivative)."""
        if self._is_function:
            return self._eta_fn(params["theta"])  # type: ignore[misc]
        inputs = self.inputs if inputs is None else inputs
        full = {**self._fixed, **params}
        if self._forward is not None:
            with autodiff_kernels():
                return self._forward(full, inputs)
        try:
            with eval_mode(self.model, warn=False):
                return functional_call(self.model, (full, self._buffers), inputs)
        except NotImplementedError as err:
            if "forward AD" not in str(err) and "forward mode AD" not in str(err):
                raise
            name = self._innermost_module(full, inputs)
            mod = dict(self.model.named_modules()).get(name) if name is not None else None
            what = f"module {name!r} ({type(mod).__name__})" if mod is not None else "an operation of the model"
            raise NotImplementedError(
                f"{what} has no forward-mode (jvp) rule, which this quantity needs: {str(err).splitlines()[0]} "
                "Fix: build the layer from differentiable torch ops, give its autograd.Function a jvp "
                "(torch.func-compatible setup_context/jvp), or use a quantity that needs reverse mode only "
                "(fisher() with structure dense, diag, layer or kfac; not implicit, whose products are forward-mode)."
            ) from err

    def _innermost_module(self, full: Params, inputs: Tuple[Tensor, ...]) -> Optional[str]:
        """Rerun the failing forward (inside the same transform) and return the innermost module then running."""
        names = {id(m): k for k, m in self.model.named_modules()}
        stack: list = []
        handles = []

        def pre(mod: nn.Module, args) -> None:
            stack.append(names[id(mod)])

        def post(mod: nn.Module, args, out) -> None:
            stack.pop()

        for m in self.model.modules():
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))
        try:
            with eval_mode(self.model, warn=False):
                functional_call(self.model, (full, self._buffers), inputs)
        except NotImplementedError:
            return stack[-1] if stack else None
        finally:
            for h in handles:
                h.remove()
        return None

    def eta(self, theta: Optional[Union[Tensor, Mapping[str, Tensor]]] = None) -> Tensor:
        """Natural parameters ``[n, K]`` at ``theta`` (default: the current parameters)."""
        if theta is None:
            return self._eta0
        return self.forward(self._as_params(theta, "theta"))

    def at(self, theta: Union[Tensor, Mapping[str, Tensor]]) -> "ModelManifold":
        """The same manifold evaluated at other parameters (a shallow copy)."""
        params = {k: t.detach() for k, t in self._as_params(theta, "theta").items()}
        for k, p in params.items():
            check_finite(f"parameter {k!r}", p)
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._params = params
        new._post_init()
        return new

    def subset(self, samples: slice) -> "ModelManifold":
        """The manifold of the inputs in ``samples`` (a slice of the sample axis), without another forward pass.

        The sum of a per-sample quantity over the subsets of a partition is its sum over all inputs; the Fisher
        engine uses this to process large input sets in chunks (theory.md section 2).

        Raises:
            ValueError: for a closed-form manifold (no inputs to split) or an empty slice.

        Example:
            >>> import torch
            >>> m = ModelManifold(torch.nn.Linear(3, 2).double(), torch.randn(10, 3, dtype=torch.float64))
            >>> m.subset(slice(2, 5)).n, torch.equal(m.subset(slice(2, 5)).eta(), m.eta()[2:5])
            (3, True)
        """
        if self._is_function:
            raise ValueError("a closed-form manifold (from_function) has no inputs to split")
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.inputs = tuple(x[samples] for x in self.inputs)
        new._eta0 = self._eta0[samples]
        new.n = int(new._eta0.shape[0])
        if new.n == 0:
            raise ValueError(f"the slice {samples} selects no inputs of {self.n}")
        return new

    def activation_numel(self) -> int:
        """Elements of every module output for one input (one forward pass on the first input).

        Used to size chunks: back-propagating ``R`` factor columns through a chunk of ``b`` inputs holds about
        ``b * activation_numel() * (R + 2)`` elements. 0 for a closed-form manifold. Measured on the first call
        and kept (it depends on the model's structure and the input shapes only).

        Example:
            >>> import torch
            >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
            >>> ModelManifold(net, torch.randn(5, 3, dtype=torch.float64)).activation_numel()
            10
        """
        if self._is_function or self.model is None:
            return 0
        # shapes only (the same at other parameters and for a subset of the inputs, which share this cache):
        # measured once, not by a forward pass at every fisher() call
        cached = self.__dict__.get("_activation_numel")
        if cached is None:
            cached = output_numel(self.model, lambda: self.forward(self._params, tuple(x[:1] for x in self.inputs)))
            self._activation_numel = cached
        return cached

    # -- first and second derivatives --------------------------------------
    def jvp(self, v: Union[Tensor, Mapping[str, Tensor]]) -> Tensor:
        """``J v``: the change of all outputs along parameter direction ``v`` (``[n, K]``)."""
        _, out = jvp(self.forward, (self._params,), (self._as_params(v),))
        return out

    def vjp(self, w: Tensor) -> Tensor:
        """``J^T w`` for output cotangent ``w`` (``[n, K]``), as a flat vector ``[P]``."""
        if tuple(w.shape) != (self.n, self.num_outputs):
            raise ValueError(f"cotangent must have shape [n, K] = [{self.n}, {self.num_outputs}], got {tuple(w.shape)}")
        _, fn = vjp(self.forward, self._params)
        return self.flatten(fn(w.to(self.dtype))[0])

    def d2(self, u: Union[Tensor, Mapping[str, Tensor]], v: Optional[Union[Tensor, Mapping[str, Tensor]]] = None) -> Tensor:
        """Second directional derivative ``D2 eta[u, v]`` (``[n, K]``; ``v`` defaults to ``u``).

        Forward over forward mode: no ``P x P`` object is formed.
        """
        pu = self._as_params(u)
        pv = pu if v is None else self._as_params(v)

        def along_u(p: Params) -> Tensor:
            return jvp(self.forward, (p,), (pu,))[1]

        return jvp(along_u, (self._params,), (pv,))[1]

    def per_sample_vjp(self, factors: Tensor, chunk_size: Optional[int] = None) -> Tensor:
        """Per-sample products ``G[i, r] = J_i^T factors[i, :, r]``, shape ``[n, R, P]``.

        ``factors`` has shape ``[n, K, R]``. The Fisher information of every
        kind is ``(1/n) sum_i G_i^T G_i`` for a suitable factor (theory.md
        section 2). Computed per sample with ``vmap`` (never the full ``J``);
        for closed-form manifolds through the dense Jacobian.
        """
        n, k = self.n, self.num_outputs
        if factors.dim() != 3 or factors.shape[:2] != (n, k):
            raise ValueError(f"factors must have shape [n, K, R] = [{n}, {k}, R], got {tuple(factors.shape)}")
        factors = factors.to(self.dtype)
        r = factors.shape[2]
        memory_guard(
            n * r * self.num_params,
            self.dtype,
            f"per-sample products [n={n}, R={r}, P={self.num_params}]",
            "use structure='diag', 'kfac' or 'implicit', or fewer inputs",
        )
        if self._is_function:
            jac = self.jacobian()
            return torch.einsum("nkr,nkp->nrp", factors, jac)
        return self._per_sample_vjp_vmap(factors, chunk_size)

    def iter_per_sample_vjp(self, factors: Tensor, max_bytes: int = 256 * 1024**2) -> Iterator[Tuple[slice, Tensor]]:
        """Yield ``(samples, G_chunk)`` with ``G_chunk = per_sample_vjp(factors)[samples]``.

        Keeps at most about ``max_bytes`` of per-sample products alive, so
        reductions (diagonals, blocks) never hold ``[n, R, P]`` at once.
        """
        n, k = self.n, self.num_outputs
        if factors.dim() != 3 or factors.shape[:2] != (n, k):
            raise ValueError(f"factors must have shape [n, K, R] = [{n}, {k}, R], got {tuple(factors.shape)}")
        factors = factors.to(self.dtype)
        if self._is_function:
            yield slice(0, n), self.per_sample_vjp(factors)
            return
        per_sample = factors.shape[2] * self.num_params * factors.element_size()
        step = max(1, min(n, int(max_bytes // max(per_sample, 1))))
        for start in range(0, n, step):
            sl = slice(start, min(n, start + step))
            sub = tuple(x[sl] for x in self.inputs)
            yield sl, self._per_sample_vjp_vmap(factors[sl], None, sub)

    def _per_sample_vjp_vmap(
        self, factors: Tensor, chunk_size: Optional[int], inputs: Optional[Tuple[Tensor, ...]] = None
    ) -> Tensor:
        params = self._params
        inputs = self.inputs if inputs is None else inputs

        def one(xs: Tuple[Tensor, ...], fac: Tensor) -> Tensor:
            single = tuple(x.unsqueeze(0) for x in xs)
            _, fn = vjp(lambda p: self.forward(p, single)[0], params)
            grads = vmap(fn)(fac.transpose(0, 1))[0]  # dict of [R, *shape]
            return torch.cat([grads[k].reshape(fac.shape[1], -1) for k in self.param_names], dim=1)

        n = factors.shape[0]
        if chunk_size is None:
            per_sample = factors.shape[2] * self.num_params * factors.element_size()
            chunk_size = max(1, min(n, int(256 * 1024**2 // max(per_sample, 1))))
        try:
            return vmap(one, chunk_size=chunk_size)(inputs, factors)
        except (RuntimeError, NotImplementedError) as err:  # layer without a vmap rule
            warnings.warn(f"vmap over samples failed ({err}); falling back to a loop over samples", RuntimeWarning, stacklevel=2)
            return torch.stack([one(tuple(x[i] for x in inputs), factors[i]) for i in range(n)])

    def jacobian(self, memory_limit: Optional[int] = None) -> Tensor:
        """Dense Jacobian ``J = d eta / d theta``, shape ``[n, K, P]`` (size-checked)."""
        memory_guard(
            self.n * self.num_outputs * self.num_params,
            self.dtype,
            f"the dense Jacobian [n={self.n}, K={self.num_outputs}, P={self.num_params}]",
            "use matrix-free products (jvp/vjp) or structure='diag'/'kfac'/'implicit'",
            memory_limit,
        )
        if self._is_function:
            jac = jacrev(self.forward)(self._params)
            return torch.cat([jac[k].reshape(self.n, self.num_outputs, -1) for k in self.param_names], dim=-1)
        eye = torch.eye(self.num_outputs, dtype=self.dtype, device=self.device).expand(self.n, -1, -1)
        return self._per_sample_vjp_vmap(eye, None)

    # -- likelihood -----------------------------------------------------------
    def check_targets(self, targets: Tensor) -> None:
        """Raise ``ValueError`` unless ``targets`` fit this manifold's family and size."""
        self.family.check_targets(targets, self.n, self.num_outputs)

    def loss(self, targets: Tensor, theta: Optional[Union[Tensor, Mapping[str, Tensor]]] = None) -> Tensor:
        """Mean negative log-likelihood ``(1/n) sum_i l_i`` at ``theta``."""
        self.check_targets(targets)
        return self.family.nll(self.eta(theta), targets).mean()

    def __repr__(self) -> str:
        kind = "function" if self._is_function else type(self.model).__name__
        return (
            f"ModelManifold({kind}, n={self.n}, K={self.num_outputs}, P={self.num_params}, "
            f"family={self.family!r}, dtype={self.dtype})"
        )
