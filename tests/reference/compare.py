"""Comparison helpers and tolerances shared by the tests.

Float64 references (dense Jacobians, closed forms, enumeration) agree with the
library up to rounding, so the tolerances are relative to the size of the
reference: a difference that is small next to ``max |reference|`` passes even
where single entries are zero.
"""

from __future__ import annotations

from typing import Optional

import torch

#: float64 against a float64 reference computed another way: a few hundred roundings
RTOL64 = 1e-9
#: the absolute part, relative to the largest reference entry
ATOL64 = 1e-10


def assert_close_to_scale(
    a: torch.Tensor, b: torch.Tensor, scale: Optional[float] = None, rtol: float = RTOL64, atol: float = ATOL64
) -> None:
    """``a`` equals the reference ``b``: ``|a - b| <= rtol |b| + atol * scale`` entrywise.

    ``scale`` defaults to ``max |b|`` (pass the size of the quantity ``b`` was computed from
    when ``b`` itself may be tiny, e.g. a product ``F v``).
    """
    scale = b.abs().max().item() if scale is None else scale
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol * max(scale, 1e-30))
