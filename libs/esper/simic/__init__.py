"""Simic: the RL side of growth: the environment around a growing training run, rewards, rollouts, PPO
and its checkpoints."""

from esper.simic.checkpoint import load_policy
from esper.simic.env import EnvConfig, GrowthEnv, run_episode
from esper.simic.ppo import PPOConfig
from esper.simic.rewards import RewardConfig
from esper.simic.trainer import PPOTrainer, TrainerConfig

__all__ = ["EnvConfig", "GrowthEnv", "PPOConfig", "PPOTrainer", "RewardConfig", "TrainerConfig", "load_policy",
           "run_episode"]
