"""The neural policy: an actor-critic MLP with factored, masked action heads, and `NeuralPolicy`.

An action is three choices, one head each: the operation (WAIT, GERMINATE, ADVANCE, CULL), the slot,
the blueprint. The slot head has one row of logits per operation and the blueprint head one row per
slot, so "advance mid" and "cull early" can both be likely at once (a single shared slot row could
not say that) without an autoregressive network: the rows are read off one trunk.

Masks come from the transition table, never from a second copy of the rules: `legal_tensor` turns the
list of legal actions, computed by `kasmina.lifecycle.legal_actions` (the very function execution
checks against) from the observation, into a boolean [operation, slot, blueprint] table. The heads'
masks are its reductions: an operation is allowed when some (slot, blueprint) is; a slot given the
operation when some blueprint is; a blueprint given both. So every sampled action is legal by
construction, and tests/unit/test_masks.py checks it against `check_legal` on real environments.

The log-probability of an action is log p(op) + [op takes a slot] log p(slot | op) + [op is GERMINATE]
log p(blueprint | slot); the entropy is H(op) plus the conditional entropies of the heads the sampled
operation uses (a one-sample estimate of the joint entropy, as in factored-action PPO for games).
"""

from __future__ import annotations

import reprlib

import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical

from esper.kasmina.lifecycle import budget_left, legal_actions
from esper.leyline import Action, Blueprint, Decision, Observation, Operation, short_name
from esper.tamiyo.features import FeatureSpec, RunningMeanStd

OP = Operation
OPERATIONS = [OP.OPERATION_WAIT, OP.OPERATION_GERMINATE, OP.OPERATION_ADVANCE, OP.OPERATION_CULL]
"""Operation head index -> Operation."""
TAKES_SLOT = frozenset({OP.OPERATION_GERMINATE, OP.OPERATION_ADVANCE, OP.OPERATION_CULL})
TAKES_BLUEPRINT = frozenset({OP.OPERATION_GERMINATE})
MASKED_LOGIT = -1e8
"""Logit of an illegal choice: exp() underflows to exactly 0 probability, and 0 * logit stays finite in
the entropy (a -inf would give NaN there)."""


def observation_legal_actions(obs: Observation) -> list[Action]:
    """The legal actions of the state `obs` describes, by the same function execution uses."""
    stages = {state.slot: state.stage for state in obs.slots}
    return legal_actions(stages, list(obs.blueprints), budget_left(obs.seeds_germinated, obs.max_seeds))


class ActionCodec:
    """Action <-> (operation, slot, blueprint) head indices for one FeatureSpec."""

    def __init__(self, spec: FeatureSpec):
        self.slots = list(spec.slots)
        self.blueprints = spec.blueprint_values
        self.shape = (len(OPERATIONS), len(self.slots), len(self.blueprints))

    def encode(self, action: Action) -> tuple[int, int, int]:
        """Unused fields index 0 (WAIT is (0, 0, 0); ADVANCE mid is (2, mid, 0))."""
        slot = self.slots.index(action.slot) if action.operation in TAKES_SLOT else 0
        blueprint = self.blueprints.index(action.blueprint) if action.operation in TAKES_BLUEPRINT else 0
        return OPERATIONS.index(action.operation), slot, blueprint

    def decode(self, op: int, slot: int, blueprint: int) -> Action:
        operation = OPERATIONS[op]
        action = Action(operation=operation)
        if operation in TAKES_SLOT:
            action.slot = self.slots[slot]
        if operation in TAKES_BLUEPRINT:
            action.blueprint = self.blueprints[blueprint]
        return action

    def legal_tensor(self, actions: list[Action]) -> torch.Tensor:
        """bool [operations, slots, blueprints]: True exactly at the encodings of `actions`."""
        legal = np.zeros(self.shape, dtype=bool)
        for action in actions:
            legal[self.encode(action)] = True
        return torch.from_numpy(legal)

    def describe(self, action: Action) -> str:
        text = Operation.Name(action.operation).removeprefix("OPERATION_")
        if action.operation in TAKES_SLOT:
            text += f" {action.slot}"
        if action.operation in TAKES_BLUEPRINT:
            text += f" {short_name(Blueprint, action.blueprint)}"
        return text


