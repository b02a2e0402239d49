"""The ``dropgeom`` command line: a thin layer over the public functions.

Commands (each has ``--help``)::

    dropgeom reproduce [--quick] [--out DIR] [--seeds N]   test the paper's claims C1-C3, write a report
    dropgeom train     [--objective dropout --p 0.3 ...]   train an MLP on a data set, print per-epoch metrics
    dropgeom fisher    [--data NAME] [--hidden 32 ...]     Fisher information of an MLP on a data set: kind x structure table
    dropgeom curvature [--activation tanh ...]             embedding and mask curvature of a trained MLP
    dropgeom report DIR                                    re-render the report of a run directory

Also available as ``python -m dropgeom``.

Example:
    >>> parser = build_parser()
    >>> parser.parse_args(["reproduce", "--quick", "--seeds", "2"]).seeds
    2
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .config import CURVATURE_METHODS, CURVATURE_PARAMS, DATASETS, EXPERIMENTS, PRESETS
from .options import ExecutorKind, FisherKind, Structure, choices
from .cli_support import (  # noqa: F401
    CLIError,
    _add_model_options,
    _mlp_for,
    _nonnegative_int,
    _positive_float,
    _positive_int,
    _print_table,
    _probability,
    _seed,
)
from .cli_train import DATA_HELP, _add_train, _check_data

__all__ = ["main", "build_parser"]


# --------------------------------------------------------------------------- reproduce
def _cmd_reproduce(args: argparse.Namespace) -> int:
    from .config import RunConfig
    from .pipeline import reproduce

    preset = args.preset or ("quick" if args.quick else "full")
    overrides: Dict[str, Any] = {}
    if args.config:
        import json

        try:
            loaded = json.loads(Path(args.config).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CLIError(f"cannot read --config {args.config}: {getattr(err, 'strerror', None) or err}") from None
        if not isinstance(loaded, dict):
            raise CLIError(
                f'--config {args.config} must hold a JSON object of options (like {{"seeds": 3}}), not {json.dumps(loaded)[:40]}'
            )
        overrides.update(loaded)
    if args.seeds is not None:
        overrides["seeds"] = args.seeds
    if args.only:
        overrides["experiments"] = args.only
    if args.data:
        overrides["dataset"] = args.data
    config = RunConfig.from_preset(preset, **overrides)
    from .experiments.regularizers import require_datasets

    require_datasets([config.dataset])  # C1 reads it too: fail at once, with the install line, when it is missing
    out = Path(args.out or f"runs/reproduce-{preset}")
    t0 = time.perf_counter()
    try:
        report = reproduce(
            config,
            out,
            progress=not args.no_progress,
            threads=args.threads,
            workers=args.workers,
            executor=args.executor,
            address=args.address,
        )
    except KeyboardInterrupt:
        print(
            f"\ndropgeom reproduce: interrupted; finished units are saved in {out}; run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    print(f"\nreport: {report}  (and {report.with_suffix('.html')})  in {time.perf_counter() - t0:.1f} s")
    import json

    summary = json.loads((report.parent / "summary.json").read_text())
    rows = [v for s in summary.values() for k, v in s.items() if k in ("verdict", "verdict_b")]
    _print_table(rows, ["claim", "verdict", "evidence"])
    return 0


# --------------------------------------------------------------------------- train
def _cmd_fisher(args: argparse.Namespace) -> int:
    import torch

    from . import ModelManifold, fisher
    from .data import load_dataset

    _check_data(args.data)
    torch.manual_seed(args.seed)
    ds = load_dataset(args.data, seed=args.seed, dtype=torch.float64 if args.float64 else torch.float32)
    x = ds.x_train[: args.n]
    fewer = f"; --n {args.n}, but {ds.name} has {ds.n_train} training inputs" if args.n > ds.n_train else ""
    dims = [ds.num_features] + [args.hidden] * args.depth + [ds.num_outputs]
    layers: List[torch.nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    net = torch.nn.Sequential(*layers[:-1]).to(x.dtype)
    m = ModelManifold(net, x, ds.family)
    what = f"an MLP {'-'.join(map(str, dims))} (P={m.num_params}) on {m.n} {ds.name} inputs"
    print(f"Fisher information of {what} (mean over inputs{fewer})\n")
    rows: List[Dict[str, Any]] = []
    columns = ["kind", "structure", "trace", "top eigenvalue", "seconds"]
    gen = torch.Generator().manual_seed(args.seed)
    try:
        for kind in args.kinds:
            for structure in args.structures:
                if structure == "dense" and m.num_params > 5000:
                    rows.append(
                        {"kind": kind, "structure": structure, "trace": "-", "top eigenvalue": "-", "seconds": "too large"}
                    )
                    continue
                t0 = time.perf_counter()
                F = fisher(m, kind, structure, targets=ds.y_train[: args.n], n_samples=1, generator=gen)
                tr = float(F.trace())
                top = float(F.eig(1)[0].max())
                rows.append(
                    {
                        "kind": kind,
                        "structure": structure,
                        "trace": tr,
                        "top eigenvalue": top,
                        "seconds": time.perf_counter() - t0,
                    }
                )
    except KeyboardInterrupt:
        if rows:
            _print_table(rows, columns)
        total = len(args.kinds) * len(args.structures)
        print(f"\ndropgeom fisher: interrupted after {len(rows)} of {total} rows", file=sys.stderr)
        return 130
    _print_table(rows, columns)
    return 0


# --------------------------------------------------------------------------- curvature
#: ``dropgeom curvature --method auto`` is dense while the Hessian tensor [n, K, P, P] stays below this
CLI_DENSE_BYTES = 32 * 2**20


def _cmd_curvature(args: argparse.Namespace) -> int:
    import torch

    from .config import RunConfig
    from .experiments.common import curvature_measures, fit, prepare_data

    torch.set_num_threads(1)
    cfg = RunConfig.from_preset(  # its depth (C1's, at least 2) is not used: the model below has --depth
        "quick",
        width=args.width,
        activation=args.activation,
        epochs=max(args.epochs, 1),
        curvature_inputs=args.inputs,
        curvature_method=args.method,
        curvature_params=args.params,
        damping=args.damping,
        input_dim=args.input_dim,
    )
    data = prepare_data(cfg, args.seed)
    model = _mlp_for(args, data.num_features, data.num_outputs, args.p)
    if args.epochs > 0:
        tr = fit(model, data, "dropout" if args.p > 0 else "none", cfg, args.seed, args.p)
        last = tr["history"][-1] if tr["history"] else {}
        print(
            f"trained {args.epochs} epochs ({'dropout p=%g' % args.p if args.p > 0 else 'no dropout'}): test NLL {last.get('test_nll', float('nan')):.4g}"
        )
    from .experiments.common import curvature_params, quantity_name

    if args.method == "auto":
        # dense keeps about 5 copies of the Hessian tensor [n, K, P, P] (1.9 GB at the defaults, P = 160):
        # this command uses it only while that tensor is small, the matrix-free method otherwise
        names = curvature_params(model, cfg.curvature_params)
        P = sum(t.numel() for k, t in model.named_parameters() if names is None or k in names)
        hessian_bytes = data.x_curv.shape[0] * data.num_outputs * P * P * 8
        cfg = cfg.replace(curvature_method="dense" if hessian_bytes <= CLI_DENSE_BYTES else "stochastic")
    t0 = time.perf_counter()
    c = curvature_measures(model, data, cfg, args.seed)
    seconds = time.perf_counter() - t0
    skip = {"gamma2_stderr", "gamma2_damped_stderr"} if c.get("method") == "dense" else set()  # exactly 0 when dense
    _print_table([{"quantity": quantity_name(k), "value": v} for k, v in c.items() if k not in skip], ["quantity", "value"])
    print(f"\ncurvature computed in {seconds:.1f} s; symbols as in docs/theory.md section 3")
    return 0


# --------------------------------------------------------------------------- report
def _cmd_report(args: argparse.Namespace) -> int:
    from .pipeline import render_run

    path = render_run(args.dir)
    print(f"report: {path}  (and {path.with_suffix('.html')})")
    return 0


# --------------------------------------------------------------------------- parser
def _add_reproduce(sub: Any) -> None:
    p = sub.add_parser(
        "reproduce",
        help="test the paper's claims C1-C3 and write a report",
        description="Train small MLPs with and without dropout (and Fisher-dropout, L2) over several seeds, measure the "
        "curvature of the model manifold, the dropout gap and its Fisher and curvature terms, and write a run "
        "directory with metrics (JSON lines, CSV), figures (PNG), report.md and a self-contained report.html with a "
        "verdict per claim. Interrupt it at any time; running the same command again resumes (finished runs are "
        "not recomputed).",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="the quick preset: under 10 minutes on an idle 2-core CPU, bundled digits only (default: the full run, with Fashion-MNIST; its measured time is in the README)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="run directory (default runs/reproduce-<preset>): a new or empty folder, or an earlier run of the same config, which is resumed (its finished units are reused, also when --only names other claims); one process at a time",
    )
    p.add_argument(
        "--seeds",
        type=_positive_int,
        default=None,
        help="number of seeds per setting (default: the preset's, 10 for full, 5 for quick, 2 for test)",
    )
    p.add_argument(
        "--only",
        nargs="+",
        choices=EXPERIMENTS,
        default=None,
        help="run only these claims (default: all); claims run one at a time into one --out folder add up there, and its report shows them all",
    )
    p.add_argument(
        "--data",
        default=None,
        choices=list(DATASETS),
        help="data set of C1, and of C2 where the config sets no c2_datasets (presets quick and test; the full preset's C2 "
        "uses digits and fashion_mnist whatever --data says; C3 uses c3_datasets) (default digits; fashion_mnist needs "
        "`apt-get install -y dataset-fashion-mnist`)",
    )
    p.add_argument(
        "--preset",
        choices=list(PRESETS),
        default=None,
        help="a named preset (overrides --quick); 'test' is a smoke run of well under a minute on an idle machine",
    )
    p.add_argument("--config", default=None, help="JSON file of config overrides (every option of dropgeom.config.RunConfig)")
    p.add_argument(
        "--threads", type=_positive_int, default=1, help="torch threads per process (default 1: fastest for these tiny models)"
    )
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=min(2, os.cpu_count() or 1),
        help="processes running units in parallel (default: 2, or 1 on a 1-core machine)",
    )
    p.add_argument(
        "--executor",
        choices=choices(ExecutorKind),
        default=ExecutorKind.PROCESS.value,
        help="where units run: 'process' (worker processes on this machine) or 'ray' (Ray tasks: a local Ray, or a "
        "cluster with --address; pip install 'dropgeom[ray]')",
    )
    p.add_argument(
        "--address", default=None, help="Ray head node HOST:PORT (or auto) for --executor ray; default: start a local Ray"
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress line (by default one line shows the claim, units done/total and an ETA)",
    )
    p.set_defaults(fn=_cmd_reproduce)


def _add_fisher(sub: Any) -> None:
    kinds, structures = choices(FisherKind), choices(Structure)
    p = sub.add_parser(
        "fisher",
        help="Fisher information of an MLP on a data set: a kind x structure table",
        description=f"Compute the Fisher information ({', '.join(kinds)}) of a tanh MLP at initialisation on the first --n "
        f"training inputs of a data set (default scikit-learn's bundled digits) in every structure ({', '.join(structures)}) "
        "and print its trace, top eigenvalue and the time taken (mean over inputs).",
    )
    p.add_argument("--data", default="digits", help=DATA_HELP)
    p.add_argument("--hidden", type=_positive_int, default=32, help="hidden units per layer (default 32)")
    p.add_argument("--depth", type=_positive_int, default=1, help="hidden layers (default 1)")
    p.add_argument("--n", type=_positive_int, default=512, help="number of inputs (default 512)")
    p.add_argument("--kinds", nargs="+", choices=kinds, default=kinds, help=f"Fisher kinds (default: all, {' '.join(kinds)})")
    p.add_argument(
        "--structures",
        nargs="+",
        choices=structures,
        default=structures,
        help=f"structures (default: all, {' '.join(structures)}; dense is skipped above 5000 parameters)",
    )
    p.add_argument("--float64", action="store_true", help="compute in float64 (default float32)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the inputs and the Monte Carlo Fisher (default 0)")
    p.set_defaults(fn=_cmd_fisher)


def _add_curvature(sub: Any) -> None:
    p = sub.add_parser(
        "curvature",
        help="embedding curvature and mask-direction curvature of a trained MLP",
        description="Train a small MLP on digits (inputs projected on their principal components) with dropout at "
        "--p (default 0.2), then print the e-embedding curvature gamma^2 of its model manifold over held-out inputs (damped, "
        "and raw with --method dense; the matrix-free estimate of the raw value is unreliable on a badly conditioned "
        "metric) and the normal curvature along the dropout mask directions (theory.md 3).",
    )
    p.add_argument(
        "--p",
        type=_probability,
        default=0.2,
        help="dropout probability during training, and of the mask whose directions are measured (default 0.2; 0 trains without dropout)",
    )
    p.add_argument(
        "--epochs", type=_nonnegative_int, default=20, help="training epochs before measuring (0: at initialisation; default 20)"
    )
    p.add_argument(
        "--inputs", type=_positive_int, default=100, help="held-out inputs the curvature is evaluated on (default 100)"
    )
    p.add_argument("--input-dim", type=_positive_int, default=10, help="principal components of the inputs kept (default 10)")
    p.add_argument(
        "--method",
        choices=CURVATURE_METHODS,
        default="auto",
        help="curvature method (default auto: dense, exact and with the raw gamma^2, while the Hessian tensor n x K x P x P stays under 32 MB, else the matrix-free stochastic estimate, whose memory grows like n K P)",
    )
    p.add_argument(
        "--params",
        choices=CURVATURE_PARAMS,
        default="around_mask",
        help="parameters the manifold varies (default: the layers around the first mask)",
    )
    p.add_argument(
        "--damping", type=_positive_float, default=1e-3, help="relative damping of the damped curvature (default 1e-3)"
    )
    _add_model_options(p)
    p.set_defaults(fn=_cmd_curvature)


def _add_report(sub: Any) -> None:
    p = sub.add_parser(
        "report",
        help="re-render the report of a run directory",
        description="Recompute the summaries, figures, report.md and report.html of a run directory from its stored "
        "records (nothing is retrained).",
    )
    p.add_argument("dir", help="the run directory (holds config.json)")
    p.set_defaults(fn=_cmd_report)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``dropgeom`` command; its choices come from the option enums and registries."""
    parser = argparse.ArgumentParser(
        prog="dropgeom",
        description="dropgeom: the information geometry of dropout training (Fisher information, curvature of the "
        "model manifold, dropout terms) for PyTorch models.",
        epilog="Run `dropgeom COMMAND --help` for the options of a command. Errors are one line; add --debug "
        "(anywhere) for the traceback. Environment: DROPGEOM_MALLOC=heap keeps freed memory in the heap (faster "
        "steps with large tensors, several times the memory; glibc only; default: system).",
    )
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback instead of one line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in (_add_reproduce, _add_train, _add_fisher, _add_curvature, _add_report):
        add(sub)
    return parser


