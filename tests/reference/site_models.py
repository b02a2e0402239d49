"""Small modules whose dropout sits where a ``nn.Dropout`` child cannot be seen: attention-weight dropout,
``F.dropout`` in a custom forward, and ``F.scaled_dot_product_attention(dropout_p=...)``.

Shared by ``tests/test_dropout_sites.py`` and ``tests/test_dropout_penalty_sites.py``; plain ``torch.nn``
modules (nothing here imports dropgeom).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AttnNet", "FuncDrop", "SdpaNet"]


class AttnNet(nn.Module):
    """Self-attention with attention-weight dropout, mean-pooled, linear head."""

    def __init__(self, e: int = 2, heads: int = 1, k: int = 2, p: float = 0.3) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(e, heads, dropout=p, batch_first=True)
        self.head = nn.Linear(e, k)

    def forward(self, x, need_weights: bool = True):
        a, _ = self.attn(x, x, x, need_weights=need_weights)
        return self.head(torch.tanh(x + a).mean(1))


class FuncDrop(nn.Module):
    """F.dropout inside a custom forward (gated by self.training, and one unconditional call)."""

    def __init__(self, p: float = 0.4, always: float = 0.0) -> None:
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(2, 3), nn.Linear(3, 2)
        self.p, self.always = p, always

    def forward(self, x):
        h = F.dropout(torch.tanh(self.lin1(x)), self.p, self.training)
        if self.always:
            h = F.dropout(h, self.always)  # training=True by default: random even in eval mode
        return self.lin2(h)


class SdpaNet(nn.Module):
    """Attention through F.scaled_dot_product_attention(dropout_p=p) (always on)."""

    def __init__(self, e: int = 2, p: float = 0.3) -> None:
        super().__init__()
        self.qkv, self.head = nn.Linear(e, 3 * e), nn.Linear(e, 2)
        self.p = p

    def forward(self, x):
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, -1)  # [n, 1, L, e]
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p)
        return self.head(torch.tanh(a[:, 0]).mean(1))
