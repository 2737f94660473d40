"""The analytics store: finished (or partial) runs in one SQLite file, built from their telemetry.

Everything is derived from leyline TelemetryEvents (a run directory's `telemetry.jsonl`, or any JSONL
of events), never from `summary.json`: runs recorded by a stack's worker and runs from `esper train`
are indexed the same way. A file may hold several runs (a PPO run directory holds every episode under
`<run>_ep<i>`); each run id is one row. Indexing a run again replaces it, so `esper runs index` may be
rerun over the same folders.

A seed's *contribution* here is the last one measured for it (the value its fossilize or cull decision
saw); "mean contribution" per blueprint and slot is the mean of those over the seeds that had one.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from esper.leyline import Blueprint, SeedStage, TelemetryEvent, short_name
from esper.nissa import read_jsonl

S = SeedStage
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    source TEXT NOT NULL,            -- the file the events came from
    mode TEXT, task TEXT, seed INTEGER, device TEXT,
    epochs INTEGER, max_epochs INTEGER,
    val_accuracy REAL, best_val_accuracy REAL, test_accuracy REAL,   -- percent; test only once finished
    val_loss REAL, test_loss REAL,   -- mean cross-entropy: a language model's measure (its perplexity is exp)
    host_params INTEGER, total_params INTEGER,
    wall_seconds REAL,
    finished INTEGER NOT NULL,       -- 1 when a RunFinished was recorded
    governor_rollbacks INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS epochs (
    run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    epoch INTEGER NOT NULL,
    train_loss REAL, train_accuracy REAL, val_loss REAL, val_accuracy REAL, total_params INTEGER,
    PRIMARY KEY (run_id, epoch)
);
CREATE TABLE IF NOT EXISTS seeds (
    run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    seed_id INTEGER NOT NULL,
    slot TEXT NOT NULL,
    blueprint TEXT NOT NULL,
    germinated_epoch INTEGER,
    fate TEXT NOT NULL,              -- fossilized | culled | live (still growing when the run ended) | grafted
    end_epoch INTEGER,               -- epoch its fate was decided (its last move while live)
    contribution REAL,               -- last measured, percentage points; NULL when never measured
    contribution_se REAL,
    PRIMARY KEY (run_id, seed_id)
);
"""
ADDED_RUN_COLUMNS = ("val_loss", "test_loss")
"""Columns of `runs` younger than the store format: added to an older store as it is opened."""
FATES = {S.SEED_STAGE_FOSSILIZED: "fossilized", S.SEED_STAGE_CULLED: "culled", S.SEED_STAGE_EMBARGOED: "culled",
         S.SEED_STAGE_DORMANT: "culled"}


@dataclass
class _Seed:
    slot: str
    blueprint: str
    germinated_epoch: int | None
    fate: str = "live"
    end_epoch: int = 0
    contribution: float | None = None
    contribution_se: float | None = None


@dataclass
class _Run:
    """One run folded from its events, ready to write."""

    run_id: str
    source: str
    row: dict = field(default_factory=dict)
    epochs: dict = field(default_factory=dict)
    seeds: dict[int, _Seed] = field(default_factory=dict)
    rollbacks: int = 0

    def apply(self, event: TelemetryEvent) -> None:
        kind = event.WhichOneof("payload")
        if kind == "run_started":
            s = event.run_started
            self.row.update(mode=s.mode, task=s.task, seed=s.seed, device=s.device)
        elif kind == "epoch":
            sig = event.epoch.signals
            self.epochs[sig.epoch] = (sig.train_loss, sig.train_accuracy, sig.val_loss, sig.val_accuracy,
                                      sig.total_params)
            self.row.update(epochs=sig.epoch, max_epochs=sig.max_epochs, val_accuracy=sig.val_accuracy,
                            val_loss=sig.val_loss,
                            best_val_accuracy=sig.best_val_accuracy, host_params=sig.host_params,
                            total_params=sig.total_params)
            for slot in event.epoch.slots:
                seed = self.seeds.get(slot.seed_id)
                if seed is not None and slot.has_contribution:
                    seed.contribution, seed.contribution_se = slot.contribution, slot.contribution_se
        elif kind == "transition":
            t = event.transition
            if t.from_stage == S.SEED_STAGE_DORMANT and t.seed_id:
                # Germinated, or grafted (straight to FOSSILIZED before epoch 1: host structure, not growth).
                grafted = t.to_stage == S.SEED_STAGE_FOSSILIZED
                self.seeds[t.seed_id] = _Seed(t.slot, short_name(Blueprint, t.blueprint),
                                              None if grafted else t.epoch, "grafted" if grafted else "live", t.epoch)
            seed = self.seeds.get(t.seed_id)
            if seed is not None and seed.fate == "live":  # None: the file starts mid-run, after it germinated
                seed.fate = FATES.get(t.to_stage, "live")  # decided once: a cull's embargo moves change nothing
                seed.end_epoch = t.epoch
        elif kind == "governor":
            self.rollbacks += 1
        elif kind == "run_finished":
            f = event.run_finished
            self.row.update(val_accuracy=f.val_accuracy,
                            test_accuracy=f.test_accuracy if f.HasField("test_accuracy") else None,
                            test_loss=f.test_loss if f.HasField("test_loss") else None,
                            total_params=f.total_params, wall_seconds=f.wall_seconds, epochs=f.epochs)
            self.row["finished"] = 1


