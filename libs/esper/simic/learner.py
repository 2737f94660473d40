"""PPO from trajectories that other processes collected: the learner half of distributed PPO.

`Learner` holds a PPOTrainer (the same policy, optimizer, normalizers and `update()` as `esper train
ppo`) but never runs an environment: workers play episodes against the policy tamiyo_server serves
and ship them as Rollouts of *raw* features and rewards (simic.actor). Here each row is normalized
with the observation statistics of the policy version that chose it (the statistics that version was
published with, so the stored log-probabilities are the acting policy's), rewards with the learner's
running return statistics, and after `n_envs x update_every` episodes PPO updates and the version goes
up. Trajectories from a version more than `max_policy_lag` updates old are refused: PPO's ratio
clipping assumes data from (nearly) the current policy.

`state_dict()` is the trainer's checkpoint (policy, Adam, normalizers, RNG states, counters, and the
rollout received but not yet learned from) plus the observation statistics of each live version: a
learner restarted from it continues as if never stopped.
"""

from __future__ import annotations

import dataclasses
import reprlib
import time
from dataclasses import fields

import torch

from esper.nissa import Telemetry
from esper.simic.ppo import UpdateStats
from esper.simic.rewards import COMPONENTS, reward_limit
from esper.simic.rollout import Rollout
from esper.simic.trainer import PPOTrainer, TrainerConfig
from esper.tamiyo.features import FEATURE_LIMIT, RunningMeanStd


