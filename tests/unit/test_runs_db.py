"""The analytics store answers its queries for runs made here: two tiny heuristic runs and a static
one on the synthetic task, recorded by `esper train`'s own code, indexed from their run directories."""

from __future__ import annotations

import io
import json
import random
import shutil
import sqlite3
import time
from collections import Counter

import pytest
import torch
from rich.console import Console

from esper.cli import main
from esper.experiment import RunConfig, run
from esper.karn.runs_db import RunsDB
from esper.leyline import (Blueprint, EpochReport, GovernorEvent, LifecycleTransition, RunFinished, RunStarted,
                           SeedStage, SlotState, TelemetryEvent, TrainingSignals, from_short_name)
from esper.nissa import new_run_id
from esper.simic import EnvConfig
from esper.tamiyo import HeuristicConfig
from esper.tolaria.trainer import TrainConfig

ENV = EnvConfig(task="synthetic", max_epochs=14, slots=("early", "mid", "late"), train=TrainConfig(max_batches=5))
EAGER = HeuristicConfig(min_epoch_to_germinate=3, plateau_patience=2)


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    torch.set_num_threads(1)  # a module fixture runs before conftest's per-test thread setting
    out = tmp_path_factory.mktemp("runs")
    quiet = Console(file=io.StringIO())
    run(RunConfig(mode="heuristic", env=ENV, heuristic=EAGER, episodes=2, seed=2, runs_dir=str(out)), quiet)
    run(RunConfig(mode="static", env=ENV, seed=2, runs_dir=str(out)), quiet)
    return out


def summaries(runs_dir) -> dict[str, dict]:
    return {s["run_id"]: s for s in (json.loads(p.read_text()) for p in runs_dir.glob("*/summary.json"))}


def test_store_matches_what_the_runs_recorded(runs_dir):
    db = RunsDB(":memory:")
    run_ids = db.index_path(runs_dir)
    expected = summaries(runs_dir)
    assert sorted(run_ids) == sorted(expected)
    for row in db.runs():
        s = expected[row["run_id"]]
        assert row["finished"] == 1 and row["mode"] == s["mode"] and row["epochs"] == 14
        assert row["total_params"] == s["total_params"]
        assert row["test_accuracy"] == pytest.approx(s["test_accuracy"])
        assert [c["epoch"] for c in db.curve(row["run_id"])] == list(range(1, 15))
        # Seed fates from the telemetry agree with the model's own records.
        fates = {r["seed_id"]: ("live" if r["fate"] not in ("fossilized", "culled") else r["fate"]) for r in s["seeds"]}
        assert {x["seed_id"]: x["fate"] for x in db.seeds(row["run_id"])} == fates

    # Per blueprint and slot: counts add up to the seeds of every run, and fossilized + culled + live = germinated.
    stats = db.blueprint_stats()
    all_seeds = [(r["blueprint"], r["slot"], r["fate"]) for s in expected.values() for r in s["seeds"]]
    assert sum(b["germinated"] for b in stats) == len(all_seeds) > 0
    assert Counter((b["blueprint"], b["slot"]) for b in stats) == Counter({(bp, sl): 1 for bp, sl, _ in all_seeds})
    assert all(b["fossilized"] + b["culled"] + b["live"] == b["germinated"] for b in stats)
    assert sum(b["fossilized"] for b in stats) == sum(f == "fossilized" for *_, f in all_seeds)

    # Accuracy against parameters: the static run has the fewest (the host alone).
    points = db.accuracy_vs_params()
    assert points[0]["mode"] == "static" and points[0]["total_params"] == points[0]["host_params"]


def test_a_seed_is_culled_at_its_cull_and_a_graft_is_no_growth():
    """Seed 1 is culled at epoch 5; its embargo's end (epoch 8) is not its fate's epoch. Seed 2 is grafted
    (DORMANT -> FOSSILIZED before epoch 1): host structure of a from-scratch run, counted in no fate of growth."""
    moves = [(1, "DORMANT", "GERMINATED", 1), (1, "GERMINATED", "TRAINING", 2), (1, "TRAINING", "CULLED", 5),
             (1, "CULLED", "EMBARGOED", 5), (1, "EMBARGOED", "DORMANT", 8), (2, "DORMANT", "FOSSILIZED", 0)]
    events = [TelemetryEvent(run_id="r", sequence=i + 1, transition=LifecycleTransition(
        slot="mid" if seed == 1 else "early", seed_id=seed, blueprint=Blueprint.BLUEPRINT_NORM,
        from_stage=from_short_name(SeedStage, a), to_stage=from_short_name(SeedStage, b), epoch=epoch))
        for i, (seed, a, b, epoch) in enumerate(moves)]
    db = RunsDB(":memory:")
    db.index_events(events, "test")
    seeds = {s["seed_id"]: (s["fate"], s["germinated_epoch"], s["end_epoch"]) for s in db.seeds("r")}
    assert seeds == {1: ("culled", 1, 5), 2: ("grafted", None, 0)}
    stats = {b["slot"]: (b["germinated"], b["fossilized"], b["culled"], b["grafted"]) for b in db.blueprint_stats()}
    assert stats == {"mid": (1, 0, 1, 0), "early": (0, 0, 0, 1)}


