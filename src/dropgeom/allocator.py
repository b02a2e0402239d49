"""Keep freed memory in the process heap, so large tensors are reused rather than mapped afresh.

glibc's ``malloc`` serves a block above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and gives it
back with ``munmap`` when freed. A float64 CNN evaluated on a thousand 28x28 images allocates activations of
tens of MiB at every step, so every step maps them anew and the kernel zero-fills each 4 KiB page on first
touch: in the full ``reproduce`` run the Fashion-MNIST CNN units spent about half their CPU time in the kernel
(1.3 billion minor page faults in 45 minutes). With mmap off (``M_MMAP_MAX = 0``) and trimming raised
(``M_TRIM_THRESHOLD``) the blocks stay in the heap and are reused: a CNN forward and backward on 1,000 images
drops from 9.3 to 5.4 CPU-seconds per 20 steps, the system time from 4.2 to 0.3 s (docs/benchmarks.md,
"The allocator"). Values are unchanged: only where the memory comes from differs.

The price is memory: freed blocks stay in the heap, fragmented, and the process's resident size grows to
several times glibc's. One Fashion-MNIST CNN gradient unit of the full ``reproduce`` preset, alone on the idle
2-core VM (2026-12-05, ``bench/unit_costs.py``): 418 CPU-seconds and a 2.1 GB peak with glibc's defaults,
212 CPU-seconds and a 7.9 GB peak with this (6.2-8.7 GB with trimming left on). Hence it is off unless asked
for: ``DROPGEOM_MALLOC=heap`` applies it in every ``dropgeom`` command and ``reproduce``'s workers (``system``, the default, keeps
glibc's defaults). Elsewhere than glibc (musl, macOS, Windows) it does nothing. Written by hand: ``mallopt``
through ``ctypes``, the settings glibc's ``MALLOC_MMAP_MAX_`` and ``MALLOC_TRIM_THRESHOLD_`` environment
variables would give, which only take effect at process start.

Example:
    >>> from dropgeom.allocator import keep_freed_memory
    >>> keep_freed_memory() in (True, False)  # True on Linux with glibc when DROPGEOM_MALLOC=heap
    True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from typing import Optional

from .options import MallocMode, parse

__all__ = ["keep_freed_memory", "is_glibc", "ENV_VAR"]

#: ``DROPGEOM_MALLOC=heap`` keeps freed memory in the heap; ``system`` (the default) keeps glibc's defaults
ENV_VAR = "DROPGEOM_MALLOC"

# glibc's <malloc.h> parameter numbers
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 2**31 - 1  # the largest int mallopt takes: freed memory is effectively never trimmed

_applied = False


def _wanted(enable: Optional[bool]) -> bool:
    if enable is not None:
        if not isinstance(enable, bool):
            raise TypeError(f"enable must be True, False or None, got {enable!r}")
        return enable
    raw = os.environ.get(ENV_VAR, "").strip() or MallocMode.SYSTEM
    return parse(MallocMode, raw, where=f"{ENV_VAR}={os.environ.get(ENV_VAR)!r}") is MallocMode.HEAP


def is_glibc() -> bool:
    """Whether this process runs on Linux with glibc, the one C library whose ``mallopt`` this module sets.

    Raises:
        Nothing: on any other system (or a C library :func:`platform.libc_ver` cannot name) it is False.

    Example:
        >>> is_glibc() in (True, False)
        True
    """
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def keep_freed_memory(enable: Optional[bool] = None) -> bool:
    """Make glibc keep freed blocks in the heap (no ``mmap`` per large block, no trimming) for this process.

    Call it once, early, in a process that allocates large tensors over and over (a ``reproduce`` worker does)
    and has memory to spare (see the module docstring). It is idempotent, and forked children inherit it.

    Args:
        enable: True to apply, False to do nothing, None (default) to follow ``DROPGEOM_MALLOC``
            (``heap`` applies; ``system``, the default, does nothing).

    Returns:
        True when the settings are in effect in this process (now or from an earlier call), False otherwise
        (not asked for, or not glibc).

    Raises:
        TypeError: ``enable`` is not a bool or None.
        ValueError: ``DROPGEOM_MALLOC`` is set to something other than ``heap`` or ``system``.

    Example:
        >>> import os
        >>> keep_freed_memory() == (os.environ.get("DROPGEOM_MALLOC", "system") == "heap" and is_glibc())
        True
    """
    global _applied
    if not _wanted(enable):
        return _applied
    if _applied:
        return True
    if not is_glibc():
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; apply the trim threshold first so that a failure leaves mmap as it was
    _applied = bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)) and bool(mallopt(_M_MMAP_MAX, 0))
    return _applied
