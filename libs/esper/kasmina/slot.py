"""A slot: the place between two host blocks where a seed can live, and how it routes gradients.

Forward by stage (x: the host's activations at this boundary, f: the seed's residual delta):
- DORMANT, GERMINATED, CULLED, EMBARGOED: x. The seed is not run.
- TRAINING: straight_through(x, f(x.detach())). The value is exactly x, whatever f computes (even inf or
  NaN: x + (f - f.detach()) would be NaN there), so the host's outputs are bit-identical to a run
  without the seed; the backward pass hands the host's error signal dL/dx to f as well, and x.detach()
  stops any gradient from f reaching the host.
- BLENDING: x + alpha * f(x.detach()) = lerp(host, host + f, alpha) with the host keeping its full
  identity-path gradient and none through the seed path.
- FOSSILIZED: x + f(x). Ordinary host structure from now on.
`forward_copies` evaluates a batch several times at once, one copy with the alpha forced (the
counterfactual: with or without the seed).
"""

from __future__ import annotations

import torch
from torch import nn

from esper.leyline import Blueprint, SeedStage

S = SeedStage


class SeedSlot(nn.Module):
    def __init__(self, name: str, channels: int, kind: str):
        super().__init__()
        self.name = name
        self.channels = channels
        self.kind = kind
        self.seed: nn.Module | None = None
        self.stage: int = S.SEED_STAGE_DORMANT
        self.blueprint: int = Blueprint.BLUEPRINT_UNSPECIFIED
        self.seed_id = 0
        self.alpha = 0.0
        self.epochs_in_stage = 0
        self.embargo_epochs_left = 0
        # (mean, standard error) in accuracy points, measured after the last epoch; None if not measured.
        self.contribution: tuple[float, float] | None = None
        # Measured with `contribution`: validation loss without the seed minus with it.
        self.loss_contribution = 0.0

    @property
    def runs_seed(self) -> bool:
        """Whether `forward` (in training) runs the seed; otherwise it returns x itself."""
        return self.seed is not None and self.stage in (
            S.SEED_STAGE_TRAINING, S.SEED_STAGE_BLENDING, S.SEED_STAGE_FOSSILIZED)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.runs_seed:
            return x
        if self.stage == S.SEED_STAGE_TRAINING and not torch.is_grad_enabled():
            return x  # evaluation: the value is x anyway, skip the seed's compute
        return through_seed(x, self.seed, self.stage, self.alpha)

    def forward_copies(self, x: torch.Tensor, copies: int, forced_copy: int, forced_alpha: float) -> torch.Tensor:
        """Evaluation of a batch made of `copies` equal-sized copies: each copy as `forward` would give it
        (TRAINING: alpha 0; BLENDING: alpha), except copy `forced_copy`, whose alpha is `forced_alpha`."""
        alphas = [self.alpha if self.stage == S.SEED_STAGE_BLENDING else 0.0] * copies
        alphas[forced_copy] = forced_alpha
        run = [c for c, a in enumerate(alphas) if a != 0.0]  # the seed runs only where it counts
        if not run:
            return x
        parts = list(x.chunk(copies))  # views; no index tensor, so nothing is copied host -> device
        deltas = self.seed(torch.cat([parts[c] for c in run])).chunk(len(run))
        for c, delta in zip(run, deltas):
            parts[c] = parts[c] + alphas[c] * delta
        return torch.cat(parts)

    @property
    def seed_params(self) -> int:
        return 0 if self.seed is None else sum(p.numel() for p in self.seed.parameters())


class StraightThrough(torch.autograd.Function):
    """Value x; gradient dL/dx to x and to delta (times `mask`, where only some channels are TRAINING)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        ctx.mask = mask
        return x.clone()  # a tensor of its own, as x + ... was: later in-place operations must not reach x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, grad if ctx.mask is None else grad * ctx.mask, None


def straight_through(x: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    return StraightThrough.apply(x, delta, mask)


def through_seed(x: torch.Tensor, seed: nn.Module, stage: int, alpha: float | torch.Tensor) -> torch.Tensor:
    """x through a seed in TRAINING, BLENDING or FOSSILIZED, routed as the module docstring says. `alpha`
    (BLENDING) may be a tensor broadcasting over x: the grouped runs of tolaria.grouped blend at one
    alpha per run's channels."""
    if stage == S.SEED_STAGE_FOSSILIZED:
        return x + seed(x)
    delta = seed(x.detach())
    if stage == S.SEED_STAGE_TRAINING:
        return straight_through(x, delta)
    return x + alpha * delta
