"""Argument types and table printing of the ``dropgeom`` command line (:mod:`dropgeom.cli`).

Each type turns one command-line string into a checked value, or raises ``argparse.ArgumentTypeError`` with a
message naming what was expected (argparse prints it as a one-line usage error).

Example:
    >>> _probability("0.3")
    0.3
    >>> _positive_int("0")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: expected a positive integer, got 0
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, List, Sequence

from .config import ACTIVATIONS

__all__ = [
    "CLIError",
    "_positive_int",
    "_probability",
    "_positive_float",
    "_seed",
    "_nonnegative_int",
    "_print_table",
    "_add_model_options",
    "_mlp_for",
]


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _probability(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a dropout probability in [0, 1), got {text!r}") from None
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"dropout probability p must be in [0, 1), got {v}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {v}")
    return v


#: seeds go to torch.Generator.manual_seed and numpy: keep them in numpy's range
SEED_MAX = 2**32 - 1


def _seed(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed in [0, {SEED_MAX}], got {text!r}") from None
    if not 0 <= v <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected an integer seed in [0, {SEED_MAX}], got {v}")
    return v


def _nonnegative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {v}")
    return v


def _print_table(rows: List[Dict[str, Any]], columns: Sequence[str]) -> None:
    def f(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[f(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


class CLIError(Exception):
    """A user error the command line reports in one line (exit status 2)."""


def _add_model_options(p: argparse.ArgumentParser, width: int = 8, depth: int = 2) -> None:
    p.add_argument("--width", type=_positive_int, default=width, help=f"units per hidden layer (default {width})")
    p.add_argument("--depth", type=_positive_int, default=depth, help=f"number of hidden layers, 1 or more (default {depth})")
    p.add_argument("--activation", choices=ACTIVATIONS, default="tanh", help="hidden activation (default tanh)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the data split, initialisation and masks (default 0)")


def _mlp_for(args: argparse.Namespace, in_dim: int, out_dim: int, p: float) -> Any:
    from .experiments.common import build_mlp

    return build_mlp(in_dim, out_dim, args.width, args.depth, args.activation, p, args.seed)
