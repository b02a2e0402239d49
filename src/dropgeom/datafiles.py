"""Local data files for :func:`dropgeom.data.load_dataset`: IDX (MNIST format), ``.npz`` and ``.csv``.

:func:`read_idx` / :func:`write_idx` read and write MNIST-format IDX arrays (gzip optional); the readers
return ``(X, y, feature names)`` as numpy arrays. :mod:`dropgeom.data` re-exports ``read_idx`` and ``write_idx``.

Example:
    >>> import os, tempfile
    >>> import numpy as np
    >>> path = os.path.join(tempfile.mkdtemp(), "a-idx2-ubyte")
    >>> write_idx(path, np.arange(6, dtype=np.uint8).reshape(2, 3))
    >>> read_idx(path).tolist()
    [[0, 1, 2], [3, 4, 5]]
"""

from __future__ import annotations

import csv
import gzip
import os
from typing import Dict, Optional, Tuple, Union

import numpy as np

__all__ = ["read_idx", "write_idx"]

PathLike = Union[str, "os.PathLike[str]"]


# ---------------------------------------------------------------------------
# IDX (MNIST) format. Hand-written: a few lines of header parsing, no library
# in our dependencies reads it without downloading.
# ---------------------------------------------------------------------------

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _open_maybe_gzip(path: PathLike) -> bytes:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path!r}")
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file name says
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise ValueError(f"{path!r}: corrupt gzip stream ({err})") from err
    return raw


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), optionally gzip-compressed.

    Layout: two zero bytes, a type byte (``0x08`` uint8, ``0x09`` int8, ``0x0B``
    int16, ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64, all big-endian),
    a byte with the number of dimensions ``d``, then ``d`` big-endian uint32
    sizes, then the data in C order.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: a corrupt gzip stream; not an IDX file (too short, a wrong magic number, an unknown type code,
            0 dimensions, a truncated header) or a data size that disagrees with the header's shape.
        OSError: the file cannot be read.

    Example:
        >>> import tempfile, os
        >>> f = os.path.join(tempfile.mkdtemp(), "a-idx1-ubyte")
        >>> write_idx(f, np.array([3, 1, 4], dtype=np.uint8))
        >>> read_idx(f)
        array([3, 1, 4], dtype=uint8)
    """
    raw = _open_maybe_gzip(path)
    where = os.fspath(path)
    if len(raw) < 4:
        raise ValueError(f"{where!r}: too short to be an IDX file ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{where!r}: not an IDX file (the magic number must start with two zero bytes)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{where!r}: unknown IDX data type code 0x{code:02x}")
    if ndim == 0:
        raise ValueError(f"{where!r}: IDX file declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{where!r}: truncated IDX header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{where!r}: IDX header declares shape {dims} of {dtype} ({expected} bytes) but the file holds "
            f"{len(raw) - header} data bytes"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path: PathLike, array: np.ndarray, compress: bool = False) -> None:
    """Write ``array`` as an IDX file (gzip-compressed if ``compress``); the inverse of :func:`read_idx`.

    Raises:
        ValueError: a dtype IDX cannot store (it stores uint8, int8, int16, int32, float32, float64); a 0-d
            array or one of more than 255 dimensions (the header has one byte for the count; :func:`read_idx`
            refuses 0).
        OSError: the file cannot be written.

    Example:
        >>> import tempfile, os
        >>> f = os.path.join(tempfile.mkdtemp(), "b-idx3-ubyte.gz")
        >>> write_idx(f, np.zeros((2, 3, 3), dtype=np.uint8), compress=True)
        >>> read_idx(f).shape
        (2, 3, 3)
    """
    array = np.asarray(array)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
    dt = array.dtype.newbyteorder("=")
    if dt not in codes:
        raise ValueError(f"IDX cannot store dtype {array.dtype}; use one of {sorted(str(d) for d in codes)}")
    code = codes[dt]
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"IDX stores arrays of 1 to 255 dimensions, got a {array.ndim}-d array")
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    body = np.ascontiguousarray(array.astype(_IDX_DTYPES[code])).tobytes()
    blob = header + body
    if compress:
        blob = gzip.compress(blob)
    with open(os.fspath(path), "wb") as fh:
        fh.write(blob)


# ---------------------------------------------------------------------------
# Sources returning raw (X, y, feature_names, info)
# ---------------------------------------------------------------------------


def _read_npz(path: PathLike) -> Tuple[np.ndarray, np.ndarray, Optional[Tuple[str, ...]]]:
    import zipfile
    import zlib

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path!r}")
    with open(path, "rb") as fh:
        head = fh.read(6)
    if head.startswith(b"\x93NUMPY"):
        raise ValueError(f"{path!r}: a single .npy array, not an npz archive; save X and y with numpy.savez")
    if not head.startswith(b"PK"):
        raise ValueError(f"{path!r}: not an npz file (no zip header); save X and y with numpy.savez")
    broken = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error)
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.keys())
            xk = next((k for k in ("X", "x") if k in z), None)
            yk = next((k for k in ("y", "Y") if k in z), None)
            if xk is None or yk is None:
                raise LookupError(f"{path!r}: an npz data file needs arrays 'X' and 'y'; it holds {keys}")
            x, y = z[xk], z[yk]
            names = tuple(str(s) for s in z["feature_names"]) if "feature_names" in z else None
    except LookupError as err:
        raise ValueError(str(err)) from None
    except broken as err:  # a truncated or bit-flipped archive: zipfile / zlib / numpy errors
        raise ValueError(
            f"{path!r}: the npz file is truncated or corrupt ({type(err).__name__}); re-create it with numpy.savez"
        ) from err
    return x, y, names


def _read_csv(path: PathLike, label: Union[str, int]) -> Tuple[np.ndarray, np.ndarray, Tuple[str, ...]]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path!r}")
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    if len(rows) < 2:
        raise ValueError(f"{path!r}: a csv data file needs a header row and at least one data row")
    header = [c.strip() for c in rows[0]]
    if isinstance(label, int):
        if not -len(header) <= label < len(header):
            raise ValueError(f"{path!r}: label column {label} out of range for {len(header)} columns")
        li = label % len(header)
    else:
        if label not in header:
            raise ValueError(f"{path!r}: no label column {label!r}; columns are {header}")
        li = header.index(label)
    bad = [i + 2 for i, r in enumerate(rows[1:]) if len(r) != len(header)]
    if bad:
        raise ValueError(f"{path!r}: rows {bad[:5]} have a different number of fields than the header ({len(header)})")
    labels = [r[li].strip() for r in rows[1:]]
    feats = [[c for j, c in enumerate(r) if j != li] for r in rows[1:]]
    try:
        x = np.asarray(feats, dtype=np.float64)
    except ValueError as err:
        raise ValueError(f"{path!r}: feature columns must be numeric ({err})") from err
    try:
        y = np.asarray([float(v) for v in labels])
        if np.all(y == np.round(y)):
            y = y.astype(np.int64)
    except ValueError:
        y = np.asarray(labels)  # string class labels
    return x, y, tuple(h for j, h in enumerate(header) if j != li)


_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def _find_mnist(directory: PathLike) -> Dict[str, str]:
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"MNIST directory not found: {directory!r}")
    found, missing = {}, []
    for key, stem in _MNIST_FILES.items():
        for cand in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
            if os.path.isfile(os.path.join(directory, cand)):
                found[key] = os.path.join(directory, cand)
                break
        else:
            missing.append(stem + "[.gz]")
    if missing:
        raise FileNotFoundError(f"{directory!r} lacks the MNIST files {missing}")
    return found
