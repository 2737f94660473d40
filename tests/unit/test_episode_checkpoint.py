"""Episode checkpoints: a growth run saved at an epoch boundary and loaded into a new GrowthEnv continues
bit for bit on the CPU (issue 4: a worker killed and restarted loses nothing of its episode)."""

import contextlib
import dataclasses
import io
import json
import random
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from esper import experiment
from esper.cli import build_parser, main, train_config
from esper.experiment import RunConfig, make_policy, run
from esper.leyline import Action, Blueprint, Decision, Operation
from esper.karn.dashboard.state import DashboardState
from esper.karn.runs_db import RunsDB
from esper.nissa import ListSink, Telemetry, read_jsonl
from esper.simic import EnvConfig, GrowthEnv, run_episode
from esper.simic.checkpoint import load_checkpoint, save_checkpoint
from esper.tamiyo import HeuristicConfig, HeuristicPolicy
from esper.tolaria.data import load_task_data
from esper.tolaria.trainer import TrainConfig
from support import Interrupted, StopsAt

EAGER = HeuristicPolicy(HeuristicConfig(min_epoch_to_germinate=3, plateau_patience=2))
FORMAT = "esper.test.episode/1"


def comparable(events):
    """Events without what the clock decides (wall time, epoch seconds)."""
    out = []
    for e in events:
        e = type(e).FromString(e.SerializeToString())
        e.wall_time = 0.0
        if e.HasField("epoch"):
            e.epoch.epoch_seconds = 0.0
        out.append(e)
    return out


def straight(cfg, data, seed):
    sink = ListSink()
    env = GrowthEnv(cfg, data, torch.device("cpu"), Telemetry("run", sinks=[sink]))
    obs = run_episode(env, EAGER, seed)
    return env, obs, sink.events


def resumed_at(cfg, data, seed, boundaries, path):
    """The same episode, saved at each epoch in `boundaries` and continued in a new GrowthEnv from the file."""
    sink = ListSink()
    env = GrowthEnv(cfg, data, torch.device("cpu"), Telemetry("run", sinks=[sink]))
    obs, done = env.reset(seed), False
    while not done:
        if env.epoch in boundaries:
            save_checkpoint(env.state_dict(), path, FORMAT)
            saved = np.random.get_state()[1].copy(), random.getstate()
            # Disturb every global RNG: the checkpoint has to bring them back.
            torch.manual_seed(12345), np.random.seed(1), random.seed(2)
            env = GrowthEnv(cfg, data, torch.device("cpu"), Telemetry("run", sinks=[sink]))
            obs = env.resume(load_checkpoint(path, FORMAT))
            # Nothing in an episode draws from these after a resume (torch's is the episode's own: own_rng),
            # so the results below could not show a generator left disturbed: asked here.
            assert np.array_equal(np.random.get_state()[1], saved[0]) and random.getstate() == saved[1]
            assert torch.equal(torch.get_rng_state(), env.rng)
        obs, done = env.step(EAGER.decide(obs))
    return env, obs, sink.events


def assert_identical(a, b):
    (env_a, obs_a, events_a), (env_b, obs_b, events_b) = a, b
    assert comparable(events_a) == comparable(events_b)
    assert obs_a == obs_b
    assert [r.__dict__ for r in env_a.model.records] == [r.__dict__ for r in env_b.model.records]
    weights_a, weights_b = env_a.model.state_dict(), env_b.model.state_dict()
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert env_a.evaluate_test() == env_b.evaluate_test()


def test_saved_and_loaded_at_every_epoch_equals_straight_run(synthetic_data, tmp_path):
    """16 epochs, 3 slots, seeds kept, culled and growing (seed 1, found by trying seeds on this CPU
    build): a checkpoint round trip at every epoch boundary, each continued in a new environment, gives
    the same events, weights, records and accuracies."""
    cfg = EnvConfig(task="synthetic", max_epochs=16, slots=("early", "mid", "late"))
    reference = straight(cfg, synthetic_data, 1)
    fates = sorted({r.fate for r in reference[0].model.records})
    print(f"seeds: {len(reference[0].model.records)}, fates {fates}, val {reference[1].signals.val_accuracy:.4f}%")
    assert {"fossilized", "culled", "blending"} <= set(fates), "the episode must cross these fates to test them"
    assert_identical(reference, resumed_at(cfg, synthetic_data, 1, set(range(1, 16)), tmp_path / "ckpt.pt"))


def test_half_then_half_on_cifar10(shared_cifar_dir, tmp_path):
    """The real data path (crop/flip augmentation, BatchNorm, SGD momentum): 3 epochs straight equal
    2 + save + load + 1, with a seed germinated (and given its optimizer) before the save."""
    cfg = EnvConfig(task="cifar10", max_epochs=3, slots=("mid",), train=TrainConfig(max_batches=2, eval_batch_size=500))
    data = load_task_data("cifar10", str(shared_cifar_dir))
    data = type(data)(**{**data.__dict__, "val_x": data.val_x[:500], "val_y": data.val_y[:500],
                         "test_x": data.test_x[:500], "test_y": data.test_y[:500]})
    global EAGER
    keep, EAGER = EAGER, HeuristicPolicy(HeuristicConfig(min_epoch_to_germinate=1, plateau_patience=0))
    try:
        reference = straight(cfg, data, 0)
        assert reference[0].model.records, "a seed must be alive across the save"
        assert_identical(reference, resumed_at(cfg, data, 0, {2}, tmp_path / "ckpt.pt"))
    finally:
        EAGER = keep


