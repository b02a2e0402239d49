"""How a training run is configured to stop, and what it records: :class:`EarlyStopping` and :class:`History`.

Both are re-exported by :mod:`dropgeom.train.loop` and :mod:`dropgeom.train`.

Example:
    >>> h = History(records=[{"epoch": 1, "test_nll": 0.5}, {"epoch": 2, "test_nll": 0.4}])
    >>> len(h), h.metric("test_nll")
    (2, [0.5, 0.4])
    >>> History.from_dict(h.to_dict()) == h
    True
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional

__all__ = ["EarlyStopping", "History"]


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
