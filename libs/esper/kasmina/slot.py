"""A slot: the place between two host blocks where a seed can live, and how it routes gradients.

Forward by stage (x: the host's activations at this boundary, f: the seed's residual delta):
- DORMANT, GERMINATED, CULLED, EMBARGOED: x. The seed is not run.
- TRAINING: x + (f(x.detach()) - f(x.detach()).detach()). The value is exactly x, so the host's
  outputs are bit-identical to a run without the seed; the backward pass hands the host's error
  signal dL/dx to f (straight-through), and x.detach() stops any gradient from f reaching the host.
- BLENDING: x + alpha * f(x.detach()) = lerp(host, host + f, alpha) with the host keeping its full
  identity-path gradient and none through the seed path.
- FOSSILIZED: x + f(x). Ordinary host structure from now on.
`alpha_override` forces BLENDING's formula with a given alpha (counterfactual evaluation).
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
        self.alpha_override: float | None = None
        # (mean, standard error) in accuracy points, measured after the last epoch; None if not measured.
        self.contribution: tuple[float, float] | None = None
        # Measured with `contribution`: validation loss without the seed minus with it.
        self.loss_contribution = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.seed is None or self.stage not in (
            S.SEED_STAGE_TRAINING, S.SEED_STAGE_BLENDING, S.SEED_STAGE_FOSSILIZED
        ):
            return x
        if self.alpha_override is not None:
            return x + self.alpha_override * self.seed(x.detach())
        if self.stage == S.SEED_STAGE_FOSSILIZED:
            return x + self.seed(x)
        if self.stage == S.SEED_STAGE_TRAINING and not torch.is_grad_enabled():
            return x  # evaluation: the value is x anyway, skip the seed's compute
        delta = self.seed(x.detach())
        if self.stage == S.SEED_STAGE_TRAINING:
            return x + (delta - delta.detach())
        return x + self.alpha * delta

    @property
    def seed_params(self) -> int:
        return 0 if self.seed is None else sum(p.numel() for p in self.seed.parameters())
