"""Tamiyo: the decision makers that choose lifecycle operations from observations."""

from esper.tamiyo.features import FeatureSpec
from esper.tamiyo.heuristic import HeuristicConfig, HeuristicPolicy
from esper.tamiyo.network import ActorCritic, NeuralPolicy
from esper.tamiyo.policy import Policy, WaitPolicy, decide_all

__all__ = ["ActorCritic", "FeatureSpec", "HeuristicConfig", "HeuristicPolicy", "NeuralPolicy", "Policy",
           "WaitPolicy", "decide_all"]
