"""A whole heuristic episode on the synthetic task exercises every lifecycle path, with reasons."""

from esper.leyline import (Blueprint, Observation, Operation, SeedStage, SlotState, TrainingSignals,
                           from_short_name, short_name)
from esper.nissa import ListSink, Telemetry
from esper.simic import EnvConfig, GrowthEnv, run_episode
from esper.simic.env import HISTORY
from esper.tamiyo import HeuristicConfig, HeuristicPolicy, WaitPolicy

import torch

EPISODE = EnvConfig(task="synthetic", max_epochs=40, slots=("early", "mid", "late"))
# Grow early and often so that 40 short epochs see seeds both kept and removed.
EAGER = HeuristicConfig(min_epoch_to_germinate=3, plateau_patience=2)


def run(policy, synthetic_data, seed=0):
    sink = ListSink()
    env = GrowthEnv(EPISODE, synthetic_data, torch.device("cpu"), Telemetry("test", sinks=[sink]))
    obs = run_episode(env, policy, seed)
    return env, obs, sink.events


def test_heuristic_episode_fossilizes_and_culls(synthetic_data):
    """Two episodes (seeds measured on this CPU build to keep and remove seeds) cover every path."""
    paths = []
    for seed in (2, 3):
        env, obs, events = run(HeuristicPolicy(EAGER), synthetic_data, seed)
        assert obs.signals.epoch == 40
        paths += [[h["stage"] for h in r.history] for r in env.model.records]
        check_telemetry(env, events)
    assert ["GERMINATED", "TRAINING", "BLENDING", "FOSSILIZED"] in paths
    culled = [p for p in paths if "CULLED" in p]
    assert culled, paths
    assert all(p[p.index("CULLED"):][:2] in (["CULLED"], ["CULLED", "EMBARGOED"]) for p in culled)


def check_telemetry(env, events):

    """Every decision carries a reason, every transition is in the telemetry, sequence numbers are gapless."""
    decisions = [e.decision for e in events if e.HasField("decision")]
    assert len(decisions) == 40 and all(d.reason for d in decisions)
    transitions = [e.transition for e in events if e.HasField("transition")]
    assert len(transitions) == sum(len(r.history) for r in env.model.records)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    # Every ADVANCE was preceded by a gate check recorded with its values.
    gates = [e.gate for e in events if e.HasField("gate")]
    assert gates and all(g.values and g.reason for g in gates)
    for fossil in (r for r in env.model.records if r.fate == "fossilized"):
        (passed,) = [g for g in gates if g.gate == "G_fossilize" and g.seed_id == fossil.seed_id and g.passed]
        assert passed.values["contribution"] > passed.thresholds["contribution"]


def test_static_policy_never_grows(synthetic_data):
    env, obs, _ = run(WaitPolicy(), synthetic_data)
    assert env.model.records == []
    assert obs.signals.total_params == obs.signals.host_params
    assert all(short_name(SeedStage, s.stage) == "DORMANT" for s in obs.slots)


def test_same_seed_same_episode(synthetic_data):
    """CPU runs are reproducible: the same seed gives the same decisions and accuracies."""
    cfg = EnvConfig(task="synthetic", max_epochs=12, slots=("mid",))
    results = []
    for _ in range(2):
        sink = ListSink()
        env = GrowthEnv(cfg, synthetic_data, torch.device("cpu"), Telemetry("t", sinks=[sink]))
        obs = run_episode(env, HeuristicPolicy(HeuristicConfig(min_epoch_to_germinate=2, plateau_patience=1)), 3)
        results.append((list(obs.signals.val_accuracy_history), [e.decision.action for e in sink.events
                                                                   if e.HasField("decision")]))
    assert results[0] == results[1]


