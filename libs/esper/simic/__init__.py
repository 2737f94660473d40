"""Simic: the environment around a growing training run (and, later, the RL that learns to drive it)."""

from esper.simic.env import EnvConfig, GrowthEnv, run_episode

__all__ = ["EnvConfig", "GrowthEnv", "run_episode"]
