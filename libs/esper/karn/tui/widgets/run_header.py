"""One line about the run being watched: mode, task, epoch, accuracy, parameters, events missed."""

from __future__ import annotations

from rich.markup import escape
from textual.widgets import Static

from esper.karn.store import RunRecord
from esper.karn.tui.widgets.event_log import tested


class RunHeader(Static):
    def show_run(self, run: RunRecord, source_status: str = "") -> None:
        """`source_status`: markup saying the source ended or failed, empty while it delivers."""
        parts = [f"[bold]{escape(run.run_id)}[/]"]
        if run.started is not None:
            parts.append(escape(f"{run.started.mode} · {run.started.task} · seed {run.started.seed}"))
        last = run.last_epoch
        if last is not None:
            s = last.signals
            parts.append(f"epoch {s.epoch}/{s.max_epochs} · val {s.val_accuracy:.2f}% "
                         f"(best {s.best_val_accuracy:.2f}%) · {s.total_params:,} params")
            if last.sharpness:  # DEBUG telemetry, on its schedule
                parts.append(f"sharpness {last.sharpness:.3g}")
        if run.finished is not None:
            parts.append(f"[green]finished[/]: {tested(run.finished)}")
        if run.lost:
            parts.append(f"[red]{run.lost} events missed[/]")
        if source_status:
            parts.append(source_status)
        self.update("  ·  ".join(parts))
