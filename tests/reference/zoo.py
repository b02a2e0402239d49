"""The model zoo: one row per architecture a PyTorch user has (float64, seeded, tiny).

Each row builds ``(model, inputs, targets)``; ``tests/test_zoo.py`` checks every row's
Fisher against curvlinops' GGN (the exact Fisher for softmax cross-entropy) and, for rows
with dropout, dropgeom's Monte Carlo dropout gap against torch's own train-mode forward.
Adding an architecture is adding one row to ``ZOO``. Nothing here imports dropgeom.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch
from torch import Tensor, nn

D64 = torch.float64
K = 3


class Pool(nn.Module):
    """``head(mean over the sequence of body(x))`` for sequence bodies returning a tensor or a tuple."""

    def __init__(self, body: nn.Module, width: int, embed: int = 0, decoder: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(embed, width) if embed else None
        self.body, self.head, self.decoder = body, nn.Linear(width, K), decoder

    def forward(self, x: Tensor) -> Tensor:
        h = self.emb(x) if self.emb is not None else x
        out = self.body(h, h) if self.decoder else self.body(h)
        out = out[0] if isinstance(out, tuple) else out
        return self.head(out.mean(1))


class ResBlock(nn.Module):
    """``relu(x + bn(conv(x)))`` with BatchNorm in eval mode (non-trivial running statistics)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        with torch.no_grad():
            self.bn.running_mean.copy_(torch.linspace(-0.2, 0.2, c))
            self.bn.running_var.copy_(torch.linspace(0.5, 1.5, c))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.bn(self.conv(x)))


class AttnDrop(nn.Module):
    """Self-attention with attention-weight dropout, residual, mean-pooled, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, dropout=0.3, batch_first=True)
        self.head = nn.Linear(4, K)

    def forward(self, x: Tensor) -> Tensor:
        a, _ = self.attn(x, x, x)
        return self.head((x + a).mean(1))


@dataclass
class Row:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], Tensor]
    dropout: bool  # has dropout: its gap is checked against torch's train-mode forward


def _x(*shape: int) -> Callable[[torch.Generator], Tensor]:
    return lambda g: torch.randn(*shape, generator=g, dtype=D64)


def _ids(n: int, length: int, vocab: int) -> Callable[[torch.Generator], Tensor]:
    return lambda g: torch.randint(0, vocab, (n, length), generator=g)


def _enc() -> nn.Module:
    return Pool(nn.TransformerEncoderLayer(4, 2, 8, dropout=0.2, batch_first=True), 4, embed=5)


ZOO: Dict[str, Row] = {
    r.name: r
    for r in [
        Row("mlp_dropout", lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Dropout(0.3), nn.Linear(5, K)), _x(6, 4), True),
        Row(
            "cnn_bn_residual",
            lambda: nn.Sequential(
                nn.Conv2d(1, 2, 3), ResBlock(2), nn.Dropout2d(0.2), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2, K)
            ),
            _x(5, 1, 4, 4),
            True,
        ),
        Row("lstm", lambda: Pool(nn.LSTM(3, 4, batch_first=True), 4), _x(4, 3, 3), False),
        Row("gru", lambda: Pool(nn.GRU(3, 4, batch_first=True), 4), _x(4, 3, 3), False),
        Row(
            "lstm_2layer_bidir_proj",
            lambda: Pool(nn.LSTM(3, 4, 2, batch_first=True, bidirectional=True, proj_size=2), 4),
            _x(3, 3, 3),
            False,
        ),
        Row("transformer_encoder", _enc, _ids(5, 3, 5), True),
        Row(
            "transformer_decoder",
            lambda: Pool(nn.TransformerDecoderLayer(4, 2, 8, dropout=0.2, batch_first=True), 4, embed=5, decoder=True),
            _ids(4, 3, 5),
            True,
        ),
        Row(
            "transformer",
            lambda: Pool(nn.Transformer(4, 2, 1, 1, 8, dropout=0.2, batch_first=True), 4, embed=5, decoder=True),
            _ids(4, 3, 5),
            True,
        ),
        Row("attention_dropout", AttnDrop, _x(6, 3, 4), True),
    ]
}


def build(name: str, seed: int = 0) -> Tuple[nn.Module, Tensor, Tensor]:
    """``(model in eval mode, inputs, class targets)`` of row ``name`` in float64."""
    row = ZOO[name]
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    model = row.build().double().eval()
    x = row.inputs(g)
    return model, x, torch.randint(0, K, (x.shape[0],), generator=g)