def telemetry_files(folder: Path) -> list[Path]:
    """Every telemetry.jsonl under `folder`, at any depth, through symlinked folders too (each real folder
    once: a link loop ends)."""
    seen, found = set(), []
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        if "telemetry.jsonl" in names:
            found.append(Path(root) / "telemetry.jsonl")
    return sorted(found)


class StoreError(ValueError):
    """A path that cannot hold the store (a file that is not SQLite, a folder, a file on the way to it):
    one line for the user, found before a run trains, not after."""


def foreign(conn: sqlite3.Connection, path) -> str | None:
    """Why the database `conn` has open is another program's, not a run store (it has tables, and no runs
    table with a run_id), or None. Such a file is neither read nor given esper's tables: it had been altered."""
    tables = sorted(row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
    if tables and "run_id" not in {row[1] for row in conn.execute("PRAGMA table_info(runs)")}:
        return f"{path} is another SQLite database, not a run store (its tables: {', '.join(tables)})"
    return None


class RunsDB:
    """The store over one SQLite file (":memory:" works too)."""

    def __init__(self, path: str | Path):
        try:
            if str(path) != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            # Runs of `esper compare` record themselves from parallel processes: a writer waits its turn
            # (each write is one short transaction) rather than failing on "database is locked".
            self.conn = sqlite3.connect(str(path), timeout=60)
            self.conn.row_factory = sqlite3.Row
            self.conn.execute("PRAGMA foreign_keys = ON")
            if why := foreign(self.conn, path):
                raise StoreError(why)
            self.conn.executescript(SCHEMA)
            have = {row["name"] for row in self.conn.execute("PRAGMA table_info(runs)")}
            self.unadded: list[str] = []
            """ADDED_RUN_COLUMNS a read-only older store lacks: read as NULL."""
            for column in ADDED_RUN_COLUMNS:  # a store made before them: its rows read NULL there until reindexed
                if column not in have:
                    try:
                        self.conn.execute(f"ALTER TABLE runs ADD COLUMN {column} REAL")
                    except sqlite3.OperationalError as exc:
                        if "readonly" in str(exc):  # listed and reported all the same
                            self.unadded.append(column)
                        elif "duplicate column" not in str(exc):  # a comparison's other run added it first
                            raise
        except (OSError, sqlite3.DatabaseError) as exc:  # OperationalError (a folder) is a DatabaseError
            raise StoreError(f"{path} cannot be a run store: {exc}") from None

    def close(self) -> None:
        self.conn.close()

    def index_events(self, events: Iterable[TelemetryEvent], source: str) -> list[str]:
        """Fold events into runs and (re)write them; returns the run ids written. PPO updates are not
        runs of a network: they are skipped. Of events with the same sequence number in a run the last is
        kept: a --telemetry-file shared across a kill and a resume (or a restart from the first epoch) holds
        the abandoned branch's events, then the ones that stand (a governor rollback had counted twice)."""
        by_run: dict[str, dict[int, TelemetryEvent]] = {}
        for event in events:
            if not event.HasField("ppo_update"):
                by_run.setdefault(event.run_id, {})[event.sequence] = event
        runs: dict[str, _Run] = {}
        for run_id, by_sequence in by_run.items():
            run = runs[run_id] = _Run(run_id, source)
            for sequence in sorted(by_sequence):
                run.apply(by_sequence[sequence])
        with self.conn:
            for run in runs.values():
                self._write(run)
        return list(runs)

    def index_path(self, path: Path) -> list[str]:
        """A JSONL file, or a folder: every run directory's telemetry.jsonl at any depth under it (a run
        directory itself, a --runs-dir with {seed} folders, a comparison's folder)."""
        if path.is_file():
            return self.index_events(read_jsonl(path), str(path))
        files = telemetry_files(path)
        if not files:
            raise FileNotFoundError(f"{path}: no telemetry.jsonl in it or in the folders under it")
        return [run_id for f in files for run_id in self.index_events(read_jsonl(f), str(f))]

    def _write(self, run: _Run) -> None:
        self.conn.execute("DELETE FROM runs WHERE run_id = ?", (run.run_id,))
        row = {"run_id": run.run_id, "source": run.source, "finished": 0, "governor_rollbacks": run.rollbacks,
               **run.row}
        self.conn.execute(f"INSERT INTO runs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                          tuple(row.values()))
        self.conn.executemany("INSERT INTO epochs VALUES (?, ?, ?, ?, ?, ?, ?)",
                              [(run.run_id, e, *values) for e, values in sorted(run.epochs.items())])
        self.conn.executemany("INSERT INTO seeds VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", [
            (run.run_id, seed_id, s.slot, s.blueprint, s.germinated_epoch, s.fate, s.end_epoch, s.contribution,
             s.contribution_se) for seed_id, s in sorted(run.seeds.items())])

    def forget(self, run_ids: list[str]) -> None:
        """Drop these runs (their epochs and seeds with them): runs whose folders are gone, as a resumed
        comparison's that it trains again."""
        where, args = _among(run_ids)
        with self.conn:
            self.conn.execute(f"DELETE FROM runs {where}", args)

    # Queries. `run_ids` narrows any of them to some runs; None means every run.

    def runs(self, run_ids: list[str] | None = None) -> list[sqlite3.Row]:
        where, args = _among(run_ids)
        missing = "".join(f", NULL AS {column}" for column in self.unadded)
        return self.conn.execute(f"SELECT *{missing} FROM runs {where} ORDER BY run_id", args).fetchall()

    def seeds(self, run_id: str) -> list[sqlite3.Row]:
        return self.conn.execute("SELECT * FROM seeds WHERE run_id = ? ORDER BY seed_id", (run_id,)).fetchall()

    def curve(self, run_id: str) -> list[sqlite3.Row]:
        return self.conn.execute("SELECT * FROM epochs WHERE run_id = ? ORDER BY epoch", (run_id,)).fetchall()

    def blueprint_stats(self, run_ids: list[str] | None = None) -> list[sqlite3.Row]:
        """Per blueprint and slot: seeds germinated, fossilized, culled, still live, and the mean of
        their last measured contributions (NULL when none was measured); grafted seeds (from-scratch
        runs' built-in architecture) apart, counted in no fate of growth."""
        where, args = _among(run_ids)
        return self.conn.execute(f"""
            SELECT blueprint, slot, SUM(fate != 'grafted') AS germinated,
                   SUM(fate = 'fossilized') AS fossilized, SUM(fate = 'culled') AS culled,
                   SUM(fate = 'live') AS live, SUM(fate = 'grafted') AS grafted,
                   AVG(contribution) AS mean_contribution
            FROM seeds {where} GROUP BY blueprint, slot ORDER BY blueprint, slot""", args).fetchall()

    def accuracy_vs_params(self, run_ids: list[str] | None = None) -> list[sqlite3.Row]:
        """Per run: final parameters against validation and test accuracy, fewest parameters first."""
        where, args = _among(run_ids)
        return self.conn.execute(f"""
            SELECT run_id, mode, task, total_params, host_params, val_accuracy, test_accuracy
            FROM runs {where} ORDER BY total_params, run_id""", args).fetchall()


def _among(run_ids: list[str] | None) -> tuple[str, tuple]:
    if run_ids is None:
        return "", ()
    return f"WHERE run_id IN ({', '.join('?' * len(run_ids))})", tuple(run_ids)
