"""PPO rewards: the reward of every update's rollout as a sparkline, and the last rollout's reward
components (their sum is the reward: esper.simic.rewards).

Rewards are shown per environment step (a rollout's sum over its `rollout_steps`), because that is
defined for every update a viewer sees, a late joiner's first included, whereas the episodes in one
rollout are not in the message. Every episode runs its whole epoch budget, so the mean episode return
is this figure times max_epochs.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, Sparkline

from esper.leyline import PPOUpdate


class Rewards(Vertical):
    """Shown once the first PPO update arrives (the app reveals it)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.per_step: list[float] = []
        """Reward per step of each update's rollout, in the order the updates arrived."""

    def compose(self) -> ComposeResult:
        yield Label("per step", id="reward-label")
        yield Sparkline([], id="reward-curve", summary_function=max)
        yield Label("", id="reward-components")

    def update_ppo(self, u: PPOUpdate) -> None:
        steps = max(u.rollout_steps, 1)
        components = {name: total / steps for name, total in sorted(u.reward_components.items())}
        self.per_step.append(sum(components.values()))
        self.query_one("#reward-curve", Sparkline).data = self.per_step
        self.query_one("#reward-label", Label).update(
            f"per step {self.per_step[-1]:+.4f}  (best {max(self.per_step):+.4f})")
        self.query_one("#reward-components", Label).update(
            "\n".join(f"{name} {value:+.4f}" for name, value in components.items()))
