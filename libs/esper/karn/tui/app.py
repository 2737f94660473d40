"""The Esper TUI: live panels over a stream of leyline TelemetryEvents.

`make_app(source)` takes any iterable (a replayed JSONL file, a `QueueSource` fed by an in-process run,
the bus follower of `esper.transport.follow`) or async iterable of events. A worker reads the source
and posts one `TelemetryReceived` message per event; the app folds each into karn's `RunStore` (which
drops the duplicates a late-join snapshot overlaps with the live stream and counts sequence gaps) and
hands it down to the panel that shows it.

A source with a `stop()` method is told to stop when the app exits: a thread blocked in a source that
never ends would otherwise keep the process alive after the screen is gone.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Iterable

from rich.markup import escape
from textual import on
from textual.app import App, ComposeResult
from textual.containers import Horizontal
from textual.message import Message
from textual.widgets import Footer, Header, HelpPanel
from textual.worker import get_current_worker

from esper.karn.store import RunStore
from esper.karn.tui.widgets import Curves, EventLog, GradientHealth, PolicyHealth, Rewards, RunHeader, SlotTable
from esper.leyline import TelemetryEvent

Source = Iterable[TelemetryEvent] | AsyncIterable[TelemetryEvent]


class TelemetryReceived(Message):
    """One event from the source (posted from the worker, thread-safe)."""

    def __init__(self, event: TelemetryEvent) -> None:
        super().__init__()
        self.event = event


class SourceEnded(Message):
    """The source has no more events; `error` says why when it failed."""

    def __init__(self, error: str | None = None) -> None:
        super().__init__()
        self.error = error


class TelemetryApp(App):
    CSS_PATH = "esper.tcss"
    TITLE = "Esper"
    BINDINGS = [
        ("q", "quit", "Quit"),
        ("question_mark", "toggle_help", "Keys"),
        ("c", "clear_log", "Clear log"),
    ]

    def __init__(self, source: Source, title: str = "") -> None:
        super().__init__()
        self.source = source
        self.sub_title = title
        self.store = RunStore()
        self.watched: str | None = None
        """The run whose epochs the header and curves show: the last to report an epoch."""
        self.source_ended = False
        self.source_status = ""
        """Empty while the source delivers; then "source ended", or why it failed."""

    def compose(self) -> ComposeResult:
        yield Header()
        yield RunHeader("waiting for telemetry…", id="run")
        with Horizontal(id="top"):
            yield _titled(SlotTable(id="slots"), "seeds")
            yield _titled(Curves(id="curves"), "curves")
        yield _titled(GradientHealth(id="gradients"), "gradient health")
        with Horizontal(id="ppo"):
            yield _titled(PolicyHealth(id="policy"), "policy health")
            yield _titled(Rewards(id="rewards"), "rewards")
        yield _titled(EventLog(id="log"), "events")
        yield Footer()

    def on_mount(self) -> None:
        if isinstance(self.source, AsyncIterable):
            self.run_worker(self._follow_async(), name="telemetry", exit_on_error=False)
        else:
            self.run_worker(self._follow, name="telemetry", thread=True, exit_on_error=False)

    def on_unmount(self) -> None:
        stop = getattr(self.source, "stop", None)
        if stop is not None:
            stop()

    def _follow(self) -> None:
        worker = get_current_worker()
        try:
            for event in self.source:
                if worker.is_cancelled:
                    return
                self.post_message(TelemetryReceived(event))
        except Exception as exc:  # a corrupt file or a broken socket: say so on screen, keep what was shown
            self.post_message(SourceEnded(f"{type(exc).__name__}: {exc}"))
            return
        self.post_message(SourceEnded())

    async def _follow_async(self) -> None:
        try:
            async for event in self.source:
                self.post_message(TelemetryReceived(event))
        except Exception as exc:
            self.post_message(SourceEnded(f"{type(exc).__name__}: {exc}"))
            return
        self.post_message(SourceEnded())

    @on(TelemetryReceived)
    def show_event(self, message: TelemetryReceived) -> None:
        event = message.event
        if not self.store.apply(event):
            return  # already shown: a late-join snapshot overlaps the live stream
        kind = event.WhichOneof("payload")
        if kind == "ppo_update":
            for panel in (self.query_one(PolicyHealth), self.query_one(Rewards)):
                panel.add_class("-active")
                panel.update_ppo(event.run_id, event.ppo_update)
            return
        if kind == "epoch":
            self.watched = event.run_id
            self.query_one(SlotTable).update_epoch(event.run_id, event.epoch)
            self.query_one(Curves).show_run(self.store.runs[event.run_id])
            if event.epoch.gradients:  # DEBUG telemetry
                gradients = self.query_one(GradientHealth)
                gradients.add_class("-active")
                gradients.update_epoch(event.run_id, event.epoch)
        else:
            self.query_one(EventLog).add_event(event)
        if self.watched in (None, event.run_id):
            self._show_header(event.run_id)

    @on(SourceEnded)
    def source_done(self, message: SourceEnded) -> None:
        self.source_ended = True
        if message.error:
            self.source_status = f"[red]source failed: {escape(message.error)}[/]"
            self.notify(message.error, title="telemetry source failed", severity="error", timeout=30)
        else:
            self.source_status = "[dim]source ended[/]"
        if self.watched is not None:
            self._show_header(self.watched)
        else:
            self.query_one(RunHeader).update(self.source_status)

    def _show_header(self, run_id: str) -> None:
        self.query_one(RunHeader).show_run(self.store.runs[run_id], self.source_status)

    def action_toggle_help(self) -> None:
        if self.screen.query(HelpPanel):
            self.action_hide_help_panel()
        else:
            self.action_show_help_panel()

    def action_clear_log(self) -> None:
        self.query_one(EventLog).clear()


def _titled(widget, title: str):
    widget.border_title = title
    return widget


def make_app(source: Source, title: str = "") -> TelemetryApp:
    """The app over `source`; `title` (a file name, a bus endpoint) goes in the header."""
    return TelemetryApp(source, title)
