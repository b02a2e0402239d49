"""Small helpers shared across the package (not public): inputs as a tuple, the batching fallback,
the training-flags context, the drop-probability check and the memory guard.

One copy of each, imported by the modules that need them (issue #8, item 6). This module is in the
base layer: it imports nothing from dropgeom.

Example:
    >>> import torch
    >>> as_tuple(torch.zeros(2, 3))[0].shape
    torch.Size([2, 3])
    >>> vmap_or_loop(lambda r: r.sum(), torch.ones(4, 3)).tolist()
    [3.0, 3.0, 3.0, 3.0]
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import vmap

__all__ = [
    "Inputs",
    "as_tuple",
    "checked_inputs",
    "vmap_or_loop",
    "training_off",
    "check_finite",
    "NonFiniteOutputError",
    "check_outputs_finite",
    "memory_guard",
    "DEFAULT_MEMORY_LIMIT",
    "DEFAULT_CHUNK_BYTES",
    "atomic_write_bytes",
    "to_jsonable",
]

Inputs = Union[Tensor, Tuple[Tensor, ...]]

#: Largest single tensor (bytes) a dense request may allocate before an error
#: pointing to a matrix-free structure is raised. Override per call.
DEFAULT_MEMORY_LIMIT = 2 * 1024**3
#: Bytes of back-propagated factors one chunk of inputs may hold inside the Fisher engine (1 GiB): larger input
#: sets are processed in chunks and summed, so no input size ends in an out-of-memory kill. Override per call.
DEFAULT_CHUNK_BYTES = 1024**3


def as_tuple(inputs: Inputs) -> Tuple[Tensor, ...]:
    """``inputs`` as a tuple of model arguments (a single tensor becomes a 1-tuple); nothing is checked."""
    return inputs if isinstance(inputs, tuple) else (inputs,)


def checked_inputs(inputs: Inputs) -> Tuple[Tensor, ...]:
    """:func:`as_tuple`, checked: tensors with one non-empty leading sample axis and finite floating values.

    Raises:
        TypeError: not a tensor or a tuple of tensors.
        ValueError: no leading sample axis, differing sample counts, ``n = 0`` or non-finite values.
    """
    if isinstance(inputs, Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, tuple) or not inputs or not all(isinstance(t, Tensor) for t in inputs):
        raise TypeError("inputs must be a tensor or a tuple of tensors with a leading sample axis")
    n = inputs[0].shape[0] if inputs[0].dim() else 0
    for t in inputs:
        if t.dim() == 0 or t.shape[0] != n:
            raise ValueError(f"every input needs the same leading sample axis; got {[tuple(x.shape) for x in inputs]}")
        if torch.is_floating_point(t) and not torch.isfinite(t).all():
            raise ValueError("inputs contain non-finite values (NaN or inf)")
    if n == 0:
        raise ValueError("inputs are empty (n = 0)")
    return inputs


def vmap_or_loop(fn: Callable[..., Tensor], *cols: Tensor) -> Tensor:
    """``vmap(fn)(*cols)``, or ``stack([fn(*row) for row in zip(*cols)])`` when a layer has no batching rule."""
    try:
        return vmap(fn)(*cols)
    except (RuntimeError, NotImplementedError):
        return torch.stack([fn(*(c[i] for c in cols)) for i in range(cols[0].shape[0])])


@contextlib.contextmanager
def training_off(model: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode (``training = False``) for the duration; each flag restored afterwards.

    Unlike :func:`dropgeom.manifold.eval_mode` (which uses it) no kernels are rerouted and no dropout is intercepted.
    """
    flags = [(m, m.training) for m in model.modules()]
    try:
        for m, _ in flags:
            m.training = False
        yield
    finally:
        for m, t in flags:
            m.training = t


class NonFiniteOutputError(ValueError):
    """The model's outputs (natural parameters) are non-finite at the current parameters (``dropgeom.NonFiniteOutputError``).

    A ``ValueError`` for callers of the public functions; the training loop catches it and ends the run as
    diverged (a step that sent the parameters to overflow), keeping the last good epoch.

    Example:
        >>> issubclass(NonFiniteOutputError, ValueError)
        True
    """


def check_outputs_finite(eta: Tensor) -> None:
    """Raise :class:`NonFiniteOutputError` unless every entry of ``eta`` is finite.

    Raises:
        NonFiniteOutputError: an entry is ``nan`` or ``inf``.

    Example:
        >>> check_outputs_finite(torch.zeros(2, 3))
        >>> check_outputs_finite(torch.tensor([[float("inf")]]))
        Traceback (most recent call last):
            ...
        dropgeom._utils.NonFiniteOutputError: the model's outputs are non-finite at these parameters
    """
    if not _all_finite(eta):
        raise NonFiniteOutputError("the model's outputs are non-finite at these parameters")


