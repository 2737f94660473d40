"""What every controller is: something that turns an Observation into a Decision."""

from __future__ import annotations

from typing import Protocol

from esper.leyline import Action, Decision, Observation, Operation


class Policy(Protocol):
    """A policy that cannot decide on some observations `tamiyo.validate` accepts (NeuralPolicy: slots
    outside its network) also has `problems(observation) -> list[str]`, which tamiyo_server asks first."""

    name: str
    version: str

    def decide(self, observation: Observation) -> Decision: ...


def decide_all(policy: Policy, observations: list[Observation]) -> list[Decision]:
    """Each observation's decision, in one call where the policy takes a batch: a RemotePolicy asks its server
    once (DecideBatch) for a group's runs, not once per run."""
    decide_batch = getattr(policy, "decide_batch", None)
    return decide_batch(observations) if decide_batch else [policy.decide(o) for o in observations]


class WaitPolicy:
    """Never grows: the static baseline runs through the same environment step as every controller."""

    name = "static"
    version = "1"

    def decide(self, observation: Observation) -> Decision:
        return Decision(action=Action(operation=Operation.OPERATION_WAIT), reason="static baseline",
                        policy_name=self.name, policy_version=self.version)
