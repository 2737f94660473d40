"""esper compare: statistics, architecture hand-over to the from-scratch arm, and a tiny end-to-end run."""

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
from scipy import stats

from esper.cli import build_parser, compare_config, compare_grouped, episodes_grouped, main, train_config
from esper import compare
from esper.compare import (Arm, CompareConfig, PolicyChanged, arms_for, copy_policy, differences, final_architecture,
                           headline, mean_ci, paired, progress_of, results_table, seed_blocks, train_command,
                           walls_shared, write_report)
from esper.durable import lock_exclusively
from esper.karn.runs_db import RunsDB
from esper.simic.checkpoint import file_sha256, load_checkpoint, save_checkpoint


def test_mean_ci_is_the_t_interval():
    values = [70.0, 72.0, 71.0, 75.0, 74.0]
    mean, half = mean_ci(values)
    assert mean == pytest.approx(72.4)
    sd = stats.tstd(values)
    assert half == pytest.approx(stats.t.ppf(0.975, 4) * sd / 5 ** 0.5)
    mean, half = mean_ci([3.0])
    assert mean == 3.0 and math.isnan(half)  # one seed: no interval, not one of width 0


def test_final_architecture_keeps_only_what_shapes_the_network():
    summary = {"seeds": [
        {"slot": "mid", "blueprint": "conv_heavy", "fate": "fossilized"},
        {"slot": "late", "blueprint": "norm", "fate": "culled"},
        {"slot": "early", "blueprint": "attention", "fate": "blending"},
        {"slot": "late", "blueprint": "depthwise", "fate": "training"},
    ]}
    assert final_architecture(summary) == ["mid:conv_heavy", "early:attention"]


def test_original_budget_adds_the_unmatched_baseline():
    arms = arms_for("original", 40, ["static", "heuristic", "from-scratch"])
    assert arms[0] == Arm("static@10", "static", 10, same_steps=False)
    assert [a.max_epochs for a in arms[1:]] == [40, 40, 40]


def test_language_models_are_compared_on_test_loss():
    """Not on validation loss: the growing arms' decisions were made on that split."""
    assert headline("tinystories") == ("test_loss", "test loss")
    assert headline("cifar10") == ("test_accuracy", "test accuracy")


def test_a_diverged_language_models_huge_loss_reports_an_infinite_perplexity():
    """A finite mean test loss past what exp can hold (a diverged run's) had raised OverflowError in the
    report, after phase one, so that the comparison ended with no results.md."""
    runs = [summary(42, 0.0, []) | {"test_loss": 5.0}, summary(43, 0.0, []) | {"test_loss": 1500.0}]
    table = results_table(CompareConfig(task="tinystories", arms=("static",)), {"static": runs})
    assert "| 752.500 ± 9497.888 (perplexity inf) |" in table


@pytest.mark.parametrize("argv, needle", [
    (["compare", "--seeds", "0"], "--seeds must be >= 1"),
    (["compare", "--progress-every", "nan"], "--progress-every must be seconds"),
    (["compare", "--resume", "no-such-comparison"], "no compare.json there"),
    (["compare", "--resume", "a", "--out", "b"], "leave out --out b"),
    (["compare", "--progress-every", "-1"], "--progress-every must be seconds"),
    (["compare", "--arms", "from-scratch"], "needs heuristic"),
    (["compare", "--budget", "original", "--max-epochs", "10"], "fixes the budget at 40"),
    (["compare", "--arms", "static", "ppo"], "--arms ppo needs --policy"),
    (["compare", "--policy", "missing.pt"], "--policy missing.pt: no such file"),
    (["train", "learned", "--task", "synthetic"], "--policy"),
    (["compare", "--grouped", "--precision", "bf16"], "--grouped trains CNN hosts in fp32"),
    (["compare", "--grouped", "--task", "tinystories"], "--grouped trains CNN hosts in fp32"),
    (["compare", "--grouped", "--telemetry-level", "debug"], "--telemetry-level debug"),
    # Refused before any run starts (each run's `esper train` would refuse them only once it started); the
    # small budget keeps a regression from training for long.
    (["compare", "--task", "synthetic", "--max-epochs", "1", "--seeds", "1", "--slots", "middle"],
     "--slots: unknown middle"),
    (["compare", "--task", "synthetic", "--max-epochs", "1", "--seeds", "1", "--slots", "mid", "mid"], "listed twice"),
    (["compare", "--task", "synthetic", "--max-epochs", "1", "--seeds", "1", "--arms", "static", "heuristic",
      "heuristic"], "--arms: heuristic is listed twice"),
])
def test_compare_flag_errors(argv, needle, capsys):
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("command, decide, instead", [
    (["compare"], compare_grouped, "a process per run"),  # 1.46x faster a comparison (H200, compare_grouped.py)
    (["train", "heuristic"], episodes_grouped, "episodes one after another"),  # one run 3.1x (H200, graphed)
])
@pytest.mark.parametrize("flags, device, grouped", [
    ([], "cuda:0", True),  # measured faster there
    ([], "cpu", False),  # and slower on 2 cores
    (["--no-grouped"], "cuda:0", False),
    (["--grouped"], "cpu", True),
    (["--precision", "bf16"], "cuda:0", False),  # flags grouping cannot take leave the default off, unrefused
    (["--task", "tinystories"], "cuda", False),  # a host with no grouped form: no choice, nothing said
    (["--telemetry-level", "debug"], "cuda:0", False),
    (["--compile"], "cuda:0", False),
])
def test_comparisons_and_runs_are_grouped_by_default_on_cuda_only(command, decide, instead, flags, device, grouped,
                                                                  capsys):
    assert decide(build_parser().parse_args([*command, *flags]), device) is grouped
    said = capsys.readouterr().err
    if device.startswith("cuda") and not grouped and flags[:1] not in (["--no-grouped"], ["--task"]):  # says why not
        assert said.startswith(f"esper: {instead}, not grouped as by default on CUDA: grouped runs cannot "
                               f"take {' '.join(flags[:2])}"), said
    else:
        assert said == ""


