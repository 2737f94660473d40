"""PPO policy health from the last `PPOUpdate`: each gauge coloured green, yellow or red; the losses
and the rollout's action distribution (rewards have a panel of their own: `rewards.py`).

Thresholds (`HEALTH`), from CleanRL's and Stable-Baselines3's guidance on reading PPO runs:
- approx_kl: green below 0.02, yellow to 0.05, red above. simic's `target_kl` (0.03) stops an update
  early; a last-minibatch KL past 0.05 means the update moved far from the policy that acted.
- clipfrac: green below 0.2, yellow to 0.3, red above: most ratios should stay inside the clip range.
- explained_variance: green from 0.5, yellow from 0, red below 0 (the critic predicts the returns
  worse than their mean does; advantages are then mostly noise).
- entropy: as a fraction of the first update's entropy (the policy's size of action space is not in
  the message): green from 0.5, yellow from 0.2, red below (the policy has collapsed to few actions).
"""

from __future__ import annotations

from rich.markup import escape
from textual.widgets import Static

from esper.leyline import PPOUpdate

GREEN, YELLOW, RED = "green", "yellow", "red"

# name -> (higher is healthier, green bound, yellow bound)
HEALTH = {
    "entropy": (True, 0.5, 0.2),           # fraction of the first update's entropy
    "approx_kl": (False, 0.02, 0.05),
    "clipfrac": (False, 0.2, 0.3),
    "explained_variance": (True, 0.5, 0.0),
}


def health_colour(name: str, value: float) -> str:
    higher_better, green, yellow = HEALTH[name]
    if higher_better:
        return GREEN if value >= green else YELLOW if value >= yellow else RED
    return GREEN if value < green else YELLOW if value <= yellow else RED


class PolicyHealth(Static):
    """Shown once the first PPO update arrives (the app reveals it); heuristic runs have no policy to learn."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.run_id = ""
        self.first_entropy: float | None = None
        """The first entropy of the run that updated last (entropy is judged against its own run's)."""
        self.colours: dict[str, str] = {}
        """Gauge -> its colour at the last update: what the panel shows, kept for tests and alerts."""

    def update_ppo(self, run_id: str, u: PPOUpdate) -> None:
        if run_id != self.run_id:
            self.run_id, self.first_entropy = run_id, None
        if self.first_entropy is None:
            self.first_entropy = u.entropy
        entropy_fraction = u.entropy / self.first_entropy if self.first_entropy > 0 else 1.0
        measured = {"entropy": entropy_fraction, "approx_kl": u.approx_kl, "clipfrac": u.clipfrac,
                    "explained_variance": u.explained_variance}
        self.colours = {name: health_colour(name, value) for name, value in measured.items()}
        c = self.colours
        lines = [
            f"[bold]update {u.update}[/] · {u.episodes} episodes · {u.global_step:,} steps · "
            f"{u.steps_per_second:.1f} steps/s",
            f"entropy [{c['entropy']}]{u.entropy:.3f}[/] ({entropy_fraction:.0%} of first)  "
            f"approx_kl [{c['approx_kl']}]{u.approx_kl:.4f}[/]  "
            f"clipfrac [{c['clipfrac']}]{u.clipfrac:.3f}[/]  "
            f"explained_variance [{c['explained_variance']}]{u.explained_variance:.3f}[/]",
            f"policy loss {u.policy_loss:.4f}  value loss {u.value_loss:.4f}  grad norm {u.grad_norm:.3f}  "
            f"epochs {u.epochs_run}{' (KL stop)' if u.early_stopped else ''}  ent_coef {u.ent_coef:.4f}  "
            f"lr {u.learning_rate:.2e}",
            "actions " + _counts(u.action_counts, u.rollout_steps),
        ]
        if u.nonfinite_skipped:  # weights kept, but something upstream (rewards, a setting) went wrong
            lines.append(f"[red]{u.nonfinite_skipped} minibatches not stepped on: their gradient was not finite[/]")
        self.update("\n".join(lines))


def _counts(counts, total: int) -> str:
    return "  ".join(f"{escape(op)} {n} ({n / total:.0%})" if total else f"{escape(op)} {n}"
                     for op, n in sorted(counts.items()))