def test_a_seeds_contribution_is_its_last_measured_one_and_an_untested_run_has_no_test_accuracy():
    """An epoch that measured no contribution (has_contribution unset) leaves the seed's last measured one; a
    run that finished untested (a PPO training episode) stores NULL, not 0.0%."""
    def epoch(sequence: int, **contribution) -> TelemetryEvent:
        return TelemetryEvent(run_id="r", sequence=sequence, epoch=EpochReport(
            signals=TrainingSignals(epoch=sequence - 1, max_epochs=5),
            slots=[SlotState(slot="mid", seed_id=1, stage=SeedStage.SEED_STAGE_TRAINING, **contribution)]))

    germinated = TelemetryEvent(run_id="r", sequence=1, transition=LifecycleTransition(
        slot="mid", seed_id=1, blueprint=Blueprint.BLUEPRINT_NORM, from_stage=SeedStage.SEED_STAGE_DORMANT,
        to_stage=SeedStage.SEED_STAGE_GERMINATED, epoch=1))
    db = RunsDB(":memory:")
    db.index_events([germinated, epoch(2, has_contribution=True, contribution=2.5, contribution_se=0.5), epoch(3),
                     TelemetryEvent(run_id="r", sequence=4, run_finished=RunFinished(val_accuracy=40.0, epochs=3))],
                    "test")
    (seed,) = db.seeds("r")
    assert (seed["contribution"], seed["contribution_se"]) == (2.5, 0.5)
    (run,) = db.runs()
    assert run["test_accuracy"] is None and run["val_accuracy"] == 40.0


def test_events_a_resume_wrote_again_are_folded_once_the_last_standing(tmp_path):
    """A --telemetry-file shared across a kill and a resume holds the events after the checkpoint twice (a
    governor rollback among them had been counted twice); where the two differ (a GPU's resume, a restart from
    the first epoch), the later ones are the run's."""
    started = TelemetryEvent(run_id="r", sequence=1, run_started=RunStarted(task="synthetic"))
    rollback = TelemetryEvent(run_id="r", sequence=2, governor=GovernorEvent(epoch=3, cause="divergence"))
    db = RunsDB(tmp_path / "karn.db")
    db.index_events([started, rollback, rollback], "shared.jsonl")  # the resumed process emits sequence 2 again
    assert [r["governor_rollbacks"] for r in db.runs()] == [1]
    epoch = TelemetryEvent(run_id="r", sequence=2, epoch=EpochReport(signals=TrainingSignals(epoch=3, max_epochs=5)))
    db.index_events([started, rollback, started, epoch], "restarted.jsonl")  # begun again: no rollback then
    assert [r["governor_rollbacks"] for r in db.runs()] == [0]
    db.close()


def test_reindexing_replaces_rather_than_duplicates(runs_dir):
    db = RunsDB(":memory:")
    db.index_path(runs_dir)
    before = [tuple(r) for r in db.blueprint_stats()]
    db.index_path(runs_dir)
    assert [tuple(r) for r in db.blueprint_stats()] == before and len(db.runs()) == 3


