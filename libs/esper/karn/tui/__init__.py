"""The Esper TUI: a Textual app showing a growth run's telemetry, live or replayed."""

from esper.karn.tui.app import TelemetryApp, make_app
from esper.karn.tui.sources import QueueSource

__all__ = ["QueueSource", "TelemetryApp", "make_app"]
