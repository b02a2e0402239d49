r"""The training loop: seeded, checkpointed, resumable, and safe against divergence.

:func:`train` minimises an :class:`~dropgeom.train.objectives.Objective` with
any ``torch.optim`` optimizer over mini-batches and records per-epoch metrics
(train and test NLL, accuracy and expected calibration error for
classification; see :mod:`dropgeom.train.metrics`) in a :class:`History`.

Reproducibility: all randomness (the shuffling, dropout masks, and anything
drawn from torch's global RNG inside the loop) flows from ``seed``: a
``torch.Generator`` seeded with it, and the global RNG forked and seeded with
it for the duration (the caller's global RNG state is restored afterwards).
Same model initialisation + same seed -> bitwise identical parameters.

Checkpoints and resume: with ``checkpoint_dir``, the full state (parameters,
optimizer state, generator and RNG states, history, early-stopping state) is
written atomically after every ``checkpoint_every`` epochs and when the run
ends. Calling :func:`train` again with the same arguments continues from the
last checkpoint (a run interrupted mid-epoch repeats that epoch from its
start), and ends bitwise identical to an uninterrupted run; a finished run is
not recomputed. A checkpoint from a different configuration (objective, seed,
batch size, optimizer, parameter shapes, data size) is refused with an error.

Divergence: a non-finite or exploding batch loss (above
``divergence_threshold``), non-finite model outputs or non-finite parameters stop the run without
raising; the history is marked ``diverged`` with the reason and the
parameters are reset to those of the last completed epoch.

Example:
    >>> import torch
    >>> from dropgeom.data import load_dataset
    >>> ds = load_dataset("iris", seed=0)
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 3))
    >>> hist = train(net, ds, "dropout", epochs=3, batch_size=32, seed=0, progress=False)
    >>> len(hist), hist.diverged, sorted(k for k in hist[-1] if k.startswith("test_"))
    (3, False, ['test_accuracy', 'test_ece', 'test_nll'])
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .._utils import NonFiniteOutputError
from ..data import Dataset
from ..families import ExponentialFamily, get_family
from .checkpoint import load_checkpoint, save_checkpoint
from .ddp import agree_any, check_equal_steps, global_record
from .history import EarlyStopping, History
from .metrics import evaluate
from .objectives import Objective
from .optimizers import OptimizerSpec, make_optimizer
from .registry import make_objective

__all__ = ["train", "History", "EarlyStopping", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "checkpoint.pt"

DataSpec = Union[Dataset, Tuple[Tensor, Tensor], Tuple[Tensor, Tensor, Tensor, Tensor]]


def _split_data(data: DataSpec) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[str]]:
    if isinstance(data, Dataset):
        return data.x_train, data.y_train, data.x_test, data.y_test, data.family
    if isinstance(data, (tuple, list)) and len(data) in (2, 4) and all(isinstance(t, Tensor) for t in data):
        if len(data) == 2:
            return data[0], data[1], None, None, None
        return data[0], data[1], data[2], data[3], None
    raise TypeError("data must be a dropgeom.data.Dataset or a tuple (x_train, y_train[, x_test, y_test]) of tensors")


def _fingerprint(
    model: nn.Module, objective: Objective, opt: torch.optim.Optimizer, seed: int, batch_size: int, n: int
) -> Dict[str, Any]:
    groups = [
        {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)) for k, v in g.items() if k != "params"}
        for g in opt.param_groups
    ]
    return {
        "objective": repr(objective),
        "optimizer": type(opt).__name__,
        "optimizer_groups": repr(groups),
        "seed": seed,
        "batch_size": batch_size,
        "n_train": n,
        "params": repr([(k, tuple(p.shape), str(p.dtype)) for k, p in model.named_parameters()]),
    }


def _n(x: Optional[Tensor]) -> int:
    return 0 if x is None else int(x.shape[0])


def _params_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _state_copy(model: nn.Module) -> Dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train(
    model: nn.Module,
    data: DataSpec,
    objective: Union[str, Objective] = "none",
    *,
    objective_options: Optional[Mapping[str, Any]] = None,
    optimizer: OptimizerSpec = None,
    lr: float = 1e-3,
    epochs: int = 10,
    batch_size: int = 128,
    seed: int = 0,
    family: Optional[Union[str, ExponentialFamily]] = None,
    early_stopping: Optional[Union[EarlyStopping, int]] = None,
    checkpoint_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
    resume: bool = True,
    checkpoint_every: int = 1,
    checkpoint_seconds: Optional[float] = 10.0,
    callback: Optional[Callable[[Dict[str, float], nn.Module], Optional[bool]]] = None,
    progress: bool = True,
    divergence_threshold: float = 1e6,
    eval_batch_size: Optional[int] = 4096,
) -> History:
    """Train ``model`` in place on ``data`` and return its :class:`History`.

    Args:
        model: the network (outputs are natural parameters ``[n, K]``).
        data: a :class:`~dropgeom.data.Dataset` or ``(x_train, y_train[, x_test, y_test])``.
        objective: a name (``none``, ``l2``, ``dropout``, ``gaussian_dropout``,
            ``fisher_dropout``; options in ``objective_options``) or an Objective.
        optimizer: ``None``/``"adam"``, ``"adamw"``, ``"sgd"`` (with ``lr``), an optimizer, or ``params -> optimizer``.
        epochs: total number of epochs (a resumed run counts the finished ones).
        batch_size: mini-batch size (the last, smaller batch is kept).
        seed: seeds the shuffling, the masks and the global RNG inside the loop.
        family: output family; default the data set's (``categorical`` for tuples).
        early_stopping: an :class:`EarlyStopping`, or an int patience on ``test_nll``.
        checkpoint_dir: where ``checkpoint.pt`` is written (atomically); ``None``: no checkpoints.
        resume: continue from an existing checkpoint in ``checkpoint_dir`` (``False``: start afresh, overwrite it).
        checkpoint_every: write a checkpoint every this many epochs (and at the end).
        checkpoint_seconds: also write one after any epoch that ends this many seconds after the last checkpoint
            (``None``: only ``checkpoint_every``), so that an interrupted long training loses little work.
        callback: ``callback(record, model)`` after each epoch (before that epoch's checkpoint, so a resumed
            run sees the same decision); returning ``True`` stops the run, and a resumed run stopped this way
            is not continued.
        progress: show a tqdm progress bar over epochs.
        divergence_threshold: a batch loss above this counts as divergence.
        eval_batch_size: batch size of the per-epoch evaluation.

    Returns:
        The :class:`History`; ``history.diverged`` is set (no exception) when
        the loss or parameters became non-finite or exploded.

    Raises:
        ValueError: ``epochs`` < 0; ``batch_size``, ``eval_batch_size``, ``checkpoint_every``, ``lr``, ``checkpoint_seconds``,
            ``divergence_threshold`` not positive, ``seed`` not an int; an unknown objective, option, family, optimizer; an
            optimizer with other parameters; no trainable parameters; unequal or empty training inputs and labels; early stopping
            on a metric the data lacks; a checkpoint unreadable or of another training; DDP ranks with unequal batches per epoch.
        TypeError: ``model``, ``data``, ``early_stopping`` or ``optimizer`` of an unsupported type.

    Example (the same seed gives the same parameters):
        >>> import torch
        >>> x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
        >>> def run():
        ...     torch.manual_seed(1)
        ...     net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Dropout(0.2), torch.nn.Linear(8, 3))
        ...     hist = train(net, (x, y), "dropout", epochs=3, batch_size=16, seed=0, progress=False)
        ...     return net, hist
        >>> (a, h), (b, _) = run(), run()
        >>> len(h), all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
        (3, True)
    """
    sizes = dict(epochs=epochs, batch_size=batch_size, checkpoint_every=checkpoint_every, eval_batch_size=eval_batch_size)
    settings: Dict[str, Any] = dict(sizes, checkpoint_seconds=checkpoint_seconds, divergence_threshold=divergence_threshold)
    run, plan, ref = _setup(
        model, data, objective, objective_options, optimizer, family, checkpoint_dir, callback, seed, lr, early_stopping, settings
    )
    with torch.random.fork_rng(devices=[ref.device] if ref.device.type == "cuda" else []):
        torch.manual_seed(seed)
        if not (resume and run.resume(epochs)):
            _epochs(run, plan, progress)
    return run.history


def _setup(
    model: nn.Module,
    data: DataSpec,
    objective: Union[str, Objective],
    objective_options: Optional[Mapping[str, Any]],
    optimizer: OptimizerSpec,
    family: Optional[Union[str, ExponentialFamily]],
    checkpoint_dir: Optional[Union[str, "os.PathLike[str]"]],
    callback: Optional[Callable[[Dict[str, float], nn.Module], Optional[bool]]],
    seed: int,
    lr: float,
    early_stopping: Optional[Union[EarlyStopping, int]],
    sizes: Dict[str, Any],
) -> Tuple[_Run, _Plan, Tensor]:
    """:func:`train`'s arguments checked, and its run (the state) and plan built; also a parameter (device, dtype).

    ``sizes``: ``epochs``, ``batch_size``, ``checkpoint_every``, ``eval_batch_size``, ``checkpoint_seconds``,
    ``divergence_threshold``.
    """
    es = _check_args(model, seed=seed, lr=lr, early_stopping=early_stopping, **sizes)
    obj = make_objective(objective, **dict(objective_options or {}))
    split, fam, ref = _prepare_data(model, data, family, es)
    # DDP: unequal shards, or a test split on some ranks only, would hang
    check_equal_steps(model, int(split[0].shape[0]), sizes["batch_size"], _n(split[2]))
    opt = make_optimizer(optimizer, model, float(lr))
    ckpt_path = os.path.join(os.fspath(checkpoint_dir), CHECKPOINT_NAME) if checkpoint_dir is not None else None
    fingerprint = _fingerprint(model, obj, opt, seed, sizes["batch_size"], int(split[0].shape[0]))
    run = _Run(model, opt, torch.Generator(device="cpu").manual_seed(seed), History(), fingerprint, ckpt_path)
    return run, _Plan(obj, fam, split, early_stopping=es, callback=callback, **sizes), ref


def _check_args(model: nn.Module, *, early_stopping: Optional[Union[EarlyStopping, int]], **kw: Any) -> Optional[EarlyStopping]:
    """Validate :func:`train`'s scalar arguments; return ``early_stopping`` as an :class:`EarlyStopping` (or ``None``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name in ("epochs", "batch_size", "checkpoint_every"):
        val = kw[name]
        if isinstance(val, bool) or not isinstance(val, int) or val < (0 if name == "epochs" else 1):
            raise ValueError(f"{name} must be a {'non-negative' if name == 'epochs' else 'positive'} int, got {val!r}")
    size = kw["eval_batch_size"]
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"eval_batch_size must be None or a positive int, got {size!r}")
    seed, lr, seconds, threshold = kw["seed"], kw["lr"], kw["checkpoint_seconds"], kw["divergence_threshold"]
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if seconds is not None and not (isinstance(seconds, (int, float)) and seconds > 0):
        raise ValueError(f"checkpoint_seconds must be None or positive, got {seconds!r}")
    if not (isinstance(threshold, (int, float)) and threshold > 0):
        raise ValueError(f"divergence_threshold must be positive, got {threshold!r}")
    if isinstance(early_stopping, int) and not isinstance(early_stopping, bool):
        early_stopping = EarlyStopping(patience=early_stopping)
    if early_stopping is not None and not isinstance(early_stopping, EarlyStopping):
        raise TypeError("early_stopping must be None, an int patience or an EarlyStopping")
    return early_stopping