def test_a_group_of_one_is_grouped_by_default_as_a_cuda_graph_only():
    """One seed, or one episode, eagerly (--no-cuda-graph) is a plain run by default: a group of one ran at
    0.92x and 1.04x a plain run eager, 3.1x and 3.5x as a graph (H200). (PPO's: test_ppo_train.py.)"""
    for command in (["compare", "--seeds"], ["train", "static", "--episodes"]):
        decide = compare_grouped if command[0] == "compare" else episodes_grouped
        parse = lambda *flags: build_parser().parse_args([*command, *flags])  # noqa: E731
        assert decide(parse("1"), "cuda:0") is True
        assert decide(parse("1", "--no-cuda-graph"), "cuda:0") is False
        assert decide(parse("2", "--no-cuda-graph"), "cuda:0") is True


def test_a_resumed_comparison_keeps_its_grouping_unless_told(tmp_path):
    """One started with a process per run on CUDA (before grouped was the default there) resumes so."""
    (tmp_path / "compare.json").write_text(json.dumps(dataclasses.asdict(CompareConfig(grouped=False))))
    resume = ["compare", "--resume", str(tmp_path)]
    assert compare_grouped(build_parser().parse_args(resume), "cuda:0") is False
    assert compare_grouped(build_parser().parse_args([*resume, "--grouped"]), "cuda:0") is True
    (tmp_path / "compare.json").write_text(json.dumps({"task": "cifar10"}))  # saved before grouping existed
    assert compare_grouped(build_parser().parse_args(resume), "cuda:0") is False


@pytest.mark.parametrize("saved", ["{trunc", "[1, 2]", b"\xff\xfe"])
@pytest.mark.parametrize("grouping", [[], ["--no-grouped"]])  # read to keep its way, or only to compare settings
def test_a_resumed_comparison_whose_settings_are_unreadable_is_refused_in_one_line(tmp_path, saved, grouping,
                                                                                   capsys):
    folder = tmp_path / "cmp"
    folder.mkdir()
    (folder / "compare.json").write_bytes(saved.encode() if isinstance(saved, str) else saved)
    assert main(["compare", "--task", "synthetic", "--resume", str(folder), "--db", str(tmp_path / "k.db"),
                 *grouping]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"esper: error: --resume {folder}: its compare.json") and len(err.splitlines()) == 1, err


def test_every_arm_trains_with_the_comparisons_precision_compilation_cudnn_mode_and_cuda_graphs():
    """compare's speed flags reach every run's TrainConfig: its child command, parsed as `esper train` parses it."""
    cfg = CompareConfig(task="synthetic", precision="bf16", compile=True, memory_format="contiguous",
                        cudnn_benchmark=True, cuda_graph=False)
    speed = lambda train: (train.precision, train.compile, train.memory_format, train.cudnn_benchmark,  # noqa: E731
                           train.cuda_graph)
    for arm in arms_for(cfg.budget, cfg.max_epochs, list(cfg.arms)):
        cmd = train_command(cfg, arm, [42], {})
        train = train_config(build_parser().parse_args(cmd[cmd.index("train"):])).env.train
        assert speed(train) == ("bf16", True, "contiguous", True, False), arm
    cmd = train_command(CompareConfig(), arms_for("matched", 40, ["static"])[0], [42], {})
    train = train_config(build_parser().parse_args(cmd[cmd.index("train"):])).env.train
    assert speed(train) == ("fp32", False, "auto", False, True)


def test_grouped_trains_each_arms_seeds_in_one_grouped_process_with_its_own_grafts():
    cfg = CompareConfig(task="synthetic", budget="original", grouped=True, arms=("static", "heuristic", "from-scratch",
                                                                             "ppo"), policy="policy.pt")
    for arm in arms_for(cfg.budget, cfg.max_epochs, list(cfg.arms)):
        cmd = train_command(cfg, arm, [42, 43, 44], {42: ["mid:conv_heavy"], 43: [], 44: ["mid:norm"]})
        assert "--grouped" in cmd, arm
        assert cmd[cmd.index("--episodes") + 1] == "3" and cmd[cmd.index("--seed") + 1] == "42"
        assert cmd[cmd.index("--runs-dir") + 1].endswith(f"runs/{arm.name}/seed{{seed}}")
        assert [a for a in cmd if a.startswith("--graft")] == ["--graft=42=mid:conv_heavy", "--graft=44=mid:norm"]
    # said, not left to `esper train`'s default, which is grouped on CUDA
    assert "--no-grouped" in train_command(CompareConfig(), arms_for("matched", 40, ["static"])[0], [42], {})


def test_from_scratch_runs_of_negative_seeds_get_their_grafts():
    """--seed -1: the child reads `--graft=-1=mid:norm` as the graft of episode -1 (a separate "-1=mid:norm"
    would be taken for a flag), as it reads `esper train --seed -1`."""
    cfg = CompareConfig(task="synthetic", seed=-1, seeds=2, grouped=True)
    scratch = arms_for(cfg.budget, cfg.max_epochs, ["heuristic", "from-scratch"])[1]
    cmd = train_command(cfg, scratch, [-1, 0], {-1: ["mid:norm"], 0: ["mid:conv_heavy"]})
    run = train_config(build_parser().parse_args(cmd[cmd.index("train"):]))
    assert (run.seed, run.episodes, run.seed_grafts) == (-1, 2, ((-1, "mid", "norm"), (0, "mid", "conv_heavy")))


