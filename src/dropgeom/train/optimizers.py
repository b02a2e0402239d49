"""The optimizer :func:`dropgeom.train.train` uses: a name from :data:`OPTIMIZERS`, an optimizer, or a factory.

Example:
    >>> import torch
    >>> type(make_optimizer("sgd", torch.nn.Linear(2, 2), lr=0.1)).__name__
    'SGD'
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Type, Union

import torch
from torch import nn

__all__ = ["OPTIMIZERS", "OptimizerSpec", "make_optimizer"]

#: the optimizers ``train(optimizer=<name>)`` and the CLI's ``--optimizer`` know, by name (default ``"adam"``)
OPTIMIZERS: Dict[str, Type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}

OptimizerSpec = Union[None, str, torch.optim.Optimizer, Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]]


def make_optimizer(spec: OptimizerSpec, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The optimizer of ``model``'s trainable parameters: ``OPTIMIZERS[spec](params, lr=lr)`` for a name (``None``:
    Adam), ``spec`` itself for an optimizer (checked to hold only the model's parameters), ``spec(params)`` for a
    factory.

    Raises:
        ValueError: the model has no trainable parameters; an unknown name (the message lists the known ones); an
            optimizer holding parameters that are not the model's.
        TypeError: a factory that returns no ``torch.optim.Optimizer``, or a ``spec`` of another type.

    Example:
        >>> import torch
        >>> make_optimizer(None, torch.nn.Linear(2, 2), lr=1e-3).defaults["lr"]
        0.001
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    if spec is None or isinstance(spec, str):
        name = (spec or "adam").lower()
        if name not in OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {spec!r}; choose one of {sorted(OPTIMIZERS)}, or pass a torch.optim.Optimizer or a factory"
            )
        return OPTIMIZERS[name](params, lr=lr)
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