def _prepare_data(
    model: nn.Module, data: DataSpec, family: Optional[Union[str, ExponentialFamily]], early_stopping: Optional[EarlyStopping]
) -> Tuple[Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]], ExponentialFamily, Tensor]:
    """``((x_train, y_train, x_test, y_test), family, a parameter)``: the splits checked and moved to the
    parameters' device (floating ones to their dtype)."""
    x_tr, y_tr, x_te, y_te, data_family = _split_data(data)
    fam = get_family(family if family is not None else (data_family or "categorical"))
    if x_tr.shape[0] != y_tr.shape[0] or (x_te is not None and x_te.shape[0] != y_te.shape[0]):
        raise ValueError("inputs and labels differ in number of samples")
    if x_tr.shape[0] == 0:
        raise ValueError("the training set is empty")
    ref = next(iter(model.parameters()), None)
    if ref is None:
        raise ValueError("the model has no parameters")
    if torch.is_floating_point(x_tr):
        x_tr = x_tr.to(ref.dtype)
        x_te = x_te.to(ref.dtype) if x_te is not None else None
    if torch.is_floating_point(y_tr):
        y_tr = y_tr.to(ref.dtype)
        y_te = y_te.to(ref.dtype) if y_te is not None else None
    x_tr, y_tr = x_tr.to(ref.device), y_tr.to(ref.device)
    x_te, y_te = (x_te.to(ref.device), y_te.to(ref.device)) if x_te is not None else (None, None)
    if early_stopping is not None and early_stopping.monitor.startswith("test_") and x_te is None:
        raise ValueError(f"early stopping monitors {early_stopping.monitor!r} but the data has no test split")
    return (x_tr, y_tr, x_te, y_te), fam, ref


