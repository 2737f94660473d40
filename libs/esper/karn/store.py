"""The run store: what karn knows about every run it has heard of, rebuilt from telemetry events.

Events arrive from the bus possibly twice (a late-join snapshot overlaps the live stream) and
possibly with holes (a slow subscriber, a hub restart). Sequence numbers are per run, from 1, so
`apply` drops what it has seen and counts what it missed; it never guesses.

An `EventJournal` keeps the store across restarts of karn and of the whole stack (the hub's late-join
snapshot lives in the hub's memory only): every event the store applied, appended to a file and
replayed into a fresh store on start.
"""

from __future__ import annotations

import struct
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.message import DecodeError

from esper.durable import lock_exclusively, write_durably
from esper.leyline import (
    EpochReport,
    Operation,
    RunFinished,
    RunStarted,
    SeedStage,
    TelemetryEvent,
    enum_name,
)


MAX_EPOCHS = 10_000
"""Epoch reports kept per run. No run Esper trains reports so many (a run is --max-epochs long: 40 to 75 by
default), so only a peer flooding one run with epochs reaches it; past it the run's first reported epoch
is forgotten, and karn's memory stays bounded."""

MAX_SEQUENCE_GAP = 1_000_000
"""How far past its run's last event an event may be. A run emits a few thousand (75 epochs at DEBUG level), so
a jump past this is a corrupt or hostile peer's number: dropped and counted (RunStore.implausible). Taken, a
sequence of 2**64-1 had made every later event of its run a duplicate, and 1.8e19 events lost."""


@dataclass
class RunRecord:
    run_id: str
    started: RunStarted | None = None
    epochs: dict[int, EpochReport] = field(default_factory=dict)
    """Epoch number -> its report, in the order first reported, at most MAX_EPOCHS; a governor rollback
    re-reports an epoch, the last one wins."""
    decisions: Counter = field(default_factory=Counter)
    """Operation short name -> decisions taken."""
    finished: RunFinished | None = None
    last_sequence: int = 0
    lost: int = 0

    @property
    def last_epoch(self) -> EpochReport | None:
        return self.epochs[max(self.epochs)] if self.epochs else None

    def seeds_by_stage(self) -> Counter:
        """Stage short name -> slots in that stage at the last reported epoch."""
        last = self.last_epoch
        return Counter(enum_name(SeedStage, s.stage) for s in last.slots) if last else Counter()


class RunStore:
    """Runs by id, at most `max_runs` (the least recently reporting is forgotten first), safe to read from another
    thread (the /metrics server) while the subscriber applies events."""

    def __init__(self, max_runs: int = 64):
        self.max_runs = max_runs
        self.runs: OrderedDict[str, RunRecord] = OrderedDict()
        self.lock = threading.Lock()
        self.received: Counter = Counter()
        """Payload kind -> events applied (duplicates excluded)."""
        self.duplicates = 0
        self.implausible = 0
        """Events dropped for a sequence number more than MAX_SEQUENCE_GAP past their run's last."""

    def apply(self, event: TelemetryEvent) -> bool:
        """Fold one event into its run; False when it was a duplicate (already applied) or implausible."""
        with self.lock:
            known = self.runs.get(event.run_id)
            last = known.last_sequence if known else 0
            if event.sequence <= last:
                self.duplicates += 1
                return False
            if event.sequence - last > MAX_SEQUENCE_GAP:
                self.implausible += 1
                return False
            run = known or self._run(event.run_id)
            self.runs.move_to_end(event.run_id)  # applied (and journaled): the run reported last
            run.lost += event.sequence - run.last_sequence - 1
            run.last_sequence = event.sequence
            kind = event.WhichOneof("payload") or "unknown"  # a payload of a newer build (a journal it wrote)
            self.received[kind] += 1
            if kind == "run_started":
                run.started = event.run_started
            elif kind == "epoch":
                run.epochs[event.epoch.signals.epoch] = event.epoch
                if len(run.epochs) > MAX_EPOCHS:
                    del run.epochs[next(iter(run.epochs))]
            elif kind == "decision":
                run.decisions[enum_name(Operation, event.decision.action.operation)] += 1
            elif kind == "run_finished":
                run.finished = event.run_finished
            return True

    def _run(self, run_id: str) -> RunRecord:
        """The run's record; past max_runs the run that reported least recently is forgotten (not the one
        created first: a PPO run outlives every one of its episodes, and reports after them all)."""
        run = self.runs.get(run_id)
        if run is None:
            run = self.runs[run_id] = RunRecord(run_id)
            while len(self.runs) > self.max_runs:
                self.runs.popitem(last=False)
        return run


