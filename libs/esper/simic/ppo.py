"""Proximal Policy Optimization for the growth controller, every detail a named field.

Reads top to bottom like CleanRL's ppo.py (Huang et al. 2022, "The 37 Implementation Details of PPO"):
the config, the entropy schedule, GAE, the reward normalizer, then one update. Rollout collection lives
in simic/trainer.py; this module never touches an environment.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from esper.leyline import Operation, short_name
from esper.simic.rollout import Rollout
from esper.tamiyo.features import RunningMeanStd
from esper.tamiyo.network import OPERATIONS, ActorCritic


@dataclass(frozen=True)
class PPOConfig:
    lr: float = 3e-4
    """Adam learning rate (--lr); Adam eps is 1e-5 (CleanRL)."""
    anneal_lr: bool = False
    """Decay the learning rate linearly over the run's --episodes (--anneal-lr, CleanRL's anneal_lr): see
    lr_at. Off by default: every policy measured so far trained at a constant rate."""
    gamma: float = 0.99
    """Discount per epoch (--gamma); also the reward shaping's gamma."""
    gae_lambda: float = 0.95
    """GAE lambda: 1 is the Monte-Carlo return, 0 one-step TD."""
    clip_coef: float = 0.2
    """Clipped surrogate: the probability ratio is kept within [1 - clip_coef, 1 + clip_coef] (--clip-ratio)."""
    clip_vloss: bool = True
    """Clip the value update around the old values with clip_coef as well (CleanRL's default)."""
    norm_adv: bool = True
    """Standardize advantages within each minibatch."""
    ent_coef: float = 0.05
    """Entropy bonus coefficient (--entropy-coef): the schedule's start and end unless given."""
    ent_coef_start: float | None = None
    """Coefficient at episode 0 (--entropy-coef-start); None: ent_coef."""
    ent_coef_end: float | None = None
    """Coefficient once the anneal is over (--entropy-coef-end); None: ent_coef."""
    ent_coef_min: float = 0.0
    """Floor under the annealed coefficient (--entropy-coef-min); 0: none, so an anneal ends where it
    was asked to. The original tool's floor (0.1) exceeded its coefficient (0.05) and silently
    replaced it; here a floor above the start is an error."""
    ent_anneal_episodes: int = 0
    """Episodes over which the coefficient moves linearly from start to end; 0: the whole run."""
    vf_coef: float = 0.5
    """Weight of the value loss in the total loss."""
    max_grad_norm: float = 0.5
    """Global gradient-norm clip before each optimizer step."""
    update_epochs: int = 10
    """Passes over the rollout per update (SB3's default): rollouts of whole growth episodes are
    expensive, so each is used hard, with target_kl to stop before the policy moves too far."""
    num_minibatches: int = 4
    """Minibatches per pass."""
    target_kl: float | None = 0.03
    """Stop the update (every remaining minibatch and epoch) as soon as a minibatch's approximate KL
    from the acting policy exceeds this, before stepping on it; None: never."""
    norm_obs: bool = True
    """Standardize observations by running mean/std (saved and restored with the policy)."""
    clip_obs: float = 10.0
    """Clip standardized observations to [-clip_obs, clip_obs]."""
    norm_reward: bool = True
    """Divide rewards by the running std of the discounted return (not its mean: a shift would change
    the problem)."""
    clip_reward: float = 10.0
    """Clip normalized rewards to [-clip_reward, clip_reward]."""
    hidden_size: int = 64
    """Width of the actor and critic MLPs."""

    def __post_init__(self) -> None:
        if not_finite := [f.name for f in fields(self) if isinstance(v := getattr(self, f.name), float)
                          and not math.isfinite(v)]:
            raise ValueError(f"PPOConfig: {', '.join(not_finite)} must be finite")
        start = self.ent_coef if self.ent_coef_start is None else self.ent_coef_start
        end = self.ent_coef if self.ent_coef_end is None else self.ent_coef_end
        if min(self.ent_coef, start, end, self.ent_coef_min) < 0:
            raise ValueError("entropy coefficients must be >= 0")
        if self.ent_coef_min > start:
            raise ValueError(f"--entropy-coef-min {self.ent_coef_min:g} exceeds the entropy coefficient "
                             f"{start:g} it would floor: it would replace it from the first episode")
        if not (0 < self.gamma <= 1 and 0 <= self.gae_lambda <= 1):
            raise ValueError("--gamma must be in (0, 1] and gae_lambda in [0, 1]")
        if self.lr <= 0 or self.clip_coef <= 0:
            raise ValueError("--lr and --clip-ratio must be > 0")
        if self.update_epochs < 1 or self.num_minibatches < 1 or self.ent_anneal_episodes < 0:
            raise ValueError("update_epochs, num_minibatches >= 1; --entropy-anneal-episodes >= 0")