def layer_init(layer: nn.Linear, std: float = np.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    """Orthogonal weights, constant bias (CleanRL; Engstrom et al. 2020 'Implementation Matters')."""
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


class ActorCritic(nn.Module):
    """Separate actor and critic MLPs (tanh, as CleanRL's ppo.py), factored actor heads."""

    def __init__(self, obs_dim: int, n_slots: int, n_blueprints: int, hidden: int = 64):
        super().__init__()
        n_ops = len(OPERATIONS)
        self.n_ops, self.n_slots, self.n_blueprints = n_ops, n_slots, n_blueprints
        self.critic = nn.Sequential(
            layer_init(nn.Linear(obs_dim, hidden)), nn.Tanh(),
            layer_init(nn.Linear(hidden, hidden)), nn.Tanh(),
            layer_init(nn.Linear(hidden, 1), std=1.0),
        )
        self.actor_trunk = nn.Sequential(
            layer_init(nn.Linear(obs_dim, hidden)), nn.Tanh(),
            layer_init(nn.Linear(hidden, hidden)), nn.Tanh(),
        )
        # std 0.01: near-uniform initial policy over the legal actions (CleanRL).
        self.op_head = layer_init(nn.Linear(hidden, n_ops), std=0.01)
        self.slot_head = layer_init(nn.Linear(hidden, n_ops * n_slots), std=0.01)
        self.blueprint_head = layer_init(nn.Linear(hidden, n_slots * n_blueprints), std=0.01)

    def get_value(self, x: torch.Tensor) -> torch.Tensor:
        return self.critic(x).squeeze(-1)  # [N]

    def get_action_and_value(
        self,
        x: torch.Tensor,
        legal: torch.Tensor,
        action: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        greedy: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [N, obs_dim]; legal: bool [N, ops, slots, blueprints]; action: long [N, 3] to evaluate, or
        None to choose one (sampled with `generator`, or the most likely with `greedy`).
        Returns action [N, 3], log-prob [N], entropy [N], value [N], and the probability of each
        chosen part [N, 3] (for decision reasons)."""
        n = x.shape[0]
        rows = torch.arange(n, device=x.device)
        h = self.actor_trunk(x)  # [N, hidden]
        op_dist = masked(self.op_head(h), legal.flatten(2).any(-1))  # [N, ops]
        op = self._choose(op_dist, action, 0, generator, greedy)  # [N]
        slot_logits = self.slot_head(h).view(n, self.n_ops, self.n_slots)[rows, op]  # [N, slots]
        slot_dist = masked(slot_logits, legal[rows, op].any(-1))
        slot = self._choose(slot_dist, action, 1, generator, greedy)
        bp_logits = self.blueprint_head(h).view(n, self.n_slots, self.n_blueprints)[rows, slot]  # [N, bps]
        bp_dist = masked(bp_logits, legal[rows, op, slot])
        blueprint = self._choose(bp_dist, action, 2, generator, greedy)

        takes_slot = torch.tensor([o in TAKES_SLOT for o in OPERATIONS], device=x.device)[op].float()
        takes_bp = torch.tensor([o in TAKES_BLUEPRINT for o in OPERATIONS], device=x.device)[op].float()
        logprob = op_dist.log_prob(op) + takes_slot * slot_dist.log_prob(slot) + takes_bp * bp_dist.log_prob(blueprint)
        entropy = op_dist.entropy() + takes_slot * slot_dist.entropy() + takes_bp * bp_dist.entropy()
        chosen = torch.stack([op, slot, blueprint], dim=1)  # [N, 3]
        probs = torch.stack([d.probs[rows, c] for d, c in ((op_dist, op), (slot_dist, slot), (bp_dist, blueprint))], 1)
        return chosen, logprob, entropy, self.get_value(x), probs

    @staticmethod
    def _choose(dist: Categorical, action: torch.Tensor | None, part: int,
                generator: torch.Generator | None, greedy: bool) -> torch.Tensor:
        if action is not None:
            return action[:, part]
        if greedy:
            return dist.probs.argmax(-1)
        # Categorical.sample() cannot take a generator; multinomial can, so sampling is reproducible
        # from the trainer's own generator whatever else uses the global RNG. That generator lives on
        # the CPU (its state is checkpointed as such), so a policy on a GPU samples there.
        probs = dist.probs if generator is None else dist.probs.to(generator.device)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(dist.probs.device)


def masked(logits: torch.Tensor, mask: torch.Tensor) -> Categorical:
    return Categorical(logits=logits.masked_fill(~mask, MASKED_LOGIT))


class NeuralPolicy:
    """A trained ActorCritic behind the tamiyo Policy protocol: observation in, legal decision out.

    It normalizes with the observation statistics frozen at save time and picks the most likely
    action (`greedy`, for evaluation) or samples one."""

    name = "ppo"

    def __init__(self, network: ActorCritic, spec: FeatureSpec, obs_rms: RunningMeanStd, clip_obs: float,
                 version: str, greedy: bool = True, seed: int = 0):
        self.network = network.eval()
        self.spec = spec
        self.codec = ActionCodec(spec)
        self.obs_rms = obs_rms
        self.clip_obs = clip_obs
        self.version = version
        self.greedy = greedy
        self.generator = torch.Generator().manual_seed(seed)

    def problems(self, observation: Observation) -> list[str]:
        """What this network cannot decide on though `observation_problems` passes it: slots and blueprints
        outside its FeatureSpec, which the action heads have no index for (distinct names within the spec
        also bound the slot count)."""
        problems = []
        slots = [state.slot for state in observation.slots if state.slot not in self.spec.slots]
        if slots:
            problems.append(f"slots {reprlib.repr(slots)} are not among this policy's {list(self.spec.slots)}")
        blueprints = [short_name(Blueprint, b) for b in observation.blueprints if b not in self.codec.blueprints]
        if blueprints:
            problems.append(f"blueprints {reprlib.repr(blueprints)} are not among this policy's "
                            f"{list(self.spec.blueprints)}")
        return problems

    @torch.no_grad()
    def decide(self, observation: Observation) -> Decision:
        x = self.obs_rms.normalize(self.spec.encode_batch([observation]), self.clip_obs)
        legal = self.codec.legal_tensor(observation_legal_actions(observation))[None]
        action, logprob, _, value, probs = self.network.get_action_and_value(
            x, legal, generator=self.generator, greedy=self.greedy)
        return decision(self.codec, action[0].tolist(), probs[0].tolist(), float(value[0]),
                        self.name, self.version, float(logprob[0]))


def decision(codec: ActionCodec, action: list[int], probs: list[float], value: float,
             name: str, version: str, log_prob: float = 0.0) -> Decision:
    """A Decision whose reason gives the probability of each chosen part and the critic's value; it
    also carries the value and the action's log-probability, which a distributed PPO worker records
    (SEED RL: the inference server, not the actor, knows them)."""
    chosen = codec.decode(*action)
    parts = [f"p(op)={probs[0]:.2f}"]
    if chosen.operation in TAKES_SLOT:
        parts.append(f"p(slot)={probs[1]:.2f}")
    if chosen.operation in TAKES_BLUEPRINT:
        parts.append(f"p(blueprint)={probs[2]:.2f}")
    reason = f"{codec.describe(chosen)}: {' '.join(parts)}, value {value:+.3f}"
    return Decision(action=chosen, reason=reason, policy_name=name, policy_version=version,
                    log_prob=log_prob, value=value)