COMPACT_FLOOR = 64 << 20
"""A running journal is compacted once it passes this size, or twice its size after its last compaction if
that is more: a long-lived karn watching run after run (a PPO campaign's episodes) had kept every event of
every run it ever applied until its next start, and that start had read the whole file into memory."""


class JournalBusy(RuntimeError):
    """Another process keeps the journal."""


class EventJournal:
    """Applied events as length-prefixed protobuf records (a 4-byte little-endian size, then a serialized
    TelemetryEvent) in one append-only file. Each batch is flushed to the OS, so a SIGKILL loses nothing
    written; a record cut short (a crash mid-write) or corrupt ends the replay and is cut off.

    Compaction rewrites the file (atomically) with only the events of the runs the store keeps, so it holds
    no more runs than the store (each with every event it sent: a run flooded past MAX_EPOCHS keeps the
    epochs the store forgot): on start, and while appending once the file has doubled (COMPACT_FLOOR).
    The file is read a record at a time, so neither costs memory beyond the store's."""

    SIZE = struct.Struct("<I")
    MAX_RECORD = 16 << 20
    """A size above this is corruption, not an event (events are kilobytes)."""

    def __init__(self, path: Path, compact_floor: int = COMPACT_FLOOR):
        self.path = Path(path)
        self.compact_floor = compact_floor
        self.compact_at = compact_floor
        """The size at which `append` compacts the file next."""
        self.store: RunStore | None = None
        self._file = None
        self._lock = None

    def replay(self, store: RunStore) -> int:
        """Apply every recorded event to `store`, then compact the file; returns the events replayed. Opens the
        journal for `append`, which keeps it to the runs of `store`. JournalBusy when another karn keeps it: its
        compaction had swapped the file under the first, whose events from then on went to a deleted file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = lock_exclusively(self.path.with_name(self.path.name + ".lock"))
        if self._lock is None:
            raise JournalBusy(f"{self.path} is kept by another karn: give this one its own --journal")
        replayed = 0
        for event, _ in self._records():
            store.apply(event)
            replayed += 1
        self.store = store
        self._compact()
        return replayed

    def append(self, events: list) -> None:
        self._file.writelines(self._record(e) for e in events)
        self._file.flush()
        if self._file.tell() > self.compact_at:
            self._compact()

    def close(self) -> None:
        for held in (self._file, self._lock):
            if held is not None:
                held.close()

    def _compact(self) -> None:
        """Rewrite the file with the records of the store's runs, then append to the new one."""
        if self._file is not None:
            self._file.close()
        # Durably: a rename not yet on disk at a power cut could have left an empty journal for the whole one.
        write_durably(self.path, lambda f: f.writelines(record for event, record in self._records()
                                                         if event.run_id in self.store.runs))
        self._file = self.path.open("ab")
        self.compact_at = max(self.compact_floor, 2 * self._file.tell())

    def _record(self, event: TelemetryEvent) -> bytes:
        data = event.SerializeToString()
        return self.SIZE.pack(len(data)) + data

    def _records(self) -> Iterator[tuple[TelemetryEvent, bytes]]:
        """Each whole record of the file in order, as (event, the record's bytes), up to the first torn or
        corrupt one."""
        if not self.path.is_file():
            return
        with self.path.open("rb") as f:
            while len(header := f.read(self.SIZE.size)) == self.SIZE.size:
                (size,) = self.SIZE.unpack(header)
                if size > self.MAX_RECORD or len(data := f.read(size)) < size:
                    return
                try:
                    event = TelemetryEvent.FromString(data)
                except DecodeError:
                    return
                yield event, header + data
