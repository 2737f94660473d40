"""Tamiyo: the decision makers that choose lifecycle operations from observations."""

from esper.tamiyo.heuristic import HeuristicConfig, HeuristicPolicy
from esper.tamiyo.policy import Policy, WaitPolicy

__all__ = ["HeuristicConfig", "HeuristicPolicy", "Policy", "WaitPolicy"]