def test_a_failed_run_ends_the_comparison_in_one_line_that_says_how_to_resume(tmp_path, capsys):
    """A run's `esper train` that fails (here: no TinyStories text) ends compare with exit 1 and one line: which
    run, its own last line, where the rest of what it wrote is, and the --resume that finishes the comparison."""
    out, empty = tmp_path / "cmp", tmp_path / "empty"
    empty.mkdir()
    assert main(["compare", "--task", "tinystories", "--data-dir", str(empty), "--arms", "static", "--seeds", "1",
                 "--max-epochs", "1", "--out", str(out), "--db", str(tmp_path / "karn.db"),
                 "--progress-every", "0"]) == 1
    said = capsys.readouterr().err.strip().splitlines()
    assert said[0].startswith("device: cpu; a process per run; writing ") and len(said) == 2, said
    stderr = out / "runs" / "static" / "seed42" / "stderr.txt"
    assert said[1].startswith(f"esper: error: static seed 42 failed (exit status 1): no *.txt or *.txt.gz in {empty}")
    assert said[1].endswith(f"(all it wrote: {stderr}); finish the comparison with the same flags and --resume {out}")
    assert "Traceback" not in stderr.read_text() and f"no *.txt or *.txt.gz in {empty}" in stderr.read_text()


def test_a_failed_run_stops_the_comparison_while_another_still_trains(tmp_path, monkeypatch, capsys):
    """With --workers 2, a run that fails while one submitted before it trains on ends the comparison at once
    (it had waited for that run to finish, starting the queued ones meanwhile), and no run is left training."""
    said = tmp_path / "pids"

    def train_command(cfg, arm, seeds, grafts):
        fail = "sys.exit(3)" if seeds == [43] else "time.sleep(60)"
        return [sys.executable, "-c", f"import os, sys, time; open({str(said)!r}, 'a').write(f'{{os.getpid()}} '); "
                                      f"time.sleep(0.5); {fail}"]

    monkeypatch.setattr(compare, "train_command", train_command)
    started = time.monotonic()
    assert main(["compare", "--task", "synthetic", "--max-epochs", "1", "--seeds", "3", "--arms", "static",
                 "--workers", "2", "--out", str(tmp_path / "cmp"), "--db", str(tmp_path / "karn.db"),
                 "--progress-every", "0"]) == 1
    assert time.monotonic() - started < 30
    assert "esper: error: static seed 43 failed (exit status 3)" in capsys.readouterr().err
    for pid in said.read_text().split():
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2], pid


def test_a_comparison_another_process_is_writing_is_refused_and_left_alone(tmp_path, capsys):
    """A --resume of a comparison still running had cleared the folders of its live runs and ended in a
    traceback; the comparison's lock (flock, released however its holder ends) now refuses it in one line."""
    out = tmp_path / "cmp"
    flags = ["compare", "--task", "synthetic", "--max-epochs", "1", "--max-batches", "1", "--seeds", "1", "--arms",
             "static", "--db", str(tmp_path / "karn.db"), "--progress-every", "0"]
    assert main([*flags, "--out", str(out)]) == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != "compare.lock"}
    held = lock_exclusively(out / "compare.lock")
    capsys.readouterr()
    try:
        assert main([*flags, "--resume", str(out)]) == 2
    finally:
        held.close()
    assert capsys.readouterr().err.strip().endswith(f"esper: error: {out} is being written by another esper compare: "
                                                    f"let it finish, or stop it and --resume {out}")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != "compare.lock"} == before
    assert main([*flags, "--resume", str(out)]) == 0


def test_a_resume_says_when_it_ran_otherwise_and_is_counted_only_when_it_trains(tmp_path):
    """wall.json keeps each invocation's device and settings: the report says where they differed (a run cut
    off and trained again under --workers 2 had been described as trained under the first invocation's
    --workers 1, and on the CPU its numbers depend on it). A --resume of a finished comparison trains nothing
    and is not counted (it had read as "interrupted and resumed")."""
    out = tmp_path / "cmp"
    flags = ["compare", "--task", "synthetic", "--max-epochs", "1", "--max-batches", "1", "--seeds", "1", "--arms",
             "static", "--db", str(tmp_path / "karn.db"), "--progress-every", "0"]
    assert main([*flags, "--out", str(out)]) == 0
    first = (out / "wall.json").read_text()
    assert json.loads(first)["ran_with"] == [{"device": f"CPU ({os.cpu_count()} cores)", "workers": 1,
                                              "gpu_preload": False, "cudnn_benchmark": False, "cuda_graph": True}]
    assert main([*flags, "--resume", str(out)]) == 0
    assert (out / "wall.json").read_text() == first
    assert "invocations" not in (out / "results.md").read_text()
    shutil.rmtree(out / "runs" / "static" / "seed42")  # as a run cut off by a kill is cleared on resume
    assert main([*flags, "--workers", "2", "--resume", str(out)]) == 0
    wall = json.loads((out / "wall.json").read_text())
    assert wall["invocations"] == 2 and [r["workers"] for r in wall["ran_with"]] == [1, 2]
    assert ("Its invocations ran with other settings (1: workers 1; 2: workers 2). Each run trained whole within one "
            "invocation;") in (out / "results.md").read_text()


def summary(seed: int, accuracy: float, seeds: list[dict]) -> dict:
    """A run's summary.json as far as the report reads it, on the synthetic host (6,220 parameters)."""
    return {"seed": seed, "test_accuracy": accuracy, "test_loss": 1.0, "val_loss": 1.0, "host_params": 6220,
            "total_params": 6220 + sum(s["params"] for s in seeds), "seeds": seeds, "seed_counts": {},
            "train_flops": 1e9, "wall_seconds": 2.0,
            "curve": [{"epoch": 1, "val_accuracy": accuracy, "val_loss": 1.0, "total_params": 6220,
                       "stages": {"mid": "DORMANT"}}]}


