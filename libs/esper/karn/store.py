"""The run store: what karn knows about every run it has heard of, rebuilt from telemetry events.

Events arrive from the bus possibly twice (a late-join snapshot overlaps the live stream) and
possibly with holes (a slow subscriber, a hub restart). Sequence numbers are per run, from 1, so
`apply` drops what it has seen and counts what it missed; it never guesses.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from esper.leyline import EpochReport, Operation, RunFinished, RunStarted, SeedStage, TelemetryEvent, short_name


@dataclass
class RunRecord:
    run_id: str
    started: RunStarted | None = None
    epochs: dict[int, EpochReport] = field(default_factory=dict)
    """Epoch number -> its report; a governor rollback re-reports an epoch, the last one wins."""
    decisions: Counter = field(default_factory=Counter)
    """Operation short name -> decisions taken."""
    transitions: Counter = field(default_factory=Counter)
    """Destination stage short name -> lifecycle transitions."""
    governor_rollbacks: int = 0
    finished: RunFinished | None = None
    last_sequence: int = 0
    lost: int = 0

    @property
    def last_epoch(self) -> EpochReport | None:
        return self.epochs[max(self.epochs)] if self.epochs else None

    def seeds_by_stage(self) -> Counter:
        """Stage short name -> slots in that stage at the last reported epoch."""
        last = self.last_epoch
        return Counter(_name(SeedStage, s.stage) for s in last.slots) if last else Counter()


class RunStore:
    """Runs by id, at most `max_runs` (the oldest is forgotten first), safe to read from another
    thread (the /metrics server) while the subscriber applies events."""

    def __init__(self, max_runs: int = 64):
        self.max_runs = max_runs
        self.runs: OrderedDict[str, RunRecord] = OrderedDict()
        self.lock = threading.Lock()
        self.received: Counter = Counter()
        """Payload kind -> events applied (duplicates excluded)."""
        self.duplicates = 0

    def apply(self, event: TelemetryEvent) -> bool:
        """Fold one event into its run; False when it was a duplicate (already applied)."""
        with self.lock:
            run = self._run(event.run_id)
            if event.sequence <= run.last_sequence:
                self.duplicates += 1
                return False
            run.lost += event.sequence - run.last_sequence - 1
            run.last_sequence = event.sequence
            kind = event.WhichOneof("payload")
            self.received[kind] += 1
            if kind == "run_started":
                run.started = event.run_started
            elif kind == "epoch":
                run.epochs[event.epoch.signals.epoch] = event.epoch
            elif kind == "decision":
                run.decisions[_name(Operation, event.decision.action.operation)] += 1
            elif kind == "transition":
                run.transitions[_name(SeedStage, event.transition.to_stage)] += 1
            elif kind == "governor":
                run.governor_rollbacks += 1
            elif kind == "run_finished":
                run.finished = event.run_finished
            return True

    def _run(self, run_id: str) -> RunRecord:
        run = self.runs.get(run_id)
        if run is None:
            run = self.runs[run_id] = RunRecord(run_id)
            while len(self.runs) > self.max_runs:
                self.runs.popitem(last=False)
        return run


def _name(enum, value: int) -> str:
    """short_name, but a value this build does not know (proto3 enums are open) is "unknown"."""
    return short_name(enum, value) if value in enum.values() else "unknown"
