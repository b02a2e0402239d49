r"""Data sets for the experiments: bundled, synthetic and local files (nothing downloads).

:func:`load_dataset` returns a :class:`Dataset`: train and test tensors, the
output family, the number of classes and the feature names. Features are
standardised with the mean and standard deviation of the *training* split
(constant features keep scale 1), and the train/test split is a random
permutation fixed by ``seed``.

Sources (``name``):

* scikit-learn's bundled sets, shipped with the package: ``digits`` (default,
  1,797 8x8 images, 10 classes), ``breast_cancer``, ``wine``, ``iris``;
* synthetic teachers with label noise: ``glm_teacher`` (a flat model:
  ``eta = x W``, a canonical-link GLM, whose manifold is e-flat, theory.md 1)
  and ``mlp_teacher`` (a curved one: a tanh MLP with large weights);
* local files: ``npz`` (keys ``X`` and ``y``), ``csv`` (a header row and a label
  column), ``idx`` (MNIST-format IDX images + labels, gzip optional) and
  ``mnist`` (a directory holding the four standard MNIST IDX files, whose own
  train/test split is kept). ``fashion_mnist`` reads the four IDX files the
  Debian package ``dataset-fashion-mnist`` installs in
  ``/usr/share/datasets/fashion-mnist`` (or ``path=``), 60,000 training and
  10,000 test images of 28x28 pixels, 10 classes, keeping its own split; when
  they are missing it fails at once with one line saying how to install them.
  A path ending in ``.npz`` / ``.csv`` / ``-ubyte``
  (``.gz``) may also be given directly as ``name``.

Labels: integer (or string) labels give the ``categorical`` family with the
classes re-indexed to ``0..C-1`` (sorted); floating-point labels from files give
the ``gaussian`` family with targets of shape ``[n, 1]``.

Example:
    >>> ds = load_dataset("iris", seed=0)
    >>> ds.x_train.shape, ds.x_test.shape, ds.family, ds.num_classes
    (torch.Size([112, 4]), torch.Size([38, 4]), 'categorical', 3)
    >>> bool(ds.x_train.mean(0).abs().max() < 1e-5)
    True
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .datafiles import _find_mnist, _read_csv, _read_npz, read_idx, write_idx

__all__ = ["Dataset", "load_dataset", "read_idx", "write_idx", "DATASETS"]

PathLike = Union[str, "os.PathLike[str]"]

BUNDLED = ("digits", "breast_cancer", "wine", "iris")
SYNTHETIC = ("glm_teacher", "mlp_teacher")
FILES = ("npz", "csv", "idx", "mnist")
#: data sets installed by system packages (read from their install directory, never downloaded)
INSTALLED = ("fashion_mnist",)
DATASETS = BUNDLED + SYNTHETIC + FILES + INSTALLED
#: where the Debian package ``dataset-fashion-mnist`` puts the four IDX files
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_HINT = (
    "Fashion-MNIST is not installed: run `apt-get install -y dataset-fashion-mnist` "
    f"(Debian/Ubuntu; it puts the IDX files in {FASHION_MNIST_DIR}) or pass path=<directory with the four IDX files>"
)


@dataclass(frozen=True)
class Dataset:
    """A train/test split with its output family.

    Attributes:
        name: where the data came from.
        x_train, y_train, x_test, y_test: tensors with a leading sample axis;
            labels are int64 class indices (``categorical``) or float ``[n, 1]``.
        family: the exponential family of the labels (``"categorical"`` or ``"gaussian"``).
        num_classes: number of classes (``None`` for regression).
        feature_names: names of the input features, if the source has them.
        mean, std: the standardisation fitted on the training split
            (``x_standardised = (x_raw - mean) / std``); ``None`` if not standardised.
        info: extra facts about the source (teacher parameters, label noise, ...).
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    family: str = "categorical"
    num_classes: Optional[int] = None
    feature_names: Optional[Tuple[str, ...]] = None
    mean: Optional[Tensor] = None
    std: Optional[Tensor] = None
    info: Dict[str, object] = field(default_factory=dict)

    @property
    def num_features(self) -> int:
        """Width of one flattened input."""
        return int(self.x_train[0].numel())

    @property
    def num_outputs(self) -> int:
        """Width ``K`` of the natural parameter a model needs for this data."""
        return int(self.num_classes) if self.family == "categorical" else int(self.y_train.shape[-1])

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])

    def to(self, dtype: Optional[torch.dtype] = None, device: Optional[Union[str, torch.device]] = None) -> "Dataset":
        """A copy with the inputs (and float labels) moved to ``dtype`` / ``device``."""

        def cast(t: Optional[Tensor], is_label: bool = False) -> Optional[Tensor]:
            if t is None:
                return None
            if is_label and not torch.is_floating_point(t):
                return t.to(device=device) if device is not None else t
            return t.to(dtype=dtype or t.dtype, device=device or t.device)

        return replace(
            self,
            x_train=cast(self.x_train),
            x_test=cast(self.x_test),
            y_train=cast(self.y_train, True),
            y_test=cast(self.y_test, True),
            mean=cast(self.mean),
            std=cast(self.std),
        )

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={tuple(self.x_train.shape)}, test={tuple(self.x_test.shape)}, "
            f"family={self.family!r}, num_classes={self.num_classes})"
        )