def test_the_report_counts_the_final_architectures_parameters_and_gives_one_seed_no_interval():
    """A heuristic run that ends with mid:conv_heavy fossilized and late:norm still training has 6,220 + 4,672
    parameters in its final network, as its from-scratch run, which builds in only mid:conv_heavy; one seed
    per arm gives no interval ("n/a", not "± 0.00")."""
    conv_heavy = {"slot": "mid", "blueprint": "conv_heavy", "fate": "fossilized", "params": 4672}
    norm = {"slot": "late", "blueprint": "norm", "fate": "training", "params": 300}
    results = {"static": [summary(42, 60.0, [])], "heuristic": [summary(42, 65.5, [conv_heavy, norm])],
               "from-scratch": [summary(42, 64.0, [conv_heavy])]}
    results["heuristic"][0]["train_flops"] = 1.25e9  # static's: 1e9
    table = results_table(CompareConfig(task="synthetic", seeds=1), results)
    rows = {cells[0].removeprefix("| "): cells[2:8] for cells in (line.split(" | ") for line in table.splitlines()[2:])}
    assert rows == {"static": ["yes", "60.00 ± n/a", "-", "6,220", "1e+09", "1.00x"],
                    "heuristic": ["yes", "65.50 ± n/a", "+5.50 ± n/a", "10,892", "1.25e+09", "1.25x"],
                    "from-scratch": ["yes", "64.00 ± n/a", "+4.00 ± n/a", "10,892", "1e+09", "1.00x"]}


def test_the_report_pairs_the_learned_controller_with_the_heuristic(tmp_path):
    """Seed by seed: ppo 63 and 64 against heuristic 60 and 62 is +2.50, t-interval 12.706 * 0.7071 / sqrt 2."""
    results = {"static": [summary(42, 55.0, []), summary(43, 56.0, [])],
               "heuristic": [summary(42, 60.0, []), summary(43, 62.0, [])],
               "ppo": [summary(42, 63.0, []), summary(43, 64.0, [])]}
    cfg = CompareConfig(task="synthetic", seeds=2, arms=("static", "heuristic", "ppo"), policy="/p.pt",
                        out_dir=str(tmp_path))
    results["heuristic"][0]["seed_counts"] = {"fossilized": 1, "culled": 2}
    results["heuristic"][1]["seed_counts"] = {"fossilized": 2}
    text = write_report(cfg, results, seconds=1.0).read_text()
    assert "ppo against heuristic, test accuracy paired by seed (95% CI): +2.50 ± 6.35, with 1.00x its training " \
           "FLOPs." in text
    assert "Seeds of the heuristic arm over all runs: 3 fossilized, 2 culled." in text  # in words, most first
    assert "Seeds of the ppo arm over all runs: none germinated." in text


def test_runs_are_paired_by_their_seed_whatever_their_order():
    """Heuristic 61 and 65 against static 60 and 63, listed in other orders: +1.50 ± 6.35 (differences 1 and 2);
    by position it had been +1.50 ± 31.77. Arms with other seeds are not paired at all."""
    static = [summary(42, 60.0, []), summary(43, 63.0, [])]
    heuristic = [summary(43, 65.0, []), summary(42, 61.0, [])]
    assert paired(heuristic, static, "test_accuracy") == "+1.50 ± 6.35"
    with pytest.raises(ValueError, match="the same seeds"):
        paired([summary(44, 61.0, []), summary(42, 61.0, [])], static, "test_accuracy")


def test_the_report_pairs_growth_with_from_scratch_and_marks_the_unmatched_baseline(tmp_path):
    """Heuristic against its own architectures trained from the start, paired by seed with the FLOPs ratio; under
    --budget original heuristic against static@10 too, which is said to be unmatched; a diverged run's mean is
    "not finite"; an arm not finished yet (phase 1's report) is named."""
    results = {"static@10": [summary(42, 50.0, []), summary(43, 52.0, [])],
               "static": [summary(42, 60.0, []), summary(43, 63.0, [])],
               "heuristic": [summary(42, 66.0, []), summary(43, 67.0, [])]}
    for run in results["heuristic"]:
        run["train_flops"] = 1.3e9
    cfg = CompareConfig(task="synthetic", seeds=2, max_epochs=40, budget="original", out_dir=str(tmp_path))
    text = write_report(cfg, results, seconds=1.0).read_text()
    assert "heuristic against static@10, test accuracy paired by seed (95% CI): +15.50 ± 6.35, with 1.30x its " \
           "training FLOPs." in text
    assert "static@10 is the original table's unmatched baseline, shown for reference only: 10 epochs against " \
           "the other arms' 40." in text
    assert "Not finished yet: from-scratch (this report is rewritten as each phase ends)." in text
    assert "heuristic against from-scratch" not in text

    results["from-scratch"] = [summary(43, 68.0, []), summary(42, 65.0, [])]
    for run in results["from-scratch"]:
        run["train_flops"] = 1.4e9
    results["static"][0]["test_accuracy"] = math.nan
    text = write_report(cfg, results, seconds=1.0).read_text()
    assert "heuristic against from-scratch, test accuracy paired by seed (95% CI): +0.00 ± 12.71, with 0.93x its " \
           "training FLOPs." in text
    assert "| static | 40 | yes | not finite | - |" in text and "Not finished yet" not in text


def test_the_ppo_arm_runs_the_policy_that_was_checked(tmp_path):
    """The policy is copied into the comparison before any run, and every ppo run reads the copy: a PPO run or
    learner rewriting the file meanwhile cannot give one comparison two policies (or a policy trained on
    the seeds it is measured on). A copy that is not the checked policy is refused."""
    policy = tmp_path / "live.pt"
    policy.write_bytes(b"version 1")
    cfg = CompareConfig(task="synthetic", arms=("static", "ppo"), policy=str(policy),
                        policy_sha256=file_sha256(policy), out_dir=str(tmp_path / "out"))
    (tmp_path / "out").mkdir()
    copy_policy(cfg, tmp_path / "out")
    policy.write_bytes(b"version 2")  # rewritten by its trainer while the comparison runs
    (ppo,) = [a for a in arms_for("matched", 40, ["ppo"])]
    cmd = train_command(cfg, ppo, [42], {})
    used = Path(cmd[cmd.index("--policy") + 1])
    assert used == tmp_path / "out" / "policy.pt" and used.read_bytes() == b"version 1"
    copy_policy(cfg, tmp_path / "out")  # a resume keeps the copy
    assert used.read_bytes() == b"version 1"
    used.unlink()
    with pytest.raises(PolicyChanged, match="changed since it was checked"):
        copy_policy(cfg, tmp_path / "out")  # the file is no longer the checked policy
    assert not used.exists()


