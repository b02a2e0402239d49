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
``divergence_threshold``) or non-finite parameters stop the run without
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

import copy
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..data import Dataset
from ..families import ExponentialFamily, get_family
from .checkpoint import load_checkpoint, save_checkpoint
from .metrics import evaluate
from .objectives import Objective
from .registry import make_objective

__all__ = ["train", "History", "EarlyStopping", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "checkpoint.pt"

OptimizerSpec = Union[None, str, torch.optim.Optimizer, Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]]
DataSpec = Union[Dataset, Tuple[Tensor, Tensor], Tuple[Tensor, Tensor, Tensor, Tensor]]


@dataclass
class EarlyStopping:
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience`` epochs.

    ``monitor`` is a key of the per-epoch record (``test_nll`` by default:
    the held-out split of the data; pass a validation split as the test part
    to monitor validation NLL). With ``restore_best`` the model ends at the
    parameters of the best epoch.
    """

    patience: int = 10
    monitor: str = "test_nll"
    min_delta: float = 0.0
    restore_best: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"early stopping patience must be a positive int, got {self.patience!r}")
        if not (isinstance(self.min_delta, (int, float)) and self.min_delta >= 0):
            raise ValueError(f"early stopping min_delta must be >= 0, got {self.min_delta!r}")


@dataclass
class History:
    """Per-epoch records of a run and how it ended.

    ``records[e]`` holds, for epoch ``e + 1``: ``epoch``, ``objective_<metric>``
    (means over the epoch's batches of the objective's metrics, e.g.
    ``objective_loss``, ``objective_nll``, ``objective_penalty``), ``train_nll``,
    ``test_nll`` (and ``_accuracy``, ``_ece`` for classification; eval mode),
    ``lr`` and ``seconds`` (wall time of the epoch).
    ``diverged`` / ``divergence`` say whether and why the run was stopped for
    NaN or explosion; ``stopped_early`` and ``best_epoch`` report early
    stopping, ``stopped_by_callback`` a stop asked for by the callback; ``resumed_from`` is the epoch a resumed run continued after.
    """

    records: List[Dict[str, float]] = field(default_factory=list)
    diverged: bool = False
    divergence: Optional[str] = None
    stopped_early: bool = False
    stopped_by_callback: bool = False
    best_epoch: Optional[int] = None
    finished: bool = False
    resumed_from: Optional[int] = None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Dict[str, float]:
        return self.records[i]

    def metric(self, key: str) -> List[float]:
        """The values of one metric over the epochs."""
        return [r.get(key, float("nan")) for r in self.records]

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "History":
        return cls(**{k: copy.deepcopy(v) for k, v in d.items() if k in cls.__dataclass_fields__})


def _split_data(data: DataSpec) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[str]]:
    if isinstance(data, Dataset):
        return data.x_train, data.y_train, data.x_test, data.y_test, data.family
    if isinstance(data, (tuple, list)) and len(data) in (2, 4) and all(isinstance(t, Tensor) for t in data):
        if len(data) == 2:
            return data[0], data[1], None, None, None
        return data[0], data[1], data[2], data[3], None
    raise TypeError("data must be a dropgeom.data.Dataset or a tuple (x_train, y_train[, x_test, y_test]) of tensors")


def _make_optimizer(spec: OptimizerSpec, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    if spec is None or isinstance(spec, str):
        name = (spec or "adam").lower()
        table = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
        if name not in table:
            raise ValueError(f"unknown optimizer {spec!r}; choose one of {sorted(table)}, or pass a torch.optim.Optimizer or a factory")
        return table[name](params, lr=lr)
    if isinstance(spec, torch.optim.Optimizer):
        own = {id(p) for p in model.parameters()}
        foreign = [p for g in spec.param_groups for p in g["params"] if id(p) not in own]
        if foreign:
            raise ValueError("the optimizer holds parameters that do not belong to the model")
        return spec
    if callable(spec):
        opt = spec(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"the optimizer factory must return a torch.optim.Optimizer, got {type(opt).__name__}")
        return opt
    raise TypeError(f"optimizer must be None, a name, a torch.optim.Optimizer or a factory; got {type(spec).__name__}")


def _fingerprint(
    model: nn.Module, objective: Objective, opt: torch.optim.Optimizer, seed: int, batch_size: int, n: int
) -> Dict[str, Any]:
    groups = [{k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)) for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return {
        "objective": repr(objective),
        "optimizer": type(opt).__name__,
        "optimizer_groups": repr(groups),
        "seed": seed,
        "batch_size": batch_size,
        "n_train": n,
        "params": repr([(k, tuple(p.shape), str(p.dtype)) for k, p in model.named_parameters()]),
    }


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
        optimizer: ``None``/``"adam"``, ``"adamw"``, ``"sgd"`` (with ``lr``), an
            optimizer over the model's parameters, or a factory ``params -> optimizer``.
        epochs: total number of epochs (a resumed run counts the finished ones).
        batch_size: mini-batch size (the last, smaller batch is kept).
        seed: seeds the shuffling, the masks and the global RNG inside the loop.
        family: output family; default the data set's (``categorical`` for tuples).
        early_stopping: an :class:`EarlyStopping`, or an int patience on ``test_nll``.
        checkpoint_dir: where ``checkpoint.pt`` is written (atomically); ``None``: no checkpoints.
        resume: continue from an existing checkpoint in ``checkpoint_dir``
            (``False``: start afresh and overwrite it).
        checkpoint_every: write a checkpoint every this many epochs (and at the end).
        checkpoint_seconds: also write one after any epoch that ends this many
            seconds after the last checkpoint (``None``: only ``checkpoint_every``),
            so that an interrupted long training loses little work.
        callback: ``callback(record, model)`` after each epoch (before that
            epoch's checkpoint, so a resumed run sees the same decision);
            returning ``True`` stops the run, and a resumed run stopped this
            way is not continued.
        progress: show a tqdm progress bar over epochs.
        divergence_threshold: a batch loss above this counts as divergence.
        eval_batch_size: batch size of the per-epoch evaluation.

    Returns:
        The :class:`History`; ``history.diverged`` is set (no exception) when
        the loss or parameters became non-finite or exploded.

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
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, val in (("epochs", epochs), ("batch_size", batch_size), ("checkpoint_every", checkpoint_every)):
        if isinstance(val, bool) or not isinstance(val, int) or val < (0 if name == "epochs" else 1):
            raise ValueError(f"{name} must be a {'non-negative' if name == 'epochs' else 'positive'} int, got {val!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if checkpoint_seconds is not None and not (isinstance(checkpoint_seconds, (int, float)) and checkpoint_seconds > 0):
        raise ValueError(f"checkpoint_seconds must be None or positive, got {checkpoint_seconds!r}")
    if not (isinstance(divergence_threshold, (int, float)) and divergence_threshold > 0):
        raise ValueError(f"divergence_threshold must be positive, got {divergence_threshold!r}")
    if isinstance(early_stopping, int) and not isinstance(early_stopping, bool):
        early_stopping = EarlyStopping(patience=early_stopping)
    if early_stopping is not None and not isinstance(early_stopping, EarlyStopping):
        raise TypeError("early_stopping must be None, an int patience or an EarlyStopping")

    obj = make_objective(objective, **dict(objective_options or {}))
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
    if x_te is not None:
        x_te, y_te = x_te.to(ref.device), y_te.to(ref.device)
    if early_stopping is not None and early_stopping.monitor.startswith("test_") and x_te is None:
        raise ValueError(f"early stopping monitors {early_stopping.monitor!r} but the data has no test split")

    opt = _make_optimizer(optimizer, model, float(lr))
    n = int(x_tr.shape[0])
    fp = _fingerprint(model, obj, opt, seed, batch_size, n)
    ckpt_path = os.path.join(os.fspath(checkpoint_dir), CHECKPOINT_NAME) if checkpoint_dir is not None else None

    history = History()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    best_value, best_state, bad_epochs = math.inf, None, 0

    with torch.random.fork_rng(devices=[ref.device] if ref.device.type == "cuda" else []):
        torch.manual_seed(seed)
        state = load_checkpoint(ckpt_path) if (ckpt_path is not None and resume) else None
        if state is not None:
            diffs = [k for k in fp if state.get("fingerprint", {}).get(k) != fp[k]]
            if diffs:
                raise ValueError(
                    f"checkpoint {ckpt_path} belongs to a different training (differs in {', '.join(diffs)}); "
                    "delete it, or use another checkpoint folder"
                )
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            gen.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            history = History.from_dict(state["history"])
            history.resumed_from = len(history.records)
            best_value, bad_epochs = state["best_value"], state["bad_epochs"]
            best_state = state.get("best_state")
            ended = history.diverged or history.stopped_early or history.stopped_by_callback
            if history.finished and (ended or len(history) >= epochs):
                return history
            history.finished = False

        last_save = [time.perf_counter()]

        def checkpoint() -> None:
            if ckpt_path is None:
                return
            last_save[0] = time.perf_counter()
            save_checkpoint(
                ckpt_path,
                {
                    "fingerprint": fp,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "generator": gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "history": history.to_dict(),
                    "best_value": best_value,
                    "bad_epochs": bad_epochs,
                    "best_state": best_state,
                },
            )

        from tqdm.auto import tqdm

        bar = tqdm(total=epochs, initial=len(history), disable=not progress, desc=f"train {obj.name}", leave=False)
        last_good = _state_copy(model)
        try:
            for epoch in range(len(history) + 1, epochs + 1):
                t0 = time.perf_counter()
                model.train()
                perm = torch.randperm(n, generator=gen).to(x_tr.device)
                sums: Dict[str, float] = {}
                reason: Optional[str] = None
                for start in range(0, n, batch_size):
                    idx = perm[start : start + batch_size]
                    opt.zero_grad(set_to_none=True)
                    out = obj(model, x_tr[idx], y_tr[idx], fam, gen)
                    value = out.metrics["loss"]
                    if not math.isfinite(value):
                        reason = f"non-finite loss ({value}) at epoch {epoch}, batch {start // batch_size}"
                        break
                    if abs(value) > divergence_threshold:
                        reason = f"loss {value:.3g} above divergence_threshold={divergence_threshold:g} at epoch {epoch}"
                        break
                    out.loss.backward()
                    opt.step()
                    w = len(idx) / n
                    for k, v in out.metrics.items():
                        sums[f"objective_{k}"] = sums.get(f"objective_{k}", 0.0) + w * v
                if reason is None and not _params_finite(model):
                    reason = f"non-finite parameters after epoch {epoch}"
                if reason is not None:
                    model.load_state_dict(last_good)
                    history.diverged, history.divergence, history.finished = True, reason, True
                    checkpoint()
                    break
                record: Dict[str, float] = {"epoch": epoch, **sums}
                for split, xs, ys in (("train", x_tr, y_tr), ("test", x_te, y_te)):
                    if xs is not None:
                        for k, v in evaluate(model, xs, ys, fam, eval_batch_size).items():
                            record[f"{split}_{k}"] = v
                record["lr"] = float(opt.param_groups[0].get("lr", float("nan")))
                record["seconds"] = time.perf_counter() - t0
                if not math.isfinite(record.get("train_nll", 0.0)):
                    model.load_state_dict(last_good)
                    history.diverged, history.finished = True, True
                    history.divergence = f"non-finite training NLL after epoch {epoch}"
                    checkpoint()
                    break
                history.records.append(record)
                last_good = _state_copy(model)
                stop = False
                if early_stopping is not None:
                    if early_stopping.monitor not in record:
                        raise ValueError(
                            f"early stopping monitors {early_stopping.monitor!r}, not among the metrics {sorted(record)}"
                        )
                    value = record[early_stopping.monitor]
                    if value < best_value - early_stopping.min_delta:
                        best_value, bad_epochs, history.best_epoch = value, 0, epoch
                        best_state = _state_copy(model) if early_stopping.restore_best else None
                    else:
                        bad_epochs += 1
                        stop = bad_epochs >= early_stopping.patience
                # the callback decides before the checkpoint is written: a run killed after
                # that checkpoint resumes with the same decision (bitwise resume)
                user_stop = callback is not None and bool(callback(record, model)) and not stop
                if stop or user_stop or epoch == epochs:
                    history.stopped_early = stop
                    history.stopped_by_callback = user_stop
                    if (stop or epoch == epochs) and early_stopping is not None and early_stopping.restore_best and best_state is not None:
                        model.load_state_dict(best_state)
                    history.finished = True
                    checkpoint()
                elif epoch % checkpoint_every == 0 or (
                    checkpoint_seconds is not None and time.perf_counter() - last_save[0] >= checkpoint_seconds
                ):
                    checkpoint()
                bar.update(1)
                bar.set_postfix(
                    {k: f"{record[k]:.4g}" for k in ("objective_loss", "test_nll", "test_accuracy") if k in record}
                )
                if stop or user_stop:
                    break
            else:
                history.finished = True
        finally:
            bar.close()
    return history