def _all_finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite. A finite sum implies it (NaN/inf propagate); only a non-finite sum
    (which may be an overflow) needs the elementwise check: one reduction instead of three ``[numel]`` temporaries."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def check_finite(name: str, t: Tensor) -> None:
    """Raise ``ValueError`` if the floating tensor ``t`` holds a NaN or an infinity (``_all_finite``).

    Raises:
        ValueError: ``t`` contains non-finite values.
    """
    if torch.is_floating_point(t) and not _all_finite(t):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")


def check_p(p: object, where: str, *, zero: bool = True) -> float:
    """A drop probability as a float: in ``[0, 1)`` (``zero=False``: in ``(0, 1)``), the one validator of ``p``.

    Raises:
        TypeError: ``p`` is not a real number (a bool is a ``ValueError``: ``True`` is not a probability).
        ValueError: ``p`` is a bool, not finite, or outside the interval.

    Example:
        >>> check_p(0.25, "the mask")
        0.25
    """
    if isinstance(p, Tensor) and p.numel() == 1:
        p = p.item()
    interval = "[0, 1)" if zero else "(0, 1)"
    if isinstance(p, bool):
        raise ValueError(f"p for {where} must lie in {interval} (the drop probability), got {p!r}")
    if not isinstance(p, numbers.Real):
        raise TypeError(f"p for {where} must be a float, got {type(p).__name__}")
    value = float(p)
    if not math.isfinite(value) or not (0.0 <= value < 1.0) or (not zero and value == 0.0):
        raise ValueError(f"p for {where} must lie in {interval} (the drop probability), got {p!r}")
    return value


def memory_guard(numel: int, dtype: torch.dtype, what: str, alternative: str, limit: Optional[int] = None) -> None:
    """Raise ``MemoryError`` with advice if ``numel`` elements of ``dtype`` exceed ``limit`` bytes.

    Raises:
        MemoryError: ``numel`` elements need more than ``limit`` (default :data:`DEFAULT_MEMORY_LIMIT`) bytes.
    """
    limit = DEFAULT_MEMORY_LIMIT if limit is None else limit
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes > limit:
        raise MemoryError(f"{what} needs {nbytes / 1024**3:.2f} GiB (limit {limit / 1024**3:.2f} GiB); {alternative}")


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_MODE = _file_mode()  # mkstemp creates 0600 files; written results get the usual permissions


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, fsync, ``os.replace``).

    One writer for run directories (:mod:`dropgeom.rundir`) and training checkpoints
    (:mod:`dropgeom.train.checkpoint`): a reader sees the old file or the new one, never a torn one.

    Raises:
        OSError: the folder cannot be created or written (the temporary file is removed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _MODE)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def to_jsonable(obj: Any) -> Any:
    """Convert tensors, numpy values and non-finite floats into plain JSON values (NaN/inf become strings).

    What :mod:`dropgeom.rundir` (which re-exports it) applies before writing JSON.

    Raises:
        Nothing of its own: other objects are returned as they are (``json.dumps`` may refuse them).

    Example:
        >>> to_jsonable({1: torch.tensor([0.5, float("nan")])})
        {'1': [0.5, 'nan']}
    """
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)  # "nan", "inf", "-inf": JSON has no such numbers
    return obj


def first_order_only(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a hand-written ``autograd.Function.backward`` that is differentiable once.

    ``torch.autograd.function.once_differentiable`` alone raises only when the incoming gradients require
    grad; a double backward whose incoming gradients do not (a Hessian-vector product of a scalar built on the
    function, ``create_graph=True``) would silently miss this function's second-order terms. Under
    ``create_graph`` autograd runs the backward with grad mode on: this raises there.

    Raises:
        RuntimeError: (from the decorated backward) when called with ``create_graph=True``.

    Example:
        >>> class Square(torch.autograd.Function):
        ...     @staticmethod
        ...     def forward(ctx, x):
        ...         ctx.save_for_backward(x)
        ...         return x * x
        ...     @staticmethod
        ...     @first_order_only("Square")
        ...     def backward(ctx, g):
        ...         (x,) = ctx.saved_tensors
        ...         return 2 * x * g
        >>> x = torch.tensor(3.0, requires_grad=True)
        >>> torch.autograd.grad(Square.apply(x), x)[0]
        tensor(6.)
    """
    from torch.autograd.function import once_differentiable

    def wrap(backward: Callable[..., Any]) -> Callable[..., Any]:
        inner = once_differentiable(backward)

        def checked(ctx: Any, *grads: Any) -> Any:
            if torch.is_grad_enabled():
                raise RuntimeError(
                    f"{name} is differentiable once (its backward is written by hand): second derivatives "
                    "(create_graph=True, Hessian-vector products) through it are not supported"
                )
            return inner(ctx, *grads)

        return checked

    return wrap
