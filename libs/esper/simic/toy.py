"""A tiny built-in growth task for learning tests of the controller (as Stable-Baselines3 ships
IdentityEnv and friends): the real GrowthEnv step, lifecycle, gates and masks, with training replaced
by a few lines of arithmetic, so an episode costs milliseconds instead of minutes.

`SimulatedTrainer` stands in for tolaria's Trainer (`GrowthEnv(..., trainer_factory=...)`). The host's
validation accuracy follows a saturating curve; each blueprint has a fixed true gain in accuracy points,
which a seed adds in proportion to its alpha while BLENDING and in full once FOSSILIZED. The
counterfactual contribution the environment reports is that gain (times alpha while blending; the
prospective gain while TRAINING) plus Gaussian noise, so the gates behave as on a real run. A controller
that learns "germinate the good blueprint, advance it through its gates, never keep a bad one" gains
the good blueprint's points over the host alone; WAIT gains nothing; a random controller about nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from esper.kasmina import MorphogeneticModel
from esper.leyline import Blueprint, SeedStage, from_short_name
from esper.tolaria.data import Dataset
from esper.tolaria.trainer import EvalResult, TrainConfig

S = SeedStage


@dataclass(frozen=True)
class ToyConfig:
    gains: tuple[tuple[str, float], ...] = (
        ("conv_heavy", 6.0), ("conv_light", 2.0), ("depthwise", -1.0), ("attention", -3.0), ("norm", -4.0))
    """True gain (accuracy points) of each blueprint once fully blended."""
    host_start: float = 40.0
    """Host validation accuracy before training (percent)."""
    host_gain: float = 30.0
    """Points the host gains as training saturates."""
    host_epochs: float = 6.0
    """Time constant of the host's learning curve (epochs)."""
    noise: float = 0.5
    """Standard deviation (points) of the noise on validation accuracy and on contributions."""


class SimulatedTrainer:
    """tolaria.Trainer's interface (train_epoch, evaluate, seed_grad_norms, reset_momentum) over a model
    that is never trained; randomness comes from the environment's per-episode generator."""

    def __init__(self, model: MorphogeneticModel, data: Dataset, cfg: TrainConfig, device: torch.device,
                 generator: torch.Generator, toy: ToyConfig = ToyConfig()):
        self.model = model
        self.generator = generator
        self.toy = toy
        self.gains = {from_short_name(Blueprint, name): gain for name, gain in toy.gains}
        self.epoch = 0

    def _noise(self) -> float:
        return self.toy.noise * float(torch.randn((), generator=self.generator))

    def _host_accuracy(self) -> float:
        toy = self.toy
        return toy.host_start + toy.host_gain * (1 - math.exp(-self.epoch / toy.host_epochs))

    def _effect(self, name: str) -> float:
        slot = self.model.slots[name]
        gain = self.gains.get(slot.blueprint, 0.0)
        if slot.stage == S.SEED_STAGE_FOSSILIZED:
            return gain
        return slot.alpha * gain if slot.stage == S.SEED_STAGE_BLENDING else 0.0

    def _accuracy(self) -> float:
        return self._host_accuracy() + sum(self._effect(name) for name in self.model.slots)

    def train_epoch(self) -> tuple[float, float]:
        self.epoch += 1
        accuracy = self._accuracy() + 5.0  # training accuracy runs a little above validation
        return 2.0 * (1 - accuracy / 100), accuracy

    def evaluate(self, split: str = "val", counterfactual: bool = True) -> EvalResult:
        accuracy = self._accuracy() + (self._noise() if split == "val" else 0.0)
        contributions = {}
        for name, slot in self.model.live_seeds().items():
            if counterfactual and slot.stage in (S.SEED_STAGE_TRAINING, S.SEED_STAGE_BLENDING):
                full = self.gains.get(slot.blueprint, 0.0)
                mean = full if slot.stage == S.SEED_STAGE_TRAINING else self._effect(name)
                contributions[name] = (mean + self._noise(), self.toy.noise)
        return EvalResult(loss=2.0 * (1 - accuracy / 100), accuracy=accuracy, contributions=contributions,
                          loss_contributions={name: mean / 50 for name, (mean, _) in contributions.items()})

    def seed_grad_norms(self) -> dict[str, float]:
        return {name: 1.0 for name in self.model.live_seeds()}

    def reset_momentum(self) -> None:
        """Nothing is trained, so there is no momentum to clear."""
