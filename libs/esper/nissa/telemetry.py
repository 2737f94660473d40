"""Telemetry events, levels and sinks.

Every event is a leyline TelemetryEvent with a per-publisher sequence number, so a consumer can count
what it missed. The level decides what is *built*, not only what is written: at OFF nothing is
constructed, and `Telemetry.wants(level)` lets callers skip computing debug-only values.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from google.protobuf import json_format

from esper.leyline import TelemetryEvent, TelemetryLevel

L = TelemetryLevel


def new_run_id(name: str) -> str:
    """A run id: the start time to the microsecond, then `name`. Ids sort by start time (the newest run is
    the last name), and two runs of the same name started within one second are still two runs in karn."""
    now = time.time()
    return f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}.{int(now % 1 * 1e6):06d}_{name}"


# The least level at which each payload is emitted.
PAYLOAD_LEVEL = {
    "run_started": L.TELEMETRY_LEVEL_MINIMAL,
    "run_finished": L.TELEMETRY_LEVEL_MINIMAL,
    "transition": L.TELEMETRY_LEVEL_MINIMAL,
    "governor": L.TELEMETRY_LEVEL_MINIMAL,
    "ppo_update": L.TELEMETRY_LEVEL_MINIMAL,  # learning progress matters as much as run start/end
    "epoch": L.TELEMETRY_LEVEL_NORMAL,
    "decision": L.TELEMETRY_LEVEL_NORMAL,
    "gate": L.TELEMETRY_LEVEL_NORMAL,
}


class Sink(Protocol):
    def emit(self, event: TelemetryEvent) -> None: ...
    def close(self) -> None: ...


class ListSink:
    """Keeps events in memory (tests, the in-process TUI)."""

    def __init__(self) -> None:
        self.events: list[TelemetryEvent] = []

    def emit(self, event: TelemetryEvent) -> None:
        self.events.append(event)

    def close(self) -> None:
        pass


class JsonlSink:
    """One event per line as protobuf JSON; appends, line-buffered so a crash loses at most one line."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = path.open("a", buffering=1, encoding="utf-8")

    def emit(self, event: TelemetryEvent) -> None:
        self._file.write(json_format.MessageToJson(event, indent=None) + "\n")

    def close(self) -> None:
        self._file.close()


def read_jsonl(path: Path) -> Iterator[TelemetryEvent]:
    """The events of a JsonlSink's file. A last line cut short (its writer killed mid-line, or still
    writing) ends them, as JsonlSink's "a crash loses at most one line" promises; blank lines are
    skipped; any other line that is not an event is a ValueError naming the file and line, and so is a file
    that is not UTF-8 text."""
    with path.open(encoding="utf-8") as f:
        try:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    event = json_format.Parse(line, TelemetryEvent())
                except json_format.ParseError as exc:
                    if not line.endswith("\n"):
                        return
                    why = str(exc).splitlines()[0]  # protobuf's next line lists every field
                    raise ValueError(f"{path}:{number}: not a telemetry event ({why})") from None
                yield event
        except UnicodeDecodeError:  # reading the next line: the ValueError above is not one
            raise ValueError(f"{path}: not a telemetry JSONL file (not UTF-8 text)") from None


class Telemetry:
    """Builds events for one run at one level and fans them out to sinks."""

    def __init__(self, run_id: str, level: int = L.TELEMETRY_LEVEL_NORMAL, sinks: list[Sink] | None = None):
        self.run_id = run_id
        self.level = level
        self.sinks = list(sinks or [])
        self.sequence = 0

    def wants(self, level: int) -> bool:
        return bool(self.sinks) and self.level >= level and self.level != L.TELEMETRY_LEVEL_OFF

    def emit(self, **payload) -> None:
        """emit(epoch=EpochReport(...)): one payload field of TelemetryEvent, by name."""
        (field, message), = payload.items()
        if not self.wants(PAYLOAD_LEVEL[field]):
            return
        self.sequence += 1
        event = TelemetryEvent(run_id=self.run_id, sequence=self.sequence, wall_time=time.time())
        getattr(event, field).CopyFrom(message)
        for sink in self.sinks:
            sink.emit(event)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
