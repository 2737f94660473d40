"""The governor rolls a run back on a NaN loss, culls live seeds, records it, and the run goes on."""

import functools
import math

import torch

from esper.leyline import Action, Blueprint, Decision, Operation, SeedStage
from esper.nissa import ListSink, Telemetry
from esper.simic import EnvConfig, GrowthEnv
from esper.simic.toy import SimulatedTrainer
from esper.simic.trainer import PPOTrainer, TrainerConfig
from esper.tamiyo.validate import observation_problems
from esper.tolaria.governor import Governor

WAIT = Decision(action=Action(operation=Operation.OPERATION_WAIT), reason="test")


def test_nan_loss_rolls_back_and_the_run_continues(synthetic_data):
    sink = ListSink()
    env = GrowthEnv(EnvConfig(task="synthetic", max_epochs=10, slots=("mid",)), synthetic_data,
                    torch.device("cpu"), Telemetry("gov", sinks=[sink]))
    env.reset(seed=0)
    env.step(WAIT)
    env.step(Decision(action=Action(operation=Operation.OPERATION_GERMINATE, slot="mid",
                                    blueprint=Blueprint.BLUEPRINT_CONV_LIGHT), reason="test"))
    before, _ = env.step(Decision(action=Action(operation=Operation.OPERATION_ADVANCE, slot="mid"), reason="test"))
    good = {k: v.clone() for k, v in env.model.host.state_dict().items()}

    first_conv = env.model.host.blocks[0][0].weight
    with torch.no_grad():
        first_conv[0, 0, 0, 0] = float("nan")  # injected fault
    obs, done = env.step(WAIT)

    rollbacks = [e.governor for e in sink.events if e.HasField("governor")]
    assert len(rollbacks) == 1
    assert rollbacks[0].cause == "non-finite loss" and rollbacks[0].restored_epoch == 3
    assert list(rollbacks[0].culled_slots) == ["mid"]
    # The NaN is in the rollback's record; the observation describes the restored model, with the training
    # loss and accuracy of the epoch it was restored to (a NaN there would reach a policy's features).
    assert math.isnan(rollbacks[0].train_loss)
    assert (obs.signals.train_loss, obs.signals.train_accuracy) == (before.signals.train_loss,
                                                                    before.signals.train_accuracy)
    assert observation_problems(obs) == []
    for key, value in env.model.host.state_dict().items():
        assert torch.equal(value, good[key]), key
    assert env.model.slots["mid"].stage in (SeedStage.SEED_STAGE_CULLED, SeedStage.SEED_STAGE_EMBARGOED)
    assert math.isfinite(obs.signals.val_loss)

    obs, done = env.step(WAIT)  # the run continues with finite losses
    assert math.isfinite(obs.signals.train_loss) and obs.signals.epoch == 5 and not done


class NaNAtEpoch3(SimulatedTrainer):
    def train_epoch(self) -> tuple[float, float]:
        loss, accuracy = super().train_epoch()
        return (math.nan, accuracy) if self.epoch == 3 else (loss, accuracy)


def test_ppo_trains_through_a_rollback(synthetic_data):
    """A NaN epoch costs PPO one rollback, not the run: its observations stay finite, and so does the running
    normalization every later observation passes through (one NaN there had made every action's logits NaN)."""
    sink = ListSink()
    cfg = TrainerConfig(env=EnvConfig(task="synthetic", max_epochs=6, slots=("mid",)), episodes=2, n_envs=2,
                        update_every=1, seed=0)
    trainer = PPOTrainer(cfg, {"cpu": synthetic_data}, Telemetry("learner"),
                         env_telemetry=lambda episode: Telemetry(f"episode{episode}", sinks=[sink]),
                         env_factory=functools.partial(GrowthEnv, trainer_factory=NaNAtEpoch3))
    trainer.train()
    assert sum(e.HasField("governor") for e in sink.events) == 2  # one rollback in each episode
    assert trainer.episodes_done == 2 and torch.isfinite(trainer.obs_rms.mean).all()


def test_divergence_is_a_verdict():
    governor = Governor()
    assert governor.verdict(2.0) is None
    assert governor.verdict(1.0) is None
    assert governor.verdict(4.9) is None
    assert governor.verdict(5.1) == "divergence"
    assert governor.verdict(float("inf")) == "non-finite loss"


def test_a_resumed_governor_judges_divergence_against_the_lowest_loss_it_had_seen():
    """Its state had been restored without the lowest loss (a mutation that dropped it survived every test): a
    resumed run would then take a loss 10x its best for healthy, where the run never stopped rolled back."""
    governor = Governor()
    governor.verdict(1.0)
    governor.snapshot(torch.nn.Linear(2, 2), 3)
    resumed = Governor()
    resumed.load_state_dict(governor.state_dict())
    assert resumed.verdict(10.0) == governor.verdict(10.0) == "divergence"
    assert resumed.snapshot_epoch == 3
