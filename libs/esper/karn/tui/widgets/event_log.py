"""What happened, one line each: decisions with their reasons, gate checks, lifecycle transitions,
governor rollbacks, run start and end. Epoch reports and PPO updates have panels of their own."""

from __future__ import annotations

from rich.markup import escape
from textual.widgets import RichLog

from esper.leyline import Blueprint, Operation, SeedStage, TelemetryEvent, enum_name


class EventLog(RichLog):
    """Lines are not wrapped: a long reason scrolls sideways rather than breaking the one-event-a-line
    reading of the log."""

    def __init__(self, **kwargs) -> None:
        super().__init__(markup=True, max_lines=2000, **kwargs)

    def add_event(self, event: TelemetryEvent) -> None:
        line = describe(event)
        if line is not None:
            self.write(f"[dim]{escape(event.run_id)}[/] {line}")


def describe(event: TelemetryEvent) -> str | None:
    """One line of Rich markup for an event, None for kinds shown elsewhere (epochs, PPO updates)."""
    kind = event.WhichOneof("payload")
    if kind == "decision":
        action = event.decision.action
        words = [enum_name(Operation, action.operation), action.slot,
                 enum_name(Blueprint, action.blueprint) if action.blueprint else ""]
        return f"[bold]{escape(' '.join(filter(None, words)))}[/]: {escape(event.decision.reason)}"
    if kind == "gate":
        g = event.gate
        verdict = "[green]pass[/]" if g.passed else "[red]fail[/]"
        return f"{escape(g.gate)} {escape(g.slot)} #{g.seed_id} {verdict}: {escape(g.reason)}"
    if kind == "transition":
        t = event.transition
        return (f"[magenta]{escape(t.slot)} #{t.seed_id} {enum_name(Blueprint, t.blueprint)}[/] "
                f"{enum_name(SeedStage, t.from_stage)} -> {enum_name(SeedStage, t.to_stage)} "
                f"(epoch {t.epoch}): {escape(t.reason)}")
    if kind == "governor":
        g = event.governor
        culled = f", culled {escape(' '.join(g.culled_slots))}" if g.culled_slots else ""
        return (f"[bold red]governor[/] epoch {g.epoch}: {escape(g.cause)} (train loss {g.train_loss:.3g}), "
                f"restored epoch {g.restored_epoch}{culled}")
    if kind == "run_started":
        s = event.run_started
        return f"[bold]run started[/]: {escape(f'{s.mode} on {s.task}, seed {s.seed}, {s.device}')}"
    if kind == "run_finished":
        f = event.run_finished
        return (f"[bold]run finished[/] after {f.epochs} epochs: val {f.val_accuracy:.2f}%, "
                f"{tested(f)}, {f.total_params:,} parameters, {f.wall_seconds:.1f} s")
    return None


def tested(finished) -> str:
    """A RunFinished's test accuracy, or that the run was never tested (a PPO training episode)."""
    return f"test {finished.test_accuracy:.2f}%" if finished.HasField("test_accuracy") else "not tested"