def _bundled(name: str) -> Tuple[np.ndarray, np.ndarray, Optional[Tuple[str, ...]]]:
    from sklearn import datasets as skd  # local import: scikit-learn is slow to import

    loader = {"digits": skd.load_digits, "breast_cancer": skd.load_breast_cancer, "wine": skd.load_wine, "iris": skd.load_iris}[
        name
    ]
    bunch = loader()
    names = getattr(bunch, "feature_names", None)
    return (
        np.asarray(bunch.data, dtype=np.float64),
        np.asarray(bunch.target),
        (tuple(str(s) for s in names) if names is not None else None),
    )


def _teacher(
    kind: str, n: int, num_features: int, num_classes: int, label_noise: float, hidden: int, depth: int, scale: float, seed: int
) -> Tuple[np.ndarray, np.ndarray, Dict[str, object]]:
    if n < 2 or num_features < 1 or num_classes < 2:
        raise ValueError(
            f"teacher data needs n >= 2, num_features >= 1 and num_classes >= 2; got n={n}, "
            f"num_features={num_features}, num_classes={num_classes}"
        )
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must lie in [0, 1], got {label_noise}")
    if not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    # independent streams: the teacher (inputs, weights) and the labels, so that
    # changing label_noise changes only the labels
    rng = np.random.default_rng([seed, 1])
    lab = np.random.default_rng([seed, 2])
    x = rng.standard_normal((n, num_features))
    if kind == "glm_teacher":
        w = rng.standard_normal((num_features, num_classes)) * scale / np.sqrt(num_features)
        logits = x @ w
        info: Dict[str, object] = {"teacher": "glm", "scale": scale}
    else:
        if hidden < 1 or depth < 1:
            raise ValueError(f"mlp_teacher needs hidden >= 1 and depth >= 1; got hidden={hidden}, depth={depth}")
        h, fan_in = x, num_features
        for _ in range(depth):
            w = rng.standard_normal((fan_in, hidden)) * scale / np.sqrt(fan_in)
            b = rng.standard_normal(hidden) * 0.5
            h, fan_in = np.tanh(h @ w + b), hidden
        w = rng.standard_normal((hidden, num_classes)) * scale / np.sqrt(hidden)
        logits = h @ w
        info = {"teacher": "tanh_mlp", "hidden": hidden, "depth": depth, "scale": scale}
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    u = lab.random(n)[:, None]
    y = (u > np.cumsum(p, 1)).sum(1).clip(max=num_classes - 1)
    flip = lab.random(n) < label_noise
    y = np.where(flip, lab.integers(0, num_classes, n), y)
    info.update({"label_noise": label_noise, "n": n, "bayes_accuracy_clean": float((p.argmax(1) == y).mean())})
    return x, y, info


# ---------------------------------------------------------------------------
# The public loader
# ---------------------------------------------------------------------------


def _labels(y: np.ndarray, where: str) -> Tuple[np.ndarray, str, Optional[int], Optional[Tuple[str, ...]]]:
    """Class indices (categorical) or float targets [n, 1] (gaussian)."""
    y = np.asarray(y)
    if y.dtype.kind in "fc":
        if y.ndim == 1:
            y = y[:, None]
        if y.ndim != 2:
            raise ValueError(f"{where}: float labels must have shape [n] or [n, K], got {y.shape}")
        if not np.isfinite(y).all():
            raise ValueError(f"{where}: labels contain non-finite values")
        return y.astype(np.float64), "gaussian", None, None
    if y.ndim != 1:
        raise ValueError(f"{where}: class labels must have shape [n], got {y.shape}")
    classes, idx = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"{where}: labels hold a single class {classes.tolist()}; classification needs >= 2")
    names = tuple(str(c) for c in classes)
    return idx.astype(np.int64), "categorical", int(len(classes)), names