def test_resume_refuses_another_run(synthetic_data):
    env = GrowthEnv(EnvConfig(task="synthetic", max_epochs=2), synthetic_data, torch.device("cpu"), Telemetry("a"))
    env.reset(0)
    other = GrowthEnv(EnvConfig(task="synthetic", max_epochs=2), synthetic_data, torch.device("cpu"), Telemetry("b"))
    with pytest.raises(ValueError, match="run a"):
        other.resume(env.state_dict())


@pytest.fixture(scope="module")
def saved_policy(tmp_path_factory) -> str:
    """A PPO policy for the synthetic task with slots early and mid (two updates of `esper train ppo`)."""
    runs = tmp_path_factory.mktemp("ppo")
    assert main(["train", "ppo", "--task", "synthetic", "--max-epochs", "3", "--max-batches", "1", "--slots", "early",
                 "mid", "--n-envs", "2", "--num-workers", "1", "--episodes", "4", "--update-every", "1",
                 "--runs-dir", str(runs), "--telemetry-level", "off"]) == 0
    (checkpoint,) = runs.glob("*/checkpoint.pt")
    return str(checkpoint)


def test_resume_refuses_what_it_cannot_continue_in_one_line(tmp_path, capsys, saved_policy):
    """A learned run whose policy file was rewritten since (PPO rewrites its checkpoint as it trains) is refused:
    the episode would have been decided by two policies. So are a PPO run directory and a config.json that is
    not JSON, in one line each (tracebacks before)."""
    policy = tmp_path / "policy.pt"
    state = load_checkpoint(saved_policy)
    save_checkpoint({k: v for k, v in state.items() if k != "format"}, policy)
    flags = ["train", "learned", "--task", "synthetic", "--max-epochs", "4", "--max-batches", "2", "--slots", "early",
             "mid", "--policy", str(policy), "--telemetry-level", "minimal", "--runs-dir", str(tmp_path / "runs")]
    cfg = train_config(build_parser().parse_args(flags))
    with pytest.raises(Interrupted):
        run(cfg, policy=StopsAt(2, make_policy(cfg)))
    run_dir, = (p for p in (tmp_path / "runs").iterdir() if p.is_dir())
    save_checkpoint({k: v for k, v in state.items() if k != "format"} | {"rewritten": True}, policy)
    not_json = tmp_path / "not_json"
    not_json.mkdir()
    (not_json / "config.json").write_text("not json")
    capsys.readouterr()
    for resume, needle in ((run_dir, "other settings: policy_sha256 differ"),
                           (Path(saved_policy).parent, "is not a run directory of esper train"),
                           (not_json, "is not a run directory of esper train")):
        assert main([*flags, "--resume", str(resume)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err


@pytest.mark.parametrize("grouping", ["--grouped", "--no-grouped"])
def test_a_learned_experiment_is_decided_by_the_policy_it_started_with(grouping, tmp_path, saved_policy, monkeypatch):
    """Every episode is decided by the policy read as the experiment started, the one its policy_sha256
    records: a policy file rewritten as the first episode (or group) ended, as PPO rewrites its checkpoint
    while it trains, had decided the episodes after it."""
    monkeypatch.setattr(experiment, "GROUP_EPISODES", 1)  # grouped: the second episode its own group
    policy = tmp_path / "policy.pt"
    state = {k: v for k, v in load_checkpoint(saved_policy).items() if k != "format"}
    save_checkpoint(state, policy)
    flags = ["train", "learned", "--task", "synthetic", "--max-epochs", "6", "--max-batches", "2", "--slots", "early",
             "mid", "--policy", str(policy), "--telemetry-level", "minimal", "--episodes", "2", grouping]

    def summaries(name: str) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted((tmp_path / name).glob("*/*/summary.json"))]

    assert main([*flags, "--runs-dir", str(tmp_path / "kept" / "seed{seed}")]) == 0
    other = state | {"network": {k: v.flip(0) if v.dim() else v for k, v in state["network"].items()}}
    cfg = train_config(build_parser().parse_args([*flags, "--runs-dir", str(tmp_path / "rewritten" / "seed{seed}")]))
    run(cfg, console=Console(file=io.StringIO()), on_finished=lambda run_dir, summary: save_checkpoint(other, policy))
    assert main([*flags, "--runs-dir", str(tmp_path / "other" / "seed{seed}"), "--seed", "43",
                 "--episodes", "1"]) == 0  # the rewritten policy's own run of the second episode
    kept, rewritten, by_other = summaries("kept"), summaries("rewritten"), summaries("other")
    for a, b in zip(rewritten, kept, strict=True):
        assert sorted(k for k in a if a[k] != b[k]) == ["run_id", "wall_seconds"]
    assert by_other[0]["seeds"] != kept[1]["seeds"], "the two policies decide alike: the test could not fail"


POLICY_DAMAGES = {  # how a policy file is damaged -> what the refusal says, after "cannot be used ("
    "weights not finite": (lambda state: state.update(network={k: torch.full_like(v, float("nan"))
                                                               for k, v in state["network"].items()}),
                           "ValueError: policy weights that are not finite: "),
    "network missing": (lambda state: state.pop("network"), "KeyError: 'network'"),
    "hidden size a string": (lambda state: state.update(hidden_size="64"), "TypeError: "),
    "clip_obs a string": (lambda state: state.update(clip_obs="5"), "ValueError: clip_obs '5' is no positive number"),
    "counters missing": (lambda state: state.pop("counters"), "KeyError: 'counters'"),
    "trained seeds a string": (lambda state: state.update(trained_seeds="abc"),
                               "ValueError: trained_seeds 'abc' is no list of seeds"),
}


@pytest.mark.parametrize("damage", list(POLICY_DAMAGES))
def test_a_damaged_policy_is_refused_in_one_line_before_anything_trains(damage, tmp_path, capsys, saved_policy):
    """Weights not finite had failed as the run built them: a traceback, its run directory made (and a comparison
    had trained its other arms first); a key missing or a value of another type had ended either command in a
    traceback, or (trained_seeds "abc") been taken for the seeds a, b and c."""
    spoil, why = POLICY_DAMAGES[damage]
    state = load_checkpoint(saved_policy)
    spoil(state)
    bad = tmp_path / "bad.pt"
    save_checkpoint({k: v for k, v in state.items() if k != "format"}, bad)
    runs = tmp_path / "runs"
    commands = [["compare", "--arms", "static", "--seed", "1000", "--out", str(tmp_path / "cmp")]]
    if damage != "trained seeds a string":  # a learned run does not ask which seeds it learned from
        commands.append(["train", "learned", "--runs-dir", str(runs)])
    for argv in commands:
        assert main([*argv, "--task", "synthetic", "--slots", "early", "mid", "--policy", str(bad)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"esper: error: --policy {bad} cannot be used ({why}"), err
    assert not runs.exists() and not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("mode", ["heuristic", "learned"])
def test_esper_train_resume_continues_an_interrupted_run(mode, tmp_path, capsys, request):
    """`esper train heuristic|learned --resume RUN_DIR` finishes a run cut off after epoch 3 exactly as a run
    that was never stopped; a different setting is refused in one line (exit 2)."""
    flags = ["--task", "synthetic", "--max-epochs", "6", "--slots", "early", "mid", "--device", "cpu",
             "--telemetry-level", "minimal"]
    if mode == "learned":
        flags += ["--policy", request.getfixturevalue("saved_policy")]
    cfg = train_config(build_parser().parse_args(["train", mode, *flags, "--runs-dir", str(tmp_path / "cut")]))
    with pytest.raises(Interrupted):
        run(cfg, policy=StopsAt(3, make_policy(cfg)))
    run_dir, = (p for p in (tmp_path / "cut").iterdir() if p.is_dir())
    assert (run_dir / "checkpoint.pt").is_file() and not (run_dir / "summary.json").exists()

    assert main(["train", mode, *flags, "--max-epochs", "7", "--resume", str(run_dir)]) == 2
    assert "env.max_epochs" in capsys.readouterr().err
    assert main(["train", mode, *flags, "--runs-dir", str(tmp_path / "cut"), "--resume", str(run_dir),
                 "--cudnn-benchmark", "--no-cuda-graph"]) == 0  # how fast it runs may change
    assert "resuming after epoch 3" in capsys.readouterr().err
    assert main(["train", mode, *flags, "--runs-dir", str(tmp_path / "straight")]) == 0
    straight, = (p for p in (tmp_path / "straight").iterdir() if p.is_dir())
    a, b = (json.loads((d / "summary.json").read_text()) for d in (run_dir, straight))
    assert sorted(k for k in a if a[k] != b[k]) == ["run_id", "wall_seconds"]
    assert a["seed_counts"], "no seed germinated: the cut would not have tested the lifecycle's state"
    assert not (run_dir / "checkpoint.pt").exists()
    events = [json.loads(line)["sequence"] for line in (run_dir / "telemetry.jsonl").read_text().splitlines()]
    assert events == [str(i) for i in range(1, len(events) + 1)]


def test_continue_runs_resumes_an_unfinished_run_and_skips_a_finished_one(tmp_path, capsys):
    """The restarted worker's rule (`run(continue_runs=True)`): the newest run of the same config and
    episode seed is resumed if unfinished, skipped if finished; another config starts a new run."""
    flags = ["--task", "synthetic", "--max-epochs", "3", "--slots", "mid", "--device", "cpu", "--telemetry-level", "off"]
    cfg = train_config(build_parser().parse_args(["train", "heuristic", *flags, "--runs-dir", str(tmp_path)]))
    run_dirs = lambda: sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    with pytest.raises(Interrupted):
        run(cfg, policy=StopsAt(2, EAGER), continue_runs=True)
    first = run_dirs()
    config = tmp_path / first[0] / "config.json"  # a run directory from before policies were digested
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "policy_sha256"}))
    assert run(cfg, continue_runs=True)[0]["epochs"] == 3
    assert "resuming after epoch 2" in capsys.readouterr().err
    stale = tmp_path / first[0] / "checkpoint.pt"
    stale.write_bytes(b"left by a kill between summary.json and the checkpoint's removal")
    assert run(cfg, continue_runs=True)[0]["run_id"] == first[0]
    assert "finished already" in capsys.readouterr().err and not stale.exists()
    assert run_dirs() == first
    run(dataclasses.replace(cfg, seed=7), continue_runs=True)  # another seed: another run id, whatever the second
    assert len(run_dirs()) == 2