def test_a_policy_is_compared_on_held_out_seeds_only(tmp_path, capsys):
    """A PPO run of 2 episodes from seed 42 trained on the runs of seeds 42 and 43: a comparison whose seeds
    meet them is refused in one line, one from seed 44 goes ahead."""
    assert main(["train", "ppo", "--task", "synthetic", "--max-epochs", "2", "--max-batches", "1", "--slots", "mid",
                 "--n-envs", "2", "--episodes", "2", "--update-every", "1", "--num-workers", "1", "--seed", "42",
                 "--runs-dir", str(tmp_path), "--telemetry-level", "off"]) == 0
    (policy,) = tmp_path.glob("*/checkpoint.pt")
    assert load_checkpoint(policy)["trained_seeds"] == [42, 43]
    capsys.readouterr()
    for seed in ("40", "43"):  # seeds 40-42 and 43-45 meet 42-43
        assert main(["compare", "--task", "synthetic", "--slots", "mid", "--policy", str(policy), "--seeds", "3",
                     "--seed", seed, "--out", str(tmp_path / "c"), "--max-epochs", "1", "--max-batches", "1",
                     "--arms", "static", "--workers", "1", "--progress-every", "0"]) == 2  # a regression: seconds
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "learned from the episodes of seeds [" in err[0] and "--seed 44" in err[0], err
    args = build_parser().parse_args(["compare", "--task", "synthetic", "--slots", "mid", "--policy", str(policy),
                                      "--seeds", "3", "--seed", "44"])
    assert compare_config(args).arms[-1] == "ppo"
    assert not (tmp_path / "c").exists()
    # `esper train learned` on a training seed runs, and says it is no held-out measurement.
    assert main(["train", "learned", "--task", "synthetic", "--slots", "mid", "--policy", str(policy), "--seed", "43",
                 "--max-epochs", "1", "--max-batches", "1", "--runs-dir", str(tmp_path / "l")]) == 0
    assert "esper: warning: --seed 43: the policy learned from the episodes of seeds [43]" in capsys.readouterr().err
    # A checkpoint from before the seeds were recorded: an `esper train ppo` one's are its config's seed
    # onwards; a simic_learner's (its workers chose them) cannot be told, and it is refused.
    old = {k: v for k, v in load_checkpoint(policy).items() if k != "trained_seeds"}
    save_checkpoint(old, policy)
    assert compare_config(args).arms[-1] == "ppo"
    assert main(["compare", "--task", "synthetic", "--slots", "mid", "--policy", str(policy), "--seed", "43",
                 "--max-epochs", "1", "--max-batches", "1", "--arms", "static", "--out", str(tmp_path / "c")]) == 2
    assert "learned from the episodes of seeds [43]" in capsys.readouterr().err
    save_checkpoint(old | {"inbox_json": "{}"}, policy)
    assert main(["compare", "--task", "synthetic", "--slots", "mid", "--policy", str(policy), "--seed", "44"]) == 2
    assert "were not recorded" in capsys.readouterr().err


@pytest.mark.parametrize("task, batch", [("cifar10", 128), ("tinystories", 16)])
def test_the_report_names_the_batch_its_task_trains_with(task, batch, tmp_path):
    results = {"static": [summary(42, 60.0, []), summary(43, 62.0, [])]}
    report = write_report(CompareConfig(task=task, seeds=2, max_batches=50, arms=("static",), out_dir=str(tmp_path)),
                          results, seconds=1.0)
    assert f"40 epochs x 50 batches of {batch};" in report.read_text()


def test_the_report_says_how_the_runs_of_each_phase_shared_the_machine(monkeypatch):
    """Wall times compare within a phase only: 4 workers on 8 cores run static and heuristic (2 seeds each)
    4 at once with 2 threads, then from-scratch 2 at once with 4; grouped, each arm is one run; on 2 cores,
    one thread each."""
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    cfg = CompareConfig(task="synthetic", seeds=2, workers=4, device="cpu")
    assert walls_shared(cfg) == ("static, heuristic ran 4 at once with 2 CPU threads each; "
                                 "then from-scratch ran 2 at once with 4 CPU threads each")
    grouped = dataclasses.replace(cfg, grouped=True, device="cuda:0")
    assert walls_shared(grouped) == "static, heuristic ran 2 at once; then from-scratch ran 1 at once"
    ten = dataclasses.replace(grouped, seeds=10)  # a grouped run trains up to 8 seeds: two of them an arm
    assert seed_blocks(ten, list(range(42, 52))) == [list(range(42, 50)), [50, 51]]
    assert walls_shared(ten) == "static, heuristic ran 4 at once; then from-scratch ran 2 at once"
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    two_cores = walls_shared(dataclasses.replace(cfg, workers=2))
    assert two_cores.endswith("from-scratch ran 2 at once with 1 CPU thread each")


