"""PPO rewards: the reward of every update's rollout as a sparkline, and the last rollout's reward
components (their sum is the reward: esper.simic.rewards).

Rewards are shown per environment step (a rollout's sum over its `rollout_steps`), because that is
defined for every update a viewer sees, a late joiner's first included, whereas the episodes in one
rollout are not in the message. Every episode runs its whole epoch budget, so the mean episode return
is this figure times max_epochs.
"""

from __future__ import annotations

from rich.markup import escape
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, Sparkline

from esper.karn.tui.widgets.curves import finite, latest_and_best
from esper.leyline import PPOUpdate


class Rewards(Vertical):
    """Shown once the first PPO update arrives (the app reveals it); like Curves, it follows the run that
    updated last and restarts when another does."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.run_id = ""
        self.per_step: list[float] = []
        """Reward per step of each of the run's updates' rollouts, in the order the updates arrived."""

    def compose(self) -> ComposeResult:
        yield Label("per step", id="reward-label")
        yield Sparkline([], id="reward-curve", summary_function=max)
        yield Label("", id="reward-components")

    def update_ppo(self, run_id: str, u: PPOUpdate) -> None:
        if run_id != self.run_id:
            self.run_id, self.per_step = run_id, []
        steps = max(u.rollout_steps, 1)
        components = {name: total / steps for name, total in sorted(u.reward_components.items())}
        self.per_step.append(sum(components.values()))
        self.query_one("#reward-curve", Sparkline).data = finite(self.per_step)
        self.query_one("#reward-label", Label).update(latest_and_best("per step", "{:+.4f}", self.per_step, max))
        self.query_one("#reward-components", Label).update(
            "\n".join(f"{escape(name)} {value:+.4f}" for name, value in components.items()))
