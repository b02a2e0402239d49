r"""The old calling conventions of the dropout functions, kept for one release (theory.md section 4).

The dropout quantities share one signature,

.. code-block:: text

    f(model, inputs, targets=None, *, family, p, layers, noise, method, n_samples, generator, ...)

(keyword-only after ``targets``). Until the next release, :func:`legacy_signature`
maps the old positional arguments and the old keyword names onto it and emits a
``DeprecationWarning``; :class:`TupleLike` keeps the unpacking and indexing of
results that were ``NamedTuple`` s working, with the same warning.

Example:
    >>> import warnings
    >>> @legacy_signature(old=("targets", "scale"))
    ... def f(model, inputs, targets=None, *, scale=1):
    ...     return scale
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     f(None, None, None, 5), caught[0].category.__name__
    (5, 'DeprecationWarning')
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import warnings
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple, TypeVar, cast

from torch import Tensor

__all__ = ["legacy_signature", "warn_deprecated", "TupleLike"]

F = TypeVar("F", bound=Callable[..., Any])

#: positional parameters of the new signature: model, inputs, targets
N_POSITIONAL = 3


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside the dropgeom package (as pandas' ``find_stack_level``), so a
    warning points at the user's line however many of dropgeom's wrappers (legacy, batches) sit in between."""
    level, frame = 1, inspect.currentframe()
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


def warn_deprecated(message: str, stacklevel: Optional[int] = None) -> None:
    """Emit ``DeprecationWarning(message + removal note)`` pointing at the caller's line (the first frame outside
    dropgeom unless ``stacklevel`` is given)."""
    level = stacklevel if stacklevel is not None else _caller_stacklevel()
    warnings.warn(f"{message} (deprecated; removed in the next release)", DeprecationWarning, stacklevel=level)


def _is_legacy(args: Tuple[Any, ...], old: Sequence[str]) -> bool:
    """True when the positional ``args`` follow the old order rather than ``(model, inputs, targets)``."""
    if len(args) > N_POSITIONAL:
        return True
    # old orders whose third argument was not ``targets`` (penalty: family): a tensor or None is the new targets
    return len(args) == N_POSITIONAL and old[0] != "targets" and not (args[2] is None or isinstance(args[2], Tensor))


def translate(
    name: str, args: Tuple[Any, ...], kwargs: Dict[str, Any], old: Sequence[str], renamed: Mapping[str, str]
) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    """The call ``name(*args, **kwargs)`` in the new signature (warns once per deprecated use).

    Raises:
        TypeError: too many positional arguments, or one argument given twice (old and new name).
    """
    kwargs = dict(kwargs)
    if _is_legacy(args, old):
        extra = args[2:]
        if len(extra) > len(old):
            raise TypeError(f"{name}() takes at most {2 + len(old)} positional arguments, got {len(args)}")
        names = list(old[: len(extra)])
        for key, value in zip(names, extra):
            if key in kwargs:
                raise TypeError(f"{name}() got multiple values for argument {key!r}")
            kwargs[key] = value
        args = args[:2]
        shown = [k for k in names if k != "targets" or old[0] != "targets"]
        warn_deprecated(f"{name}(): passing {', '.join(shown)} by position; pass them as keywords")
    for old_key, new_key in renamed.items():
        if old_key in kwargs:
            if new_key in kwargs:
                raise TypeError(f"{name}() got both {old_key!r} (old name) and {new_key!r}")
            warn_deprecated(f"{name}(): the keyword {old_key!r} is now {new_key!r}")
            kwargs[new_key] = kwargs.pop(old_key)
    return args, kwargs


def legacy_signature(old: Sequence[str], renamed: Optional[Mapping[str, str]] = None) -> Callable[[F], F]:
    """Decorator: accept the old positional order ``(model, inputs, *old)`` and the old keyword names.

    ``old``: the names of the old positional parameters after ``model, inputs``;
    ``renamed``: ``{old keyword: new keyword}``. New-style calls pass through untouched. The wrapper's
    ``translate_call(args, kwargs)`` gives the new-style call, for wrappers that must read the arguments first.
    """
    renames = dict(renamed or {})

    def decorate(fn: F) -> F:
        def translate_call(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
            if len(args) >= N_POSITIONAL or any(k in kwargs for k in renames):
                return translate(fn.__name__, args, kwargs, old, renames)
            return args, kwargs

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            args, kwargs = translate_call(args, kwargs)
            return fn(*args, **kwargs)

        # outer wrappers (dropgeom.dispatch.mean_over_batches) translate first, so old forms stream too
        wrapper.translate_call = translate_call  # type: ignore[attr-defined]
        return cast(F, wrapper)

    return decorate


class TupleLike:
    """Unpacking and indexing of a frozen dataclass result in field order, as its ``NamedTuple`` predecessor allowed.

    Deprecated: read the fields by name (``r.value``). Truthiness and ``len`` are not emulated.
    """

    def _fields_tuple(self) -> Tuple[Any, ...]:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(cast(Any, self)))

    def __iter__(self) -> Iterator[Any]:
        warn_deprecated(f"unpacking a {type(self).__name__}; read its fields by name")
        return iter(self._fields_tuple())

    def __getitem__(self, index: Any) -> Any:
        warn_deprecated(f"indexing a {type(self).__name__}; read its fields by name")
        return self._fields_tuple()[index]