class Script:
    """These actions, one per epoch, then WAIT."""

    def __init__(self, *actions: Action):
        self.actions = list(actions)

    def decide(self, obs):
        action = self.actions.pop(0) if self.actions else Action(operation=Operation.OPERATION_WAIT)
        return Decision(action=action, reason="scripted")


def test_the_curve_shows_the_stage_each_epoch_trained_in(synthetic_data, tmp_path):
    """A seed culled at epoch 3 is CULLED in epoch 3 (the end of that epoch moves it on to EMBARGOED),
    and DORMANT again once the embargo is over: the stages the lifecycle timeline draws."""
    env = EnvConfig(task="synthetic", max_epochs=8, slots=("mid",), train=TrainConfig(max_batches=2))
    cfg = RunConfig(mode="heuristic", env=env, runs_dir=str(tmp_path))
    script = Script(Action(operation=Operation.OPERATION_GERMINATE, slot="mid",
                           blueprint=Blueprint.BLUEPRINT_CONV_LIGHT),
                    Action(operation=Operation.OPERATION_ADVANCE, slot="mid"),
                    Action(operation=Operation.OPERATION_CULL, slot="mid"))
    summary = experiment.run_one(cfg, synthetic_data, torch.device("cpu"), 0, Console(file=io.StringIO()), script)
    stages = [point["stages"]["mid"] for point in summary["curve"]]
    print(stages)
    assert stages == ["GERMINATED", "TRAINING", "CULLED", "EMBARGOED", "EMBARGOED", "EMBARGOED", "DORMANT", "DORMANT"]
    # The epoch reports carry them too, for the dashboard's timeline (their slots hold the stages at the end).
    (run_dir,) = tmp_path.glob("*/")
    state = DashboardState()
    shown = [m["slots"][0]["trained_stage"] for e in read_jsonl(run_dir / "telemetry.jsonl")
             for m in state.apply(e) if m["type"] == "epoch"]
    assert shown == stages


