"""A trajectory the learner accepts is committed and learned from, so Learner.problem must refuse every
one that would make an update fail: before it checked shapes and dtypes only, and one NaN observation
(or an action outside a head, or one its mask forbids) crashed every later update, across restarts."""

from __future__ import annotations

import pytest
import torch

from esper.nissa import Telemetry
from esper.simic.env import EnvConfig
from esper.simic.learner import Learner
from esper.simic.rewards import COMPONENTS, RewardConfig
from esper.simic.rollout import Rollout
from esper.simic.trainer import TrainerConfig

TOY = EnvConfig(task="synthetic", max_epochs=4, slots=("mid",))


def rollout(learner: Learner, t: int = TOY.max_epochs, n: int = 1) -> Rollout:
    """`n` episodes (one whole one by default) that WAIT throughout, every action legal."""
    trainer = learner.trainer
    return Rollout(obs=torch.zeros(t, n, trainer.spec.dim),
                   legal=torch.ones(t, n, *trainer.codec.shape, dtype=torch.bool),
                   actions=torch.zeros(t, n, 3, dtype=torch.int64), logprobs=torch.zeros(t, n),
                   values=torch.zeros(t, n), next_values=torch.zeros(t, n), rewards=torch.zeros(t, n),
                   reward_parts=torch.zeros(t, n, len(COMPONENTS)),
                   terminated=torch.ones(t, n, dtype=torch.bool),
                   policy_version=torch.zeros(t, n, dtype=torch.int64), seeds=torch.zeros(t, n, dtype=torch.int64))


def nan_obs(r: Rollout) -> None:
    r.obs[1, 0, 3] = float("nan")


def inf_value(r: Rollout) -> None:
    r.values[0, 0] = float("inf")


def huge_action(r: Rollout) -> None:
    r.actions[2, 0, 0] = 10**6


def negative_action(r: Rollout) -> None:
    r.actions[2, 0, 1] = -1


def illegal_action(r: Rollout) -> None:
    r.legal[0, 0, 1:] = False  # only WAIT is legal at the first step ...
    r.actions[0, 0, 0] = 1  # ... and it GERMINATEs


def nothing_legal(r: Rollout) -> None:
    r.legal[3] = False


def negative_seed(r: Rollout) -> None:
    r.seeds[:] = -5  # -1 is "unknown" (an older worker); nothing else below 0 is a seed


def seed_changing_mid_episode(r: Rollout) -> None:
    r.seeds[2:] = 7  # only row 0 would be recorded as learned from


def float64_obs(r: Rollout) -> None:
    r.obs = r.obs.double()  # the right shape: had crashed the learner's index_put (a RuntimeError) in add()


def huge_obs(r: Rollout) -> None:
    r.obs[:] = 3e38  # finite: it had taken the observation normalizer's variance to 1e76 for good


def huge_reward(r: Rollout) -> None:
    r.rewards[1, 0] = -3e38  # the reward normalizer's: every real reward had normalized to 0 after it


def huge_reward_part(r: Rollout) -> None:
    r.reward_parts[1, 0, 0] = 3e38  # it reaches the update's reward components and the episode's return


def not_terminated_at_the_end(r: Rollout) -> None:
    r.terminated[-1] = False  # the episode goes on past the trajectory: no return to learn from


BAD = {"float64 obs": (float64_obs, "obs is torch.float64 (4, 1,"),
       "last step not terminated": (not_terminated_at_the_end, "not whole 4-epoch episodes (4 steps of 1 episodes)"),
       "NaN obs": (nan_obs, "obs is not finite"), "inf value": (inf_value, "values is not finite"),
       "obs 3e38": (huge_obs, "obs past 100 in magnitude"), "reward -3e38": (huge_reward, "rewards past 2.01e+08"),
       "reward part 3e38": (huge_reward_part, "reward_parts past 2.01e+08"),
       "action 10**6": (huge_action, "outside the heads' ranges"), "action -1": (negative_action, "outside"),
       "illegal action": (illegal_action, "legal masks forbid"), "empty mask": (nothing_legal, "legal masks forbid"),
       "seed -5": (negative_seed, "seeds that are not one per episode"),
       "seed changing": (seed_changing_mid_episode, "seeds that are not one per episode")}


@pytest.mark.parametrize("case", list(BAD))
def test_a_refused_trajectory_leaves_the_learner_able_to_update(case):
    spoil, reason = BAD[case]
    learner = Learner(TrainerConfig(env=TOY, n_envs=1, update_every=1, episodes=10, seed=0), Telemetry("l"))
    bad = rollout(learner)
    spoil(bad)
    refused = learner.add(bad)
    assert refused is not None and reason in refused and len(refused) < 100, refused
    assert learner.pending_episodes == 0 and learner.trainer.global_step == 0

    assert learner.add(rollout(learner)) is None and learner.ready()
    stats = learner.update()
    assert learner.version == 1 and torch.isfinite(torch.tensor(stats.policy_loss))
    assert all(bool(p.isfinite().all()) for p in learner.trainer.agent.parameters())
    assert all(bool(v.isfinite().all()) for v in learner.trainer.obs_rms.state().values())


def test_the_rewards_a_large_sparse_scale_makes_are_learned_from():
    """The reward limit scales with the rewards' own settings: a fixed 1e6 had refused every trajectory of a
    stack run with --sparse-scale 5e6, which `esper train ppo` trains with."""
    cfg = TrainerConfig(env=TOY, n_envs=1, update_every=1, episodes=10, seed=0,
                        reward=RewardConfig(mode="sparse", sparse_scale=5e6))
    learner = Learner(cfg, Telemetry("l"))
    big = rollout(learner)
    big.rewards[-1] = 2.7e6  # a terminal reward of 54% accuracy at that scale
    assert learner.add(big) is None


@pytest.mark.parametrize("steps, episodes", [(0, 1), (TOY.max_epochs, 0), (0, 0), (2, 1)])
def test_a_trajectory_of_no_steps_or_no_episodes_is_refused(steps, episodes):
    """An empty one had raised IndexError, which no peer's message may do: the learner had exited."""
    learner = Learner(TrainerConfig(env=TOY, n_envs=1, update_every=1, episodes=10, seed=0), Telemetry("l"))
    refused = learner.add(rollout(learner, steps, episodes))
    assert refused == f"not whole 4-epoch episodes ({steps} steps of {episodes} episodes)"
    assert learner.pending_episodes == 0 and learner.trainer.global_step == 0
