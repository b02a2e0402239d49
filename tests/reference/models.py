"""A table of small float64 models for the core tests (BackPACK-style settings).

Each entry builds ``(model, inputs, family, K)`` deterministically from a seed.
The models are ordinary ``torch.nn`` modules; nothing here imports dropgeom.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch
from torch import Tensor, nn

D64 = torch.float64


class ResidualNet(nn.Module):
    """``head(tanh(x + lin2(tanh(lin1(x)))))``: one residual block."""

    def __init__(self, d: int = 4, k: int = 3) -> None:
        super().__init__()
        self.lin1 = nn.Linear(d, d)
        self.lin2 = nn.Linear(d, d)
        self.head = nn.Linear(d, k)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(x + self.lin2(torch.tanh(self.lin1(x)))))


class AttentionNet(nn.Module):
    """Self-attention over a short sequence, mean-pooled, then a linear head."""

    def __init__(self, e: int = 4, heads: int = 2, k: int = 3) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(e, heads, batch_first=True)
        self.head = nn.Linear(e, k)

    def forward(self, x: Tensor) -> Tensor:
        a, _ = self.attn(x, x, x, need_weights=False)
        return self.head((x + a).mean(1))


class NormalHead(nn.Module):
    """Wraps a body with 2 outputs into normal natural parameters ``(o_1, -softplus(o_2) - 0.1)``."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        o = self.body(x)
        return torch.stack([o[:, 0], -nn.functional.softplus(o[:, 1]) - 0.1], dim=-1)


def mlp(act: Callable[[], nn.Module], d: int = 4, h: int = 5, k: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(d, h), act(), nn.Linear(h, k))


@dataclass
class Setting:
    name: str
    build: Callable[[int], nn.Module]  # k -> model
    inputs: Callable[[torch.Generator], Tensor]
    supports_normal: bool = True


def _x(*shape: int) -> Callable[[torch.Generator], Tensor]:
    return lambda g: torch.randn(*shape, generator=g, dtype=D64)


def _bn_mlp(k: int) -> nn.Module:
    net = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, k))
    with torch.no_grad():
        net[1].running_mean.copy_(torch.linspace(-0.5, 0.5, 5))
        net[1].running_var.copy_(torch.linspace(0.5, 2.0, 5))
        net[1].weight.copy_(torch.linspace(0.8, 1.2, 5))
        net[1].bias.copy_(torch.linspace(-0.1, 0.1, 5))
    return net


def _cnn(k: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, k))


def _cnn_avg(k: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(2, 1, 1), nn.Flatten(), nn.Linear(4, k)
    )


SETTINGS: Dict[str, Setting] = {
    s.name: s
    for s in [
        Setting("logreg", lambda k: nn.Linear(5, k), _x(7, 5)),
        Setting("mlp_tanh", lambda k: mlp(nn.Tanh, k=k), _x(6, 4)),
        Setting("mlp_softplus", lambda k: mlp(nn.Softplus, k=k), _x(6, 4)),
        Setting("mlp_relu", lambda k: mlp(nn.ReLU, k=k), _x(6, 4)),
        Setting("cnn_maxpool", _cnn, _x(5, 1, 6, 6)),
        Setting("cnn_avgpool", _cnn_avg, _x(4, 2, 4, 4)),
        Setting("residual", lambda k: ResidualNet(4, k), _x(6, 4)),
        Setting("layernorm", lambda k: nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, k)), _x(6, 4)),
        Setting("batchnorm_eval", _bn_mlp, _x(6, 4)),
        Setting("attention", lambda k: AttentionNet(4, 2, k), _x(4, 3, 4)),
        Setting(
            "instancenorm",
            lambda k: nn.Sequential(
                nn.Conv2d(1, 2, 2), nn.InstanceNorm2d(2, affine=True), nn.Tanh(), nn.Flatten(), nn.Linear(16, k)
            ),
            _x(4, 1, 3, 5),
        ),
    ]
}

# the models the Fisher tests run every kind x structure on
FISHER_MODELS = ["logreg", "mlp_tanh", "cnn_maxpool"]


def build(name: str, family: str = "categorical", k: int = 3, seed: int = 0) -> Tuple[nn.Module, Tensor]:
    """``(model, inputs)`` for setting ``name`` in float64; ``normal`` gets a :class:`NormalHead` (K=2)."""
    s = SETTINGS[name]
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    if family == "normal":
        model = NormalHead(s.build(2))
    else:
        model = s.build(k)
    return model.double(), s.inputs(g)
