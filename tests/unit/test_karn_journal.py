"""karn's event journal: the run store survives a restart, a torn last record is cut off, and
compaction (at start, and while running whenever the file has doubled) keeps only the runs the store
keeps, which are the runs that reported last."""

import tracemalloc

import pytest

from support import recorded_syncs

from esper.karn import store as karn_store
from esper.karn.store import EventJournal, RunStore
from esper.leyline import EpochReport, TelemetryEvent, TrainingSignals


def epoch_event(run_id: str, sequence: int) -> TelemetryEvent:
    event = TelemetryEvent(run_id=run_id, sequence=sequence)
    event.epoch.CopyFrom(EpochReport(signals=TrainingSignals(epoch=sequence, val_accuracy=50.0 + sequence)))
    return event


def test_a_restarted_store_holds_every_event_once(tmp_path):
    path = tmp_path / "karn" / "events.binpb"
    journal = EventJournal(path)
    store = RunStore()
    assert journal.replay(store) == 0
    events = [epoch_event("run", s) for s in range(1, 11)]
    journal.append([e for e in events if store.apply(e)])
    journal.append([e for e in events[:5] if store.apply(e)])  # a snapshot overlap: nothing new
    journal.close()
    with path.open("ab") as f:  # a record cut short by a crash mid-write
        f.write(EventJournal.SIZE.pack(100) + b"\x08\x01")

    again = RunStore()
    replayed = EventJournal(path).replay(again)
    run = again.runs["run"]
    print(f"replayed {replayed} events; epochs {sorted(run.epochs)}; lost {run.lost}")
    assert replayed == 10
    assert sorted(run.epochs) == list(range(1, 11)) and run.lost == 0 and again.duplicates == 0
    assert run.epochs[7].signals.val_accuracy == 57.0
    assert path.stat().st_size == sum(len(EventJournal(path)._record(e)) for e in events)  # the torn tail is gone


@pytest.mark.parametrize("corrupt", ["past MAX_RECORD", "not an event"])
def test_a_corrupt_record_ends_the_replay_and_is_cut_off(corrupt, tmp_path, monkeypatch):
    """A size past MAX_RECORD is corruption, not an event (one of 4 GB had been read: MemoryError at karn's
    start); a record that does not parse ends the replay too, whole records after it included."""
    path = tmp_path / "events.binpb"
    journal = EventJournal(path)
    journal.replay(RunStore())
    journal.append([epoch_event("run", 1), epoch_event("run", 2)])
    journal.close()
    whole = path.stat().st_size
    after = epoch_event("run", 3)
    if corrupt == "past MAX_RECORD":  # a whole event, but larger than a record may be: here, than the others
        monkeypatch.setattr(EventJournal, "MAX_RECORD", len(epoch_event("run", 2).SerializeToString()))
        after.run_started.task = "x" * 100
        bad = b""
    else:
        bad = EventJournal.SIZE.pack(4) + b"\xff\xff\xff\xff"
    with path.open("ab") as f:
        f.write(bad + EventJournal(path)._record(after) + EventJournal(path)._record(epoch_event("run", 4)))
    store = RunStore()
    assert EventJournal(path).replay(store) == 2 and sorted(store.runs["run"].epochs) == [1, 2]
    assert path.stat().st_size == whole


def test_the_journal_keeps_only_the_runs_the_store_keeps(tmp_path):
    path = tmp_path / "events.binpb"
    journal = EventJournal(path)
    journal.replay(RunStore(max_runs=2))
    journal.append([epoch_event(f"run{i}", 1) for i in range(3)])
    journal.close()
    store = RunStore(max_runs=2)
    assert EventJournal(path).replay(store) == 3
    assert list(store.runs) == ["run1", "run2"]
    assert EventJournal(path).replay(RunStore()) == 2  # compacted on the previous start


def test_the_compacted_journal_is_on_disk_before_it_replaces_the_old_one(tmp_path):
    """The rewrite at start replaces the only copy of every run: fsynced before its rename and the directory
    after it, a power cut leaves the old journal or the new one, never an empty file in their place."""
    tmp_path = tmp_path.resolve()  # as /proc/self/fd names it
    path = tmp_path / "events.binpb"
    journal = EventJournal(path)
    journal.replay(RunStore())
    journal.append([epoch_event("run", 1)])
    journal.close()
    with recorded_syncs() as calls:
        EventJournal(path).replay(RunStore())
    assert calls == [("fsync", f"{path}.tmp"), ("replace", str(path)), ("fsync", str(tmp_path))]


