"""Figures of the report: one style for every claim (labelled axes with units, legends, 150 dpi, log axes only
away from rounding level) and record keys in words.

Example:
    >>> quantity_name("mask_normal_curvature")
    'curvature along the mask directions'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .stats import finite

__all__ = [
    "FIGURE_DPI",
    "QUANTITY_NAMES",
    "quantity_name",
    "log_scale_ok",
    "style_axes",
    "log_ticks",
    "seed_legend_handles",
    "save_figure",
]

FIGURE_DPI = 150

#: quantities of the records and the CLI in words (with the symbol of theory.md where there is one)
QUANTITY_NAMES: Dict[str, str] = {
    "gamma2": "embedding curvature gamma^2 of the n inputs together (sum-convention metric)",
    "gamma2_per_sample": "embedding curvature of one input's model, n gamma^2",
    "gamma2_stderr": "standard error of gamma^2",
    "gamma2_damped": "damped embedding curvature gamma^2_lambda",
    "gamma2_damped_stderr": "standard error of the damped gamma^2_lambda",
    "mask_normal_curvature": "curvature along the mask directions",
    "normal_dim": "dimension of the normal space",
    "damping_abs": "damping lambda (absolute)",
    "projection_residual": "relative residual of the tangent projections (not converged above 1e-6)",
    "solver": "linear algebra of the stochastic estimator (svd: exact; cg: conjugate gradients)",
    "param_norm": "norm of the parameters the manifold varies",
    "num_params": "parameters the manifold varies, P",
    "n_inputs": "inputs the curvature is evaluated on, n",
    "num_outputs": "outputs per input, K",
    "method": "curvature method",
    "seconds": "time taken (s)",
    "test_nll": "test negative log-likelihood (nats)",
    "train_nll": "train negative log-likelihood (nats)",
    "test_accuracy": "test accuracy",
    "test_ece": "test expected calibration error",
    "gain": "test NLL gain from dropout (nats)",
}


def quantity_name(key: str) -> str:
    """A record key in words (``QUANTITY_NAMES``); unknown keys are returned with ``_`` as spaces.

    Example:
        >>> quantity_name("mask_normal_curvature")
        'curvature along the mask directions'
    """
    return QUANTITY_NAMES.get(key, key.replace("_", " "))


def log_scale_ok(values: Sequence[Any], rounding: float = 1e-10) -> bool:
    """Whether a log axis suits ``values``: all positive, and the smallest not at rounding level.

    Rounding level: below ``rounding`` times the largest magnitude (float64
    noise from a quantity that is zero in exact arithmetic, e.g. a curvature
    of an e-flat manifold). Such values belong on a linear axis, or in the text.

    Example:
        >>> log_scale_ok([1.0, 30.0]), log_scale_ok([1e-15, 1.0]), log_scale_ok([0.0, 1.0])
        (True, False, False)
    """
    xs = finite(values)
    return bool(xs) and min(xs) > 0 and min(xs) >= rounding * max(abs(x) for x in xs)


def style_axes(ax: Any, xlabel: str, ylabel: str, title: Optional[str] = None, legend: bool = True) -> None:
    """Label both axes (with units), set a plain-words title and a legend of the labelled artists.

    Example:
        >>> import matplotlib
        >>> matplotlib.use("Agg")
        >>> import matplotlib.pyplot as plt
        >>> fig, ax = plt.subplots()
        >>> _ = ax.plot([0, 1], [1, 2], label="mean over seeds")
        >>> style_axes(ax, "dropout rate p", "test NLL (nats)", "Test NLL")
        >>> ax.get_ylabel(), ax.get_legend() is not None
        ('test NLL (nats)', True)
        >>> plt.close(fig)
    """
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", frameon=False)
    ax.grid(True, alpha=0.3)


def log_ticks(ax: Any, which: str, values: Sequence[Any], count: int = 5) -> None:
    """Put a log ``which`` axis (``"x"`` or ``"y"``) on a few readable ticks spanning the positive finite ``values``.

    Matplotlib labels a log axis at powers of ten only, so data within one decade gets no label or
    overlapping minor labels; this sets ``count`` geometrically spaced ticks (two significant figures)
    and turns the minor labels off. Nothing changes when no value is positive and finite.

    Raises:
        ValueError: ``which`` is not ``"x"`` or ``"y"``.

    Example:
        >>> import matplotlib
        >>> matplotlib.use("Agg")
        >>> import matplotlib.pyplot as plt
        >>> fig, ax = plt.subplots()
        >>> _ = ax.plot([0.011, 0.024], [1, 2])
        >>> ax.set_xscale("log")
        >>> log_ticks(ax, "x", [0.011, 0.024], count=3)
        >>> [t.get_text() for t in ax.get_xticklabels()]
        ['0.011', '0.016', '0.024']
        >>> plt.close(fig)
    """
    if which not in ("x", "y"):
        raise ValueError(f"which must be 'x' or 'y', got {which!r}")
    from matplotlib.ticker import NullFormatter

    xs = [x for x in finite(values) if x > 0]
    if not xs:
        return
    lo, hi = min(xs), max(xs)
    ticks = sorted({float(f"{t:.2g}") for t in (np.geomspace(lo, hi, count) if hi > lo else [lo])})
    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xticks if which == "x" else ax.set_yticks)(ticks)
    (ax.set_xticklabels if which == "x" else ax.set_yticklabels)([f"{t:g}" for t in ticks])
    axis.set_minor_formatter(NullFormatter())


def seed_legend_handles(interval: str = "95% interval of the geometric mean") -> List[Any]:
    """Legend entries for the usual figure: the mean over seeds with its interval, and one dot per seed."""
    from matplotlib.lines import Line2D

    return [
        Line2D([], [], color="C0", marker="o", label=f"mean over seeds, bars: {interval}"),
        Line2D([], [], color="0.6", marker=".", linestyle="none", label="one seed"),
    ]


def save_figure(fig: Any, path: Path, dpi: int = FIGURE_DPI) -> None:
    """Save a matplotlib figure as PNG (``dpi`` >= 150 by default) atomically and close it."""
    import io

    import matplotlib.pyplot as plt

    from ..rundir import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=max(int(dpi), FIGURE_DPI), bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
