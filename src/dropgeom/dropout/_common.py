"""Shared helpers of the dropout package (not public)."""

from __future__ import annotations

from typing import Callable, Dict, Tuple, Union

import torch
from torch import Tensor, nn

from .._utils import Inputs, check_outputs_finite, checked_inputs as as_tuple, vmap_or_loop  # noqa: F401 (as_tuple: re-exported)
from ..families import ExponentialFamily, get_family


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
    check_outputs_finite(eta)


def family_of(family: Union[str, ExponentialFamily]) -> ExponentialFamily:
    return get_family(family)


def chunked_vmap(fn: Callable, batched: Tensor, chunk: int) -> Tensor:
    """``torch.stack([fn(b) for b in batched])`` computed with ``vmap`` in chunks (loop fallback)."""
    return torch.cat([vmap_or_loop(fn, batched[s : s + chunk]) for s in range(0, batched.shape[0], chunk)])


def chunk_for(n_rows: int, width: int, budget: int = 2**24) -> int:
    """How many batched evaluations of ``n_rows x width`` activations to run at once."""
    return max(1, budget // max(1, n_rows * width))
