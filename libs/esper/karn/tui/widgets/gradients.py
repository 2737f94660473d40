"""Gradient health of the run that reported an epoch last: each host layer's and seed's gradient norm
over the epoch, flagged vanishing or exploding by nissa's thresholds (`esper.nissa.diagnostics`).
Only DEBUG telemetry measures it, so the panel stays hidden until a report carries it."""

from __future__ import annotations

from rich.markup import escape
from textual.widgets import Static

from esper.leyline import EpochReport, LayerGradient


class GradientHealth(Static):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.flags: dict[str, str] = {}
        """Layer -> "ok", "vanishing" or "exploding" at the last report shown: kept for tests and alerts."""

    def update_epoch(self, run_id: str, report: EpochReport) -> None:
        self.flags = {g.layer: flag(g) for g in report.gradients}
        lines = [f"[dim]{escape(run_id)} epoch {report.signals.epoch}: L2 norm of each gradient, mean (max) over "
                 "the epoch[/]"]
        lines += [f"{escape(f'{g.layer:<12}')} {g.mean_norm:9.3g} ({g.max_norm:9.3g})  {STYLE[self.flags[g.layer]]}"
                  for g in report.gradients]
        self.update("\n".join(lines))


STYLE = {"ok": "[green]ok[/]", "vanishing": "[yellow]vanishing[/]", "exploding": "[bold red]exploding[/]"}


def flag(g: LayerGradient) -> str:
    return "exploding" if g.exploding else "vanishing" if g.vanishing else "ok"