def test_a_run_that_keeps_reporting_is_kept_past_max_runs():
    """A PPO run starts before its episodes and reports (updates) after each round of them: past max_runs the
    store forgets the run that reported least recently, not the one created first, which had made the live
    PPO run a new, empty record with every earlier event counted lost."""
    store = RunStore(max_runs=3)
    store.apply(epoch_event("ppo", 1))
    for episode in range(6):
        store.apply(epoch_event(f"ppo_ep{episode}", 1))
        store.apply(epoch_event("ppo", episode + 2))
    assert list(store.runs) == ["ppo_ep4", "ppo_ep5", "ppo"]
    assert store.runs["ppo"].lost == 0 and sorted(store.runs["ppo"].epochs) == list(range(1, 8))


def test_a_duplicate_does_not_make_a_run_recent(tmp_path):
    """Only applied events (the journaled ones) order the runs: a snapshot's duplicate moving its run up had
    made the store after a restart (replaying the journal) keep other runs than the live one, and compaction
    then delete the events of the run it should have kept."""
    journal = EventJournal(tmp_path / "events.binpb")
    live = RunStore(max_runs=2)
    journal.replay(live)
    for event in (epoch_event("A", 1), epoch_event("B", 1), epoch_event("A", 1), epoch_event("C", 1)):
        if live.apply(event):
            journal.append([event])
    journal.close()
    restarted = RunStore(max_runs=2)
    EventJournal(tmp_path / "events.binpb").replay(restarted)
    assert list(live.runs) == list(restarted.runs) == ["B", "C"]


def test_a_run_flooded_with_epochs_keeps_its_last_max_epochs(monkeypatch):
    """A peer sending one run ever more epochs cannot grow karn's memory without bound: past MAX_EPOCHS (5
    here) each new epoch forgets the first one reported; a re-reported epoch (a governor rollback) replaces
    its report where it stands."""
    monkeypatch.setattr(karn_store, "MAX_EPOCHS", 5)
    store = RunStore()
    for sequence in range(1, 9):
        store.apply(epoch_event("flood", sequence))
    run = store.runs["flood"]
    assert list(run.epochs) == [4, 5, 6, 7, 8] and run.last_epoch.signals.epoch == 8 and run.lost == 0
    rollback = epoch_event("flood", 9)
    rollback.epoch.signals.epoch = 6
    store.apply(rollback)
    assert list(run.epochs) == [4, 5, 6, 7, 8] and run.epochs[6].signals.val_accuracy == 59.0


def test_a_sequence_past_any_a_run_could_reach_is_dropped_and_counted():
    """One event at sequence 2**64-1 (a corrupt or hostile peer's) had been taken: 1.8e19 events counted lost,
    and every later event of the run dropped as a duplicate, for good (it was journaled). It is dropped, counted
    on /metrics, and the run goes on; a gap of MAX_SEQUENCE_GAP (events a restart missed) is still taken."""
    from prometheus_client import CollectorRegistry, generate_latest

    from esper.karn import RunStoreCollector

    def at(run_id: str, sequence: int) -> TelemetryEvent:  # an epoch's report, whatever its number
        event = epoch_event(run_id, 1)
        event.sequence = sequence
        return event

    store = RunStore()
    assert store.apply(at("victim", 1))
    assert not store.apply(at("victim", 2**64 - 1))
    assert not store.apply(at("stranger", 2**63))  # a run first heard of so: not made either
    assert all(store.apply(at("victim", sequence)) for sequence in (2, 3))
    assert store.apply(at("victim", 3 + karn_store.MAX_SEQUENCE_GAP))
    run = store.runs["victim"]
    assert not store.apply(at("victim", 2))
    assert list(store.runs) == ["victim"] and run.lost == karn_store.MAX_SEQUENCE_GAP - 1 and store.duplicates == 1
    registry = CollectorRegistry()
    registry.register(RunStoreCollector(store))
    assert "esper_karn_events_implausible_total 2.0" in generate_latest(registry).decode()


def test_a_running_journal_keeps_to_the_runs_the_store_keeps(tmp_path):
    """karn watching run after run (a PPO campaign's episodes) had journaled every event of every run until its
    next start. Compacted whenever it doubles (from a floor of 2,000 bytes here), the file stays under the
    floor plus a batch while 200 runs come and go, and a restart replays into the live store's runs."""
    path = tmp_path / "events.binpb"
    journal = EventJournal(path, compact_floor=2000)
    live = RunStore(max_runs=2)
    journal.replay(live)
    sizes = []
    for run in range(200):
        journal.append([e for e in (epoch_event(f"run{run}", s) for s in range(1, 6)) if live.apply(e)])
        sizes.append(path.stat().st_size)
    journal.close()
    batch = sum(len(journal._record(epoch_event("run199", s))) for s in range(1, 6))
    print(f"largest journal {max(sizes)} bytes (a run's batch {batch}); last {sizes[-1]}")
    assert max(sizes) <= 2000 + batch
    restarted = RunStore(max_runs=2)
    EventJournal(path).replay(restarted)
    assert path.stat().st_size == 2 * batch  # compacted at the start to the two runs
    assert list(restarted.runs) == list(live.runs) == ["run198", "run199"]
    for run_id, run in live.runs.items():
        again = restarted.runs[run_id]
        assert (again.epochs, again.last_sequence, again.lost) == (run.epochs, run.last_sequence, run.lost)
        assert (sorted(run.epochs), run.last_sequence, run.lost) == ([1, 2, 3, 4, 5], 5, 0)