def _split(n: int, test_fraction: float, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    n_test = int(round(test_fraction * n))
    if n_test < 1 or n - n_test < 1:
        raise ValueError(f"test_fraction={test_fraction} leaves an empty split for n={n} samples")
    perm = rng.permutation(n)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def load_dataset(
    name: Union[str, "os.PathLike[str]"] = "digits",
    *,
    path: Optional[PathLike] = None,
    labels: Optional[PathLike] = None,
    label: Union[str, int] = "label",
    test_fraction: float = 0.25,
    seed: int = 0,
    standardize: bool = True,
    dtype: torch.dtype = torch.float32,
    max_train: Optional[int] = None,
    n: int = 2000,
    num_features: int = 20,
    num_classes: int = 3,
    label_noise: float = 0.1,
    hidden: int = 32,
    depth: int = 2,
    scale: Optional[float] = None,
) -> Dataset:
    """Load a data set as a standardised train/test :class:`Dataset`.

    Args:
        name: one of ``digits`` (default), ``breast_cancer``, ``wine``, ``iris``,
            ``glm_teacher``, ``mlp_teacher``, ``npz``, ``csv``, ``idx``, ``mnist``,
            ``fashion_mnist`` (installed by the Debian package ``dataset-fashion-mnist``), or a path to an ``.npz`` / ``.csv`` / IDX file.
        path: the file (``npz``, ``csv``, ``idx`` images) or directory (``mnist``).
        labels: the IDX label file that goes with ``path`` (``idx`` only).
        label: the label column of a csv file (name or index; default ``"label"``).
        test_fraction: share of the samples held out (ignored by ``mnist``,
            which keeps its own split).
        seed: fixes the split and the synthetic teachers.
        standardize: subtract the training mean and divide by the training
            standard deviation (constant features: by 1).
        dtype: floating-point type of the inputs (and of float labels).
        max_train: keep at most this many training samples (the first of the
            seeded permutation); ``None`` keeps all.
        n, num_features, num_classes, label_noise, hidden, depth, scale:
            synthetic teachers only. ``label_noise`` is the probability that a
            label is replaced by a uniformly random class; ``scale`` multiplies
            the teacher's weights (default 3 for ``glm_teacher``, 2.5 for
            ``mlp_teacher``: large enough that tanh units saturate and the
            teacher's manifold is curved).

    Raises:
        ValueError: unknown name, bad options, malformed files, mismatched
            numbers of inputs and labels.
        FileNotFoundError: a local file or directory that does not exist, or
            ``fashion_mnist`` not installed (the message says how to install it).

    Example:
        >>> ds = load_dataset("mlp_teacher", n=200, num_features=5, seed=1)
        >>> ds.n_train, ds.n_test, ds.num_classes
        (150, 50, 3)
        >>> load_dataset("mlp_teacher", n=200, num_features=5, seed=1).y_train.equal(ds.y_train)
        True
    """
    _check_options(seed, test_fraction, dtype, max_train)
    key, path = _resolve_name(name, path)
    rng = np.random.default_rng(seed)
    if key in SYNTHETIC:
        sc = scale if scale is not None else (3.0 if key == "glm_teacher" else 2.5)
        x, y, info = _teacher(key, n, num_features, num_classes, label_noise, hidden, depth, sc, seed)
        src = _Source(key, x, y, tuple(f"x{j}" for j in range(num_features)), info=info)
    else:
        src = _read_source(key, path, labels, label)
    x = _check_inputs(src.x, src.y, src.where)
    y, family, k, class_names = _labels(src.y, src.where)
    info = {**src.info, "classes": class_names} if class_names is not None else src.info
    tr, te = _split_indices(x.shape[0], src.n_fixed_train, float(test_fraction), max_train, rng)
    return _assemble(src, x, y, tr, te, family, k, info, standardize, dtype)


def _check_options(seed: Any, test_fraction: Any, dtype: Any, max_train: Any) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if not (isinstance(test_fraction, (int, float)) and 0.0 < test_fraction < 1.0):
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction!r}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch dtype, got {dtype!r}")
    if max_train is not None and (not isinstance(max_train, int) or max_train < 1):
        raise ValueError(f"max_train must be a positive int or None, got {max_train!r}")


def _resolve_name(name: Union[str, "os.PathLike[str]"], path: Optional[PathLike]) -> Tuple[str, Optional[PathLike]]:
    """``(source key, path)``: a name of :data:`DATASETS`, or a file / directory path given as the name."""
    key = os.fspath(name) if isinstance(name, os.PathLike) else name
    if not isinstance(key, str):
        raise ValueError(f"name must be a string or a path, got {type(name).__name__}")
    if key in DATASETS:
        return key, path
    low = key.lower()
    if low.endswith(".npz"):
        return "npz", key
    if low.endswith(".csv"):
        return "csv", key
    if low.endswith(("ubyte", "ubyte.gz")):
        return "idx", key
    if os.path.isdir(key):
        return "mnist", key
    raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASETS)} or give a .npz/.csv/IDX path")


@dataclass
class _Source:
    """What a source gives before labels are indexed and the data are split."""

    key: str
    x: np.ndarray
    y: np.ndarray
    names: Optional[Tuple[str, ...]] = None
    where: str = ""
    info: Dict[str, object] = field(default_factory=dict)
    n_fixed_train: Optional[int] = None  # the first samples are the source's own training split (MNIST)

    def __post_init__(self) -> None:
        self.where = self.where or self.key