@dataclass
class _Plan:
    """What :func:`train` was asked to do (fixed for the run)."""

    objective: Objective
    family: ExponentialFamily
    data: Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]
    epochs: int
    batch_size: int
    checkpoint_every: int
    checkpoint_seconds: Optional[float]
    divergence_threshold: Union[int, float]
    eval_batch_size: Optional[int]
    early_stopping: Optional[EarlyStopping]
    callback: Optional[Callable[[Dict[str, float], nn.Module], Optional[bool]]]


@dataclass
class _Run:
    """The state of a run, everything a checkpoint holds: model, optimizer, generator, history, early stopping."""

    model: nn.Module
    opt: torch.optim.Optimizer
    gen: torch.Generator
    history: History
    fingerprint: Dict[str, Any]
    ckpt_path: Optional[str]
    best_value: float = math.inf
    best_state: Optional[Dict[str, Tensor]] = None
    bad_epochs: int = 0
    last_save: float = 0.0

    def resume(self, epochs: int) -> bool:
        """Load the checkpoint, if any (the global RNG included); ``True`` when that run has already ended.

        Raises:
            ValueError: the checkpoint belongs to a different training.
        """
        state = load_checkpoint(self.ckpt_path) if self.ckpt_path is not None else None
        if state is None:
            return False
        diffs = [k for k in self.fingerprint if state.get("fingerprint", {}).get(k) != self.fingerprint[k]]
        if diffs:
            raise ValueError(
                f"checkpoint {self.ckpt_path} belongs to a different training (differs in {', '.join(diffs)}); "
                "delete it, or use another checkpoint folder"
            )
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.history = History.from_dict(state["history"])
        self.history.resumed_from = len(self.history.records)
        self.best_value, self.bad_epochs = state["best_value"], state["bad_epochs"]
        self.best_state = state.get("best_state")
        h = self.history
        if h.finished and (h.diverged or h.stopped_early or h.stopped_by_callback or len(h) >= epochs):
            return True
        h.finished = False
        return False

    def checkpoint(self) -> None:
        """Write the state atomically (nothing without a checkpoint folder)."""
        if self.ckpt_path is None:
            return
        self.last_save = time.perf_counter()
        save_checkpoint(
            self.ckpt_path,
            {
                "fingerprint": self.fingerprint,
                "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(),
                "generator": self.gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "history": self.history.to_dict(),
                "best_value": self.best_value,
                "bad_epochs": self.bad_epochs,
                "best_state": self.best_state,
            },
        )

    def diverge(self, last_good: Dict[str, Tensor], reason: str) -> None:
        """End the run as diverged: the parameters of the last completed epoch back, the reason recorded."""
        self.model.load_state_dict(last_good)
        self.history.diverged, self.history.divergence, self.history.finished = True, reason, True
        self.checkpoint()