class CtrlC:
    """The eager heuristic, and Ctrl-C once, at `epoch` of the episode of `seed`."""

    def __init__(self, seed: int, epoch: int):
        self.seed, self.epoch, self.fired = seed, epoch, False

    def decide(self, obs):
        if obs.run_id.endswith(f"_s{self.seed}") and obs.signals.epoch == self.epoch and not self.fired:
            self.fired = True
            raise KeyboardInterrupt
        return EAGER.decide(obs)


def test_ctrl_c_names_the_run_to_resume_and_resuming_an_earlier_episode_finishes_the_experiment(
        tmp_path, monkeypatch, capsys):
    """Ctrl-C in the third of three episodes: one line naming its run directory (had been a traceback),
    the two finished episodes already in the run store (it had recorded only when the command returned),
    and `--resume` of the first episode's directory, the first that `ls` shows, goes on to finish the
    third in its own directory (it had trained the second and third again in new ones)."""
    runs, db = tmp_path / "runs", tmp_path / "runs" / "karn.db"
    argv = ["train", "heuristic", "--task", "synthetic", "--max-epochs", "4", "--max-batches", "1",
            "--episodes", "3", "--seed", "7", "--runs-dir", str(runs)]
    monkeypatch.setattr(experiment, "make_policy", lambda cfg: CtrlC(seed=9, epoch=2))
    assert main(argv) == 130
    first, second, third = sorted(runs.glob("*_s*"))
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert said == f"esper: interrupted; continue it with the same flags and --resume {third}"
    assert (third / "checkpoint.pt").is_file() and not (third / "summary.json").exists()
    listed = RunsDB(db).runs()
    assert sorted(r["run_id"] for r in listed) == [first.name, second.name]

    monkeypatch.setattr(experiment, "make_policy", lambda cfg: EAGER)
    assert main(argv) == 0  # another experiment of the same flags, after it: its episodes are its own
    others = sorted(set(runs.glob("*_s*")) - {first, second, third})
    assert len(others) == 3 and all((d / "summary.json").is_file() for d in others)
    capsys.readouterr()
    assert main([*argv, "--resume", str(first)]) == 0
    said = capsys.readouterr().err
    assert f"{first.name}: finished already" in said and f"{second.name}: finished already" in said
    assert sorted(runs.glob("*_s*")) == sorted([first, second, third, *others])
    assert (third / "summary.json").is_file() and not (third / "checkpoint.pt").exists()
    assert {r["run_id"] for r in RunsDB(db).runs()} == {d.name for d in [first, second, third, *others]}


