"""Building blocks of a small pre-norm decoder-only transformer (nanoGPT's shape), and sampling.

The activations between blocks are the residual stream [B, T, C]: a slot after block i sees exactly
what block i+1 reads, and a seed's delta joins the stream as every block's output does. The blocks are
pre-norm (x + f(LayerNorm(x))), so the stream itself is never normalized in place and an identity
seed leaves it untouched. There is no dropout: runs are short, and train-mode outputs then equal
eval-mode ones, which isolation and export rely on (LayerNorm has no running statistics either).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t attends to positions <= t."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)  # [B, T, C] each
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))  # [B, H, T, C/H]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, C/H]
        return self.proj(y.transpose(1, 2).reshape(b, t, c))  # [B, T, C]


class MLP(nn.Module):
    """Position-wise feed-forward: C -> 4C -> GELU -> C."""

    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, 4 * width)
        self.proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))  # [B, T, C]


class Block(nn.Module):
    """x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_attn = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln_mlp = nn.LayerNorm(width)
        self.mlp = MLP(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x))  # [B, T, C]
        return x + self.mlp(self.ln_mlp(x))


class Embedding(nn.Module):
    """Token plus learned position embedding: [B, T] int64 ids -> [B, T, C]."""

    def __init__(self, vocab: int, width: int, context: int):
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"sequence of {t} tokens is longer than the context ({self.context})")
        return self.tok(idx) + self.pos(torch.arange(t, device=idx.device))  # [B, T, C]


class LMHead(nn.Module):
    """Final LayerNorm and the projection to next-token logits, its weight tied to the token
    embedding (as GPT-2 and nanoGPT do: a fifth fewer parameters in a model this small)."""

    def __init__(self, tok: nn.Embedding):
        super().__init__()
        vocab, width = tok.weight.shape
        self.ln = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab, bias=False)
        self.out.weight = tok.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(x))  # [B, T, vocab]


def init_gpt_weights(module: nn.Module, n_layers: int) -> None:
    """GPT-2's init: N(0, 0.02) weights, zero biases, and residual projections scaled by
    1/sqrt(2 n_layers) so the stream's variance does not grow with depth."""
    for name, m in module.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(".proj") else 0.02
            nn.init.normal_(m.weight, mean=0.0, std=std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: torch.Tensor,
    max_new_tokens: int,
    context: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    vocab: int | None = None,
) -> torch.Tensor:
    """Sample `max_new_tokens` tokens after `prompt` [B, T0] int64; returns [B, T0 + max_new_tokens].

    `model` is anything that maps [B, T] ids to [B, T, vocab] logits (a MorphogeneticModel or
    an export), in eval mode; it sees at most the last `context` tokens. top_k keeps the k likeliest
    tokens before sampling (nanoGPT's sample.py). Ids from `vocab` up are never sampled: a tokenizer
    trained on little text has fewer ids than the model's head, and the rest decode to nothing.
    """
    idx = prompt
    for _ in range(max_new_tokens):
        logits = model(idx[:, -context:])[:, -1, :] / temperature  # [B, vocab]
        if vocab is not None:
            logits[:, vocab:] = float("-inf")
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # [B, 1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)  # [B, 1]
        idx = torch.cat([idx, nxt], dim=1)
    return idx