def _read_source(key: str, path: Optional[PathLike], labels: Optional[PathLike], label: Union[str, int]) -> _Source:
    """The bundled sets and local files (``fashion_mnist`` is read as an ``mnist`` directory)."""
    if key in BUNDLED:
        return _Source(key, *_bundled(key))
    if key == "fashion_mnist":
        path = FASHION_MNIST_DIR if path is None else path
        try:
            _find_mnist(path)
        except FileNotFoundError:
            raise FileNotFoundError(FASHION_MNIST_HINT + f" (looked in {os.fspath(path)!r})") from None
        src = _read_source("mnist", path, labels, label)
        return replace(src, key=key, info={**src.info, "directory": src.where})  # named fashion_mnist, not by its folder
    if path is None:
        raise ValueError(f"dataset {key!r} needs path=...")
    where = os.fspath(path)
    if key == "npz":
        return _Source(key, *_read_npz(path), where=where)
    if key == "csv":
        return _Source(key, *_read_csv(path, label), where=where)
    if key == "idx":
        if labels is None:
            raise ValueError("dataset 'idx' needs labels=<IDX label file> beside path=<IDX image file>")
        return _Source(key, read_idx(path), read_idx(labels), where=where)
    xs = {k: read_idx(v) for k, v in _find_mnist(path).items()}
    for part in ("train", "test"):
        if xs[f"x_{part}"].shape[0] != xs[f"y_{part}"].shape[0]:
            raise ValueError(
                f"{where!r}: MNIST {part} images ({xs[f'x_{part}'].shape[0]}) and labels "
                f"({xs[f'y_{part}'].shape[0]}) differ in number"
            )
    x = np.concatenate([xs["x_train"], xs["x_test"]])
    y = np.concatenate([xs["y_train"], xs["y_test"]])
    return _Source(key, x, y, where=where, n_fixed_train=xs["x_train"].shape[0])


def _check_inputs(x: Any, y: Any, where: str) -> np.ndarray:
    """The inputs as float64 ``[n, features]``, checked against the labels."""
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim < 2:
        raise ValueError(f"{where}: inputs must have shape [n, ...] with at least one feature, got {x.shape}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{where}: {x.shape[0]} inputs but {y.shape[0]} labels")
    if x.dtype.kind not in "biuf":
        raise ValueError(f"{where}: inputs must be numeric, got dtype {x.dtype}")
    x = x.reshape(x.shape[0], -1).astype(np.float64)
    if not np.isfinite(x).all():
        raise ValueError(f"{where}: inputs contain non-finite values")
    return x


def _split_indices(
    n: int, n_fixed_train: Optional[int], test_fraction: float, max_train: Optional[int], rng: np.random.Generator
) -> Tuple[np.ndarray, np.ndarray]:
    """Train and test indices: the source's own split or a seeded one, the training part cut to ``max_train``."""
    if n_fixed_train is not None:
        tr, te = np.arange(n_fixed_train), np.arange(n_fixed_train, n)
        tr = tr[rng.permutation(len(tr))] if max_train is not None else tr
    else:
        tr, te = _split(n, test_fraction, rng)
        tr = rng.permutation(tr) if max_train is not None else tr
    if max_train is not None:
        tr = np.sort(tr[:max_train])
    return tr, te


def _assemble(
    src: _Source,
    x: np.ndarray,
    y: np.ndarray,
    tr: np.ndarray,
    te: np.ndarray,
    family: str,
    k: Optional[int],
    info: Dict[str, object],
    standardize: bool,
    dtype: torch.dtype,
) -> Dataset:
    """The :class:`Dataset` of the split indices, standardised with the training split's mean and deviation."""
    x_tr, x_te = x[tr], x[te]
    mean = std = None
    if standardize:
        mean = x_tr.mean(0)
        std = x_tr.std(0)
        std = np.where(std > 1e-12 * max(1.0, float(np.abs(x_tr).max(initial=0.0))), std, 1.0)
        x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    ydt = torch.int64 if family == "categorical" else dtype

    def t(a: np.ndarray, dt: torch.dtype) -> Tensor:
        return torch.as_tensor(np.ascontiguousarray(a)).to(dt)

    return Dataset(
        name=src.where if src.key in FILES else src.key,
        x_train=t(x_tr, dtype),
        y_train=t(y[tr], ydt),
        x_test=t(x_te, dtype),
        y_test=t(y[te], ydt),
        family=family,
        num_classes=k,
        feature_names=src.names,
        mean=None if mean is None else t(mean, dtype),
        std=None if std is None else t(std, dtype),
        info=info,
    )