def test_a_blend_that_costs_accuracy_is_culled_however_long_it_has_run():
    """The regression cull compares the blend so far with the epochs before it at every blend length up to
    max_stage_epochs: an observation's history (HISTORY epochs) holds both (10 had hidden a 10-point drop
    from the 10th blending epoch on)."""
    cfg = HeuristicConfig()
    for k in range(1, cfg.max_stage_epochs):
        history = ([70.0] * 20 + [60.0] * k)[-HISTORY:]  # 10 points lost since blending began k epochs ago
        blending = SlotState(slot="mid", stage=SeedStage.SEED_STAGE_BLENDING, blueprint=Blueprint.BLUEPRINT_CONV_HEAVY,
                             epochs_in_stage=k, alpha=min(1.0, k / 5))
        obs = Observation(signals=TrainingSignals(epoch=20 + k, max_epochs=75, val_accuracy_history=history),
                          slots=[blending], blueprints=[Blueprint.BLUEPRINT_CONV_HEAVY])
        decision = HeuristicPolicy(cfg).decide(obs)
        assert decision.action.operation == Operation.OPERATION_CULL, (k, decision.reason)
        assert decision.reason == "validation accuracy 10.00 points below its level before blending", k


def decide(slot: SlotState) -> tuple[int, str, str]:
    """The heuristic's (operation, slot, reason) on an observation of `slot` at a steady epoch."""
    obs = Observation(signals=TrainingSignals(epoch=20, max_epochs=75, val_accuracy_history=[70.0] * 16),
                      slots=[slot], blueprints=list(Blueprint.values())[1:])
    decision = HeuristicPolicy().decide(obs)
    return decision.action.operation, decision.action.slot, decision.reason


def blending(contribution: float, se: float, epochs: int = 3) -> SlotState:
    return SlotState(slot="mid", stage=SeedStage.SEED_STAGE_BLENDING, blueprint=Blueprint.BLUEPRINT_CONV_HEAVY,
                     epochs_in_stage=epochs, alpha=0.5, has_contribution=True, contribution=contribution,
                     contribution_se=se)


def test_a_blending_seed_is_culled_below_the_larger_of_k_errors_and_the_least_harm():
    """cull_k_se (2) standard errors, but never less than cull_min_harm (1 point): with few discordant images
    the error is tiny, and a test on it alone would cull on noise (a mutation taking the smaller survived)."""
    CULL, WAIT = Operation.OPERATION_CULL, Operation.OPERATION_WAIT
    assert decide(blending(-0.9, 0.1))[0] == WAIT  # 9 errors below 0, but less than a point of harm
    assert decide(blending(-1.1, 0.1))[:2] == (CULL, "mid")
    assert decide(blending(-2.9, 1.5))[0] == WAIT  # past the point, within 2 errors
    assert decide(blending(-3.1, 1.5)) == (CULL, "mid", "contribution -3.10 < -3.00 points")


def test_a_seed_is_culled_once_it_has_sat_its_stages_limit():
    """max_training_epochs (2) in TRAINING, max_stage_epochs (12) in BLENDING, counted from the epoch it entered:
    culled at the limit, not an epoch later (a mutation of >= to > survived)."""
    training = [SlotState(slot="mid", stage=SeedStage.SEED_STAGE_TRAINING, blueprint=Blueprint.BLUEPRINT_NORM,
                          epochs_in_stage=epochs) for epochs in (1, 2)]
    assert [decide(slot)[0] for slot in training] == [Operation.OPERATION_WAIT, Operation.OPERATION_CULL]
    assert [decide(blending(0.0, 0.1, epochs))[0] for epochs in (11, 12)] == [Operation.OPERATION_WAIT,
                                                                            Operation.OPERATION_CULL]
    assert decide(blending(0.0, 0.1, 12))[2] == "12 epochs in BLENDING"


def test_only_the_last_cull_memory_culled_blueprints_are_skipped():
    """The next blueprint skips those among the last cull_memory (2) culled; one culled before them may come
    again (a mutation that skipped every culled blueprint survived)."""
    first, second, third = [from_short_name(Blueprint, name) for name in HeuristicConfig().blueprint_rotation[:3]]
    obs = Observation(signals=TrainingSignals(epoch=20, max_epochs=75, plateau_epochs=10),
                      slots=[SlotState(slot="mid", stage=SeedStage.SEED_STAGE_DORMANT)],
                      blueprints=list(Blueprint.values())[1:], recently_culled=[first, second, third])
    decision = HeuristicPolicy().decide(obs)  # the rotation's first, culled before the last two
    assert decision.action.operation == Operation.OPERATION_GERMINATE and decision.action.blueprint == first
    obs.recently_culled[:] = [second, first]
    assert HeuristicPolicy().decide(obs).action.blueprint == third