def ent_coef_at(cfg: PPOConfig, episodes_done: int, total_episodes: int) -> float:
    """Linear anneal from start to end over ent_anneal_episodes (0: total_episodes), floored at ent_coef_min."""
    start = cfg.ent_coef if cfg.ent_coef_start is None else cfg.ent_coef_start
    end = cfg.ent_coef if cfg.ent_coef_end is None else cfg.ent_coef_end
    span = cfg.ent_anneal_episodes or total_episodes
    frac = min(1.0, episodes_done / span) if span > 0 else 1.0
    return max(cfg.ent_coef_min, start + frac * (end - start))


def lr_at(cfg: PPOConfig, episodes_before: int, total_episodes: int) -> float:
    """The learning rate of the update whose rollout was played after `episodes_before` of the run's
    episodes: cfg.lr, or under anneal_lr cfg.lr * (1 - episodes_before / total_episodes), CleanRL's linear
    decay by update, so the first update steps at cfg.lr and the last still learns (simic_learner, whose
    workers decide how many episodes it gets, refuses it)."""
    if not cfg.anneal_lr or total_episodes <= 0:
        return cfg.lr
    return cfg.lr * max(0.0, 1.0 - episodes_before / total_episodes)


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    next_values: torch.Tensor,
    terminated: torch.Tensor,
    gamma: float,
    gae_lambda: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016); all inputs [T, N], returns
    (advantages, returns) [T, N].

        delta_t = r_t + gamma * V(s_t+1) * (1 - terminated_t) - V(s_t)
        A_t     = delta_t + gamma * lambda * (1 - terminated_t) * A_t+1

    An episode's last epoch is a termination, not a truncation (Pardo et al. 2018, "Time Limits in RL"):
    the observation carries epoch / max_epochs and the objective is the network at the end of the budget,
    so there is no value beyond it to bootstrap. Episodes are never cut short (simic.rollout), so no step
    is a truncation.
    """
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        alive = 1.0 - terminated[t].float()
        delta = rewards[t] + gamma * next_values[t] * alive - values[t]
        next_advantage = delta + gamma * gae_lambda * alive * next_advantage
        advantages[t] = next_advantage
    return advantages, advantages + values


class RewardNormalizer:
    """Scales rewards by the running std of each environment's discounted return (gym's NormalizeReward,
    as CleanRL uses it): rewards of any magnitude reach the critic at about unit scale."""

    def __init__(self, gamma: float, clip: float):
        self.gamma = gamma
        self.clip = clip
        self.rms = RunningMeanStd(())
        self.returns = torch.zeros(0, dtype=torch.float64)

    def start_episodes(self, n_envs: int) -> None:
        """New episodes in n_envs environments: their discounted returns start at 0."""
        self.returns = torch.zeros(n_envs, dtype=torch.float64)

    def __call__(self, rewards: torch.Tensor) -> torch.Tensor:
        """rewards: [N] raw -> [N] normalized (float32)."""
        self.returns = self.returns * self.gamma + rewards.to(torch.float64)
        self.rms.update(self.returns)
        return (rewards / torch.sqrt(self.rms.var + 1e-8)).clamp(-self.clip, self.clip).to(torch.float32)

    def episodes(self, rewards: torch.Tensor) -> torch.Tensor:
        """rewards: [T, N] raw, N whole episodes from their first step -> [T, N] normalized, step by step."""
        self.start_episodes(rewards.shape[1])
        return torch.stack([self(step) for step in rewards.cpu()]).to(rewards.device)


@dataclass
class UpdateStats:
    """What one update did; the trainer publishes it (leyline PPOUpdate) and keeps it in summary.json."""

    policy_loss: float
    value_loss: float
    entropy: float
    approx_kl: float
    """Of the last minibatch measured (the one that stopped the update, if it stopped)."""
    clipfrac: float
    explained_variance: float
    """1 - Var(returns - values) / Var(returns) over the rollout: 1 perfect, 0 no better than a constant."""
    grad_norm: float
    """Mean global gradient norm before clipping."""
    epochs_run: int
    early_stop_epoch: int | None
    """The epoch (0-based) in which the KL early stop fired, None if it did not."""
    minibatch_steps: int
    """Optimizer steps taken."""
    nonfinite_skipped: int
    """Minibatches not stepped on because their gradient was not finite. The means above are over the
    minibatches stepped on, so 0 where there were none (as after a KL stop at the first); approx_kl, the last
    measured, may then not be finite."""
    ent_coef: float
    lr: float
    action_counts: dict[str, int]
    """Operations chosen in the rollout."""
    reward_components: dict[str, float] = field(default_factory=dict)
    """Sum of each raw reward component over the rollout (set by the trainer)."""
    steps_per_second: float = 0.0
    """Environment steps per second of the rollout's collection (set by the trainer)."""
    update_seconds: float = 0.0


def explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float:
    var = returns.var(unbiased=False)
    return float("nan") if var == 0 else float(1 - (returns - values).var(unbiased=False) / var)


def ppo_update(
    agent: ActorCritic,
    optimizer: torch.optim.Optimizer,
    rollout: Rollout,
    cfg: PPOConfig,
    ent_coef: float,
    generator: torch.Generator,
) -> UpdateStats:
    """One PPO update on `rollout` (clipped surrogate, clipped value loss, entropy bonus, minibatch
    epochs, gradient clipping, KL early stop); minibatch order comes from `generator`."""
    start = time.perf_counter()
    advantages, returns = compute_gae(rollout.rewards, rollout.values, rollout.next_values,
                                      rollout.terminated, cfg.gamma, cfg.gae_lambda)
    # Flatten [T, N, ...] -> [T * N, ...].
    b_obs = rollout.obs.flatten(0, 1)
    b_legal = rollout.legal.flatten(0, 1)
    b_actions = rollout.actions.flatten(0, 1)
    b_logprobs = rollout.logprobs.flatten()
    b_values = rollout.values.flatten()
    b_advantages = advantages.flatten()
    b_returns = returns.flatten()
    batch_size = b_logprobs.numel()
    minibatch_size = math.ceil(batch_size / cfg.num_minibatches)

    sums = dict.fromkeys(("policy_loss", "value_loss", "entropy", "clipfrac", "grad_norm"), 0.0)
    steps, skipped, approx_kl, epochs_run, early_stop_epoch = 0, 0, 0.0, 0, None
    for epoch in range(cfg.update_epochs):
        epochs_run = epoch + 1
        order = torch.randperm(batch_size, generator=generator)
        for begin in range(0, batch_size, minibatch_size):
            idx = order[begin:begin + minibatch_size]
            _, newlogprob, entropy, newvalue, _ = agent.get_action_and_value(b_obs[idx], b_legal[idx], b_actions[idx])
            logratio = newlogprob - b_logprobs[idx]
            ratio = logratio.exp()
            with torch.no_grad():
                # k3 estimator of KL(old || new) (Schulman, "Approximating KL Divergence").
                approx_kl = float(((ratio - 1) - logratio).mean())
                clipfrac = float(((ratio - 1.0).abs() > cfg.clip_coef).float().mean())
            if cfg.target_kl is not None and approx_kl > cfg.target_kl:
                early_stop_epoch = epoch  # this minibatch is not stepped on, and nothing after it
                break

            mb_advantages = b_advantages[idx]
            if cfg.norm_adv and mb_advantages.numel() > 1:
                mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)

            # Clipped surrogate objective (as a loss: the max of the negatives).
            pg_loss1 = -mb_advantages * ratio
            pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - cfg.clip_coef, 1 + cfg.clip_coef)
            pg_loss = torch.max(pg_loss1, pg_loss2).mean()

            # Value loss, optionally clipped around the acting policy's values.
            if cfg.clip_vloss:
                v_unclipped = (newvalue - b_returns[idx]).square()
                v_clipped = b_values[idx] + torch.clamp(newvalue - b_values[idx], -cfg.clip_coef, cfg.clip_coef)
                v_loss = 0.5 * torch.max(v_unclipped, (v_clipped - b_returns[idx]).square()).mean()
            else:
                v_loss = 0.5 * (newvalue - b_returns[idx]).square().mean()

            entropy_loss = entropy.mean()
            loss = pg_loss - ent_coef * entropy_loss + cfg.vf_coef * v_loss

            optimizer.zero_grad()
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(agent.parameters(), cfg.max_grad_norm).item()
            if not math.isfinite(grad_norm):
                # One step on it makes every weight NaN (the clip scales by max_norm / NaN), in the checkpoint
                # and in the policy served, for good; skipped as AMP's GradScaler skips one, and counted.
                skipped += 1
                continue
            optimizer.step()

            steps += 1
            for key, value in (("policy_loss", pg_loss), ("value_loss", v_loss), ("entropy", entropy_loss)):
                sums[key] += value.item()
            sums["grad_norm"] += grad_norm
            sums["clipfrac"] += clipfrac
        if early_stop_epoch is not None:
            break

    ops = rollout.actions[..., 0].flatten()
    counts = torch.bincount(ops, minlength=len(OPERATIONS)).tolist()
    means = {key: value / max(steps, 1) for key, value in sums.items()}
    return UpdateStats(
        **means, approx_kl=approx_kl, explained_variance=explained_variance(b_values, b_returns),
        epochs_run=epochs_run, early_stop_epoch=early_stop_epoch, minibatch_steps=steps, nonfinite_skipped=skipped,
        ent_coef=ent_coef,
        lr=optimizer.param_groups[0]["lr"],
        action_counts={short_name(Operation, op): n for op, n in zip(OPERATIONS, counts)},
        update_seconds=time.perf_counter() - start,
    )