def test_cli_index_list_show_compare_report(runs_dir, tmp_path, capsys):
    db = str(tmp_path / "karn.db")
    assert main(["runs", "index", str(runs_dir), "--db", db]) == 0
    assert "3 runs recorded" in capsys.readouterr().out
    assert main(["runs", "list", "--db", db]) == 0
    listed = capsys.readouterr().out
    heuristic = sorted(r for r in summaries(runs_dir) if "_heuristic_" in r)
    assert all(r in listed for r in summaries(runs_dir))
    assert main(["runs", "show", heuristic[0], "--db", db]) == 0
    assert "blueprint" in capsys.readouterr().out
    assert main(["runs", "compare", *heuristic, "--db", db]) == 0
    assert "mean contribution" in capsys.readouterr().out
    assert main(["runs", "show", "nope", "--db", db]) == 1
    typo = tmp_path / "no" / "such.db"  # a mistyped store is an error, not a new empty one
    assert main(["runs", "list", "--db", str(typo)]) == 2 and not typo.parent.exists()
    assert f"--db {typo}: no such store" in capsys.readouterr().err
    out = tmp_path / "report"
    assert main(["report", *heuristic, "--db", db, "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert heuristic[1] in text and "## Seeds by blueprint and slot" in text
    for png in ("val_accuracy.png", "accuracy_vs_params.png", "seed_fates.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_a_store_damaged_past_its_first_page_is_refused_in_one_line(runs_dir, tmp_path, capsys):
    """Its first page opens: `esper runs` had then failed in a traceback ("database disk image is malformed"),
    and `esper train --db` had trained into it. Both refuse it in one line now."""
    db = tmp_path / "karn.db"
    assert main(["runs", "index", str(runs_dir), "--db", str(db)]) == 0
    data = bytearray(db.read_bytes())
    assert len(data) > 8192
    data[4096:8192] = random.Random(0).randbytes(4096)  # the second page: the runs table's
    db.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["runs", "list", "--db", str(db)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"esper: error: --db {db} cannot be read: database disk image is malformed"], err
    assert main(["train", "static", "--task", "synthetic", "--max-epochs", "1", "--runs-dir", str(tmp_path / "runs"),
                 "--db", str(db)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"esper: error: --db {db} cannot be a run store: "), err
    assert not list((tmp_path / "runs").glob("*_s42"))  # refused before any run


def test_another_programs_sqlite_database_is_refused_and_left_as_it_was(tmp_path, capsys):
    """`esper runs list --db` on another program's SQLite file had refused it only after giving it esper's
    tables and columns, and `esper train --db` had trained, then altered it."""
    foreign = tmp_path / "foreign.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY, name TEXT)")
    conn.commit()
    conn.close()
    before = foreign.read_bytes()
    for argv in (["runs", "list"], ["train", "static", "--task", "synthetic", "--max-epochs", "1", "--runs-dir",
                                   str(tmp_path / "runs")]):
        assert main([*argv, "--db", str(foreign)]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"esper: error: --db {foreign} is another SQLite " \
            "database, not a run store (its tables: runs)", argv
    assert foreign.read_bytes() == before and not list((tmp_path / "runs").glob("*_s42"))


def test_a_comparisons_folder_indexes_its_runs_at_any_depth(runs_dir, tmp_path, capsys):
    """`esper compare` keeps runs at <out>/runs/<arm>/seed<N>/<run>/: its folder indexes whole, symlinked
    folders too (a loop of links ends), and a run named twice in `esper report` is one run."""
    for run_dir in runs_dir.glob("*/"):
        arm = "static" if "_static_" in run_dir.name else "heuristic"
        shutil.copytree(run_dir, tmp_path / "cmp" / "runs" / arm / "seed2" / run_dir.name)
    (tmp_path / "cmp" / "loop").symlink_to(tmp_path / "cmp")
    db = str(tmp_path / "karn.db")
    assert main(["runs", "index", str(tmp_path / "cmp"), "--db", db]) == 0
    assert "3 runs recorded" in capsys.readouterr().out
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "static").symlink_to(tmp_path / "cmp" / "runs" / "static", target_is_directory=True)
    assert main(["runs", "index", str(tmp_path / "links"), "--db", str(tmp_path / "links.db")]) == 0
    assert "1 run recorded" in capsys.readouterr().out
    (static,) = [r for r in summaries(runs_dir) if "_static_" in r]
    assert main(["report", static, static, "--db", db, "--out", str(tmp_path / "report")]) == 0
    assert "# Esper report: 1 run\n" in (tmp_path / "report" / "report.md").read_text()


def test_a_torn_last_line_is_left_out_and_a_corrupt_one_named(runs_dir, tmp_path, capsys):
    """A run killed mid-line (or still writing) leaves its last line cut short: its runs index without it,
    as JsonlSink promises. A line that is not an event elsewhere is one error naming the file and line, for
    `esper runs index` and `esper report` alike, and so is a folder with no telemetry."""
    source = next(runs_dir.glob("*_static_*/telemetry.jsonl"))
    lines = source.read_text().splitlines(keepends=True)
    torn = tmp_path / "torn" / "run" / "telemetry.jsonl"
    torn.parent.mkdir(parents=True)
    torn.write_text("".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])  # and a blank line
    db = str(tmp_path / "karn.db")
    assert main(["runs", "index", str(torn.parent.parent), "--db", db]) == 0
    assert "1 run recorded" in capsys.readouterr().out

    corrupt = tmp_path / "corrupt" / "telemetry.jsonl"
    corrupt.parent.mkdir()
    corrupt.write_text(lines[0] + "{not json\n" + "".join(lines[1:]))
    newer = tmp_path / "newer" / "telemetry.jsonl"  # a field this build lacks: protobuf's error lists every field
    newer.parent.mkdir()
    newer.write_text(lines[0] + json.dumps(json.loads(lines[1]) | {"fieldOfANewerBuild": 1}) + "\n")
    (tmp_path / "empty").mkdir()
    for argv, needle in ((["runs", "index", str(corrupt.parent)], f"{corrupt}:2: not a telemetry event"),
                         (["runs", "index", str(newer.parent)], f"{newer}:2: not a telemetry event"),
                         (["report", str(corrupt.parent)], f"{corrupt}:2: not a telemetry event"),
                         (["report", str(tmp_path / "empty")], "no telemetry.jsonl in it")):
        assert main([*argv, "--db", db]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("esper: error:") and needle in err[0], err
    # A file that is not text is named too (the error had been the codec's alone), and a store made only for an
    # index that failed is not left behind.
    binary = tmp_path / "binary" / "telemetry.jsonl"
    binary.parent.mkdir()
    binary.write_bytes(b"\x80\x81\n")
    assert main(["runs", "index", str(binary), "--db", str(tmp_path / "new.db")]) == 2
    assert capsys.readouterr().err == f"esper: error: {binary}: not a telemetry JSONL file (not UTF-8 text)\n"
    assert not (tmp_path / "new.db").exists()


def test_esper_train_records_its_runs_in_the_store(tmp_path, capsys):
    """Heuristic, static and PPO runs show in `esper runs list` (the store beside them, <runs-dir>/karn.db)
    without `esper runs index`; a run at --telemetry-level off has no telemetry to record and still ends well."""
    runs = tmp_path / "runs"
    tiny = ["--task", "synthetic", "--max-epochs", "2", "--max-batches", "2", "--slots", "mid", "--runs-dir", str(runs)]
    assert main(["train", "heuristic", *tiny, "--episodes", "2"]) == 0
    assert main(["train", "static", *tiny, "--telemetry-level", "off"]) == 0
    assert main(["train", "ppo", *tiny, "--n-envs", "2", "--episodes", "2", "--update-every", "1",
                 "--num-workers", "1"]) == 0
    capsys.readouterr()
    assert main(["runs", "list", "--db", str(runs / "karn.db")]) == 0
    listed = capsys.readouterr().out
    print(listed)
    made = sorted(p.name for p in runs.iterdir() if p.is_dir())
    heuristic = [m for m in made if "_heuristic_" in m]
    (ppo,) = [m for m in made if "_ppo_" in m]
    (static,) = [m for m in made if "_static_" in m]
    assert len(heuristic) == 2 and all(run_id in listed for run_id in heuristic)
    assert f"{ppo}_ep0000" in listed and f"{ppo}_ep0001" in listed
    assert static not in listed
    db = RunsDB(runs / "karn.db")
    try:
        # The PPO learner's own run (its RunStarted) is a row too, beside its episodes.
        assert sorted(r["run_id"] for r in db.runs()) == sorted([*heuristic, ppo, f"{ppo}_ep0000", f"{ppo}_ep0001"])
    finally:
        db.close()


def test_a_run_resumed_from_outside_its_runs_dir_is_recorded_where_it_lies(tmp_path, capsys):
    """`--resume A/RUN --runs-dir B` continues RUN in A and the episodes after it in B; the store (B's) had
    looked for RUN in B, warned that it could not record it, and left it out."""
    tiny = ["--task", "synthetic", "--max-epochs", "2", "--max-batches", "2", "--slots", "mid", "--episodes", "2"]
    assert main(["train", "heuristic", *tiny, "--runs-dir", str(tmp_path / "a")]) == 0
    first, second = sorted((tmp_path / "a").glob("*/summary.json"))
    first.unlink()  # as if stopped in its last epoch (a finished run drops its checkpoint: it starts again)
    second.parent.rename(tmp_path / "elsewhere")  # the episode after it is trained again, in B
    capsys.readouterr()
    assert main(["train", "heuristic", *tiny, "--runs-dir", str(tmp_path / "b"), "--resume", str(first.parent)]) == 0
    assert "warning" not in capsys.readouterr().err
    (again,) = (tmp_path / "b").glob("*/summary.json")
    db = RunsDB(tmp_path / "b" / "karn.db")
    try:
        assert sorted(r["run_id"] for r in db.runs()) == sorted([first.parent.name, again.parent.name])
    finally:
        db.close()


def test_runs_of_one_name_started_in_the_same_second_get_different_ids_in_start_order(monkeypatch):
    """Run ids once ended at the second: two runs started in one second were one run to karn (and a CI
    failure of the resume test, whose cut and straight runs shared an id)."""
    clock = iter([1_800_000_000.25, 1_800_000_000.75])
    monkeypatch.setattr(time, "time", lambda: next(clock))
    first, second = new_run_id("static_cifar10_s0"), new_run_id("static_cifar10_s0")
    assert first != second and sorted([second, first]) == [first, second]
    assert first.endswith(".250000_static_cifar10_s0") and second.endswith(".750000_static_cifar10_s0")


def test_a_runs_losses_reach_the_store_and_its_tables_and_an_older_store_gains_their_columns(tmp_path):
    """A language model is judged by its loss, and the store had kept accuracies only (RunFinished had no test
    loss): `esper runs list` showed a tinystories run as 3.93% test accuracy and nothing else. A store made
    before the loss columns is given them as it is opened, its rows NULL there until indexed again."""
    import sqlite3

    from esper.karn.report import runs_table
    from esper.karn.runs_db import SCHEMA

    old = tmp_path / "old.db"
    conn = sqlite3.connect(old)
    conn.executescript("\n".join(line for line in SCHEMA.splitlines() if "val_loss REAL, test_loss REAL" not in line))
    conn.execute("INSERT INTO runs (run_id, source, finished, governor_rollbacks) VALUES ('before', 'x', 0, 0)")
    conn.commit()
    conn.close()
    events = [TelemetryEvent(run_id="lm", sequence=1, run_started=RunStarted(mode="static", task="tinystories")),
              TelemetryEvent(run_id="lm", sequence=2, epoch=EpochReport(signals=TrainingSignals(
                  epoch=1, max_epochs=1, val_accuracy=3.98, val_loss=7.173))),
              TelemetryEvent(run_id="lm", sequence=3, run_finished=RunFinished(
                  val_accuracy=3.98, test_accuracy=3.93, test_loss=6.978, epochs=1))]
    db = RunsDB(old)
    try:
        db.index_events(events, "lm.jsonl")
        rows = {r["run_id"]: r for r in db.runs()}
        assert rows["before"]["val_loss"] is None and rows["before"]["test_loss"] is None
        assert rows["lm"]["val_loss"] == pytest.approx(7.173) and rows["lm"]["test_loss"] == pytest.approx(6.978)
        header, (row,) = runs_table(db, ["lm"])
        shown = dict(zip(header, row, strict=True))
        assert (shown["test %"], shown["val loss"], shown["test loss"]) == ("3.93", "7.173", "6.978")
    finally:
        db.close()


def test_an_older_store_that_is_read_only_is_listed_with_its_losses_unknown(tmp_path, monkeypatch):
    """Opening an older store adds the loss columns; a store SQLite may only read (here opened mode=ro) had
    then been refused outright, `esper runs list` and `esper report` with it."""
    import sqlite3

    from esper.karn import runs_db
    from esper.karn.report import runs_table

    old = tmp_path / "old.db"
    conn = sqlite3.connect(old)
    conn.executescript("\n".join(line for line in runs_db.SCHEMA.splitlines() if "val_loss REAL" not in line))
    conn.execute("INSERT INTO runs (run_id, source, finished, governor_rollbacks, test_accuracy) "
                 "VALUES ('before', 'x', 1, 0, 61.5)")
    conn.commit()
    conn.close()
    connect = sqlite3.connect
    monkeypatch.setattr(runs_db.sqlite3, "connect",
                        lambda path, timeout: connect(f"file:{path}?mode=ro", uri=True, timeout=timeout))
    db = runs_db.RunsDB(old)
    try:
        header, (row,) = runs_table(db, ["before"])
        shown = dict(zip(header, row, strict=True))
        assert (shown["test %"], shown["val loss"], shown["test loss"]) == ("61.50", "-", "-")
    finally:
        db.close()
