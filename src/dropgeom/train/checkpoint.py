"""Checkpoints written atomically: a crash never leaves a half-written file.

:func:`save_checkpoint` writes to a temporary file in the target directory,
flushes and fsyncs it, then ``os.replace``-s it over the target (an atomic
rename on POSIX and Windows), so a reader sees either the old or the new
checkpoint, never a torn one. :func:`load_checkpoint` returns ``None`` when
there is none.

Example:
    >>> import tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> save_checkpoint(os.path.join(d, "ckpt.pt"), {"epoch": 3})
    >>> load_checkpoint(os.path.join(d, "ckpt.pt"))["epoch"]
    3
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Union

import torch

from .._utils import atomic_write_bytes  # one atomic writer for run directories and checkpoints

__all__ = ["save_checkpoint", "load_checkpoint", "atomic_write_bytes"]

PathLike = Union[str, "os.PathLike[str]"]


def save_checkpoint(path: PathLike, state: Dict[str, Any]) -> None:
    """Serialise ``state`` (tensors, numbers, strings, lists, dicts) with ``torch.save``, atomically.

    Raises:
        TypeError: ``state`` is not a dict.
        OSError: the folder cannot be created or written (the temporary file is removed; an
            existing checkpoint is left as it was).
        Exception: whatever ``torch.save`` raises for an object it cannot pickle (e.g. a lambda);
            nothing is written then.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
        >>> save_checkpoint(path, {"epoch": 1, "w": torch.zeros(2)})
        >>> sorted(load_checkpoint(path))
        ['epoch', 'w']
    """
    if not isinstance(state, dict):
        raise TypeError(f"a checkpoint state must be a dict, got {type(state).__name__}")
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: PathLike) -> Optional[Dict[str, Any]]:
    """Load a checkpoint written by :func:`save_checkpoint`; ``None`` if the file does not exist.

    Loads with ``weights_only=True`` (no arbitrary code runs).

    Raises:
        ValueError: the file is truncated, corrupt or not a checkpoint (a
            one-line message naming it; the loader's own text is chained).

    Example:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> load_checkpoint(os.path.join(d, "missing.pt")) is None
        True
        >>> with open(os.path.join(d, "bad.pt"), "wb") as fh:
        ...     _ = fh.write(b"not a checkpoint")
        >>> load_checkpoint(os.path.join(d, "bad.pt"))
        Traceback (most recent call last):
        ...
        ValueError: checkpoint .../bad.pt is unreadable (truncated or corrupt: ...); delete it to start that training afresh
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - report any unpickling failure with the file name
        raise ValueError(
            f"checkpoint {path} is unreadable (truncated or corrupt: {type(err).__name__}); delete it to start that training afresh"
        ) from err
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} does not hold a dropgeom training state; delete it to start that training afresh")
    return state
