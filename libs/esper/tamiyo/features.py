"""Observation -> a fixed-size float vector for the neural policy, and the running normalizer behind it.

The vector has one block of training signals and one block per slot *position of the host* (early, mid,
late for the CNN hosts), whether or not the run enabled that slot: a disabled slot's block is all zeros
(its `enabled` feature is 0 and the action masks never offer it), so one network serves every `--slots`
choice. Every feature is scaled to roughly [-1, 1] by a fixed rule first; `RunningMeanStd` then
standardizes it (PPO's observation normalization, saved and restored with the policy).

"Unknown" is the value a feature takes when the quantity does not exist yet: before the first epoch,
with a history shorter than the lag, or in a slot without a (measured) seed. Every unknown is 0, and
the flags `history_known`, `has_contribution` and the stage one-hot tell the network which zeros are
real.

Training signals (27 features):

| feature | value | scale | unknown |
|---|---|---|---|
| epoch_frac | epoch / max_epochs | [0, 1] | - |
| train_loss | log1p(train loss) | ~[0, 2.5] | 0 (epoch 0) |
| val_loss | log1p(validation loss) | ~[0, 2.5] | 0 (epoch 0) |
| train_accuracy | train accuracy / 100 | [0, 1] | 0 (epoch 0) |
| val_accuracy | validation accuracy / 100 | [0, 1] | 0 (epoch 0) |
| best_val_accuracy | best validation accuracy so far / 100 | [0, 1] | 0 (epoch 0) |
| plateau | min(epochs since a new best, 20) / 20 | [0, 1] | 0 |
| val_acc_delta_k, k = 1..5 | (val accuracy now - k epochs ago) / 10 points | clip [-3, 3] | 0 (history < k+1) |
| val_loss_delta_k, k = 1..5 | validation loss now - k epochs ago | clip [-3, 3] | 0 (history < k+1) |
| history_known | min(epochs of history - 1, 5) / 5: how many deltas are real | [0, 1] | - |
| params_vs_budget | total parameters / param_budget | clip [0, 4] | - |
| growth_vs_host | (total - host parameters) / host parameters | clip [0, 4] | - |
| seeds_germinated | min(seeds germinated this episode, 10) / 10 | [0, 1] | - |
| budget_left | 1 while the seed budget allows a germination | {0, 1} | - |
| recently_culled_<bp>, per blueprint | times among the last 5 culls / 5 | [0, 1] | 0 |

Per slot position (22 features, 23 with telemetry), prefixed `<slot>.`:

| feature | value | scale | unknown |
|---|---|---|---|
| enabled | 1 when the run enabled this slot | {0, 1} | 0 (disabled: whole block 0) |
| stage_<stage>, 7 stages | one-hot of the seed stage, DORMANT .. EMBARGOED | {0, 1} | - |
| alpha | blend weight in force during the last epoch | [0, 1] | 0 |
| epochs_in_stage | min(epochs in the current stage, 20) / 20 | [0, 1] | - |
| blueprint_<bp>, per blueprint | one-hot of the living seed's blueprint | {0, 1} | all 0 (no seed) |
| seed_params | seed parameters / host parameters | clip [0, 4] | 0 (no seed) |
| has_contribution | 1 when the contribution below was measured last epoch | {0, 1} | - |
| contribution | counterfactual contribution / 10 points | clip [-3, 3] | 0 |
| contribution_se | its standard error / 10 points | clip [0, 3] | 0 |
| contribution_z | contribution / max(se, 0.1 points) / 10 | clip [-1, 1] | 0 |
| advance_ready | 1 when the next ADVANCE's gate would pass now | {0, 1} | 0 |
| embargo_left | embargo epochs left / 5 | clip [0, 1] | 0 |
| seed_grad_norm (telemetry only) | log1p(L2 norm of the seed's last gradient); non-finite: 5 | clip [0, 5] | 0 (no seed) |

With B blueprints and P slot positions that is 22 + B + P x (17 + B) features, plus P gradient
features with telemetry. The CNN hosts (B = 5, P = 3): 93 features, 96 with the gradient features
(`--no-telemetry` drops them; the original tool had 50 and 60). `FeatureSpec.names()` is the exact list;
`FeatureSpec.for_host` builds the spec from a host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from esper.kasmina import build_host
from esper.kasmina.blueprints import blueprints_for
from esper.kasmina.lifecycle import LIVE_STAGES, budget_left
from esper.leyline import Blueprint, Observation, SeedStage, SlotState, from_short_name, short_name

FEATURE_LIMIT = 100.0
"""No feature is larger in magnitude: the largest, log1p of a loss, is at most 89 (a float32 loss's)."""
HISTORY_LAGS = 5
"""val_acc_delta_k / val_loss_delta_k for k = 1 .. HISTORY_LAGS."""
RECENT_CULLS = 5
"""Observations list at most this many recently culled blueprints."""
STAGES = [v for v in SeedStage.values() if v != SeedStage.SEED_STAGE_UNSPECIFIED]


def _clip(x: float, low: float, high: float) -> float:
    return low if x < low else high if x > high else x


@dataclass(frozen=True)
class FeatureSpec:
    """What the vector covers: fixed per network, saved with every checkpoint."""

    slots: tuple[str, ...]
    """Every slot position of the host, in host order (enabled or not)."""
    blueprints: tuple[str, ...]
    """Every blueprint the host kind accepts, by short name: the one-hots and the blueprint head."""
    param_budget: int = 500_000
    """The parameter budget `params_vs_budget` is measured against (the reward's --param-budget)."""
    telemetry: bool = True
    """Include the seed gradient features (off: --no-telemetry)."""

    @classmethod
    def for_host(cls, task: str, param_budget: int, telemetry: bool) -> FeatureSpec:
        """Every slot position and every blueprint of the host behind `task`."""
        host = build_host(task)
        return cls(slots=tuple(host.slot_positions()),
                   blueprints=tuple(short_name(Blueprint, b) for b in blueprints_for(host.spec.kind)),
                   param_budget=param_budget, telemetry=telemetry)

    @property
    def blueprint_values(self) -> list[int]:
        return [from_short_name(Blueprint, b) for b in self.blueprints]

    def names(self) -> list[str]:
        """Every feature, in vector order (the module docstring explains each)."""
        names = ["epoch_frac", "train_loss", "val_loss", "train_accuracy", "val_accuracy",
                 "best_val_accuracy", "plateau"]
        names += [f"val_acc_delta_{k}" for k in range(1, HISTORY_LAGS + 1)]
        names += [f"val_loss_delta_{k}" for k in range(1, HISTORY_LAGS + 1)]
        names += ["history_known", "params_vs_budget", "growth_vs_host", "seeds_germinated", "budget_left"]
        names += [f"recently_culled_{b}" for b in self.blueprints]
        for slot in self.slots:
            per_slot = ["enabled", *(f"stage_{short_name(SeedStage, s).lower()}" for s in STAGES), "alpha",
                        "epochs_in_stage", *(f"blueprint_{b}" for b in self.blueprints), "seed_params",
                        "has_contribution", "contribution", "contribution_se", "contribution_z",
                        "advance_ready", "embargo_left"]
            if self.telemetry:
                per_slot.append("seed_grad_norm")
            names += [f"{slot}.{n}" for n in per_slot]
        return names

    @property
    def dim(self) -> int:
        return len(self.names())

    def encode(self, obs: Observation) -> list[float]:
        """The feature vector of one observation, in `names()` order."""
        s = obs.signals
        blueprints = self.blueprint_values
        acc_hist, loss_hist = list(s.val_accuracy_history), list(s.val_loss_history)
        x = [
            s.epoch / max(s.max_epochs, 1),
            math.log1p(s.train_loss),
            math.log1p(s.val_loss),
            s.train_accuracy / 100,
            s.val_accuracy / 100,
            s.best_val_accuracy / 100,
            min(s.plateau_epochs, 20) / 20,
        ]
        x += [_clip((acc_hist[-1] - acc_hist[-1 - k]) / 10, -3, 3) if len(acc_hist) > k else 0.0
              for k in range(1, HISTORY_LAGS + 1)]
        x += [_clip(loss_hist[-1] - loss_hist[-1 - k], -3, 3) if len(loss_hist) > k else 0.0
              for k in range(1, HISTORY_LAGS + 1)]
        host = max(s.host_params, 1)
        x += [
            _clip(len(acc_hist) - 1, 0, HISTORY_LAGS) / HISTORY_LAGS,
            _clip(s.total_params / self.param_budget, 0, 4),
            _clip((s.total_params - s.host_params) / host, 0, 4),
            min(obs.seeds_germinated, 10) / 10,
            float(budget_left(obs.seeds_germinated, obs.max_seeds)),
        ]
        culled = list(obs.recently_culled)[-RECENT_CULLS:]
        x += [culled.count(b) / RECENT_CULLS for b in blueprints]
        by_name = {state.slot: state for state in obs.slots}
        for slot in self.slots:
            state = by_name.get(slot)
            x += self._slot(state, blueprints, host) if state is not None else [0.0] * self._slot_dim()
        return x

    def _slot_dim(self) -> int:
        return 1 + len(STAGES) + 2 + len(self.blueprints) + 7 + int(self.telemetry)

    def _slot(self, state: SlotState, blueprints: list[int], host_params: int) -> list[float]:
        measured = state.has_contribution
        contribution = state.contribution if measured else 0.0
        se = state.contribution_se if measured else 0.0
        holds_seed = state.stage in LIVE_STAGES or state.stage == SeedStage.SEED_STAGE_FOSSILIZED
        x = [1.0, *(float(state.stage == stage) for stage in STAGES), state.alpha,
             min(state.epochs_in_stage, 20) / 20, *(float(holds_seed and state.blueprint == b) for b in blueprints),
             _clip(state.seed_params / host_params, 0, 4), float(measured), _clip(contribution / 10, -3, 3),
             _clip(se / 10, 0, 3), _clip(contribution / max(se, 0.1) / 10, -1, 1) if measured else 0.0,
             float(state.advance_ready), _clip(state.embargo_epochs_left / 5, 0, 1)]
        if self.telemetry:
            norm = state.seed_grad_norm
            x.append(_clip(math.log1p(norm), 0, 5) if math.isfinite(norm) else 5.0)
        return x

    def encode_batch(self, observations: list[Observation]) -> torch.Tensor:
        return torch.tensor([self.encode(obs) for obs in observations], dtype=torch.float32)  # [N, dim]

    def to_dict(self) -> dict:
        return {"slots": list(self.slots), "blueprints": list(self.blueprints),
                "param_budget": self.param_budget, "telemetry": self.telemetry}

    @classmethod
    def from_dict(cls, d: dict) -> FeatureSpec:
        return cls(slots=tuple(d["slots"]), blueprints=tuple(d["blueprints"]),
                   param_budget=int(d["param_budget"]), telemetry=bool(d["telemetry"]))


class RunningMeanStd:
    """Running mean and variance over batches (Chan et al.'s parallel update), as in CleanRL's and
    gym's normalization wrappers. float64, so millions of updates do not drift; `state()` is plain
    tensors, so a checkpoint loads with `torch.load(weights_only=True)`."""

    def __init__(self, shape: tuple[int, ...] = (), epsilon: float = 1e-4):
        self.mean = torch.zeros(shape, dtype=torch.float64)
        self.var = torch.ones(shape, dtype=torch.float64)
        self.count = torch.tensor(epsilon, dtype=torch.float64)  # a tiny prior count avoids 0/0

    def update(self, batch: torch.Tensor) -> None:
        """batch: [B, *shape]."""
        batch = batch.detach().to(torch.float64)
        b_mean, b_var, b_count = batch.mean(0), batch.var(0, unbiased=False), batch.shape[0]
        delta = b_mean - self.mean
        total = self.count + b_count
        self.mean = self.mean + delta * b_count / total
        m2 = self.var * self.count + b_var * b_count + delta.square() * self.count * b_count / total
        self.var = m2 / total
        self.count = total

    def normalize(self, x: torch.Tensor, clip: float, eps: float = 1e-8) -> torch.Tensor:
        """(x - mean) / std, clipped to [-clip, clip]; float32 out."""
        z = (x.to(torch.float64) - self.mean) / torch.sqrt(self.var + eps)
        return z.clamp(-clip, clip).to(torch.float32)

    def state(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean.clone(), "var": self.var.clone(), "count": self.count.clone()}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """ValueError unless `state` has this one's shape: statistics of other observations (policy weights
        from the wire) had loaded and then failed every decision."""
        shapes = {k: tuple(state[k].shape) for k in ("mean", "var", "count")}
        if shapes != {"mean": self.mean.shape, "var": self.mean.shape, "count": ()}:
            raise ValueError(f"statistics of shapes {shapes} for observations of shape {tuple(self.mean.shape)}")
        mean, var, count = (state[k].to(torch.float64).clone() for k in ("mean", "var", "count"))
        if not (mean.isfinite().all() and var.isfinite().all() and (var >= 0).all() and count.isfinite()
                and count >= 0):
            raise ValueError("statistics that are not finite, or a negative variance or count")
        self.mean, self.var, self.count = mean, var, count
