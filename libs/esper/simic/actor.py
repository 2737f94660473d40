"""Acting: n environments stepped in lockstep by any batched decision maker, recorded as a Rollout.

One loop serves both PPO modes. In one process (simic.trainer) the act function runs the learner's own
network; on the stack (tolaria_worker --ppo) it asks tamiyo_server, whose neural policy returns each
decision's log-probability, value and policy version with it (SEED RL's central inference: the actor
only steps environments and never holds the weights). Rewards are recorded raw here (their components
and sum); whoever learns normalizes them (`RewardNormalizer.episodes`), so a worker needs no learner state.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Protocol

import torch

from esper.leyline import Decision, Observation
from esper.nissa import Telemetry
from esper.simic.env import EnvConfig, GrowthEnv, step_together
from esper.simic.env_process import EnvProcess
from esper.simic.rewards import Rewarder
from esper.simic.rollout import Rollout
from esper.tamiyo.features import FeatureSpec
from esper.tamiyo.network import ActionCodec, NeuralPolicy, observation_legal_actions
from esper.tolaria.data import Dataset
from esper.tolaria.grouped import GroupMember

EnvFactory = Callable[[EnvConfig, Dataset, torch.device, Telemetry], GrowthEnv]

Act = Callable[[list[Observation], torch.Tensor], tuple[list[Decision], dict[str, torch.Tensor]]]
"""(observations [N], legal [N, ops, slots, blueprints]) -> (decisions, the row's obs, actions, logprobs,
values and policy_version tensors, each [N, ...])."""


def make_envs(env_cfg: EnvConfig, data: dict[str, Dataset], devices: tuple[str, ...],
              env_telemetry: Callable[[int], Telemetry], episodes: range,
              env_factory: EnvFactory = GrowthEnv, processes: list[EnvProcess] = (),
              grouped: bool = False) -> list[GrowthEnv | EnvProcess]:
    """One environment per episode, on `devices` round robin; data: the dataset per device. With
    `processes` (started on the same devices round robin: env_process.start_env_processes), the first of
    them, each given its episode's telemetry. `grouped`: GrowthEnvs with GroupMember trainers, whose
    epochs the environments on a device train together, up to 8 at a time (play_round steps them with
    simic.step_together)."""
    if processes:
        envs = list(processes[:len(episodes)])
        for env, episode in zip(envs, episodes):
            env.telemetry = env_telemetry(episode)
        return envs
    factory = functools.partial(GrowthEnv, trainer_factory=GroupMember) if grouped else env_factory
    return [factory(env_cfg, data[devices[i % len(devices)]], torch.device(devices[i % len(devices)]),
                    env_telemetry(e)) for i, e in enumerate(episodes)]


def play_round(envs: list[GrowthEnv | EnvProcess], seeds: list[int], rewarders: list[Rewarder], codec: ActionCodec,
               act: Act, max_epochs: int) -> tuple[Rollout, list[Observation]]:
    """One whole episode in each environment (reset with its seed): the rollout [max_epochs, N] with raw
    rewards, and each environment's final observation. The last epoch is a termination (ppo.compute_gae).
    Environments of make_envs(grouped=True) train their epochs together (simic.step_together)."""
    obs = reset_all(envs, seeds)
    grouped = isinstance(getattr(envs[0], "trainer", None), GroupMember)  # built by reset
    for rewarder, o in zip(rewarders, obs):
        rewarder.reset(o)
    n = len(envs)
    steps: list[dict[str, torch.Tensor]] = []
    for t in range(max_epochs):
        legal = torch.stack([codec.legal_tensor(observation_legal_actions(o)) for o in obs])
        decisions, row = act(obs, legal)
        next_obs = [o for o, _ in step_together(envs, decisions)] if grouped else step_all(envs, decisions)
        terminal = t + 1 == max_epochs
        parts = torch.tensor([r.step(o, d.action, o2, terminal)
                              for r, o, d, o2 in zip(rewarders, obs, decisions, next_obs)])  # [N, C]
        device = row["values"].device
        steps.append(row | {
            "legal": legal.to(device), "rewards": parts.sum(1).to(device), "reward_parts": parts.to(device),
            "terminated": torch.full((n,), terminal, device=device),
            "seeds": torch.tensor(seeds, device=device),
        })
        obs = next_obs
    # V(s_t+1) is the next row's value; after the last epoch nothing follows (terminated: unused).
    for step, following in zip(steps, steps[1:]):
        step["next_values"] = following["values"]
    steps[-1]["next_values"] = torch.zeros_like(steps[-1]["values"])
    return Rollout.from_steps(steps), obs


def reset_all(envs: list[GrowthEnv | EnvProcess], seeds: list[int]) -> list[Observation]:
    """Each environment's first observation; those in processes of their own all start before any is awaited."""
    for env, seed in zip(envs, seeds):
        if isinstance(env, EnvProcess):
            env.send_reset(seed)
    return [env.receive()[0] if isinstance(env, EnvProcess) else env.reset(seed) for env, seed in zip(envs, seeds)]


def step_all(envs: list[GrowthEnv | EnvProcess], decisions: list[Decision]) -> list[Observation]:
    """Each environment's epoch under its decision; those in processes of their own all train at once."""
    for env, d in zip(envs, decisions):
        if isinstance(env, EnvProcess):
            env.send_step(d)
    return [env.receive()[0] if isinstance(env, EnvProcess) else env.step(d)[0] for env, d in zip(envs, decisions)]


class NotNeural(ValueError):
    """The policy server serves another policy than the neural one a PPO actor needs."""


class BatchPolicy(Protocol):
    def decide_batch(self, observations: list[Observation]) -> list[Decision]: ...


def remote_act(policy: BatchPolicy, spec: FeatureSpec) -> Act:
    """Act through a policy server. Records the *raw* features: the learner normalizes each row with the
    observation statistics of the policy version that chose it (the ones the server normalized with)."""
    codec = ActionCodec(spec)

    def act(observations: list[Observation], legal: torch.Tensor) -> tuple[list[Decision], dict[str, torch.Tensor]]:
        decisions = policy.decide_batch(observations)
        wrong = {d.policy_name for d in decisions} - {NeuralPolicy.name}
        if wrong:
            raise NotNeural(f"the policy server serves {', '.join(sorted(wrong))}, not the neural policy: "
                            f"PPO workers need tamiyo_server --policy neural")
        return decisions, {
            "obs": spec.encode_batch(observations),
            "actions": torch.tensor([codec.encode(d.action) for d in decisions], dtype=torch.int64),
            "logprobs": torch.tensor([d.log_prob for d in decisions], dtype=torch.float32),
            "values": torch.tensor([d.value for d in decisions], dtype=torch.float32),
            "policy_version": torch.tensor([int(d.policy_version) for d in decisions], dtype=torch.int64),
        }

    return act