@pytest.mark.slow
def test_a_grouped_comparison_resumes_to_the_results_of_one_never_stopped(tmp_path, capsys):
    """A grouped run's numbers depend, at float-summation level, on the runs in its group (heuristic seed 43
    trained alone ends at another validation loss than in its group with 42) and on its CPU threads (with the
    cores for 1 run, not 2, heuristic's group ends at another loss): a grouped arm with a run cut off trains
    its whole group again on --resume, with the threads it had, and ends exactly as never stopped. The run
    store then holds the runs the comparison reports, not the one that had recorded itself and was trained
    again."""
    flags = ["compare", "--task", "synthetic", "--max-epochs", "6", "--max-batches", "2", "--seeds", "2", "--grouped",
             "--arms", "static", "heuristic", "--workers", "2", "--progress-every", "0"]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert main([*flags, "--out", str(straight), "--db", str(tmp_path / "karn.db")]) == 0
    shutil.copytree(straight, cut)
    shutil.copyfile(tmp_path / "karn.db", tmp_path / "cut.db")  # the store as the cut comparison had left it
    (kept,) = (cut / "runs" / "heuristic" / "seed42").glob("*/summary.json")
    (cut_off,) = (cut / "runs" / "heuristic" / "seed43").glob("*/summary.json")
    cut_off.unlink()  # killed as the group wrote its summaries: seed 42's written, seed 43's not
    capsys.readouterr()
    assert main([*flags, "--resume", str(cut), "--db", str(tmp_path / "cut.db")]) == 0
    a, b = (json.loads((d / "results.json").read_text()) for d in (straight, cut))
    for x, y in zip(a["static"] + a["heuristic"], b["static"] + b["heuristic"], strict=True):
        assert (x["seed"], x["val_loss"], x["test_accuracy"], x["curve"], x["seeds"]) == \
               (y["seed"], y["val_loss"], y["test_accuracy"], y["curve"], y["seeds"])
    assert capsys.readouterr().err.count("finished already") == 2  # static's; heuristic's group trained again
    assert not kept.exists() and not cut_off.parent.exists()  # both trained again, in new run directories
    store = RunsDB(tmp_path / "cut.db")
    reported = sorted(p.parent.name for p in cut.glob("runs/*/*/*/summary.json"))
    assert len(reported) == 4 and sorted(r["run_id"] for r in store.runs()) == reported
    store.close()


def test_every_arm_records_the_comparisons_telemetry_level():
    """And each run records itself in the store, but at level off: a run is recorded from its telemetry (and
    `esper train` refuses --db without it)."""
    for level in ("normal", "minimal", "off"):
        cfg = CompareConfig(task="synthetic", telemetry_level=level)
        for arm in arms_for(cfg.budget, cfg.max_epochs, list(cfg.arms)):
            cmd = train_command(cfg, arm, [42], {})
            assert cmd[cmd.index("--telemetry-level") + 1] == level
            assert ("--db" in cmd) == (level != "off")


POINT = summary(42, 50.0, [])["curve"][0]


@pytest.mark.parametrize("damage", [{"train_flops": None}, {"test_accuracy": "high"}, {"seeds": "x"}, {"curve": 5},
                                    {"seed_counts": []}, {"curve": [{"epoch": 1}]}, {"curve": []},
                                    {"curve": [POINT | {"val_accuracy": "high"}]},
                                    {"curve": [POINT | {"stages": {"mid": "SPROUTING"}}]}])
def test_a_resume_trains_again_a_run_whose_summary_the_report_cannot_read(damage, tmp_path):
    """A summary from an older version, without a figure the report reads (here train_flops: None drops it),
    or one damaged by hand (a value of another type), had passed as finished and failed the report, after
    everything else had trained, with a KeyError, ValueError or TypeError."""
    cfg = CompareConfig(task="synthetic", seeds=2, out_dir=str(tmp_path), max_epochs=1)  # summary()'s one epoch
    static = arms_for(cfg.budget, cfg.max_epochs, ["static"])[0]
    for seed, spoil in ((42, {}), (43, damage)):
        run = compare.runs_dir(cfg, static, seed) / f"run{seed}"
        run.mkdir(parents=True)
        written = {k: v for k, v in (summary(seed, 50.0, []) | spoil).items() if v is not None}
        (run / "summary.json").write_text(json.dumps(written))
    results, said = {}, []
    assert compare.blocks_to_train(cfg, static, [42, 43], results, said.append) == [[43]]
    assert list(results) == [42] and said == ["       static seed 42: finished already"]
    assert not compare.runs_dir(cfg, static, 43).exists() and compare.runs_dir(cfg, static, 42).exists()


def test_a_comparison_without_telemetry_needs_no_store(tmp_path, capsys, monkeypatch):
    """Its runs are given no --db (a run is recorded from its telemetry), so no store is checked either: the
    default store that could not be one had stopped it. A --db given with it is refused, as `esper train`
    refuses it (it had been ignored)."""
    (tmp_path / "runs").write_text("x")  # where the default store would be
    monkeypatch.chdir(tmp_path)
    flags = ["compare", "--task", "synthetic", "--max-epochs", "1", "--max-batches", "1", "--seeds", "1", "--arms",
             "static", "--out", str(tmp_path / "cmp"), "--progress-every", "0"]
    assert main([*flags, "--telemetry-level", "minimal"]) == 2
    assert "--db" in capsys.readouterr().err
    assert main([*flags, "--telemetry-level", "off", "--db", str(tmp_path / "karn.db")]) == 2
    assert "--db needs a --telemetry-level other than off" in capsys.readouterr().err
    assert main([*flags, "--telemetry-level", "off"]) == 0
    assert (tmp_path / "cmp" / "results.md").is_file()


def test_progress_is_read_from_the_runs_own_telemetry(tmp_path):
    """What compare says of a running run is its newest epoch event, whatever the file ends in; a run
    whose level records no epochs says nothing."""
    flags = ["train", "heuristic", "--task", "synthetic", "--max-epochs", "2", "--device", "cpu"]
    assert main([*flags, "--runs-dir", str(tmp_path / "normal"), "--telemetry-level", "normal"]) == 0
    (summary,) = (tmp_path / "normal").glob("*/summary.json")
    last = json.loads(summary.read_text())["curve"][-1]
    expected = f"epoch 2/2, val accuracy {last['val_accuracy']:.1f}"
    assert progress_of(tmp_path / "normal", "synthetic") == expected
    with (summary.parent / "telemetry.jsonl").open("a") as f:
        f.write('{"runId": "cut off mid-wri')  # the line being written when compare reads
    assert progress_of(tmp_path / "normal", "synthetic") == expected

    assert main([*flags, "--runs-dir", str(tmp_path / "minimal"), "--telemetry-level", "minimal"]) == 0
    assert progress_of(tmp_path / "minimal", "synthetic") is None
    assert progress_of(tmp_path / "not-started", "synthetic") is None

    lm = tmp_path / "lm" / "run"
    lm.mkdir(parents=True)
    (lm / "telemetry.jsonl").write_text(json.dumps({"epoch": {"signals": {"epoch": 3, "maxEpochs": 5, "valLoss": 2.5}}}))
    assert progress_of(tmp_path / "lm", "tinystories") == "epoch 3/5, val loss 2.500"


