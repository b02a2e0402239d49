r"""C3b's regularizers at a given strength, and the CNN / data set-up of the C3 experiments.

:func:`make_regularizer` builds a training objective from a regularizer name
and a strength multiplier ``s > 0`` (a point of a log grid), relative to the
regularizer's nominal strength:

* ``l2``: clean loss + ``(s * l2 / 2) ||theta||^2`` (``l2`` the config's weight);
* ``fisher_quadratic``: clean loss + ``s * 1/2 V sum_j F^mask_jj`` at rate ``p``
  (theory.md 4.4; this is also Wei, Kakade & Ma's explicit regularizer without
  the noise, :mod:`dropgeom.train.wkm`);
* ``fisher_divergence``: clean loss + ``s * p sum_j K_j``;
* ``wkm_noise``: the explicit regularizer at ``s`` plus dropout's injected noise
  (:class:`dropgeom.train.wkm.WKMNoise`).

Example:
    >>> make_regularizer("fisher_divergence", 2.0, p=0.2, l2=1e-3)
    FisherDropout(p=0.2, form='divergence', curvature=False, estimator='exact', layers=None, weight=2.0)
    >>> make_regularizer("l1", 1.0, p=0.2, l2=1e-3)
    Traceback (most recent call last):
    ...
    ValueError: unknown regularizer 'l1'; choose from ['l2', 'fisher_quadratic', 'fisher_divergence', 'wkm_noise']
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from ..config import C3_REGULARIZERS, ConfigError, RunConfig
from .common import ACT, DTYPE, ExperimentData, build_mlp, project_pca

__all__ = [
    "make_regularizer",
    "require_datasets",
    "MissingDatasetError",
    "REGULARIZERS",
    "build_cnn",
    "c3_data",
    "c3_model",
    "c3_epochs",
    "c3_train",
    "IMAGE_MLP_WIDTH",
    "MONITOR_INPUTS",
]

#: hidden width of the MLP on Fashion-MNIST (784-256-256-10)
IMAGE_MLP_WIDTH = 256


def _l2(s: float, p: float, l2: float, estimator: str = "exact") -> Any:
    from ..train import make_objective

    return make_objective("l2", weight=s * l2)


def _fq(s: float, p: float, l2: float, estimator: str = "exact") -> Any:
    from ..train.objectives import FisherDropout

    return FisherDropout(p=p, form="quadratic", weight=s, estimator=estimator)


def _fd(s: float, p: float, l2: float, estimator: str = "exact") -> Any:
    from ..train.objectives import FisherDropout

    return FisherDropout(p=p, form="divergence", weight=s, estimator=estimator)


def _wkm(s: float, p: float, l2: float, estimator: str = "exact") -> Any:
    from ..train.wkm import WKMNoise

    return WKMNoise(p=p, weight=s, estimator=estimator)


#: regularizer name -> builder(strength, p, l2)
REGULARIZERS: Dict[str, Callable[..., Any]] = {"l2": _l2, "fisher_quadratic": _fq, "fisher_divergence": _fd, "wkm_noise": _wkm}
assert tuple(REGULARIZERS) == C3_REGULARIZERS


def make_regularizer(name: str, strength: float, p: float, l2: float, estimator: str = "exact") -> Any:
    """The training objective of regularizer ``name`` at ``strength`` times its nominal strength.

    ``estimator`` is passed to the Fisher penalties (``"unit"``: one sampled unit per input, unbiased;
    used for the CNN, whose exact divergence form costs one forward pass per unit).

    Raises:
        ValueError: an unknown name, or a strength that is not a finite positive number.

    Example: see the module docstring.
    """
    if name not in REGULARIZERS:
        raise ValueError(f"unknown regularizer {name!r}; choose from {list(REGULARIZERS)}")
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) or strength <= 0:
        raise ValueError(f"regularizer strength must be a finite number > 0 (a point of a log grid), got {strength!r}")
    return REGULARIZERS[name](float(strength), float(p), float(l2), estimator)


def build_cnn(side: int, channels: int, out_dim: int, activation: str = "tanh", p: float = 0.0, seed: int = 0) -> nn.Sequential:
    """A small float64 CNN with dropout between blocks:
    ``[conv3x3(8) act maxpool2 dropout] [conv3x3(16) act maxpool2 dropout] linear``.

    Raises:
        ValueError: an unknown activation or an image side not divisible by 4.

    Example:
        >>> net = build_cnn(8, 1, 10)
        >>> net(torch.zeros(2, 1, 8, 8, dtype=torch.float64)).shape
        torch.Size([2, 10])
    """
    if activation not in ACT:
        raise ValueError(f"unknown activation {activation!r}; choose from {sorted(ACT)}")
    if side % 4 or side < 4:
        raise ValueError(f"the CNN pools twice by 2: the image side must be a multiple of 4, got {side}")
    with torch.random.fork_rng():  # default (Kaiming-uniform) initialisation, seeded, global RNG untouched
        torch.manual_seed(int(seed))
        net = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1),
            ACT[activation](),
            nn.MaxPool2d(2),
            nn.Dropout(p),
            nn.Conv2d(8, 16, 3, padding=1),
            ACT[activation](),
            nn.MaxPool2d(2),
            nn.Dropout(p),
            nn.Flatten(),
            nn.Linear(16 * (side // 4) ** 2, out_dim),
        ).to(DTYPE)
    return net


class MissingDatasetError(ConfigError):
    """A data set the run needs is not installed; its message is one line saying how to install it."""

    def __init__(self, hint: str) -> None:
        self.problems = [hint]
        ValueError.__init__(self, hint)


def require_datasets(names: Any) -> None:
    """Fail at once when a data set of ``names`` is not installed (Fashion-MNIST: the Debian package).

    Raises:
        MissingDatasetError: (a :class:`~dropgeom.config.ConfigError`) one line saying how to install it.

    Example:
        >>> require_datasets(["digits", "iris"])  # bundled with scikit-learn: nothing to check
    """
    import os

    from ..data import FASHION_MNIST_DIR, FASHION_MNIST_HINT

    if "fashion_mnist" in set(names) and not os.path.isdir(FASHION_MNIST_DIR):
        raise MissingDatasetError(FASHION_MNIST_HINT)


@lru_cache(maxsize=4)
def _load(name: str, seed: int, max_train: int) -> Any:
    from ..data import load_dataset

    return load_dataset(name, seed=seed, dtype=DTYPE, max_train=max_train or None)


def c3_data(config: RunConfig, dataset: str, arch: str, size: int, seed: int) -> ExperimentData:
    """Train/test data for a C3 unit: MLPs on the bundled sets see ``input_dim`` principal components,
    on Fashion-MNIST all 784 pixels; CNNs see images ``[n, 1, side, side]``.

    Raises:
        FileNotFoundError: Fashion-MNIST is not installed (one line saying how to install it).
        ValueError: ``arch="cnn"`` on a data set whose inputs are not square images.

    Example:
        >>> from dropgeom.config import RunConfig
        >>> cfg = RunConfig.from_preset("test")
        >>> c3_data(cfg, "digits", "cnn", 0, seed=0).x_train.shape
        torch.Size([200, 1, 8, 8])
        >>> c3_data(cfg, "digits", "mlp", 0, seed=0).x_train.shape
        torch.Size([200, 8])
    """
    ds = _load(dataset, seed, int(size or config.max_train))
    xtr, xte = ds.x_train.to(DTYPE), ds.x_test.to(DTYPE)
    if arch == "cnn":
        side = int(round(math.sqrt(xtr.shape[1])))
        if side * side != xtr.shape[1]:
            raise ValueError(f"data set {dataset!r} has {xtr.shape[1]} features, not a square image: no CNN")
        xtr, xte = xtr.reshape(-1, 1, side, side), xte.reshape(-1, 1, side, side)
    elif dataset != "fashion_mnist" and config.input_dim and config.input_dim < xtr.shape[1]:
        xtr, xte = project_pca(xtr, xte, config.input_dim)
    nc = min(config.curvature_inputs, xte.shape[0])
    return ExperimentData(xtr, ds.y_train, xte, ds.y_test, xte[:nc], ds.y_test[:nc], ds.family, int(ds.num_outputs))


def c3_model(config: RunConfig, data: ExperimentData, dataset: str, arch: str, p: float, seed: int) -> nn.Sequential:
    """The C3 network: the config's MLP (784-256-256-10 on Fashion-MNIST) or :func:`build_cnn`.

    Raises:
        ValueError: from :func:`~dropgeom.experiments.common.build_mlp` / :func:`build_cnn` (bad activation or image side).

    Example:
        >>> from dropgeom.config import RunConfig
        >>> cfg = RunConfig.from_preset("test")
        >>> net = c3_model(cfg, c3_data(cfg, "digits", "mlp", 0, 0), "digits", "mlp", 0.2, seed=0)
        >>> [type(m).__name__ for m in net][:3]
        ['Linear', 'Tanh', 'Dropout']
    """
    if arch == "cnn":
        return build_cnn(int(data.x_train.shape[-1]), int(data.x_train.shape[1]), data.num_outputs, config.activation, p, seed)
    width = IMAGE_MLP_WIDTH if dataset == "fashion_mnist" else config.width
    return build_mlp(int(data.x_train.shape[1]), data.num_outputs, width, config.depth, config.activation, p, seed)


#: test inputs on which a C3 training reports its per-epoch test metrics (only the final model is evaluated on
#: the whole test set): Fashion-MNIST's 10,000 test images would cost more per epoch than the training itself
MONITOR_INPUTS = 1000


def c3_epochs(config: RunConfig, n_train: int) -> int:
    """Epochs of a C3 training on ``n_train`` inputs: ``config.epochs``, or under the step budget ``c3_max_steps``
    ``min(epochs, max(2, round(c3_max_steps / steps per epoch)))`` (two at least, so mid-training is an epoch).

    Example:
        >>> from dropgeom.config import RunConfig
        >>> cfg = RunConfig.from_preset("quick").replace(c3_max_steps=1600)
        >>> [c3_epochs(cfg, n) for n in (1000, 10000, 60000)]
        [100, 10, 2]
    """
    if not config.c3_max_steps:
        return config.epochs
    per_epoch = math.ceil(n_train / config.batch_size)
    return min(config.epochs, max(2, round(config.c3_max_steps / per_epoch)))


def c3_train(
    model: nn.Module,
    data: ExperimentData,
    objective: Any,
    config: RunConfig,
    seed: int,
    optimizer: str,
    options: Optional[Dict[str, Any]] = None,
    checkpoint_dir: Any = None,
    callback: Any = None,
) -> Tuple[bool, list]:
    """Train with :func:`dropgeom.train.train` (``optimizer`` adam at ``lr`` or sgd at ``c3_sgd_lr``) for
    :func:`c3_epochs` epochs, test metrics per epoch on the first :data:`MONITOR_INPUTS` test inputs;
    ``(diverged, history)``.

    Raises:
        ValueError: from :func:`dropgeom.train.train` (an unknown objective or optimizer, bad options).
    """
    from ..train import train

    epochs = c3_epochs(config, int(data.x_train.shape[0]))
    hist = train(
        model,
        (data.x_train, data.y_train, data.x_test[:MONITOR_INPUTS], data.y_test[:MONITOR_INPUTS]),
        objective,
        objective_options=options or {},
        optimizer=optimizer,
        lr=config.lr if optimizer == "adam" else config.c3_sgd_lr,
        epochs=epochs,
        batch_size=config.batch_size,
        seed=seed,
        family=data.family,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=max(1, epochs // 4),
        progress=False,
        divergence_threshold=config.divergence_threshold,
        callback=callback,
    )
    recs = [dict(r) for r in hist.records]
    last = recs[-1] if recs else {}
    diverged = bool(hist.diverged) or not all(math.isfinite(float(v)) for v in last.values() if isinstance(v, (int, float)))
    return diverged, recs