class Learner:
    def __init__(self, cfg: TrainerConfig, telemetry: Telemetry, max_policy_lag: int = 4):
        self.trainer = PPOTrainer(cfg, data={}, telemetry=telemetry, env_telemetry=lambda episode: telemetry)
        self.max_policy_lag = max_policy_lag
        self.obs_stats = {0: self.trainer.obs_rms.state()}
        """Observation statistics each live policy version was published with."""
        self.since = time.perf_counter()

    @property
    def version(self) -> int:
        return self.trainer.updates

    @property
    def pending_episodes(self) -> int:
        """Episodes received since the last update (the trainer's pending rollout, one column each)."""
        pending = self.trainer.pending
        return 0 if pending is None else pending.rewards.shape[1]

    @property
    def episodes_per_update(self) -> int:
        return self.trainer.cfg.n_envs * self.trainer.cfg.update_every

    def problem(self, rollout: Rollout) -> str | None:
        """Why `rollout` cannot be learned from, or None. Whatever passes here is committed and learned from,
        so anything that would make `update()` fail is refused here: a worker's bug or a hostile sender
        must not stop the learner."""
        trainer = self.trainer
        steps, envs = rollout.rewards.shape
        expected = {"obs": (trainer.spec.dim,), "legal": trainer.codec.shape, "actions": (3,),
                    "reward_parts": (len(COMPONENTS),)}
        for f in fields(Rollout):
            tensor = getattr(rollout, f.name)
            shape = (steps, envs, *expected.get(f.name, ()))
            if tuple(tensor.shape) != shape or tensor.dtype != Rollout.DTYPES[f.name]:
                return f"{f.name} is {tensor.dtype} {tuple(tensor.shape)}"
            # One NaN would reach the committed observation normalizer and pending rollout, and every
            # later update would fail on it, across restarts.
            if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
                return f"{f.name} is not finite"
        # Nor one finite value past any real one: a 3e38 had taken the normalizers' variances to 1e76, after
        # which every real observation normalized alike and every real reward to 0, for good (checkpointed).
        most = reward_limit(trainer.cfg.reward)
        for name, limit in (("obs", FEATURE_LIMIT), ("rewards", most), ("reward_parts", most)):
            if bool((getattr(rollout, name).abs() > limit).any()):
                return f"{name} past {limit:g} in magnitude"
        if steps != trainer.env_cfg.max_epochs or envs == 0 or not bool(rollout.terminated[-1].all()):
            return f"not whole {trainer.env_cfg.max_epochs}-epoch episodes ({steps} steps of {envs} episodes)"
        ops, slots, blueprints = trainer.codec.shape
        if not bool(((rollout.actions >= 0) & (rollout.actions < torch.tensor([ops, slots, blueprints]))).all()):
            return f"actions outside the heads' ranges {trainer.codec.shape}"
        # PPO takes the log-probability of each taken action under its mask; one the mask forbids was not
        # chosen by the policy (and a mask that allows nothing fails here too).
        op, slot, blueprint = rollout.actions.unbind(-1)  # [T, N] each
        taken = (op * slots + slot) * blueprints + blueprint  # [T, N]: index into the flattened mask
        if not bool(rollout.legal.flatten(2).gather(2, taken[..., None]).all()):
            return "actions that their legal masks forbid"
        if bool((rollout.seeds < -1).any()) or bool((rollout.seeds != rollout.seeds[0]).any()):
            return "seeds that are not one per episode (-1: a worker too old to send them)"
        versions = set(rollout.policy_version.unique().tolist())
        unknown = versions - set(self.obs_stats)
        if unknown:
            return (f"policy versions {reprlib.repr(sorted(unknown))} are unknown or more than {self.max_policy_lag} "
                    "updates old")
        return None

    def add(self, rollout: Rollout) -> str | None:
        """Learn from `rollout` at the next update; returns why it was refused instead, or None."""
        problem = self.problem(rollout)
        if problem:
            return problem
        trainer, ppo = self.trainer, self.trainer.cfg.ppo
        raw = rollout.obs  # [T, N, dim]
        obs = torch.empty_like(raw)
        for version in rollout.policy_version.unique().tolist():
            acted = rollout.policy_version == version  # [T, N]
            stats = RunningMeanStd(raw.shape[2:])
            stats.load(self.obs_stats[version])
            obs[acted] = stats.normalize(raw[acted], ppo.clip_obs)
        if ppo.norm_obs:
            trainer.obs_rms.update(raw.flatten(0, 1))
        rewards = trainer.reward_norm.episodes(rollout.rewards) if ppo.norm_reward else rollout.rewards
        rollout = dataclasses.replace(rollout, obs=obs, rewards=rewards)
        rollout = Rollout(**{k: v.to(trainer.device) for k, v in rollout.tensors().items()})
        trainer.pending = rollout if trainer.pending is None else Rollout.cat([trainer.pending, rollout])
        trainer.global_step += rollout.num_steps
        trainer.episodes_done += rollout.rewards.shape[1]
        return None

    def ready(self) -> bool:
        return self.pending_episodes >= self.episodes_per_update

    def update(self) -> UpdateStats:
        """PPO on everything pending; the new version's observation statistics are kept for its rows."""
        self.trainer.collect_seconds = time.perf_counter() - self.since  # steps/s of the whole stack
        stats = self.trainer.update()
        self.since = time.perf_counter()
        self.obs_stats[self.version] = self.trainer.obs_rms.state()
        for version in [v for v in self.obs_stats if v < self.version - self.max_policy_lag]:
            del self.obs_stats[version]
        return stats

    def policy_state(self) -> dict:
        """The policy part of a checkpoint (simic.checkpoint.policy_from_state builds the NeuralPolicy)."""
        state = self.trainer.state_dict()
        return {key: state[key] for key in ("feature_spec", "hidden_size", "clip_obs", "network")} | {
            "obs_rms": self.obs_stats[self.version]}

    def state_dict(self) -> dict:
        """A checkpoint of plain tensors and values (simic.checkpoint), `esper train ppo`'s plus obs_stats."""
        return self.trainer.state_dict() | {"obs_stats": [[v, s] for v, s in self.obs_stats.items()]}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a learner's checkpoint, or from an `esper train ppo` one (its current version only);
        ResumeError if it was trained with other settings."""
        self.trainer.load_state_dict(state)
        self.obs_stats = dict(state.get("obs_stats", [[self.version, self.trainer.obs_rms.state()]]))