def _one_line(err: BaseException) -> str:
    """A short message for ``err``: OS errors as 'reason: file', others as their first line."""
    from .config import ConfigError

    if isinstance(err, ConfigError):
        return str(err)  # lists every problem, one per line, on purpose
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    text = str(err).strip() or type(err).__name__
    first = text.splitlines()[0]
    return first if len(first) <= 400 else first[:400] + " ..."


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``dropgeom`` command; returns the exit status.

    Errors are printed as one line (``dropgeom COMMAND: error: ...``, exit
    status 2 for bad input, files or folders, 1 for anything unexpected);
    ``--debug`` (anywhere on the command line) shows the traceback instead.
    Ctrl-C exits with status 130 and one line; a second Ctrl-C exits at once.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    from .pool import interrupt_once_then_exit, leave_after_interrupt

    with interrupt_once_then_exit() as presses, warnings.catch_warnings():
        if not debug:  # a warning is one line naming the command, as errors are (--debug: Python's own format)
            warnings.showwarning = functools.partial(_show_warning, args.command)
        code = _dispatch(args, debug)
    if presses[0] and not debug:
        leave_after_interrupt(code)
    return code


def _show_warning(command: str, message: Warning | str, category: type, *_: object, **__: object) -> None:
    """``dropgeom COMMAND: warning: ...`` on one line of standard error (no source line of dropgeom's code)."""
    print(f"dropgeom {command}: warning: {' '.join(str(message).split())}", file=sys.stderr)


def _dispatch(args: argparse.Namespace, debug: bool) -> int:
    """Run the chosen command; bad input and interrupts become one line on stderr and an exit code."""
    from .config import ConfigError
    from .rundir import RunDirError

    try:
        from .allocator import keep_freed_memory

        keep_freed_memory()  # DROPGEOM_MALLOC=heap: every command keeps freed memory in the heap (a bad value: an error)
        return int(args.fn(args) or 0)
    except KeyboardInterrupt:  # a second press exits at once (interrupt_once_then_exit)
        if debug:
            raise
        print(f"\ndropgeom {args.command}: interrupted", file=sys.stderr)
        return 130
    except (CLIError, ConfigError, RunDirError, ValueError, OSError, MemoryError, ImportError) as err:
        # bad input, data files, folders or sizes: a message, no traceback
        if debug:
            raise
        print(f"dropgeom {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - anything else: still one line, the traceback behind --debug
        if debug:
            raise
        print(
            f"dropgeom {args.command}: error: {type(err).__name__}: {_one_line(err)} (run again with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
