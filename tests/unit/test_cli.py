"""The command line: runs write a complete run directory; bad input fails in one line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from esper.cli import UsageError, build_parser, check_resume, main, train_config
from esper.karn.runs_db import RunsDB
from esper.kasmina import MorphogeneticModel, build_host, load_exported
from esper.leyline import Blueprint
from esper.nissa import read_jsonl
from esper.tolaria.data import load_task_data


@pytest.mark.parametrize("argv, needle", [
    (["train", "heuristic", "--slots", "middle"], "--slots: unknown middle"),
    (["train", "heuristic", "--max-epochs", "0"], "--max-epochs must be >= 1"),
    (["train", "static", "--max-batches", "-1"], "--max-batches must be >= 0"),
    (["train", "heuristic", "--task", "imagenet"], "invalid choice: 'imagenet'"),
    (["train", "heuristic", "--telemetry-level", "off", "--telemetry-file", "x.jsonl"], "--telemetry-level"),
    (["train", "heuristic", "--slots", "mid", "mid"], "listed twice"),
    (["train", "heuristic", "--bogus"], "unrecognized arguments: --bogus"),
    (["train", "static", "--precision", "fp16"], "invalid choice: 'fp16'"),
    (["train", "static", "--grouped", "--task", "tinystories"], "leave out --task tinystories"),
    (["train", "static", "--grouped", "--compile", "--precision", "bf16"], "leave out --precision bf16, --compile"),
    (["train", "static", "--episodes", "2", "--graft", "44=mid:norm"], "seed 44 is not an episode's (--seed 42"),
    (["train", "static", "--graft", "x=mid:norm"], "'x' is not a seed"),
    (["train", "ppo", "--graft", "42=mid:norm"], "PPO's environments are all built alike"),
    (["train", "static", "--grouped", "--telemetry-level", "debug"], "leave out --telemetry-level debug"),
    (["train", "ppo", "--grouped", "--env-processes", "--precision", "bf16"],
     "leave out --precision bf16, --env-processes"),
    (["train", "ppo", "--grouped", "--task", "tinystories"], "leave out --task tinystories"),
    (["train"], "required"),
    (["sample", "runs/x", "--temperature", "nan"], "--temperature must be a number > 0, got nan"),
    # Tracebacks in sampling: logits over a tiny temperature overflow (NaN probabilities), a seed past int64
    (["sample", "runs/x", "--temperature", "1e-39"], "--temperature must be at least 1e-06, got 1e-39 (--top-k 1"),
    (["sample", "runs/x", "--seed", "18446744073709551616"], "--seed must be from -2147483648 to 2147483647, got 1844"),
    # A seed is an int32 in every run's RunStarted: one past it had failed there, its run directory made.
    (["train", "static", "--seed", "2147483648"], "every seed, 2147483648 to 2147483648, must be from -2147483648"),
    (["train", "static", "--seed", "2147483647", "--episodes", "2"], "every seed, 2147483647 to 2147483648"),
    (["train", "ppo", "--seed", "-2147483649"], "every seed, -2147483649 to -2147483550"),
    (["compare", "--seed", "2147483645", "--seeds", "5"], "--seed and --seeds: every seed, 2147483645 to 2147483649"),
    (["train", "ppo", "--clip-ratio", "nan"], "argument --clip-ratio: must be a finite number, got nan"),
    (["train", "ppo", "--lr", "inf"], "argument --lr: must be a finite number, got inf"),
    # Taken and ignored before (a short token too, which --dashboard refuses).
    (["train", "static", "--dashboard-token", "short"], "--dashboard-token needs --dashboard"),
    (["train", "ppo", "--dashboard-port", "9000"], "--dashboard-port needs --dashboard"),
    (["train", "ppo", "--runs-dir", "runs/seed{seed}"], "--runs-dir: {seed} names each episode's folder"),
    # A run is recorded from its telemetry: with none, the store had been left unmade without a word.
    (["train", "static", "--telemetry-level", "off", "--db", "x.db"], "--db needs a --telemetry-level other than off"),
    # Devices torch names but Esper cannot train on had failed with a traceback, a run directory made.
    (["train", "static", "--task", "synthetic", "--device", "mps"], "--device mps: Esper trains on cpu or cuda[:N]"),
    (["train", "ppo", "--task", "synthetic", "--devices", "meta"], "--devices meta: Esper trains on cpu or cuda"),
    (["train", "ppo", "--task", "synthetic", "--devices", "bogus"], "--devices 'bogus': "),
    # Likewise a TUI or dashboard that would wait for events for the whole run, the run's own console quiet.
    (["train", "static", "--telemetry-level", "off", "--tui"], "--tui shows the run's telemetry: it needs a"),
    (["train", "ppo", "--telemetry-level", "off", "--dashboard"], "--dashboard shows the run's telemetry: it needs"),
])
def test_bad_flags_fail_in_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("esper: error:") and needle in err[0], err


@pytest.mark.parametrize("argv, needle", [
    (["train", "ppo", "--resume", __file__], "is not a checkpoint (torch.load: UnpicklingError)"),
    (["train", "learned", "--policy", __file__], "is not a checkpoint (torch.load: UnpicklingError)"),
    (["train", "ppo", "--n-envs", "0"], "--n-envs must be >= 1"),
])
def test_python_m_esper_cli_fails_in_one_line_too(argv, needle):
    """`python -m esper.cli` (how compare starts its runs) is `esper`: a file that is not a checkpoint, or a
    PPO flag train_ppo refuses, is one line and exit 2 (a traceback and exit 1 before)."""
    done = subprocess.run([sys.executable, "-m", "esper.cli", *argv, "--task", "synthetic"], capture_output=True,
                          text=True, timeout=120)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1 and err[0].startswith("esper: error:") and needle in err[0], err


def test_a_bad_flag_on_cuda_is_one_line_before_any_word_on_grouping(monkeypatch, capsys):
    """The default's note (grouping refused by --telemetry-level debug) had come first, a second line."""
    monkeypatch.setattr("esper.cli.resolve_device", lambda requested: "cuda:0")
    assert main(["train", "static", "--telemetry-level", "debug", "--episodes", "0"]) == 2
    assert capsys.readouterr().err.splitlines() == ["esper: error: --episodes must be >= 1, got 0"]


