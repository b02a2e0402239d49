"""Shared helpers of the dropout package (not public)."""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple, Union

import torch
from torch import Tensor, nn
from torch.func import vmap

from ..families import ExponentialFamily, get_family

Inputs = Union[Tensor, Tuple[Tensor, ...]]


def as_tuple(inputs: Inputs) -> Tuple[Tensor, ...]:
    if isinstance(inputs, Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, tuple) or not inputs or not all(isinstance(t, Tensor) for t in inputs):
        raise TypeError("inputs must be a tensor or a tuple of tensors with a leading sample axis")
    n = inputs[0].shape[0] if inputs[0].dim() else 0
    for t in inputs:
        if t.dim() == 0 or t.shape[0] != n:
            raise ValueError(f"every input needs the same leading sample axis; got {[tuple(x.shape) for x in inputs]}")
        if torch.is_floating_point(t) and not torch.isfinite(t).all():
            raise ValueError("inputs contain non-finite values (NaN or inf)")
    if n == 0:
        raise ValueError("inputs are empty (n = 0)")
    return inputs


def model_inputs(model: nn.Module, inputs: Inputs) -> Tuple[Tensor, ...]:
    """:func:`as_tuple` for ``model`` (a dtype / device mismatch is named when a forward pass fails)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return as_tuple(inputs)


def detached_params(model: nn.Module) -> Dict[str, Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}


def check_output(family: ExponentialFamily, eta: Tensor, n: int) -> None:
    if not isinstance(eta, Tensor) or eta.dim() != 2 or eta.shape[0] != n:
        shape = tuple(eta.shape) if isinstance(eta, Tensor) else type(eta).__name__
        raise ValueError(f"the model must return natural parameters of shape [n={n}, K]; got {shape}")
    family.check_eta(eta)
    if not torch.isfinite(eta).all():
        raise ValueError("the model's outputs are non-finite at these parameters")


def family_of(family: Union[str, ExponentialFamily]) -> ExponentialFamily:
    return get_family(family)


def chunked_vmap(fn: Callable, batched: Tensor, chunk: int) -> Tensor:
    """``torch.stack([fn(b) for b in batched])`` computed with ``vmap`` in chunks (loop fallback)."""
    outs: List[Tensor] = []
    for s in range(0, batched.shape[0], chunk):
        part = batched[s : s + chunk]
        try:
            outs.append(vmap(fn)(part))
        except (RuntimeError, NotImplementedError):  # a layer without a batching rule
            outs.append(torch.stack([fn(b) for b in part]))
    return torch.cat(outs)


def chunk_for(n_rows: int, width: int, budget: int = 2**24) -> int:
    """How many batched evaluations of ``n_rows x width`` activations to run at once."""
    return max(1, budget // max(1, n_rows * width))
