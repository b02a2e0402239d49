"""The ``dropgeom train`` command (:mod:`dropgeom.cli`): its options, the training and the per-epoch table.

Trains an MLP (dropout after each hidden layer) on a data set with one registered objective
(:func:`dropgeom.train.registry.objective_names`), optionally into a locked, resumable ``--out`` folder, and
prints one row per epoch; on Ctrl-C it prints the finished epochs and says what was kept.

Example:
    >>> import argparse
    >>> sub = argparse.ArgumentParser().add_subparsers(dest="command")
    >>> _add_train(sub)
    >>> sub.choices["train"].parse_args(["--objective", "l2", "--weight", "0.01"]).weight
    0.01
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence

from .cli_support import CLIError, _add_model_options, _mlp_for, _positive_float, _positive_int, _print_table, _probability
from .data import BUNDLED, INSTALLED, SYNTHETIC
from .options import Estimator, PenaltyForm, choices
from .train.registry import objective_names, objective_spec, run_options

__all__ = ["_add_train", "_check_data", "DATA_HELP"]


def _cmd_train(args: argparse.Namespace) -> int:
    import contextlib

    _check_data(args.data)
    options = _objective_options(args)  # before anything is written
    lock: Any = contextlib.nullcontext()
    if args.out is not None:
        from .rundir import RunDir, prepare_output_dir
        from .train import CHECKPOINT_NAME

        prepare_output_dir(args.out, allowed=lambda name: name == CHECKPOINT_NAME)
        lock = RunDir(args.out).lock()  # one process per checkpoint folder, as for reproduce's run folders
    with lock:
        return _train_and_print(args, options)


#: what ``dropgeom train --data`` reads from files (the IDX format needs a label file it has no option for)
TRAIN_FILES = (
    "a .csv file (a header row and a 'label' column), an .npz file (arrays X and y) or a folder holding the four MNIST IDX files"
)


#: the data sets ``--data`` takes by name
DATA_NAMES = BUNDLED + SYNTHETIC + INSTALLED
#: the help of ``--data`` (train and fisher)
DATA_HELP = f"data set: a name ({', '.join(DATA_NAMES)}; default digits) or the path of {TRAIN_FILES}"


def _check_data(name: str) -> None:
    """Refuse a ``--data`` that names a file format (the library's ``path=`` sources), a lone IDX file, or neither a
    data set nor an existing file or folder, or a file of a format dropgeom does not read.

    Raises:
        CLIError: ``name`` is ``npz``, ``csv``, ``idx`` or ``mnist``; an IDX file (its labels cannot be given); not a
            name of :data:`DATA_NAMES` and no such path; a file whose name ends in neither ``.csv`` nor ``.npz``.

    Example:
        >>> _check_data("fashion_mnist")
        >>> _check_data("no_such_set")
        Traceback (most recent call last):
        ...
        dropgeom.cli_support.CLIError: --data no_such_set: no data set of that name and no such file or folder; ...
    """
    import os

    from .data import FILES

    if name in FILES:
        raise CLIError(f"--data {name} is a file format, not a data set: give the file itself as --data, {TRAIN_FILES}")
    if name.lower().endswith(("ubyte", "ubyte.gz")):
        raise CLIError(f"--data {name} is one IDX file without its labels: give the folder holding the four MNIST IDX files")
    if name in DATA_NAMES:
        return
    if not os.path.exists(name):
        raise CLIError(
            f"--data {name}: no data set of that name and no such file or folder; give a name ({', '.join(DATA_NAMES)}) "
            f"or the path of {TRAIN_FILES}"
        )
    if os.path.isfile(name) and not name.lower().endswith((".csv", ".npz")):
        raise CLIError(f"--data {name} is a file of a format dropgeom does not read: give the path of {TRAIN_FILES}")


def _train_and_print(args: argparse.Namespace, options: Dict[str, Any]) -> int:
    """Train as ``dropgeom train`` asks (its folder locked), print the table; the exit code."""
    import torch

    from .data import load_dataset
    from .experiments.sweep import _is_terminal
    from .train import train

    ds = load_dataset(args.data, seed=args.seed, dtype=torch.float64)
    model = _mlp_for(args, ds.num_features, ds.num_outputs, options.get("p", 0.0))
    finished: List[Dict[str, Any]] = []  # the epochs of this invocation, for the table after Ctrl-C

    def keep(record: Dict[str, float], _model: Any) -> None:
        finished.append(dict(record))

    try:
        hist = train(
            model,
            ds,
            args.objective,
            objective_options=options,
            lr=args.lr,
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=args.seed,
            checkpoint_dir=args.out,
            progress=not args.no_progress and _is_terminal(sys.stderr),  # no carriage returns in a log
            callback=keep,
        )
    except KeyboardInterrupt:
        _train_interrupted(args, finished)
        return 130
    _print_epochs(hist.records)
    if hist.diverged:
        if hist.records:
            print(f"training diverged: {hist.divergence}; the table shows the epochs before it", file=sys.stderr)
        else:
            print(f"training diverged before its first epoch finished: {hist.divergence} (try a smaller --lr)", file=sys.stderr)
        return 1
    if not finished and hist.resumed_from is not None:
        from .train import CHECKPOINT_NAME

        print(
            f"dropgeom train: nothing to train: {Path(args.out) / CHECKPOINT_NAME} already holds {len(hist.records)} "
            f"epoch(s), at least --epochs {args.epochs} (the table shows them; a larger --epochs continues the training)",
            file=sys.stderr,
        )
    return 0


#: the columns of ``dropgeom train``'s table (those the records hold)
TRAIN_COLUMNS = (
    "epoch",
    "objective_loss",
    "train_nll",
    "train_accuracy",
    "train_ece",
    "test_nll",
    "test_accuracy",
    "test_ece",
    "seconds",
)
#: ``dropgeom train`` options that go to the objective as they are (when it takes them), with their defaults
OBJECTIVE_FLAGS = {"form": PenaltyForm.QUADRATIC.value, "estimator": Estimator.EXACT.value, "curvature": False}
#: defaults of the shared settings ``--p`` and ``--weight`` (for the objectives that take them)
TRAIN_P, TRAIN_WEIGHT = 0.3, 1e-3


def _objective_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The options of ``--objective`` from ``--p``, ``--weight``, ``--form``, ``--estimator`` and ``--curvature``.

    Raises:
        CLIError: one of them was given for an objective that does not take it (it would be ignored).
    """
    spec = objective_spec(args.objective)
    given = {"p": args.p, "weight": args.weight, **{k: getattr(args, k) for k in OBJECTIVE_FLAGS}}
    takes = {name: _takes(spec.name, name) for name in given}
    for name, value in given.items():
        if value is not None and value is not False and not takes[name]:  # not `in (None, False)`: 0.0 == False
            users = [n for n in objective_names() if _takes(n, name)]
            raise CLIError(f"--{name} does not apply to --objective {spec.name} (only to {', '.join(users)})")
    options = run_options(
        spec.name, p=TRAIN_P if args.p is None else args.p, l2=TRAIN_WEIGHT if args.weight is None else args.weight
    )
    options.update({k: (default if given[k] is None else given[k]) for k, default in OBJECTIVE_FLAGS.items() if takes[k]})
    return options


def _takes(objective: str, flag: str) -> bool:
    """Whether ``--objective objective`` takes the ``dropgeom train`` option ``--flag``."""
    spec = objective_spec(objective)
    if flag == "p":
        return spec.uses_dropout
    if flag == "weight":  # the L2 weight (fisher_dropout's own option "weight" scales its penalty)
        return "l2" in spec.settings
    return flag in spec.options


def _print_epochs(records: Sequence[Dict[str, Any]]) -> None:
    """The per-epoch table of ``dropgeom train`` (nothing when no epoch finished)."""
    cols = [c for c in TRAIN_COLUMNS if records and c in records[0]]
    if cols:
        _print_table(list(records), cols)


def _train_interrupted(args: argparse.Namespace, finished: List[Dict[str, Any]]) -> None:
    """After Ctrl-C: the table of the finished epochs and one line saying what was kept and how to resume.

    With ``--out`` the table and the count come from the checkpoint (what a rerun resumes from), else from
    the epochs this invocation finished (nothing was saved).
    """
    if args.out is None:
        _print_epochs(finished)
        print(
            f"\ndropgeom train: interrupted after {len(finished)} finished epoch(s); nothing was saved "
            "(--out DIR keeps the finished epochs in a checkpoint, and the same command then resumes)",
            file=sys.stderr,
        )
        return
    from .train import CHECKPOINT_NAME, load_checkpoint

    path = Path(args.out) / CHECKPOINT_NAME
    try:
        state = load_checkpoint(path)
    except ValueError:  # unreadable: say so rather than fail while interrupted
        state = None
    kept = list((state or {}).get("history", {}).get("records", []))
    _print_epochs(kept)
    what = f"{len(kept)} finished epoch(s) are kept in {path}" if kept else f"no epoch had finished; nothing is in {path} yet"
    print(f"\ndropgeom train: interrupted; {what}; run the same command again to resume", file=sys.stderr)


# --------------------------------------------------------------------------- fisher


def _add_train(sub: Any) -> None:
    names = objective_names()
    p = sub.add_parser(
        "train",
        help="train an MLP with a chosen objective and print per-epoch metrics",
        description=f"Train an MLP (dropout after each hidden layer) on a data set with one objective: {', '.join(names)} "
        "(fisher_dropout: the deterministic Fisher penalty of theory.md 4.4). Prints "
        "train/test NLL, accuracy and calibration error per epoch; --out keeps checkpoints and resumes.",
    )
    p.add_argument("--data", default="digits", help=DATA_HELP)
    p.add_argument(
        "--objective",
        default="dropout",
        choices=names,
        help="training objective (default dropout): " + "; ".join(f"{n}: {objective_spec(n).description}" for n in names),
    )
    dropouts = [n for n in names if _takes(n, "p")]
    fisher = [n for n in names if _takes(n, "form")]
    p.add_argument(
        "--p",
        type=_probability,
        default=None,
        help=f"dropout probability (drop rate) of --objective {', '.join(dropouts)} (default {TRAIN_P}); an error with the others",
    )
    p.add_argument(
        "--weight",
        type=_positive_float,
        default=None,
        help=f"L2 weight of --objective l2 (default {TRAIN_WEIGHT:g}); an error with the others",
    )
    p.add_argument(
        "--form",
        choices=choices(PenaltyForm),
        default=None,
        help=f"penalty of --objective {', '.join(fisher)}: quadratic (the Fisher quadratic form of the mask noise) or "
        "divergence (p sum_j KL(p || p^(-j)), p^(-j) the output with unit j dropped) (theory.md 4.4; default quadratic)",
    )
    p.add_argument(
        "--estimator",
        choices=choices(Estimator),
        default=None,
        help=f"how --objective {', '.join(fisher)} sums its penalty over classes and units: exact (every class and "
        "unit), mc (sampled labels) or unit (sampled labels and one unit per layer) (default exact)",
    )
    p.add_argument(
        "--curvature",
        action="store_true",
        help=f"add the curvature term to the penalty of --objective {', '.join(fisher)} (theory.md 4.2; default off)",
    )
    p.add_argument("--epochs", type=_positive_int, default=20, help="epochs (default 20)")
    p.add_argument("--lr", type=_positive_float, default=0.01, help="Adam learning rate (default 0.01)")
    p.add_argument("--batch-size", type=_positive_int, default=128, help="mini-batch size (default 128)")
    p.add_argument(
        "--out", default=None, help="checkpoint folder: new, empty, or holding the checkpoint.pt of the same training (resumed)"
    )
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar (there is none when standard error is not a terminal)"
    )
    _add_model_options(p, width=32)
    p.set_defaults(fn=_cmd_train)