def test_a_store_that_fails_to_record_an_episode_is_a_warning_and_the_experiment_goes_on(tmp_path, capsys):
    """A store that takes no run (here a trigger refuses every one; another program's `runs` table once did,
    before such a file was refused up front): recording the first episode fails, which had stopped the
    experiment there with a traceback."""
    db = tmp_path / "other.db"
    RunsDB(db).close()
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON runs BEGIN SELECT RAISE(ABORT, 'no runs here'); END")
    runs = tmp_path / "runs"
    assert main(["train", "static", "--task", "synthetic", "--max-epochs", "1", "--max-batches", "1",
                 "--episodes", "2", "--runs-dir", str(runs), "--db", str(db)]) == 0
    assert len(list(runs.glob("*/summary.json"))) == 2
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("esper: warning:")]
    assert len(warnings) == 2 and all(f"--db {db} could not record" in w and "runs index" in w for w in warnings)


def test_ctrl_c_while_an_episode_is_tested_names_it_too(tmp_path, monkeypatch, capsys):
    """Its test evaluation is part of the episode: the checkpoint is still there to resume."""
    def ctrl_c(self, obs):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment.Episode, "finish", ctrl_c)
    runs = tmp_path / "runs"
    assert main(["train", "static", "--task", "synthetic", "--max-epochs", "2", "--max-batches", "1",
                 "--runs-dir", str(runs)]) == 130
    (run_dir,) = runs.glob("*_s42")
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"esper: interrupted; continue it with the same flags and --resume {run_dir}"


def interrupted_at_epoch_2(tmp_path, monkeypatch, *flags: str) -> tuple[list[str], Path]:
    """A 4-epoch synthetic heuristic run stopped by Ctrl-C in epoch 2: the command line that ran it (to resume it
    with) and its run directory. The Ctrl-C policy stays patched in: `monkeypatch.undo()` lets a resume finish."""
    argv = ["train", "heuristic", "--task", "synthetic", "--max-epochs", "4", "--max-batches", "1",
            "--runs-dir", str(tmp_path / "runs"), *flags]
    monkeypatch.setattr(experiment, "make_policy", lambda cfg: CtrlC(seed=42, epoch=2))
    assert main(argv) == 130
    (run_dir,) = (tmp_path / "runs").glob("*_s42")
    return argv, run_dir


def resume_refused(argv: list[str], run_dir: Path, monkeypatch, capsys) -> str:
    """What `--resume run_dir` says as it refuses (exit 2), the Ctrl-C policy undone: its last line."""
    monkeypatch.undo()
    capsys.readouterr()
    assert main([*argv, "--resume", str(run_dir)]) == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def event_after_checkpoint(telemetry: Path) -> None:
    """Append the event a run checkpointed every 2 epochs has after its checkpoint (a resume cuts it back, once
    it is sure to go on): a refusal that cut the telemetry first would drop it."""
    last = json.loads(telemetry.read_text().splitlines()[-1])
    with telemetry.open("a") as f:
        f.write(json.dumps(last | {"sequence": str(int(last["sequence"]) + 1)}) + "\n")


