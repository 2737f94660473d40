"""Action masks are the transition table: what the policy may choose is exactly what execution accepts."""

import itertools

import torch

from esper.kasmina import LifecycleConfig
from esper.kasmina.lifecycle import TRANSITIONS
from esper.leyline import Blueprint, Decision, Observation, Operation, SeedStage, SlotState
from esper.nissa import Telemetry
from esper.simic import EnvConfig, GrowthEnv, run_episode
from esper.simic.toy import SimulatedTrainer
from esper.tamiyo.features import FeatureSpec, RunningMeanStd
from esper.tamiyo.network import OPERATIONS, ActionCodec, ActorCritic, NeuralPolicy, observation_legal_actions

SPEC = FeatureSpec.for_host("synthetic", param_budget=500_000, telemetry=True)
CODEC = ActionCodec(SPEC)
STAGES = [s for s in SeedStage.values() if s != SeedStage.SEED_STAGE_UNSPECIFIED]
CNN_BLUEPRINTS = SPEC.blueprint_values


def test_masks_equal_the_transition_table_for_every_stage_combination():
    """Every combination of stages in the three slots, with and without seed budget."""
    for stages in itertools.product(STAGES, repeat=3):
        for max_seeds, germinated in ((0, 5), (2, 2)):  # unlimited | budget spent
            obs = Observation(slots=[SlotState(slot=name, stage=stage) for name, stage in zip(SPEC.slots, stages)],
                              blueprints=CNN_BLUEPRINTS, seeds_germinated=germinated, max_seeds=max_seeds)
            legal = CODEC.legal_tensor(observation_legal_actions(obs))  # [ops, slots, blueprints]
            assert legal[OPERATIONS.index(Operation.OPERATION_WAIT), 0, 0]
            for s, stage in enumerate(stages):
                for o, op in enumerate(OPERATIONS[1:], start=1):
                    allowed = (stage, op) in TRANSITIONS and (op != Operation.OPERATION_GERMINATE or max_seeds == 0)
                    assert bool(legal[o, s].any()) == allowed, (stages, op)
                    if allowed and op == Operation.OPERATION_GERMINATE:
                        assert legal[o, s].all()  # every blueprint of the host
                    elif allowed:
                        assert legal[o, s].tolist() == [True] + [False] * (len(CNN_BLUEPRINTS) - 1)


def test_codec_round_trips_every_legal_action():
    obs = Observation(slots=[SlotState(slot="mid", stage=SeedStage.SEED_STAGE_DORMANT),
                             SlotState(slot="late", stage=SeedStage.SEED_STAGE_BLENDING)],
                      blueprints=CNN_BLUEPRINTS)
    actions = observation_legal_actions(obs)
    assert len(actions) == 1 + len(CNN_BLUEPRINTS) + 2  # WAIT, GERMINATE mid x 5, ADVANCE/CULL late
    assert [CODEC.decode(*CODEC.encode(a)) for a in actions] == actions


def toy_env(data, slots, max_seeds=0) -> GrowthEnv:
    cfg = EnvConfig(task="synthetic", max_epochs=30, slots=slots, max_seeds=max_seeds,
                    lifecycle=LifecycleConfig(min_training_epochs=1, blend_epochs=2, embargo_epochs=1))
    return GrowthEnv(cfg, data, torch.device("cpu"), Telemetry("masks"), trainer_factory=SimulatedTrainer)


def test_every_sampled_action_is_legal_on_real_environments(synthetic_data):
    """Random walks of an untrained policy through the real lifecycle (simulated training): the masks
    derived from each observation equal the environment's own legal actions, and every sampled action
    passes check_legal and executes."""
    torch.manual_seed(0)
    agent = ActorCritic(SPEC.dim, len(SPEC.slots), len(SPEC.blueprints))
    generator = torch.Generator().manual_seed(0)
    seen_ops, seen_stages = set(), set()
    runs = [(("early", "mid", "late"), 3), (("mid",), 0), (("early", "late"), 0)]  # (slots, max_seeds)
    for episode, (slots, max_seeds) in enumerate(runs):
        env = toy_env(synthetic_data, slots, max_seeds)
        obs = env.reset(episode)
        done = False
        while not done:
            legal = CODEC.legal_tensor(observation_legal_actions(obs))
            assert torch.equal(legal, CODEC.legal_tensor(env.legal_actions()))
            x = SPEC.encode_batch([obs])
            action, _, _, _, _ = agent.get_action_and_value(x, legal[None], generator=generator)
            chosen = CODEC.decode(*action[0].tolist())
            env.model.check_legal(chosen)  # raises IllegalAction if the mask let an illegal action through
            seen_ops.add(chosen.operation)
            obs, done = env.step(Decision(action=chosen, reason="random walk", policy_name="test"))
            seen_stages.update(s.stage for s in obs.slots)
    assert seen_ops == set(OPERATIONS)
    assert {SeedStage.SEED_STAGE_TRAINING, SeedStage.SEED_STAGE_BLENDING, SeedStage.SEED_STAGE_EMBARGOED} <= seen_stages


def test_neural_policy_drives_an_episode(synthetic_data):
    """The Policy protocol: run_episode with a NeuralPolicy (greedy and sampling) completes with reasons."""
    torch.manual_seed(0)
    agent = ActorCritic(SPEC.dim, len(SPEC.slots), len(SPEC.blueprints))
    for greedy in (True, False):
        policy = NeuralPolicy(agent, SPEC, RunningMeanStd((SPEC.dim,)), 10.0, version="0", greedy=greedy)
        env = toy_env(synthetic_data, ("mid",))
        decisions = []
        obs = run_episode(env, _Recording(policy, decisions), 0)
        assert obs.signals.epoch == 30 and len(decisions) == 30
        assert all(d.policy_name == "ppo" and "p(op)=" in d.reason for d in decisions)


class _Recording:
    def __init__(self, policy, decisions):
        self.policy, self.decisions = policy, decisions
        self.name, self.version = policy.name, policy.version

    def decide(self, obs):
        d = self.policy.decide(obs)
        self.decisions.append(d)
        return d


def test_blueprint_masks_follow_the_host():
    """A blueprint the host does not accept is never offered."""
    obs = Observation(slots=[SlotState(slot="mid", stage=SeedStage.SEED_STAGE_DORMANT)],
                      blueprints=[Blueprint.BLUEPRINT_NORM])
    legal = CODEC.legal_tensor(observation_legal_actions(obs))
    g = OPERATIONS.index(Operation.OPERATION_GERMINATE)
    assert legal[g].sum() == 1 and legal[g, SPEC.slots.index("mid"), CNN_BLUEPRINTS.index(Blueprint.BLUEPRINT_NORM)]
