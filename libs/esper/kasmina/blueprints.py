"""Seed blueprints: small shape-preserving modules that compute a residual delta f(x).

A slot adds the delta to the host's activations (x + alpha * f(x)), and every blueprint's last layer
starts at zero, so a fresh seed is the identity. The zero sits in a BatchNorm/LayerNorm scale or a
linear weight with no nonlinearity after it, or one whose slope at 0 is 1 (SqueezeExcite's tanh): a
zero-scale BN before a final ReLU passes no gradient and the seed stays dead (FIELD-NOTES: 74.1% instead
of 79.2%).

CNN seeds see [B, C, H, W]; transformer seeds see the residual stream [B, T, C] and are the
transformer's own sublayers (attention, MLP) behind their own LayerNorm, as a block's are.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from esper.kasmina.transformer import MLP, CausalSelfAttention
from esper.leyline import Blueprint

HEAD_WIDTH = 32
"""Channels per head of an attention seed (the tinystories host's 128 / 4 heads)."""
LORA_RANK = 8


def zero_bn(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    nn.init.zeros_(bn.weight)
    return bn


class SqueezeExcite(nn.Module):
    """Channel gate as a delta: f(x) = x * tanh(W2 relu(W1 mean_hw(x))), W2 zero at birth."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(4, channels // reduction)
        self.squeeze = nn.Linear(channels, hidden)
        self.excite = nn.Linear(hidden, channels)
        nn.init.zeros_(self.excite.weight)
        nn.init.zeros_(self.excite.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3))  # [B, C]
        gate = torch.tanh(self.excite(torch.relu(self.squeeze(s))))  # [B, C]
        return x * gate[:, :, None, None]


def norm_seed(c: int) -> nn.Module:
    return zero_bn(c)  # f(x) = gamma * x_hat + beta, both zero at birth


def depthwise_seed(c: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False),
        nn.BatchNorm2d(c),
        nn.ReLU(inplace=True),
        nn.Conv2d(c, c, 1, bias=False),
        zero_bn(c),
    )


def conv_light_seed(c: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), zero_bn(c))


def conv_heavy_seed(c: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(c, c, 3, padding=1, bias=False),
        nn.BatchNorm2d(c),
        nn.ReLU(inplace=True),
        nn.Conv2d(c, c, 3, padding=1, bias=False),
        zero_bn(c),
    )


def zero_linear(c_in: int, c_out: int, bias: bool = True) -> nn.Linear:
    lin = nn.Linear(c_in, c_out, bias=bias)
    nn.init.zeros_(lin.weight)
    if bias:
        nn.init.zeros_(lin.bias)
    return lin


def layer_norm_seed(c: int) -> nn.Module:
    ln = nn.LayerNorm(c)
    nn.init.zeros_(ln.weight)  # f(x) = gamma * LN(x) + beta, both zero at birth
    return ln


def lora_seed(c: int) -> nn.Module:
    """f(x) = up(down(x)) of rank LORA_RANK; `up` starts at zero, so at birth only it gets gradient
    (as in LoRA), and `down` starts learning after the first step."""
    return nn.Sequential(nn.Linear(c, LORA_RANK, bias=False), zero_linear(LORA_RANK, c, bias=False))


def attention_block_seed(c: int) -> nn.Module:
    """One more causal self-attention sublayer: f(x) = attn(LN(x)), its output projection zero."""
    attn = CausalSelfAttention(c, c // HEAD_WIDTH if c % HEAD_WIDTH == 0 else 1)
    attn.proj = zero_linear(c, c)
    return nn.Sequential(nn.LayerNorm(c), attn)


def mlp_block_seed(c: int) -> nn.Module:
    """One more feed-forward sublayer: f(x) = mlp(LN(x)), its output projection zero."""
    mlp = MLP(c)
    mlp.proj = zero_linear(4 * c, c)
    return nn.Sequential(nn.LayerNorm(c), mlp)


# Blueprints per host kind: which designs fit which activations.
BLUEPRINTS: dict[str, dict[int, Callable[[int], nn.Module]]] = {
    "cnn": {
        Blueprint.BLUEPRINT_NORM: norm_seed,
        Blueprint.BLUEPRINT_ATTENTION: SqueezeExcite,
        Blueprint.BLUEPRINT_DEPTHWISE: depthwise_seed,
        Blueprint.BLUEPRINT_CONV_LIGHT: conv_light_seed,
        Blueprint.BLUEPRINT_CONV_HEAVY: conv_heavy_seed,
    },
    "transformer": {
        Blueprint.BLUEPRINT_NORM: layer_norm_seed,
        Blueprint.BLUEPRINT_LORA: lora_seed,
        Blueprint.BLUEPRINT_ATTENTION: attention_block_seed,
        Blueprint.BLUEPRINT_MLP: mlp_block_seed,
    },
}


def blueprints_for(kind: str) -> list[int]:
    return list(BLUEPRINTS[kind])


def build_seed(blueprint: int, channels: int, kind: str = "cnn") -> nn.Module:
    if blueprint not in BLUEPRINTS[kind]:
        raise ValueError(f"blueprint {Blueprint.Name(blueprint)} does not fit a {kind} host")
    return BLUEPRINTS[kind][blueprint](channels)


def seed_param_count(blueprint: int, channels: int, kind: str = "cnn") -> int:
    """Counted from the module itself, never from a table."""
    return sum(p.numel() for p in build_seed(blueprint, channels, kind).parameters())
