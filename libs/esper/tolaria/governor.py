"""The safety governor: a non-finite or diverging epoch loss rolls the run back to its last good state.

A snapshot (weights and buffers) is kept in memory after every good epoch. On rollback the caller
culls the live seeds (the usual suspects), the snapshot is restored for every tensor the model still
has, and the host optimizer's momentum is cleared; the run then goes on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class GovernorConfig:
    divergence_factor: float = 5.0
    """An epoch whose mean training loss exceeds this multiple of the lowest so far is a divergence."""


class Governor:
    def __init__(self, cfg: GovernorConfig = GovernorConfig()):
        self.cfg = cfg
        self.lowest_loss = math.inf
        self.snapshot_state: dict[str, torch.Tensor] = {}
        self.snapshot_epoch = 0

    def verdict(self, train_loss: float) -> str | None:
        """None when the epoch is healthy, else the cause of a rollback."""
        if not math.isfinite(train_loss):
            return "non-finite loss"
        if train_loss > self.cfg.divergence_factor * self.lowest_loss:
            return "divergence"
        self.lowest_loss = min(self.lowest_loss, train_loss)
        return None

    def snapshot(self, model: nn.Module, epoch: int) -> None:
        self.snapshot_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.snapshot_epoch = epoch

    def restore(self, model: nn.Module) -> int:
        """Load the snapshot into every tensor the model still has; returns the snapshot's epoch."""
        own = model.state_dict()
        model.load_state_dict({k: v for k, v in self.snapshot_state.items() if k in own}, strict=False)
        return self.snapshot_epoch

    def state_dict(self) -> dict:
        """The last good state and the lowest loss: a resumed run rolls back exactly as this one would."""
        return {"lowest_loss": self.lowest_loss, "snapshot": self.snapshot_state, "snapshot_epoch": self.snapshot_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.lowest_loss = state["lowest_loss"]
        self.snapshot_state = dict(state["snapshot"])
        self.snapshot_epoch = state["snapshot_epoch"]