@pytest.mark.slow
def test_tiny_comparison_end_to_end(tmp_path, capsys):
    out = tmp_path / "cmp"
    sigterm = signal.getsignal(signal.SIGTERM)
    assert main(["compare", "--task", "synthetic", "--max-epochs", "3", "--seeds", "2", "--workers", "2",
                 "--out", str(out), "--db", str(tmp_path / "karn.db"), "--progress-every", "0.5"]) == 0
    assert signal.getsignal(signal.SIGTERM) is sigterm  # compare's own SIGTERM handling ends with it
    said = capsys.readouterr().err
    assert "  running: static seed 42: " in said and "  running: heuristic seed" in said, said
    report = (out / "results.md").read_text()
    for arm in ("| static |", "| heuristic |", "| from-scratch |"):
        assert arm in report
    assert (out / "curves.png").stat().st_size > 0 and (out / "timeline.png").stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    assert [r["seed"] for r in results["static"]] == [42, 43]
    assert all(r["epochs"] == 3 and r["train_flops"] > 0 for runs in results.values() for r in runs)
    # Same seed, no growth: the static and from-scratch arms (nothing grafted) train identically.
    assert [r["test_accuracy"] for r in results["static"]] == [r["test_accuracy"] for r in results["from-scratch"]]
    # At the default level (normal) every run keeps its epochs and decisions, each with its observation
    # (and gate values, once a seed exists: none does in 3 epochs); minimal would keep neither.
    (telemetry,) = (out / "runs" / "heuristic" / "seed42").glob("*/telemetry.jsonl")
    kinds = {key for line in telemetry.read_text().splitlines() for key in json.loads(line)}
    assert {"decision", "epoch"} <= kinds
    assert main(["compare", "--task", "synthetic", "--out", str(out)]) == 2  # refuses to mix two comparisons
    # Every run recorded itself in the store as it ended: `esper runs list` shows the comparison.
    capsys.readouterr()
    assert main(["runs", "list", "--db", str(tmp_path / "karn.db")]) == 0
    listed = capsys.readouterr().out
    print(listed)
    assert sum(" static " in line for line in listed.splitlines()) == 4  # static and from-scratch, 2 seeds each
    assert sum(" heuristic " in line for line in listed.splitlines()) == 2
    # A finished run's summary damaged since: --resume says which, in one line, and trains nothing (it had
    # ended in a JSONDecodeError traceback).
    (summary,) = (out / "runs" / "static" / "seed43").glob("*/summary.json")
    summary.write_text("{bad")
    assert main(["compare", "--task", "synthetic", "--max-epochs", "3", "--seeds", "2", "--workers", "2",
                 "--resume", str(out), "--db", str(tmp_path / "karn.db"), "--progress-every", "0.5"]) == 2
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert said == f"esper: error: --resume {summary} cannot be read (JSONDecodeError): delete its run directory to " \
                   "train that run again", said


@pytest.mark.slow
def test_a_comparison_with_grouped_arms(tmp_path, capsys):
    """--grouped: each arm's seeds train as one grouped process, into the usual per-seed folders (each a
    run directory of its own), and follow the same seeds trained one process each: the same lifecycle
    epoch by epoch (from-scratch's runs each with its own grown architecture), FLOPs, and losses up to
    float order."""
    flags = ["compare", "--task", "synthetic", "--max-epochs", "8", "--max-batches", "5", "--seeds", "2",
             "--slots", "mid", "late", "--db", str(tmp_path / "karn.db"), "--progress-every", "0.5", "--workers", "2"]
    assert main([*flags, "--out", str(tmp_path / "alone")]) == 0
    capsys.readouterr()
    assert main([*flags, "--out", str(tmp_path / "grouped"), "--grouped"]) == 0
    err = capsys.readouterr().err
    assert all(f"{arm} seed 42-43: " in err for arm in ("static", "heuristic", "from-scratch"))
    assert "each arm grouped" in (tmp_path / "grouped" / "results.md").read_text()
    alone, grouped = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("alone", "grouped"))
    assert any(run["seeds"] for run in alone["heuristic"])  # growth happened: the seeds' path is in the group
    for grown, scratch in zip(grouped["heuristic"], grouped["from-scratch"], strict=True):  # each its own grafts
        assert [f"{s['slot']}:{s['blueprint']}" for s in scratch["seeds"]] == final_architecture(grown)
    for arm in ("static", "heuristic", "from-scratch"):
        for seed, a, g in zip((42, 43), alone[arm], grouped[arm], strict=True):
            (config,) = (tmp_path / "grouped" / "runs" / arm / f"seed{seed}").glob("*/config.json")
            assert json.loads(config.read_text())["grouped"] and g["seed"] == seed
            assert g["train_flops"] == a["train_flops"] and g["total_params"] == a["total_params"]
            assert [c["stages"] for c in g["curve"]] == [c["stages"] for c in a["curve"]]
            assert g["curve"][-1]["val_loss"] == pytest.approx(a["curve"][-1]["val_loss"], rel=1e-2)