def test_a_journal_past_its_floor_is_compacted_when_it_doubles_not_at_every_append(tmp_path, monkeypatch):
    """A store of runs that all stay (one long run): each compaction rewrites and fsyncs the whole file, so the
    next waits until the file has doubled; compacting at every append past the floor (a mutation that survived)
    is quadratic work. 400 epochs in batches of one: about log2(size / floor) compactions, not hundreds."""
    path = tmp_path / "events.binpb"
    journal = EventJournal(path, compact_floor=1000)
    store = RunStore()
    journal.replay(store)
    compactions = []
    compact = journal._compact
    monkeypatch.setattr(journal, "_compact", lambda: compactions.append(path.stat().st_size) or compact())
    for sequence in range(1, 401):
        event = epoch_event("long", sequence)
        journal.append([event] if store.apply(event) else [])
    journal.close()
    print(f"compacted at sizes {compactions} of a final {path.stat().st_size}")
    assert 3 <= len(compactions) <= 8
    assert all(b > 1.9 * a for a, b in zip(compactions, compactions[1:]))


def test_replay_reads_the_journal_a_record_at_a_time(tmp_path):
    """A start had read the whole file into memory, then parsed every event into a list: a journal of runs the
    store forgot long ago cost its size several times over. 20 MB of them now replay within 1 MB of Python
    allocations (what tracemalloc sees: the bytes read and the store's records)."""
    path = tmp_path / "events.binpb"
    journal_bytes = 20_000_000
    event = epoch_event("x" * 1000, 1)  # a kilobyte, as a real epoch report is
    writer = EventJournal(path)
    records = journal_bytes // len(writer._record(event))
    with path.open("wb") as f:
        for run in range(records):
            event.run_id = f"{run:07d}" + "x" * 993
            f.write(writer._record(event))
    tracemalloc.start()
    try:
        store = RunStore(max_runs=2)
        replayed = EventJournal(path).replay(store)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"replayed {replayed} events of a {journal_bytes / 1e6:.0f} MB journal: peak {peak / 1e6:.2f} MB traced")
    assert replayed == records and len(store.runs) == 2
    assert peak < 1_000_000


def test_events_of_a_newer_build_are_counted_as_unknown_and_every_scrape_still_answers(tmp_path):
    """proto3 enums and oneofs are open: a journal a newer karn wrote (a payload kind this build lacks), or a
    worker of a newer build (a stage, blueprint or operation it lacks), reaches the store. A payload-less
    event had been counted under kind None, and every later scrape of /metrics failed on that label."""
    from prometheus_client import CollectorRegistry, generate_latest

    from esper.karn import RunStoreCollector
    from esper.leyline import Action, Decision, SlotState

    store = RunStore(max_runs=4)
    newer = epoch_event("r", 1)
    newer.epoch.slots.append(SlotState(slot="mid", stage=99, blueprint=77))
    for event in (newer, TelemetryEvent(run_id="r", sequence=2),
                  TelemetryEvent(run_id="r", sequence=3, decision=Decision(action=Action(operation=42)))):
        assert store.apply(event)
    registry = CollectorRegistry()
    registry.register(RunStoreCollector(store))
    scraped = generate_latest(registry).decode()
    assert 'esper_karn_events_received_total{kind="unknown"} 1.0' in scraped
    assert 'esper_run_seeds{run_id="r",stage="unknown"} 1.0' in scraped
    assert 'esper_run_decisions_total{operation="unknown",run_id="r"} 1.0' in scraped


def test_a_second_karn_on_one_journal_is_refused_and_the_first_loses_nothing(tmp_path, caplog):
    """A second karn's replay compacted (swapped) the file under the first, whose appends from then on went to
    a deleted file: a restart replayed 2 of 4 events. The journal is held (flock) from replay to close."""
    from services.karn.__main__ import main as karn_main

    path = tmp_path / "events.binpb"
    first = EventJournal(path)
    first.replay(RunStore())
    first.append([epoch_event("r", 1), epoch_event("r", 2)])
    with pytest.raises(karn_store.JournalBusy):
        EventJournal(path).replay(RunStore())
    assert karn_main(["--journal", str(path), "--metrics-port", "-1"]) == 2
    assert f"{path} is kept by another karn" in caplog.text
    first.append([epoch_event("r", 3), epoch_event("r", 4)])
    first.close()
    assert EventJournal(path).replay(RunStore()) == 4