def _epochs(run: _Run, plan: _Plan, progress: bool) -> None:
    """The remaining epochs (a progress bar over them when ``progress``)."""
    from tqdm.auto import tqdm

    run.last_save = time.perf_counter()
    bar = tqdm(
        total=plan.epochs, initial=len(run.history), disable=not progress, desc=f"train {plan.objective.name}", leave=False
    )
    try:
        _epoch_loop(run, plan, bar)
    finally:
        bar.close()


def _epoch_loop(run: _Run, plan: _Plan, bar: Any) -> None:
    """Each epoch: one pass over the batches, its record, early stopping, the callback, the checkpoint."""
    last_good = _state_copy(run.model)
    for epoch in range(len(run.history) + 1, plan.epochs + 1):
        t0 = time.perf_counter()
        sums, reason = _train_epoch(run, plan, epoch)
        record = _epoch_record(run, plan, epoch, sums, t0) if reason is None else {}
        record = global_record(record, int(plan.data[0].shape[0]), _n(plan.data[2]), run.model) if record else record
        if reason is None and not math.isfinite(record.get("train_nll", 0.0)):
            reason = f"non-finite training NLL after epoch {epoch}"
        if reason is not None:
            run.diverge(last_good, reason)
            break
        run.history.records.append(record)
        last_good = _state_copy(run.model)
        stop = _early_stopping_step(run, plan.early_stopping, record, epoch)
        # the callback decides before the checkpoint is written: a run killed after
        # that checkpoint resumes with the same decision (bitwise resume)
        user_stop = agree_any(plan.callback is not None and bool(plan.callback(record, run.model)), run.model) and not stop
        if stop or user_stop or epoch == plan.epochs:
            _finish(run, plan.early_stopping, stop, user_stop, epoch == plan.epochs)
        elif epoch % plan.checkpoint_every == 0 or (
            plan.checkpoint_seconds is not None and time.perf_counter() - run.last_save >= plan.checkpoint_seconds
        ):
            run.checkpoint()
        bar.update(1)
        bar.set_postfix({k: f"{record[k]:.4g}" for k in ("objective_loss", "test_nll", "test_accuracy") if k in record})
        if stop or user_stop:
            break
    else:
        run.history.finished = True