@pytest.mark.parametrize("grouping", ["--grouped", "--no-grouped"])
def test_a_resumed_run_keeps_its_grouping_whatever_the_machine(grouping, tmp_path, monkeypatch):
    """A run started plainly resumes plainly on CUDA, where grouped is the default, and a grouped one
    grouped on the CPU, where it is not: what --resume continues is the run's way, not the machine's. A
    flag that contradicts the run's way is refused, naming it."""
    flags = ["train", "static", "--task", "synthetic", "--max-epochs", "1", "--max-batches", "1",
             "--runs-dir", str(tmp_path), "--telemetry-level", "minimal"]
    assert main([*flags, grouping, "--device", "cpu"]) == 0
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    other = "--no-grouped" if grouping == "--grouped" else "--grouped"
    for device in ("cuda:0", "cpu"):
        monkeypatch.setattr("esper.cli.resolve_device", lambda requested: device)
        cfg = train_config(build_parser().parse_args([*flags, "--resume", str(run_dir)]))
        assert cfg.grouped is (grouping == "--grouped") and cfg.device == device
        check_resume(cfg, str(run_dir))  # the same settings: resumable
        told = train_config(build_parser().parse_args([*flags, "--resume", str(run_dir), other]))
        with pytest.raises(UsageError, match="grouped differ"):
            check_resume(told, str(run_dir))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_fails_in_one_line(capsys):
    assert main(["train", "heuristic", "--device", "cuda:0"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    code = main(["train", "heuristic", "--data-dir", str(tmp_path), "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 1
    assert "--data-dir" in err and "ESPER_DATA_DIR" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_train_writes_a_complete_run_directory(tmp_path):
    tel_file = tmp_path / "all.jsonl"
    assert main(["train", "heuristic", "--task", "synthetic", "--max-epochs", "8", "--runs-dir", str(tmp_path),
                 "--telemetry-file", str(tel_file), "--telemetry-dir", str(tmp_path / "tel")]) == 0
    (run_dir,) = [p for p in tmp_path.iterdir() if p.name.endswith("_heuristic_synthetic_s42")]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["env"]["max_epochs"] == 8 and config["mode"] == "heuristic"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 8 and 0 <= summary["test_accuracy"] <= 100
    assert summary["host_params"] == 6220
    events = list(read_jsonl(run_dir / "telemetry.jsonl"))
    assert events[0].HasField("run_started") and events[-1].HasField("run_finished")
    assert sum(e.HasField("epoch") for e in events) == 8
    assert len(list(read_jsonl(tel_file))) == len(events)
    assert len(list(read_jsonl(tmp_path / "tel" / f"{run_dir.name}.jsonl"))) == len(events)
    kept = sum(s["params"] for s in summary["seeds"] if s["fate"] in ("fossilized", "blending"))
    net = load_exported(run_dir / "model")
    assert sum(p.numel() for p in net.parameters()) == summary["host_params"] + kept
    # The export scores the run's test accuracy on images standardized as architecture.json says.
    arch = json.loads((run_dir / "model" / "architecture.json").read_text())
    mean, std = (torch.tensor(arch[k]).view(1, -1, 1, 1) for k in ("input_mean", "input_std"))
    data = load_task_data("synthetic", None)
    with torch.no_grad():
        predicted = net((data.test_x / 255 - mean) / std).argmax(1)
    assert float((predicted == data.test_y).float().mean()) * 100 == pytest.approx(summary["test_accuracy"], abs=1e-4)


def test_speed_flags_reach_the_trainer_and_the_run_config(tmp_path):
    assert main(["train", "static", "--task", "synthetic", "--max-epochs", "2", "--runs-dir", str(tmp_path),
                 "--precision", "bf16", "--compile"]) == 0
    (run_dir,) = tmp_path.glob("*_static_synthetic_s42")
    train = json.loads((run_dir / "config.json").read_text())["env"]["train"]
    assert (train["precision"], train["compile"]) == ("bf16", True)
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 2


def test_telemetry_off_writes_no_events(tmp_path):
    assert main(["train", "static", "--task", "synthetic", "--max-epochs", "2", "--runs-dir", str(tmp_path),
                 "--telemetry-level", "off", "--episodes", "2"]) == 0
    run_dirs = sorted(tmp_path.iterdir())
    assert sorted(p.name.rsplit("_", 1)[1] for p in run_dirs) == ["s42", "s43"]
    assert all(not (p / "telemetry.jsonl").exists() and (p / "summary.json").exists() for p in run_dirs)


def test_original_module_entry_point(tmp_path):
    out = subprocess.run([sys.executable, "-m", "esper.scripts.train", "static", "--task", "synthetic",
                          "--max-epochs", "1", "--runs-dir", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "device: cpu" in out.stderr
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 1  # beside karn.db, the run store


def test_blueprints_lists_computed_counts(capsys):
    assert main(["blueprints"]) == 0
    out = capsys.readouterr().out
    assert "94,762" in out
    assert "73,984" in out  # conv_heavy at mid (64 channels): 2 * 64*64*9 + 4*64


def test_graft_trains_a_grown_architecture_from_scratch(tmp_path, capsys):
    assert main(["train", "static", "--task", "synthetic", "--max-epochs", "1", "--runs-dir", str(tmp_path),
                 "--graft", "mid:conv_heavy"]) == 0
    (summary,) = tmp_path.glob("*/summary.json")
    summary = json.loads(summary.read_text())
    assert summary["total_params"] == 6220 + 4672
    assert summary["seeds"][0]["fate"] == "grafted" and summary["seeds"][0]["history"][0]["epoch"] == 0
    # The graft is a lifecycle move like any other: in the telemetry, and so in the run store, where it is
    # host structure of a from-scratch run, not growth (no germination, no fossilization).
    (run_dir,) = tmp_path.glob("*/")
    (graft,) = [e.transition for e in read_jsonl(run_dir / "telemetry.jsonl") if e.HasField("transition")]
    assert (graft.slot, graft.epoch, graft.reason) == ("mid", 0, "grafted: trained from scratch")
    assert main(["runs", "show", run_dir.name, "--db", str(tmp_path / "karn.db")]) == 0
    shown = capsys.readouterr().out
    assert "0 (0/0), 1 grafted" in shown and "conv_heavy" in shown and "grafted" in shown, shown


def test_a_graft_saved_before_grafts_were_marked_is_still_one():
    """An episode checkpoint from before SeedRecord.grafted: restored, its graft is no germination still."""
    model = MorphogeneticModel(build_host("synthetic"), ["early", "mid"])
    model.graft("mid", Blueprint.BLUEPRINT_CONV_HEAVY)
    state = model.lifecycle_state()
    for record in state["records"]:
        del record["grafted"]
    restored = MorphogeneticModel(build_host("synthetic"), ["early", "mid"])
    restored.restore_lifecycle(state)
    assert [r.fate for r in restored.records] == ["grafted"] and restored.seeds_germinated == 0


def test_a_graft_is_no_germination(tmp_path):
    """--max-seeds limits the seeds grown: a graft leaves the budget whole (it had used it up, and the
    heuristic then never germinated)."""
    assert main(["train", "heuristic", "--task", "synthetic", "--max-epochs", "6", "--max-batches", "2", "--slots",
                 "early", "mid", "--max-seeds", "1", "--graft", "mid:conv_heavy", "--runs-dir", str(tmp_path),
                 "--telemetry-level", "minimal"]) == 0
    (summary,) = tmp_path.glob("*/summary.json")
    fates = [s["fate"] for s in json.loads(summary.read_text())["seeds"]]
    assert fates[0] == "grafted" and len(fates) == 2, fates


def test_an_output_that_cannot_be_written_fails_in_one_line_before_anything_trains(tmp_path, capsys):
    """A file where an output folder goes, a folder that takes no new entry (/proc: even root's writes fail
    there, where permission bits would not stop a root test), or a --db that is not a run store, is one line
    and exit 2 before any training; each used to be a traceback, for --db after the whole run had trained,
    for an existing /proc after its run directory failed. The files are left as they were."""
    afile, notdb = tmp_path / "afile", tmp_path / "notdb.txt"
    afile.write_text("x")
    notdb.write_text("hello")
    train = ["train", "static", "--task", "synthetic", "--max-epochs", "1", "--max-batches", "1", "--runs-dir"]
    runs = str(tmp_path / "runs")
    compare = ["compare", "--task", "synthetic", "--max-epochs", "1", "--max-batches", "1", "--seeds", "1"]
    for argv, needle in (([*train, str(afile)], f"--runs-dir {afile}: {afile} is a file, not a folder"),
                         ([*train, str(afile / "seed{seed}")], f"{afile} is a file, not a folder"),
                         ([*train, runs, "--telemetry-dir", str(afile / "t")], f"{afile} is a file"),
                         ([*train, runs, "--telemetry-file", str(afile / "t.jsonl")], f"{afile} is a file"),
                         ([*train, runs, "--telemetry-file", str(tmp_path)], "is a folder"),
                         ([*train, "/proc/esper-runs"], "--runs-dir /proc/esper-runs: nothing can be written in /proc"),
                         ([*train, "/proc"], "--runs-dir /proc: nothing can be written in /proc"),  # it exists
                         ([*train, runs, "--telemetry-dir", "/proc/sys"], "nothing can be written in /proc/sys"),
                         ([*train, runs, "--telemetry-file", "/proc/t.jsonl"], "--telemetry-file /proc/t.jsonl: noth"),
                         ([*train, str(tmp_path / ("x" * 300))], "no folder can be there (File name too long)"),
                         ([*train, runs, "--db", str(notdb)], f"--db {notdb} cannot be a run store"),
                         ([*train, runs, "--db", str(afile / "k.db")], f"{afile} is a file, not a folder"),
                         ([*compare, "--out", str(afile)], f"--out {afile}: {afile} is a file"),
                         ([*compare, "--out", "/proc"], "--out /proc: nothing can be written in /proc"),
                         ([*compare, "--out", str(tmp_path / "c"), "--db", str(notdb)], "cannot be a run store"),
                         (["runs", "index", runs, "--db", str(notdb)], "cannot be a run store"),
                         (["report", runs, "--out", str(afile / "r"), "--db", str(tmp_path / "k.db")], "is a file")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("esper: error: ") and needle in err[0], (argv, err)
    assert not list(tmp_path.rglob("summary.json"))
    assert afile.read_text() == "x" and notdb.read_text() == "hello"


HALF_WRITTEN_STORE = """
import os, signal, sys
from esper.karn.runs_db import RunsDB
store = RunsDB(sys.argv[1])
store.conn.execute("PRAGMA cache_size=1")  # the transaction spills into the file: its journal is hot
store.conn.execute("BEGIN IMMEDIATE")
for i in range(100):
    store.conn.execute("INSERT INTO runs (run_id, source, finished, governor_rollbacks) VALUES (?, 'killed', 0, 0)",
                       (f"half-{i}" + "x" * 4000,))
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_store_whose_writer_was_killed_mid_transaction_records_the_next_run(tmp_path):
    """A comparison SIGKILLed while a run wrote the store leaves a hot journal; `--resume` refused the store
    ("attempt to write a readonly database": the check opened it read-only, which cannot roll back)."""
    db = tmp_path / "karn.db"
    subprocess.run([sys.executable, "-c", HALF_WRITTEN_STORE, str(db)], check=False, timeout=60)
    assert Path(f"{db}-journal").stat().st_size > 0
    assert main(["train", "static", "--task", "synthetic", "--max-epochs", "1", "--max-batches", "1", "--runs-dir",
                 str(tmp_path / "runs"), "--db", str(db)]) == 0
    store = RunsDB(db)
    assert [r["mode"] for r in store.runs()] == ["static"]  # the killed transaction's rows rolled back


def test_a_store_whose_folder_takes_nothing_is_refused_before_the_run_trains(tmp_path, capsys):
    """A --db in a folder that cannot be made (under /proc) had been found only when the store was written,
    after the run: a warning then. The folder is tried first now, as every output folder is."""
    assert main(["train", "static", "--task", "synthetic", "--max-epochs", "1", "--max-batches", "1", "--runs-dir",
                 str(tmp_path), "--db", "/proc/esper/karn.db"]) == 2
    assert capsys.readouterr().err == ("esper: error: --db /proc/esper/karn.db cannot be a run store: its folder "
                                       "/proc/esper: nothing can be written in /proc (No such file or directory)\n")
    assert not list(tmp_path.iterdir())


def test_episodes_in_seed_folders_share_one_store(tmp_path, capsys):
    """With {seed} in --runs-dir the store is karn.db above the seed folders, every episode in it (it was
    in the first seed's folder, and another --seed started a second store)."""
    assert main(["train", "static", "--task", "synthetic", "--max-epochs", "1", "--max-batches", "1", "--episodes",
                 "2", "--runs-dir", str(tmp_path / "r" / "seed{seed}")]) == 0
    assert main(["runs", "list", "--db", str(tmp_path / "r" / "karn.db")]) == 0
    listed = capsys.readouterr().out
    assert "_s42" in listed and "_s43" in listed and not list(tmp_path.rglob("seed*/karn.db"))


@pytest.mark.parametrize("grafts, seed", [(["mid:norm", "mid:conv_heavy"], 42), (["43=mid:norm", "mid:norm"], 43)])
def test_a_slot_grafted_twice_fails_before_any_run_directory_exists(grafts, seed, tmp_path, capsys):
    """Two grafts in one slot in any episode (every episode's, or one's own besides them) would meet an occupied
    slot as the episode builds its network: refused first, so no run directory is left behind."""
    runs = tmp_path / "runs"
    assert main(["train", "static", "--task", "synthetic", "--max-epochs", "1", "--episodes", "2", "--runs-dir",
                 str(runs), *(f"--graft={g}" for g in grafts)]) == 2
    assert f"--graft: slot mid is grafted twice in the episode of seed {seed}" in capsys.readouterr().err
    assert not runs.exists()


@pytest.mark.parametrize("graft, needle", [("late:conv_heavy", "not among --slots"),
                                           ("mid:huge", "not a blueprint of this host"),
                                           ("mid:lora", "not a blueprint of this host")])
def test_bad_graft_fails_in_one_line(graft, needle, capsys):
    assert main(["train", "static", "--task", "synthetic", "--graft", graft]) == 2
    assert needle in capsys.readouterr().err
