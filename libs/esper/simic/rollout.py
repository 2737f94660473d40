"""Rollout: the transitions one PPO update learns from, as a flat set of named tensors.

Every field is a tensor whose first two dimensions are [T steps, N environments]; nothing else (no
protobuf, no Python objects). That is what lets a worker ship a rollout to a learner as a
msgpack map of raw buffers (dtype, shape, bytes) behind a leyline header, as DESIGN.md prescribes for
bulk tensors: `tensors()` and `Rollout.from_tensors` are the whole (de)serialization surface
(esper.transport.trajectories; `obs` and `rewards` then travel raw, see simic.learner).

Episodes are never cut (a worker restarts one from its checkpoint instead): each column holds whole
episodes, and `terminated` marks their last epochs. Each row also records the value of the observation
that *followed* the step (`next_values`, 0 after a last epoch), so GAE needs nothing beyond the rollout.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass, fields
from typing import ClassVar

import torch


@dataclass
class Rollout:
    obs: torch.Tensor  # float32 [T, N, obs_dim]: normalized features, as the policy saw them (raw from a worker)
    legal: torch.Tensor  # bool [T, N, ops, slots, blueprints]: the action masks
    actions: torch.Tensor  # int64 [T, N, 3]: (operation, slot, blueprint) head indices
    logprobs: torch.Tensor  # float32 [T, N]: log-probability of the action under the acting policy
    values: torch.Tensor  # float32 [T, N]: V(s_t) under the acting policy
    next_values: torch.Tensor  # float32 [T, N]: V(s_t+1)
    rewards: torch.Tensor  # float32 [T, N]: the reward PPO learns from (raw from a worker: the learner normalizes)
    reward_parts: torch.Tensor  # float32 [T, N, components]: raw reward components (rewards.COMPONENTS)
    terminated: torch.Tensor  # bool [T, N]: the episode ended here (its last epoch)
    policy_version: torch.Tensor  # int64 [T, N]: the update count of the policy that acted
    seeds: torch.Tensor  # int64 [T, N]: the episode's seed (as `esper train --seed`: host init, data order); -1 unknown

    DTYPES: ClassVar[dict[str, torch.dtype]] = {
        "obs": torch.float32, "legal": torch.bool, "actions": torch.int64, "logprobs": torch.float32,
        "values": torch.float32, "next_values": torch.float32, "rewards": torch.float32,
        "reward_parts": torch.float32, "terminated": torch.bool, "policy_version": torch.int64, "seeds": torch.int64}
    """Each field's dtype: what a learner checks a rollout from the wire against."""
    LEGACY: ClassVar[tuple[str, ...]] = ("truncated",)
    """Fields older versions wrote and this one drops. `truncated` was False in every rollout ever made
    (episodes are never cut), so a checkpoint's pending rollout or a trajectory spooled before still loads."""

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> Rollout:
        """The inverse of `tensors()`, also of what older versions wrote (LEGACY fields, dropped while they
        hold nothing; no `seeds`: -1, unknown); ValueError for any other set of names."""
        tensors = dict(tensors)
        if "seeds" not in tensors and "terminated" in tensors:
            tensors["seeds"] = torch.full(tensors["terminated"].shape, -1, dtype=torch.int64,
                                          device=tensors["terminated"].device)
        for name in cls.LEGACY:
            legacy = tensors.pop(name, None)
            if legacy is not None and bool(legacy.any()):
                raise ValueError(f"{name} is set: a rollout cut mid-episode, which this version does not learn from")
        names = {f.name for f in fields(cls)}
        missing, unexpected = names - set(tensors), set(tensors) - names
        if missing or unexpected:
            raise ValueError(f"not the Rollout fields: missing {reprlib.repr(sorted(missing))}, unexpected "
                             f"{reprlib.repr(sorted(unexpected))}")
        return cls(**tensors)

    @classmethod
    def from_steps(cls, steps: list[dict[str, torch.Tensor]]) -> Rollout:
        """Stack per-step rows (each field [N, ...]) into [T, N, ...]."""
        return cls(**{f.name: torch.stack([step[f.name] for step in steps]) for f in fields(cls)})

    @classmethod
    def cat(cls, rollouts: list[Rollout]) -> Rollout:
        """Side by side along the environment dimension: [T, N1] + [T, N2] -> [T, N1 + N2]."""
        return cls(**{f.name: torch.cat([getattr(r, f.name) for r in rollouts], dim=1) for f in fields(cls)})

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def num_steps(self) -> int:
        return self.rewards.numel()
