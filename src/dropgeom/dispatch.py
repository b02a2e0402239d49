r"""One rule for every public quantity: a data set given as batches goes to the streamed implementation.

Every quantity of docs/theory.md sections 2-4 is a mean (or, for the curvature, a sum) over inputs, so it can be
computed over a :class:`torch.utils.data.DataLoader` or a list of ``(inputs, targets)`` batches (what a batch is:
:mod:`dropgeom.batches`). Two decorators route such data, and nothing else changes for tensors:

* :func:`streams` -- for functions of a manifold, ``f(manifold, ...)``: a :class:`StreamedManifold` (the model over
  a data set of batches) goes to the implementation registered with :func:`register_streamed`, or to a clear error
  naming the function when it cannot be streamed;
* :func:`mean_over_batches` -- for functions of ``(model, inputs, targets)`` that return a mean over inputs (the
  dropout terms, gap and penalty of theory.md section 4): an iterable of batches in place of ``inputs`` gives
  :func:`~dropgeom.batches.stream_mean` of the per-batch results, each weighted by its size.

The streamed implementations live in the modules that know the quantity (:mod:`dropgeom.streaming` for the Fisher,
:mod:`dropgeom.curvature.streamed` for the curvature) and register themselves when the package is imported.

Example:
    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> from dropgeom import ModelManifold, StreamedManifold
    >>> from dropgeom._fisher import fisher
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    >>> x, y = torch.randn(23, 4, dtype=torch.float64), torch.randint(0, 3, (23,))
    >>> data = StreamedManifold(net, DataLoader(TensorDataset(x, y), batch_size=10))
    >>> torch.allclose(fisher(data, structure="kfac").diag(), fisher(ModelManifold(net, x), structure="kfac").diag())
    True
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple, TypeVar, Union

from torch import Tensor, nn

from .batches import Batch, Data, check_same_parameters, is_batches, iter_batches, stream_mean
from .families import ExponentialFamily, get_family
from .manifold import DEFAULT_CHUNK_BYTES, ModelManifold

__all__ = ["StreamedManifold", "streams", "register_streamed", "mean_over_batches", "streamed_functions"]

F = TypeVar("F", bound=Callable[..., Any])

#: Streamed implementations by public function (``module.qualname``), filled by :func:`register_streamed`.
_STREAMED: Dict[str, Callable[..., Any]] = {}


class StreamedManifold:
    """The model manifold of ``model`` over a data set read batch by batch (theory.md section 1).

    It holds no forward pass: every quantity reads the batches when it is computed (peak memory: one batch), builds a
    :class:`~dropgeom.manifold.ModelManifold` per batch and adds the batches' sums; under ``torch.distributed`` each
    rank passes its own shard. Functions of a manifold accept it in place of a ``ModelManifold`` where they can be
    streamed, and say so with a clear error where they cannot (:func:`streamed_functions` lists them).

    Args:
        model: the network (evaluated in eval mode, as ``ModelManifold`` does).
        data: a ``DataLoader``, a list of batches, or a tensor (tuple of tensors) of inputs split into ``batch_size``
            rows (see :mod:`dropgeom.batches`). It is read once per quantity (several times for matrix-free ones,
            which therefore need a re-iterable one: a list or a ``DataLoader``, not a generator).
        family: the output family.
        targets: labels for tensor ``data``; an iterable carries them in its batches.
        batch_size: rows per batch for tensor ``data`` (default: all rows, chunked under ``memory_budget``).
        param_names: the free parameters (default: every parameter with ``requires_grad``).
        memory_budget: bytes the back-propagated factors of one chunk of a batch may use (default 1 GiB).

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module`` or ``data`` is neither a tensor nor an iterable.
        ValueError: ``targets`` with an iterable, a non-positive ``batch_size`` or
            ``memory_budget``, unknown ``param_names``.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(3, 2).double()
        >>> m = StreamedManifold(net, [torch.randn(4, 3, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)])
        >>> m.n, m.num_params
        (7, 8)
    """

    def __init__(
        self,
        model: nn.Module,
        data: Data,
        family: Union[str, ExponentialFamily] = "categorical",
        *,
        targets: Optional[Tensor] = None,
        batch_size: Optional[int] = None,
        param_names: Optional[Sequence[str]] = None,
        memory_budget: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not is_batches(data) and not isinstance(data, (Tensor, tuple)):
            raise TypeError(f"data must be a tensor of inputs or an iterable of batches, got {type(data).__name__}")
        if is_batches(data) and targets is not None:
            raise ValueError("targets= goes with tensor inputs; an iterable of batches carries its targets in each batch")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget <= 0:
            raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
        all_params = dict(model.named_parameters())
        names = [k for k, p in all_params.items() if p.requires_grad] if param_names is None else list(param_names)
        unknown = [k for k in names if k not in all_params]
        if unknown:
            raise ValueError(f"unknown parameter names {unknown}; the model has {list(all_params)}")
        self.model, self.data, self.family = model, data, get_family(family)
        self.targets, self.batch_size, self.memory_budget = targets, batch_size, memory_budget
        self.param_names: Optional[Tuple[str, ...]] = None if param_names is None else tuple(names)
        self.num_params = sum(all_params[k].numel() for k in names)
        self._n: Optional[int] = None
        self._reads = 0

    def batches(self) -> Iterator[Batch]:
        """The batches ``(inputs tuple, targets or None)`` of this rank (:func:`~dropgeom.batches.iter_batches`), on the
        model's device (a ``DataLoader`` yields CPU tensors; each batch is moved when it is read).

        Raises:
            ValueError: a one-shot iterator read a second time.
        """
        self._reads += 1
        if self._reads > 1 and is_batches(self.data) and iter(self.data) is self.data:
            raise ValueError(
                "this quantity reads the data more than once; a one-shot iterator (a generator) can be read only once: "
                "pass a list of batches or a DataLoader"
            )
        device = next(self.model.parameters()).device
        for inputs, targets in iter_batches(
            self.data, self.targets, batch_size=self.batch_size if not is_batches(self.data) else None
        ):
            yield tuple(t.to(device) for t in inputs), None if targets is None else targets.to(device)

    def manifolds(self) -> Iterator[Tuple[ModelManifold, Optional[Tensor]]]:
        """One :class:`~dropgeom.manifold.ModelManifold` per batch, with the batch's targets.

        Raises:
            ValueError: naming the batch the model cannot take, and what a batch is.
        """
        for b, (inputs, targets) in enumerate(self.batches()):
            yield self.manifold_of(b, inputs), targets

    def manifold_of(self, b: int, inputs: Tuple[Tensor, ...]) -> ModelManifold:
        """The manifold of batch ``b`` (``inputs``), with a clear error when the model cannot take them."""
        try:
            return ModelManifold(self.model, inputs if len(inputs) > 1 else inputs[0], self.family, param_names=self.param_names)
        except (RuntimeError, TypeError) as err:
            shapes = ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in inputs)
            raise ValueError(
                f"batch {b}: the model cannot take inputs of shape {shapes} ({str(err).splitlines()[0]}); a batch is "
                "inputs or (inputs, targets), and a model with several inputs takes ((x1, x2), targets)"
            ) from err

    @property
    def n(self) -> int:
        """Inputs on this rank (one pass over the data, counted once)."""
        if self._n is None:
            self._n = sum(int(inputs[0].shape[0]) for inputs, _ in self.batches())
        return self._n

    def __repr__(self) -> str:
        return f"StreamedManifold({type(self.model).__name__}, {type(self.data).__name__}, family={self.family.name!r})"


def _key(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def streams(fn: F) -> F:
    """Decorate ``fn(manifold, ...)`` so that a :class:`StreamedManifold` goes to its streamed implementation.

    Raises (from the decorated function):
        NotImplementedError: ``fn`` has no streamed implementation (the message names it).

    Example:
        >>> import torch
        >>> @streams
        ... def size(manifold):
        ...     return manifold.num_params
        >>> size(StreamedManifold(torch.nn.Linear(2, 1), torch.zeros(3, 2)))
        Traceback (most recent call last):
        ...
        NotImplementedError: size() cannot be computed over batches (a StreamedManifold): it has no streamed implementation; build a ModelManifold of the inputs instead
    """
    key = _key(fn)

    @functools.wraps(fn)
    def wrapper(manifold: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(manifold, StreamedManifold):
            impl = _STREAMED.get(key)
            if impl is None:
                raise NotImplementedError(
                    f"{fn.__name__}() cannot be computed over batches (a StreamedManifold): it has no streamed "
                    "implementation; build a ModelManifold of the inputs instead"
                )
            return impl(manifold, *args, **kwargs)
        return fn(manifold, *args, **kwargs)

    wrapper.__dropgeom_streams__ = key  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


def register_streamed(public: Callable[..., Any], impl: Callable[..., Any]) -> None:
    """Make ``impl(streamed_manifold, *args, **kwargs)`` the streamed implementation of ``public`` (a :func:`streams` function).

    Raises:
        TypeError: ``public`` is not decorated with :func:`streams`.

    Example:
        >>> register_streamed(len, len)
        Traceback (most recent call last):
        ...
        TypeError: len is not decorated with @streams
    """
    key = getattr(public, "__dropgeom_streams__", None)
    if key is None:
        raise TypeError(f"{getattr(public, '__name__', public)} is not decorated with @streams")
    _STREAMED[key] = impl


def streamed_functions() -> Dict[str, bool]:
    """``{function: streams}`` for every function registered so far (documentation and tests).

    Functions register when their module is imported (``import dropgeom`` imports them all).

    Raises:
        Nothing: it only reads the registry.

    Example:
        >>> import dropgeom
        >>> streamed_functions()["dropgeom._fisher.fisher"]
        True
    """
    return {k: True for k in sorted(_STREAMED)}


def mean_over_batches(
    fn: F,
    *,
    refuse: Optional[Dict[str, str]] = None,
    per_batch: Optional[Callable[[Any], Any]] = None,
    finish: Optional[Callable[[Any], Any]] = None,
) -> F:
    """Wrap ``fn(model, inputs, targets, ...)`` (a mean over inputs) so that ``inputs`` may be an iterable of batches.

    With batches, ``targets`` must be left out (each batch carries its own), the ranks of a process group must hold
    the same parameters, and the result is :func:`~dropgeom.batches.stream_mean` of ``fn`` on each batch: floating
    leaves are size-weighted means over the whole data set (detached), standard errors combine in quadrature.
    ``refuse`` maps argument names to the reason they cannot be used with batches (checked when they are truthy).
    ``per_batch`` maps each batch's result to what is averaged (e.g. a result's ``value`` only), and ``finish``
    maps the mean to the returned object (e.g. back into the result type). A ``fn`` with a ``translate_call(args,
    kwargs)`` attribute (the dropout functions' deprecated call forms) has each call translated first.

    Raises (from the wrapped function):
        ValueError: ``targets`` given with batches, or a refused argument.

    Example:
        >>> import torch
        >>> def mean_sq(model, inputs, targets=None):
        ...     return (model(inputs) ** 2).mean()
        >>> f = mean_over_batches(mean_sq)
        >>> net, x = torch.nn.Linear(2, 1), torch.randn(7, 2)
        >>> bool(torch.isclose(f(net, [x[:3], x[3:]]), mean_sq(net, x).detach()))
        True
    """
    sig = inspect.signature(fn)
    refuse = dict(refuse or {})
    translate = getattr(fn, "translate_call", None)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if translate is not None:  # a deprecated call form (dropout's old positional order and keywords) in the new one
            args, kwargs = translate(args, kwargs)
        try:
            bound = sig.bind_partial(*args, **kwargs)
        except TypeError:  # not the current signature: fn itself refuses it
            return fn(*args, **kwargs)
        data = bound.arguments.get("inputs")
        if not is_batches(data):
            return fn(*args, **kwargs)
        if bound.arguments.get("targets") is not None:
            raise ValueError(f"{fn.__name__}(): targets= goes with tensor inputs; each batch carries its own targets")
        for name, why in refuse.items():
            if bound.arguments.get(name):
                raise ValueError(f"{fn.__name__}(): {name}= cannot be used with an iterable of batches: {why}")
        check_same_parameters(bound.arguments["model"])

        model = bound.arguments["model"]
        device = next(model.parameters()).device

        def one(inputs: Tuple[Tensor, ...], targets: Optional[Tensor]) -> Any:
            inputs = tuple(t.to(device) for t in inputs)  # batches move to the model's device when they are read
            bound.arguments["inputs"] = inputs if len(inputs) > 1 else inputs[0]
            if "targets" in sig.parameters:
                bound.arguments["targets"] = None if targets is None else targets.to(device)
            res = fn(*bound.args, **bound.kwargs)
            return res if per_batch is None else per_batch(res)

        mean = stream_mean(one, data)  # type: ignore[arg-type]  # is_batches(data) holds
        return mean if finish is None else finish(mean)

    return wrapper  # type: ignore[return-value]