def test_a_torn_checkpoint_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    argv, run_dir = interrupted_at_epoch_2(tmp_path, monkeypatch)
    checkpoint = run_dir / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    capsys.readouterr()
    assert main([*argv, "--resume", str(run_dir)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"esper: error: --resume {checkpoint} is not a checkpoint (torch.load: RuntimeError)"


def test_ctrl_c_without_a_checkpoint_says_the_run_starts_again(tmp_path, monkeypatch, capsys):
    """With --checkpoint-every 0 the hint had promised to continue the run, and --resume then started it again
    from epoch 1 without a word."""
    argv, run_dir = interrupted_at_epoch_2(tmp_path, monkeypatch, "--checkpoint-every", "0")
    assert capsys.readouterr().err.strip().splitlines()[-1] == "esper: interrupted; no checkpoint was written " \
        f"(--checkpoint-every 0): the same flags and --resume {run_dir} train it again from epoch 1"
    monkeypatch.undo()
    assert main([*argv, "--resume", str(run_dir)]) == 0
    said = " ".join(capsys.readouterr().err.split())
    assert f"{run_dir.name}: no checkpoint; starting it again from its first epoch" in said, said
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 4


def test_a_damaged_run_directory_is_refused_or_resumed_in_one_line(tmp_path, monkeypatch, capsys):
    """A finished run's summary damaged since is refused in one line (it had ended in a JSONDecodeError
    traceback); an interrupted run whose telemetry.jsonl was deleted resumes, saying that its telemetry keeps
    the events from there on (it had ended in FileNotFoundError)."""
    argv, run_dir = interrupted_at_epoch_2(tmp_path, monkeypatch)
    (run_dir / "telemetry.jsonl").unlink()
    monkeypatch.undo()
    capsys.readouterr()
    assert main([*argv, "--resume", str(run_dir)]) == 0
    said = " ".join(capsys.readouterr().err.split())  # the console's lines, unwrapped
    assert "its telemetry.jsonl is gone; it keeps the events from this epoch on" in said, said
    sequences = [int(json.loads(line)["sequence"]) for line in (run_dir / "telemetry.jsonl").read_text().splitlines()]
    assert sequences[0] > 1 and sequences == list(range(sequences[0], sequences[0] + len(sequences)))
    summary = run_dir / "summary.json"
    assert json.loads(summary.read_text())["epochs"] == 4
    summary.write_text("{bad")
    assert main([*argv, "--resume", str(run_dir)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"esper: error: --resume {summary} cannot be read " \
        "(JSONDecodeError): delete its run directory to train that run again"


def test_an_experiment_from_before_ids_resumes_its_later_episodes_too(tmp_path, monkeypatch, capsys):
    """Run directories without `group` in config.json (written before experiments had ids): a resume of the
    first still continues the third in its own directory; the first's telemetry, now unreadable, costs its
    record in the store only (a warning; it had been a traceback)."""
    runs = tmp_path / "runs"
    argv = ["train", "heuristic", "--task", "synthetic", "--max-epochs", "4", "--max-batches", "1",
            "--episodes", "3", "--seed", "7", "--runs-dir", str(runs)]
    monkeypatch.setattr(experiment, "make_policy", lambda cfg: CtrlC(seed=9, epoch=2))
    assert main(argv) == 130
    first, second, third = sorted(runs.glob("*_s*"))
    for run_dir in (first, second, third):
        config = json.loads((run_dir / "config.json").read_text())
        del config["group"]
        (run_dir / "config.json").write_text(json.dumps(config))
    with (first / "telemetry.jsonl").open("a") as f:
        f.write('{"oops": 1}\n')
    monkeypatch.setattr(experiment, "make_policy", lambda cfg: EAGER)
    capsys.readouterr()
    assert main([*argv, "--resume", str(first)]) == 0
    assert sorted(runs.glob("*_s*")) == [first, second, third] and (third / "summary.json").is_file()
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("esper: warning:")]
    assert len(warnings) == 1 and f"could not record {first.name}" in warnings[0]


HOLDS_THE_LOCK = """
import sys
from pathlib import Path
from esper.durable import lock_exclusively
lock = lock_exclusively(Path(sys.argv[1]) / "train.lock")
print("held" if lock else "refused", flush=True)
sys.stdin.read()
"""


def test_a_run_another_process_trains_is_refused_and_left_alone(tmp_path, monkeypatch, capsys):
    """A --resume of a run still training (or two workers of one experiment) had trimmed and rewritten its
    files under the process training it, whose later events went to a deleted telemetry.jsonl. Training holds
    the run directory's lock (train.lock) from its start to its summary; the other process is refused."""
    import subprocess
    import sys

    class Probe:  # the eager heuristic, trying the lock as the run trains
        tried: list = []

        def decide(self, obs):
            Probe.tried.append(experiment.lock_exclusively(run_dir / "train.lock"))
            return EAGER.decide(obs)

    argv, run_dir = interrupted_at_epoch_2(tmp_path, monkeypatch)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    holder = subprocess.Popen([sys.executable, "-c", HOLDS_THE_LOCK, str(run_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.undo()
        capsys.readouterr()
        assert main([*argv, "--resume", str(run_dir)]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == \
            f"esper: error: --resume {run_dir} is being trained by another process"
        assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
    finally:
        holder.communicate("")
    monkeypatch.setattr(experiment, "make_policy", lambda cfg: Probe())
    assert main([*argv, "--resume", str(run_dir)]) == 0
    assert Probe.tried and not any(Probe.tried)  # held at every decision
    assert experiment.lock_exclusively(run_dir / "train.lock") is not None  # and let go when the run finished


def test_a_checkpoint_of_another_run_is_refused_before_the_telemetry_is_touched(tmp_path, monkeypatch, capsys):
    """Another run's checkpoint.pt copied in had cut the run's telemetry.jsonl back to that run's sequence, then
    ended in a ValueError traceback."""
    argv, run_dir = interrupted_at_epoch_2(tmp_path / "a", monkeypatch)
    _, other = interrupted_at_epoch_2(tmp_path / "b", monkeypatch, "--max-batches", "1")
    (run_dir / "checkpoint.pt").write_bytes((other / "checkpoint.pt").read_bytes())
    events = (run_dir / "telemetry.jsonl").read_bytes()
    said = resume_refused(argv, run_dir, monkeypatch, capsys)
    assert said == f"esper: error: --resume {run_dir / 'checkpoint.pt'} is the checkpoint of run {other.name}, not " \
        f"of {run_dir.name}"
    assert (run_dir / "telemetry.jsonl").read_bytes() == events


@pytest.mark.parametrize("spelling", ["dot", "symlink"])
def test_a_run_resumed_by_another_name_for_its_folder_continues_as_itself(spelling, tmp_path, monkeypatch):
    """`--resume .` and `--resume runs/latest` (a symlink) had taken the name given for the run's id: a ValueError
    traceback, its telemetry cut first."""
    argv, run_dir = interrupted_at_epoch_2(tmp_path, monkeypatch)
    monkeypatch.undo()
    if spelling == "dot":
        monkeypatch.chdir(run_dir)
        given = "."
    else:
        (tmp_path / "latest").symlink_to(run_dir)
        given = str(tmp_path / "latest")
    assert main([*argv, "--resume", given]) == 0
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 4
    assert [p.name for p in (tmp_path / "runs").iterdir() if p.is_dir()] == [run_dir.name]


def test_a_learned_run_resumes_with_its_policy_file_named_another_way(tmp_path, monkeypatch, saved_policy):
    """The policy's path had been compared as a string: `./p.pt` or an absolute path for the `p.pt` a run began
    with was "other settings: policy differ", though policy_sha256 guards what the file holds."""
    (tmp_path / "pol").mkdir()
    save_checkpoint({k: v for k, v in load_checkpoint(saved_policy).items() if k != "format"},
                    tmp_path / "pol" / "p.pt")
    monkeypatch.chdir(tmp_path)
    flags = ["train", "learned", "--task", "synthetic", "--max-epochs", "4", "--max-batches", "2", "--slots", "mid",
             "--telemetry-level", "minimal", "--runs-dir", "runs"]
    cfg = train_config(build_parser().parse_args([*flags, "--policy", "pol/p.pt"]))
    with pytest.raises(Interrupted):
        run(cfg, policy=StopsAt(2, make_policy(cfg)))
    (run_dir,) = (tmp_path / "runs").glob("*_s42")
    assert main([*flags, "--policy", str(tmp_path / "pol" / "p.pt"), "--resume", str(run_dir)]) == 0
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 4


def test_a_telemetry_line_that_is_not_an_object_is_cut_as_a_torn_one_is(tmp_path, monkeypatch):
    """A line of JSON that is no object ("5", a hand edit) after the checkpoint's events had ended the resume in
    a TypeError traceback; like a torn line, it and what follows are cut."""
    argv, run_dir = interrupted_at_epoch_2(tmp_path, monkeypatch)
    with (run_dir / "telemetry.jsonl").open("a") as f:
        f.write("5\n")
    monkeypatch.undo()
    assert main([*argv, "--resume", str(run_dir)]) == 0
    lines = (run_dir / "telemetry.jsonl").read_text().splitlines()
    assert "5" not in lines and all(json.loads(line)["runId"] == run_dir.name for line in lines)


def test_a_run_that_fails_lets_go_of_its_directory(tmp_path, monkeypatch):
    """A run that failed with anything but Ctrl-C had kept its train.lock for the life of the process (an app
    left open after `esper train --tui` failed): a --resume from another process was refused."""
    class Fails:
        def decide(self, obs):
            if obs.signals.epoch == 2:
                raise RuntimeError("a policy's bug")
            return EAGER.decide(obs)

    monkeypatch.setattr(experiment, "make_policy", lambda cfg: Fails())
    argv = ["train", "heuristic", "--task", "synthetic", "--max-epochs", "4", "--max-batches", "1",
            "--runs-dir", str(tmp_path / "runs")]
    with pytest.raises(RuntimeError, match="a policy's bug"):
        main(argv)
    (run_dir,) = (tmp_path / "runs").glob("*_s42")
    lock = experiment.lock_exclusively(run_dir / "train.lock")
    assert lock is not None
    lock.close()


def spoil(state: dict, damage: str) -> str:
    """`state` (an episode checkpoint's) damaged as a hand might; what the refusal says of it."""
    env = state["env"]
    if damage == "a key missing":
        del env["rng"]
        return "KeyError: 'rng'"
    if damage == "a tensor of another shape":
        name = next(k for k, v in env["model"].items() if v.dim() == 4)
        env["model"][name] = env["model"][name][:1]
        return "RuntimeError: Error(s) in loading state_dict for MorphogeneticModel:"
    if damage == "a sequence below 0":  # had cut the telemetry to nothing, then a ValueError at the first event
        env["sequence"] = -5
        return "ValueError: telemetry sequence -5"
    if damage == "a stage this build lacks":  # had failed in the progress bar, after the trim
        env["lifecycle"]["slots"]["mid"]["stage"] = 99
        return "ValueError: slots ['mid'] in no stage this build knows"
    if damage == "momentum of another shape":  # taken by torch, to fail mid-epoch
        buffers = env["trainer"]["host_opt"]["state"][0]
        buffers["momentum_buffer"] = buffers["momentum_buffer"].flatten()[:3]
        return "ValueError: optimizer state {'momentum_buffer': (3,)} for a parameter of shape"
    raise AssertionError(damage)


DAMAGES = ["a key missing", "a tensor of another shape", "a sequence below 0", "a stage this build lacks",
           "momentum of another shape"]


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("grouping", [[], ["--episodes", "2", "--grouped"]])
def test_a_checkpoint_that_cannot_be_continued_is_refused_and_nothing_is_touched(damage, grouping, tmp_path,
                                                                                  monkeypatch, capsys):
    """A checkpoint of the right format made or damaged by hand had failed in a traceback as the run resumed,
    after its telemetry.jsonl had been cut back to the checkpoint's events (or to none); in a group, the second
    run's refused checkpoint had come after the first run's telemetry was cut. Nothing of any run is touched."""
    argv, run_dir = interrupted_at_epoch_2(tmp_path, monkeypatch, *grouping)
    damaged = sorted((tmp_path / "runs").iterdir())[-1]  # the group's second run, or the only one
    checkpoint = damaged / "checkpoint.pt"
    state = load_checkpoint(checkpoint, experiment.EPISODE_FORMAT)
    why = spoil(state, damage)
    save_checkpoint({k: v for k, v in state.items() if k != "format"}, checkpoint, experiment.EPISODE_FORMAT)
    for telemetry in (tmp_path / "runs").glob("*/telemetry.jsonl"):
        event_after_checkpoint(telemetry)
    before = {p: p.read_bytes() for p in (tmp_path / "runs").glob("*/*")}
    said = resume_refused(argv, run_dir, monkeypatch, capsys)
    assert said.startswith(f"esper: error: --resume {checkpoint} cannot be continued ({why}"), said
    assert {p: p.read_bytes() for p in (tmp_path / "runs").glob("*/*")} == before
    assert len({p.parent for p in before if p.name == "telemetry.jsonl"}) == (2 if grouping else 1)


@pytest.mark.parametrize("what", ["a folder", "a link to nothing"])
def test_a_checkpoint_that_is_no_file_is_refused_not_taken_for_none(what, tmp_path, monkeypatch, capsys):
    """It had been taken for "no checkpoint": the run trained again from epoch 1, its telemetry cut to nothing
    (a folder then failed at the first save)."""
    argv, run_dir = interrupted_at_epoch_2(tmp_path, monkeypatch)
    checkpoint = run_dir / "checkpoint.pt"
    checkpoint.unlink()
    checkpoint.mkdir() if what == "a folder" else checkpoint.symlink_to(tmp_path / "nowhere.pt")
    events = (run_dir / "telemetry.jsonl").read_bytes()
    assert resume_refused(argv, run_dir, monkeypatch, capsys) == f"esper: error: --resume {checkpoint} is not a " \
        "file: move it away to train the run again from its first epoch"
    assert (run_dir / "telemetry.jsonl").read_bytes() == events


def test_a_telemetry_file_that_is_no_file_is_refused_before_the_group_is_touched(tmp_path, monkeypatch, capsys):
    """A folder in the place of a grouped run's telemetry.jsonl had been an IsADirectoryError traceback, after
    the group's first run had had its telemetry cut back."""
    argv, run_dir = interrupted_at_epoch_2(tmp_path, monkeypatch, "--episodes", "2", "--grouped")
    first, second = sorted((tmp_path / "runs").glob("*_s4*"))
    event_after_checkpoint(first / "telemetry.jsonl")
    kept = (first / "telemetry.jsonl").read_bytes()
    (second / "telemetry.jsonl").unlink()
    (second / "telemetry.jsonl").mkdir()
    assert resume_refused(argv, run_dir, monkeypatch, capsys) == \
        f"esper: error: --resume {second / 'telemetry.jsonl'} is not a file: move it away to continue the run"
    assert (first / "telemetry.jsonl").read_bytes() == kept


def test_a_group_save_that_is_no_record_of_one_is_refused(tmp_path, monkeypatch, capsys):
    """A next checkpoint (a group's save a kill cut short) whose group_save is not {"token", "runs"} had ended
    the resume in a KeyError or TypeError traceback."""
    argv, run_dir = interrupted_at_epoch_2(tmp_path, monkeypatch, "--episodes", "2", "--grouped")
    state = load_checkpoint(run_dir / "checkpoint.pt", experiment.EPISODE_FORMAT)
    next_checkpoint = run_dir / experiment.NEXT_CHECKPOINT
    save_checkpoint({k: v for k, v in state.items() if k != "format"} | {"group_save": {"runs": 5}}, next_checkpoint,
                    experiment.EPISODE_FORMAT)
    assert resume_refused(argv, run_dir, monkeypatch, capsys) == f"esper: error: --resume {next_checkpoint} holds " \
        "no group save it can be settled by (group_save {'runs': 5})"
    assert next_checkpoint.is_file()


def test_an_event_this_build_cannot_read_ends_what_a_resume_keeps(tmp_path, monkeypatch):
    """An event line with a field this build lacks (a hand edit, or a newer build's) among the checkpoint's
    events was kept by the trim, then failed the replay of the run so far in a ValueError traceback; like a
    torn line, it and what follows are cut, and the run resumes."""
    argv, run_dir = interrupted_at_epoch_2(tmp_path, monkeypatch)
    telemetry = run_dir / "telemetry.jsonl"
    lines = telemetry.read_text().splitlines(keepends=True)
    unknown = json.dumps(json.loads(lines[2]) | {"fieldOfANewerBuild": 1}) + "\n"
    telemetry.write_text("".join(lines[:2]) + unknown + "".join(lines[3:]))
    monkeypatch.undo()
    assert main([*argv, "--resume", str(run_dir)]) == 0
    sequences = [int(json.loads(line)["sequence"]) for line in telemetry.read_text().splitlines()]
    assert "fieldOfANewerBuild" not in telemetry.read_text()
    assert sequences[:2] == [1, 2] and sequences[2] > 3  # the checkpoint's epoch 2 ended later than event 3
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 4