def _train_epoch(run: _Run, plan: _Plan, epoch: int) -> Tuple[Dict[str, float], Optional[str]]:
    """One pass over shuffled mini-batches: ``(means of the objective's metrics, why it diverged or None)``."""
    x_tr, y_tr = plan.data[0], plan.data[1]
    n, batch_size = int(x_tr.shape[0]), plan.batch_size
    run.model.train()
    perm = torch.randperm(n, generator=run.gen).to(x_tr.device)
    sums: Dict[str, float] = {}
    for start in range(0, n, batch_size):
        idx = perm[start : start + batch_size]
        run.opt.zero_grad(set_to_none=True)
        where = f"at epoch {epoch}, batch {start // batch_size}"
        try:
            out, reason = plan.objective(run.model, x_tr[idx], y_tr[idx], plan.family, run.gen), None
            value = out.metrics["loss"]
            if not math.isfinite(value):
                reason = f"non-finite loss ({value}) "
            elif abs(value) > plan.divergence_threshold:
                reason = f"loss {value:.3g} above divergence_threshold={plan.divergence_threshold:g} "
        except NonFiniteOutputError:  # a step sent the outputs to overflow (objectives that check them, e.g. Fisher-dropout)
            reason = "non-finite model outputs "
        if agree_any(reason is not None, run.model):  # under DDP every rank stops at the same batch, before its backward
            return sums, (reason or "another rank's batch diverged ") + where
        out.loss.backward()
        run.opt.step()
        w = len(idx) / n
        for k, v in out.metrics.items():
            sums[f"objective_{k}"] = sums.get(f"objective_{k}", 0.0) + w * v
    if not _params_finite(run.model):
        return sums, f"non-finite parameters after epoch {epoch}"
    return sums, None


def _epoch_record(run: _Run, plan: _Plan, epoch: int, sums: Mapping[str, float], t0: float) -> Dict[str, float]:
    """The epoch's record: the objective's means, train and test metrics (eval mode), learning rate, seconds."""
    x_tr, y_tr, x_te, y_te = plan.data
    record: Dict[str, float] = {"epoch": epoch, **sums}
    for split, xs, ys in (("train", x_tr, y_tr), ("test", x_te, y_te)):
        if xs is not None:
            for k, v in evaluate(run.model, xs, ys, plan.family, plan.eval_batch_size).items():
                record[f"{split}_{k}"] = v
    record["lr"] = float(run.opt.param_groups[0].get("lr", float("nan")))
    record["seconds"] = time.perf_counter() - t0
    return record


def _early_stopping_step(run: _Run, es: Optional[EarlyStopping], record: Mapping[str, float], epoch: int) -> bool:
    """Update the best value and the epochs without improvement; ``True`` when patience has run out.

    Raises:
        ValueError: the monitored metric is not in the record.
    """
    if es is None:
        return False
    if es.monitor not in record:
        raise ValueError(f"early stopping monitors {es.monitor!r}, not among the metrics {sorted(record)}")
    value = record[es.monitor]
    if value < run.best_value - es.min_delta:
        run.best_value, run.bad_epochs, run.history.best_epoch = value, 0, epoch
        run.best_state = _state_copy(run.model) if es.restore_best else None
        return False
    run.bad_epochs += 1
    return run.bad_epochs >= es.patience


def _finish(run: _Run, es: Optional[EarlyStopping], stop: bool, user_stop: bool, last: bool) -> None:
    """End the run (patience out, the callback's stop, or the last epoch): best parameters back if asked, checkpoint."""
    run.history.stopped_early = stop
    run.history.stopped_by_callback = user_stop
    if (stop or last) and es is not None and es.restore_best and run.best_state is not None:
        run.model.load_state_dict(run.best_state)
    run.history.finished = True
    run.checkpoint()
