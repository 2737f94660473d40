"""Rewards for the growth controller: what PPO maximizes, in three modes.

The objective of an episode is the network it leaves behind: validation accuracy at the last epoch
minus a price on parameters,

    terminal = sparse_scale * (val_accuracy / 100 - param_penalty * total_params / param_budget)

(validation, never test: the test set informs no decision). The modes differ in what arrives before it:

- `sparse`: nothing. The terminal reward alone.
- `minimal`: sparse, plus `-young_cull_penalty` for every CULL the policy chooses on a seed germinated
  fewer than `young_cull_epochs` epochs before: germinating and throwing away is not free exploration.
- `shaped` (default): sparse, plus potential-based shaping (Ng, Harada & Russell 1999)
  F = gamma * Phi(s') - Phi(s) with

      Phi(s) = contribution_scale * sum over slots of credit(slot) / 100

  where a BLENDING seed's credit is its measured counterfactual contribution (accuracy points with it
  minus without it), a FOSSILIZED seed keeps the last contribution it had while blending, and anything
  else has credit 0. The signal is dense: each epoch a blending seed's contribution rises the policy is
  paid the rise, each fall it is charged. Removal is charged too: a cull takes the seed's credit to 0,
  so F pays back everything the seed earned (and rewards removing a seed whose contribution was
  negative). Phi is 0 at the end of the episode, so the shaping sums to -Phi(s_0) = 0 over any episode
  and changes no policy's ranking (the theorem's condition); it only hands the credit out earlier.
  A germinate -> cull cycle starts and ends with the slot empty (credit 0), so its shaping telescopes
  to exactly 0: no cycle earns a positive return (tests/unit/test_rewards.py, a hypothesis property).

`gamma` in F must be the discount PPO uses, or the telescoping (and the property) breaks: the trainer
passes PPOConfig.gamma.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from esper.leyline import Action, Observation, Operation, SeedStage

S = SeedStage
MODES = ("shaped", "sparse", "minimal")
COMPONENTS = ("terminal_accuracy", "terminal_param_penalty", "contribution_shaping", "young_cull")
"""Reward components, in the order the rollout stores them; their sum is the reward."""


@dataclass(frozen=True)
class RewardConfig:
    mode: str = "shaped"
    """shaped | sparse | minimal (see the module docstring)."""
    param_budget: int = 500_000
    """Parameters at which the terminal parameter penalty reaches `param_penalty`."""
    param_penalty: float = 0.1
    """Terminal penalty per `param_budget` parameters of the final network."""
    sparse_scale: float = 1.0
    """Scale of the terminal reward (accuracy fraction minus parameter penalty)."""
    contribution_scale: float = 1.0
    """shaped: weight of the contribution potential (1.0: a point of contribution is worth a point of
    final accuracy)."""
    young_cull_epochs: int = 5
    """minimal: a seed culled fewer than this many epochs after germination is young."""
    young_cull_penalty: float = 0.05
    """minimal: charged for each young cull the policy chooses (5 accuracy points at sparse_scale 1)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.param_penalty) and math.isfinite(self.sparse_scale)):
            raise ValueError("--param-penalty and --sparse-scale must be finite")
        if self.mode not in MODES:
            raise ValueError(f"reward mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.param_budget < 1:
            raise ValueError(f"--param-budget must be >= 1, got {self.param_budget}")
        if self.param_penalty < 0 or self.sparse_scale <= 0:
            raise ValueError("--param-penalty must be >= 0 and --sparse-scale > 0")


PARAMS_CEILING = 1e9
"""More parameters than any network Esper grows: the largest parameter penalty reward_limit allows for."""


def reward_limit(cfg: RewardConfig) -> float:
    """The largest reward (and reward component) a learner takes from a worker under `cfg`: a million times what
    a step could earn or be charged at these scales, so that only a corrupt or hostile value is refused (a
    finite 3e38 had ruined the reward normalizer for good), never what a large --sparse-scale makes."""
    terminal = cfg.sparse_scale * (1 + cfg.param_penalty * PARAMS_CEILING / cfg.param_budget)
    return 1e6 * max(1.0, terminal, cfg.contribution_scale, cfg.young_cull_penalty)


def recorded_with(cfg: RewardConfig, gamma: float) -> dict:
    """The settings a Rewarder's raw rewards depend on, as plain JSON values: what a worker's trajectory says it
    recorded its rewards with, and what a learner must share to learn from them (the discount too: the
    shaping term telescopes only under PPO's own)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg) | {"gamma": gamma}))


class Rewarder:
    """The reward of one environment's steps. Keeps what the observations alone do not say: the credit
    each fossilized seed carried in, and the epoch each living seed was germinated."""

    def __init__(self, cfg: RewardConfig, gamma: float):
        self.cfg = cfg
        self.gamma = gamma

    def reset(self, obs: Observation) -> None:
        self.fossil_credit: dict[str, float] = {}
        self.germinated_at: dict[str, int] = {}
        self.potential = self._potential(obs)

    def step(self, before: Observation, action: Action, after: Observation, terminal: bool) -> list[float]:
        """Reward components (in COMPONENTS order) of taking `action` in `before` and landing in `after`."""
        cfg = self.cfg
        parts = dict.fromkeys(COMPONENTS, 0.0)
        if terminal:
            parts["terminal_accuracy"] = cfg.sparse_scale * after.signals.val_accuracy / 100
            parts["terminal_param_penalty"] = (
                -cfg.sparse_scale * cfg.param_penalty * after.signals.total_params / cfg.param_budget)
        if action.operation == Operation.OPERATION_GERMINATE:
            self.germinated_at[action.slot] = before.signals.epoch
        if action.operation == Operation.OPERATION_CULL and cfg.mode == "minimal":
            age = before.signals.epoch - self.germinated_at.get(action.slot, before.signals.epoch)
            if age < cfg.young_cull_epochs:
                parts["young_cull"] = -cfg.young_cull_penalty
        self._carry_fossil_credit(before, after)
        potential = 0.0 if terminal else self._potential(after)
        if cfg.mode == "shaped":
            parts["contribution_shaping"] = self.gamma * potential - self.potential
        self.potential = potential
        return [parts[c] for c in COMPONENTS]

    def _carry_fossil_credit(self, before: Observation, after: Observation) -> None:
        """A seed that fossilized keeps the contribution it last showed while blending."""
        previous = {state.slot: state for state in before.slots}
        for state in after.slots:
            old = previous.get(state.slot)
            if (state.stage == S.SEED_STAGE_FOSSILIZED and old is not None
                    and old.stage == S.SEED_STAGE_BLENDING and old.has_contribution):
                self.fossil_credit[state.slot] = old.contribution

    def _potential(self, obs: Observation) -> float:
        credit = 0.0
        for state in obs.slots:
            if state.stage == S.SEED_STAGE_BLENDING and state.has_contribution:
                credit += state.contribution
            elif state.stage == S.SEED_STAGE_FOSSILIZED:
                credit += self.fossil_credit.get(state.slot, 0.0)
        return self.cfg.contribution_scale * credit / 100