def test_a_comparison_resumes_only_with_its_own_settings(tmp_path, capsys):
    """--resume refuses a folder compared with other settings, naming them; where and how fast it runs
    (device, workers, data, progress, cuDNN's benchmark mode, CUDA graphs) may change."""
    saved = CompareConfig(task="synthetic", seeds=3, workers=2, out_dir=str(tmp_path))
    (tmp_path / "compare.json").write_text(json.dumps(asdict(saved)))
    assert main(["compare", "--task", "synthetic", "--seeds", "2", "--max-epochs", "5", "--resume", str(tmp_path)]) == 2
    assert "other settings: max_epochs, seeds differ" in capsys.readouterr().err
    assert differences(dataclasses.replace(saved, workers=1, device="cuda:1", progress_every=5.0,
                                           cudnn_benchmark=True, cuda_graph=False), tmp_path) == []
    # The ppo arm's policy file rewritten since (PPO rewrites its checkpoint as it trains) is another setting;
    # a comparison saved before policies were digested, without one, is not.
    with_policy = dataclasses.replace(saved, policy="/p.pt", policy_sha256="0" * 64)
    (tmp_path / "compare.json").write_text(json.dumps(asdict(with_policy)))
    assert differences(dataclasses.replace(with_policy, policy_sha256="1" * 64), tmp_path) == ["policy_sha256"]
    (tmp_path / "compare.json").write_text(json.dumps({k: v for k, v in asdict(saved).items() if k != "policy_sha256"}))
    assert differences(saved, tmp_path) == []


@pytest.mark.chaos  # a comparison SIGKILLed mid-run: in .ci/run's second pass, with the other fault injections
def test_a_comparison_killed_mid_run_resumes_to_the_results_of_one_never_stopped(tmp_path, capsys):
    """The comparison and its runs SIGKILLed at once (a power cut) once a run has finished and another
    has started; `--resume` keeps the finished run, starts the cut-off one again, and every arm's
    results equal those of the same comparison run straight through."""
    flags = ["compare", "--task", "synthetic", "--max-epochs", "3", "--seeds", "1", "--workers", "2",
             "--db", str(tmp_path / "karn.db"), "--progress-every", "0"]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert main([*flags, "--out", str(straight)]) == 0

    proc = subprocess.Popen([sys.executable, "-m", "esper.cli", *flags, "--out", str(cut)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    run_dirs = lambda: {p.parent for p in (cut / "runs").glob("*/*/*/config.json")}
    finished = lambda: {p.parent for p in (cut / "runs").glob("*/*/*/summary.json")}
    deadline = time.monotonic() + 120
    while not (finished() and run_dirs() - finished()):
        assert proc.poll() is None and time.monotonic() < deadline, "the comparison ended before it was cut"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kept, cut_off = finished(), run_dirs() - finished()
    assert len(kept) < 3  # of 3 runs: a seed of static, heuristic and from-scratch

    capsys.readouterr()
    assert main([*flags, "--resume", str(cut)]) == 0
    said = capsys.readouterr().err
    assert said.count("finished already") == len(kept)
    assert kept <= finished() and not cut_off & run_dirs()  # the cut-off runs started again, in new run dirs
    assert "over 2 invocations (interrupted and resumed)" in (cut / "results.md").read_text()
    a, b = (json.loads((d / "results.json").read_text()) for d in (straight, cut))
    assert a.keys() == b.keys() == {"static", "heuristic", "from-scratch"}
    for arm in a:
        for x, y in zip(a[arm], b[arm], strict=True):
            assert (x["seed"], x["test_accuracy"], x["curve"], x["seeds"]) == (y["seed"], y["test_accuracy"], y["curve"], y["seeds"])



def children_of(pid: int) -> list[int]:
    """The processes `pid` started, from any of its threads (Linux lists them per thread)."""
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


@pytest.mark.chaos  # Ctrl-C and SIGTERM mid-comparison: likewise
@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_a_stopped_comparison_ends_its_runs_and_says_how_to_resume_it(stop, tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) or SIGTERM to compare alone (`kill`, a scheduler)
    during the second of four queued runs: compare exits 130 within seconds, leaves no run training
    (SIGTERM reaches only compare, which ends its runs itself), starts none of the runs still queued,
    keeps its wall time for the resume, and names the --resume command."""
    out = tmp_path / "cmp"
    proc = subprocess.Popen([sys.executable, "-m", "esper.cli", "compare", "--task", "synthetic", "--max-epochs", "3",
                             "--seeds", "2", "--workers", "1", "--arms", "static", "heuristic", "--out", str(out),
                             "--db", str(tmp_path / "karn.db")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # SIG_DFL as at a terminal: a test runner started in the background (`cmd &` in a script) passes
    # SIGINT on ignored, and an ignored Ctrl-C would test nothing.
    run_dirs = lambda: sorted(p.parent for p in (out / "runs").glob("*/*/*/config.json"))
    deadline = time.monotonic() + 120
    while len(run_dirs()) < 2:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    runs = children_of(proc.pid)
    assert len(runs) == 1  # the second run, training
    if stop == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert f"--resume {out}" in err
    assert not Path(f"/proc/{runs[0]}").exists(), "a run went on training after its comparison stopped"
    assert len(run_dirs()) == 2 and (run_dirs()[0] / "summary.json").is_file() != (run_dirs()[1] / "summary.json").is_file()
    assert json.loads((out / "wall.json").read_text())["invocations"] == 1


def test_a_torn_wall_time_costs_only_the_wall_time(tmp_path, capsys):
    """wall.json unreadable on --resume (it had been a JSONDecodeError traceback): the comparison finishes,
    says so, and counts this invocation's time alone."""
    flags = ["compare", "--task", "synthetic", "--max-epochs", "1", "--max-batches", "1", "--seeds", "1",
             "--arms", "static", "--db", str(tmp_path / "karn.db"), "--progress-every", "0"]
    out = tmp_path / "cmp"
    assert main([*flags, "--out", str(out)]) == 0
    (out / "wall.json").write_text('{"seconds": 1')
    capsys.readouterr()
    assert main([*flags, "--resume", str(out)]) == 0
    assert f"esper: warning: {out / 'wall.json'} cannot be read (JSONDecodeError): the wall time counts this " \
           "invocation only" in capsys.readouterr().err
    assert json.loads((out / "wall.json").read_text())["invocations"] == 1
