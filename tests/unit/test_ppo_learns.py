"""PPO learns the built-in toy growth task (simic.toy), as Stable-Baselines3's learning tests do.

The task runs the real environment step, lifecycle, gates, masks, rewards and trainer, with training
simulated: one slot, 12-epoch episodes, and one blueprint (conv_heavy, +6 points) worth growing among
five (the others gain 2, -1, -3 and -4 points). Germinating conv_heavy, advancing it through its three
gates and fossilizing it takes 7 of the 12 epochs, in the right order. Measured on this CPU build (seed
0, 16 held-out seeds): WAIT gains 0 points over the host, the untrained (sampling) policy +0.1, the
trained greedy policy +6.4 after the 480 episodes the test allows (5,760 environment steps, ~10 s); it
asks for 4. (Across training seeds 0-9, 9 of 10 reached +6 within 320 episodes.)
"""

import functools

import torch

from esper.kasmina import LifecycleConfig
from esper.nissa import Telemetry
from esper.simic import EnvConfig, GrowthEnv, run_episode
from esper.simic.ppo import PPOConfig
from esper.simic.toy import SimulatedTrainer
from esper.simic.trainer import PPOTrainer, TrainerConfig
from esper.tamiyo import WaitPolicy

TOY = EnvConfig(task="synthetic", max_epochs=12, slots=("mid",),
                lifecycle=LifecycleConfig(min_training_epochs=1, blend_epochs=2, embargo_epochs=1))
make_env = functools.partial(GrowthEnv, trainer_factory=SimulatedTrainer)
HELD_OUT = range(10_000, 10_016)


def mean_final_accuracy(policy, data) -> float:
    accuracies = [run_episode(make_env(TOY, data, torch.device("cpu"), Telemetry("eval")), policy, seed)
                  .signals.val_accuracy for seed in HELD_OUT]
    return sum(accuracies) / len(accuracies)


def test_ppo_learns_the_toy_growth_task(synthetic_data):
    cfg = TrainerConfig(env=TOY, ppo=PPOConfig(lr=1e-3), episodes=480, n_envs=16, update_every=1, seed=0)
    trainer = PPOTrainer(cfg, {"cpu": synthetic_data}, Telemetry("learner"),
                         env_telemetry=lambda episode: Telemetry(f"ep{episode}"), env_factory=make_env)
    host = mean_final_accuracy(WaitPolicy(), synthetic_data)
    untrained = mean_final_accuracy(trainer.policy(greedy=False), synthetic_data) - host
    trainer.train()
    trained = mean_final_accuracy(trainer.policy(), synthetic_data) - host
    assert trainer.global_step == 480 * 12 and trainer.updates == 30
    assert untrained < 1.0, untrained
    assert trained >= 4.0, f"greedy PPO policy gains {trained:+.2f} points over the host (untrained {untrained:+.2f})"
    first, last = trainer.update_log[0], trainer.update_log[-1]
    assert last["entropy"] < 0.5 * first["entropy"]
    assert last["action_counts"]["CULL"] < first["action_counts"]["CULL"]  # it stops throwing seeds away
