"""`esper train ppo` end to end on the synthetic task, checkpoints, and exact resume."""

import json
from pathlib import Path

import pytest
import torch

from esper.cli import main
from esper.train_ppo import extension_note
from esper.karn.runs_db import RunsDB
from esper.nissa import Telemetry, read_jsonl
from esper.simic import EnvConfig, GrowthEnv, run_episode
from esper.simic.checkpoint import load_checkpoint, load_policy, save_checkpoint
from esper.simic.ppo import PPOConfig
from esper.simic.trainer import PPOTrainer, TrainerConfig
from esper.tolaria.trainer import TrainConfig

TINY = ["--task", "synthetic", "--max-epochs", "3", "--max-batches", "1", "--slots", "early", "mid",
        "--n-envs", "2", "--num-workers", "1"]


def run_dir(runs: Path) -> Path:
    (only,) = [p for p in runs.iterdir() if p.is_dir()]  # beside karn.db, the run store
    return only


def test_train_ppo_writes_a_run_directory_and_a_usable_policy(tmp_path, synthetic_data):
    runs = tmp_path / "runs"
    assert main(["train", "ppo", *TINY, "--episodes", "4", "--update-every", "1", "--runs-dir", str(runs),
                 "--telemetry-file", str(tmp_path / "all.jsonl")]) == 0
    out = run_dir(runs)
    assert out.name.endswith("_ppo_synthetic_s42")
    config = json.loads((out / "config.json").read_text())
    assert config["trainer"]["n_envs"] == 2 and config["trainer"]["ppo"]["ent_coef"] == 0.05
    summary = json.loads((out / "summary.json").read_text())
    assert summary["episodes_done"] == 4 and summary["updates"] == 2 and summary["global_step"] == 12
    assert [e["seed"] for e in summary["episodes"]] == [42, 43, 44, 45]
    assert all(sum(e["actions"].values()) == 3 for e in summary["episodes"])
    events = list(read_jsonl(out / "telemetry.jsonl"))
    updates = [e.ppo_update for e in events if e.HasField("ppo_update")]
    assert [u.update for u in updates] == [1, 2] and updates[-1].rollout_steps == 6
    assert set(updates[-1].action_counts) == {"WAIT", "GERMINATE", "ADVANCE", "CULL"}
    assert set(updates[-1].reward_components) >= {"terminal_accuracy", "contribution_shaping"}
    decisions = [e for e in events if e.HasField("decision")]
    assert len(decisions) == 12 and all(e.decision.policy_name == "ppo" for e in decisions)
    assert {e.run_id for e in decisions} == {f"{out.name}_ep{i:04d}" for i in range(4)}
    assert len(list(read_jsonl(tmp_path / "all.jsonl"))) == len(events)
    # Each episode is a run of its own, started and finished (karn had shown them as of no mode, never
    # finished), untested: a training episode's test accuracy is not 0 but none.
    for i in range(4):
        episode = [e for e in events if e.run_id == f"{out.name}_ep{i:04d}"]
        assert episode[0].run_started.mode == "ppo" and episode[0].run_started.seed == 42 + i
        finished = episode[-1].run_finished
        assert finished.epochs == 3 and not finished.HasField("test_accuracy") and finished.val_accuracy > 0
    stored = {r["run_id"]: r for r in RunsDB(runs / "karn.db").runs()}
    for i in range(4):
        assert stored[f"{out.name}_ep{i:04d}"]["finished"] and stored[f"{out.name}_ep{i:04d}"]["test_accuracy"] is None

    policy = load_policy(out / "checkpoint.pt")  # torch.load(weights_only=True) inside
    assert policy.version == "2" and policy.spec.dim == 96
    env = GrowthEnv(EnvConfig(task="synthetic", max_epochs=3, slots=("early", "mid")), synthetic_data,
                    torch.device("cpu"), Telemetry("eval"))
    assert run_episode(env, policy, 1000).signals.epoch == 3

    # `esper train learned` grows under the saved policy: its decisions are the policy's, in order.
    learned_runs = tmp_path / "learned"
    assert main(["train", "learned", "--policy", str(out / "checkpoint.pt"), "--task", "synthetic",
                 "--max-epochs", "3", "--max-batches", "1", "--slots", "early", "mid", "--seed", "1000",
                 "--runs-dir", str(learned_runs)]) == 0
    learned = [e.decision for e in read_jsonl(run_dir(learned_runs) / "telemetry.jsonl") if e.HasField("decision")]
    assert [(d.policy_name, d.policy_version) for d in learned] == [("ppo", "2")] * 3
    chosen = []

    class Recording:
        def decide(self, observation):
            chosen.append(policy.decide(observation))
            return chosen[-1]

    env = GrowthEnv(EnvConfig(task="synthetic", max_epochs=3, slots=("early", "mid"), seed_grad_norms=True,
                              train=TrainConfig(max_batches=1)), synthetic_data, torch.device("cpu"), Telemetry("eval"))
    run_episode(env, Recording(), 1000)
    assert [d.action for d in learned] == [d.action for d in chosen]


def checkpoint(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def without_timing(log: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("steps_per_second", "update_seconds")} for row in log]


def assert_same_training(a: dict, c: dict) -> None:
    """Two checkpoints hold the same policy, optimizer, normalizers, RNG and history, bit for bit."""
    assert a["counters"] == c["counters"]
    for key in a["network"]:
        assert torch.equal(a["network"][key], c["network"][key]), key
    for key in ("obs_rms", "reward_rms"):
        assert all(torch.equal(a[key][k], c[key][k]) for k in a[key])
    for i in a["optimizer"]["state"]:
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(a["optimizer"]["state"][i][k], c["optimizer"]["state"][i][k])
    assert torch.equal(a["rng"]["policy"], c["rng"]["policy"])
    assert without_timing(json.loads(a["update_log_json"])) == without_timing(json.loads(c["update_log_json"]))
    assert json.loads(a["episode_log_json"]) == json.loads(c["episode_log_json"])


def test_resume_continues_bit_for_bit(tmp_path, capsys):
    """4 updates straight == 2 updates, save, resume, 2 more (through the command line)."""
    flags = [*TINY, "--update-every", "1", "--telemetry-level", "off"]
    straight, half, resumed = tmp_path / "straight.pt", tmp_path / "half.pt", tmp_path / "resumed.pt"
    assert main(["train", "ppo", *flags, "--episodes", "8", "--save", str(straight),
                 "--runs-dir", str(tmp_path / "a")]) == 0
    assert main(["train", "ppo", *flags, "--episodes", "4", "--save", str(half),
                 "--runs-dir", str(tmp_path / "b")]) == 0
    assert checkpoint(half)["counters"]["updates"] == 2
    faster = ["--cudnn-benchmark", "--no-cuda-graph"]  # how fast it runs may change
    assert main(["train", "ppo", *flags, "--episodes", "8", "--resume", str(half), "--save", str(resumed),
                 "--runs-dir", str(tmp_path / "c"), *faster]) == 0
    assert checkpoint(resumed)["counters"]["updates"] == 4
    assert_same_training(checkpoint(straight), checkpoint(resumed))
    assert "esper: note" not in capsys.readouterr().err

    # A checkpoint from other settings, or one that is already done, is refused before anything is written.
    assert main(["train", "ppo", *flags, "--episodes", "8", "--resume", str(half), "--lr", "1e-3",
                 "--runs-dir", str(tmp_path / "d")]) == 2
    assert main(["train", "ppo", *flags, "--episodes", "8", "--resume", str(half), "--anneal-lr",
                 "--runs-dir", str(tmp_path / "d")]) == 2
    assert main(["train", "ppo", *flags, "--episodes", "4", "--resume", str(half),
                 "--runs-dir", str(tmp_path / "d")]) == 2
    assert not (tmp_path / "d").exists()
    errors = capsys.readouterr().err
    assert "other settings: ppo.lr differ" in errors and "already holds 4 episodes" in errors
    assert "other settings: ppo.anneal_lr differ" in errors


def test_extending_a_run_whose_end_was_not_a_whole_update_says_how_it_differs():
    """A run of 3 episodes at 2 an update ends with an update on the 1 pending: extended to 4 it has made 3
    updates where one trained straight makes 2 (max weight difference 0.02, measured), though the README said
    "exactly as if never stopped". A run cut mid-way continues exactly, and says nothing."""
    cfg = TrainerConfig(n_envs=1, update_every=2, episodes=4)
    ended = {"config_json": json.dumps({"episodes": 3}), "counters": {"episodes": 3}}
    assert extension_note(cfg, ended) == ("its run ended with an update on the 1 episodes pending, where one trained "
                                          "straight to --episodes 4 updates every 2: it continues, but not as if "
                                          "never stopped")
    assert extension_note(cfg, ended | {"counters": {"episodes": 2}}) == ""  # cut mid-run
    assert extension_note(cfg, {"config_json": json.dumps({"episodes": 2}), "counters": {"episodes": 2}}) == ""
    annealed = TrainerConfig(n_envs=1, update_every=1, episodes=4, ppo=PPOConfig(ent_coef_start=0.1, ent_coef_end=0))
    assert "the entropy bonus, annealed over --episodes, goes back from its value at the end of 3 episodes" in \
        extension_note(annealed, ended)


def test_save_never_writes_over_another_policy_and_is_checked_before_training(tmp_path, capsys):
    """--save on an existing checkpoint had replaced that policy with no word; a folder, or a file on the
    way, failed with a traceback after the first round had trained. A run continuing --resume P may save P."""
    flags = [*TINY, "--update-every", "1", "--telemetry-level", "off", "--runs-dir", str(tmp_path / "runs")]
    policy = tmp_path / "policy.pt"
    assert main(["train", "ppo", *flags, "--episodes", "2", "--save", str(policy)]) == 0
    before = policy.read_bytes()
    (tmp_path / "afile").write_text("x")
    capsys.readouterr()
    for save, said in ((policy, f"--save {policy} holds a checkpoint already: choose another path, or continue "
                                f"that one with --resume {policy}"),
                       (tmp_path, f"--save {tmp_path} is a folder: name the checkpoint file"),
                       (tmp_path / "afile" / "x.pt", f"--save {tmp_path / 'afile' / 'x.pt'}: {tmp_path / 'afile'} "
                                                     "is a file, not a folder"),
                       (Path("/proc/p.pt"), "--save /proc/p.pt: nothing can be written in /proc (No such file or "
                                            "directory)")):
        assert main(["train", "ppo", *flags, "--episodes", "2", "--save", str(save)]) == 2
        assert capsys.readouterr().err == f"esper: error: {said}\n"
    assert policy.read_bytes() == before
    assert main(["train", "ppo", *flags, "--episodes", "4", "--resume", str(policy), "--save", str(policy)]) == 0
    assert checkpoint(policy)["counters"]["episodes"] == 4


PPO_DAMAGES = {  # a PPO checkpoint damaged by hand -> what the refusal says after "cannot be continued ("
    "config missing": (lambda state: state.pop("config_json"), "KeyError: 'config_json'"),
    "counters a string": (lambda state: state.update(counters="many"), "TypeError: "),
    "network of another shape": (lambda state: state["network"].update(
        {k: v[:1] for k, v in state["network"].items() if v.dim() == 2}), "RuntimeError: "),
    "pending without its steps": (lambda state: state.update(pending={"rewards": torch.zeros(3, 1)}), "KeyError: "),
    "episode log not JSON": (lambda state: state.update(episode_log_json="{"), "JSONDecodeError: "),
}


@pytest.mark.parametrize("damage", list(PPO_DAMAGES))
def test_a_damaged_checkpoint_is_refused_in_one_line_before_a_run_directory_is_made(damage, tmp_path, capsys):
    """Each had ended `esper train ppo --resume` in a traceback, some after its run directory was made (a
    config.json and a RunStarted left behind)."""
    spoil, why = PPO_DAMAGES[damage]
    flags = [*TINY, "--update-every", "1", "--telemetry-level", "off"]
    half = tmp_path / "half.pt"
    assert main(["train", "ppo", *flags, "--episodes", "2", "--save", str(half), "--runs-dir",
                 str(tmp_path / "a")]) == 0
    state = load_checkpoint(half)
    spoil(state)
    save_checkpoint({k: v for k, v in state.items() if k != "format"}, half)
    capsys.readouterr()
    assert main(["train", "ppo", *flags, "--episodes", "4", "--resume", str(half), "--runs-dir",
                 str(tmp_path / "b")]) == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1, said
    assert said[0].startswith(f"esper: error: --resume {half}: {half} cannot be continued ({why}"), said
    assert not (tmp_path / "b").exists()


def test_resume_takes_a_ppo_runs_directory(tmp_path):
    """`--resume RUN_DIR` had said "no such checkpoint" beside RUN_DIR/checkpoint.pt."""
    flags = [*TINY, "--update-every", "1", "--telemetry-level", "off"]
    assert main(["train", "ppo", *flags, "--episodes", "2", "--runs-dir", str(tmp_path / "a")]) == 0
    (run_dir,) = (tmp_path / "a").iterdir()
    assert main(["train", "ppo", *flags, "--episodes", "4", "--resume", str(run_dir), "--save",
                 str(tmp_path / "more.pt"), "--runs-dir", str(tmp_path / "b")]) == 0
    assert checkpoint(tmp_path / "more.pt")["counters"]["episodes"] == 4


def test_a_checkpoint_written_between_updates_resumes_exactly(tmp_path, synthetic_data):
    """A crash after a round that was not followed by an update: the checkpoint carries the rollout not
    yet learned from, and the resumed run ends where the uninterrupted one does, its learning rate annealed
    as the uninterrupted one's from the restored counters (not the decayed rate restored with Adam)."""
    cfg = TrainerConfig(env=EnvConfig(task="synthetic", max_epochs=3, slots=("mid",), train=TrainConfig(max_batches=1)),
                        ppo=PPOConfig(anneal_lr=True), episodes=12, n_envs=2, update_every=2, seed=3)

    def trainer() -> PPOTrainer:
        return PPOTrainer(cfg, {"cpu": synthetic_data}, Telemetry("learner"), lambda e: Telemetry(f"ep{e}"))

    saved = tmp_path / "round5.pt"

    def keep_round_five(t: PPOTrainer, results) -> None:
        if t.episodes_done == 10:
            assert t.pending_rounds == 1 and t.updates == 2
            save_checkpoint(t.state_dict(), saved)

    straight = trainer()
    straight.train(keep_round_five)
    resumed = trainer()
    resumed.load_state_dict(load_checkpoint(saved))
    resumed.train()
    assert straight.updates == resumed.updates == 3
    assert_same_training(straight.state_dict(), resumed.state_dict())
    # CleanRL's decay by update: the three rollouts of 4 episodes each were played after 0, 4 and 8 of the 12
    assert [u["lr"] for u in resumed.update_log] == pytest.approx([3e-4, 2e-4, 1e-4], rel=1e-12)

    assert straight.trained_seeds == resumed.trained_seeds == set(range(3, 15))  # episodes 0-11 of seed 3

    # A checkpoint from before rollouts dropped `truncated` (zeros there) and carried their seeds resumes
    # the same, and its policy's seeds are known: the pending round's are the last ones played.
    old = load_checkpoint(saved)
    old["pending"]["truncated"] = torch.zeros_like(old["pending"]["terminated"])
    del old["pending"]["seeds"], old["trained_seeds"]
    save_checkpoint(old, saved)
    from_old = trainer()
    from_old.load_state_dict(load_checkpoint(saved))
    from_old.train()
    assert_same_training(straight.state_dict(), from_old.state_dict())
    assert from_old.trained_seeds == set(range(3, 15))


@pytest.mark.parametrize("argv, needle", [
    (["--entropy-coef-min", "0.1"], "exceeds the entropy coefficient 0.05"),
    (["--entropy-anneal-episodes", "10"], "needs --entropy-coef-start or --entropy-coef-end"),
    (["--entropy-coef", "0.1", "--entropy-coef-start", "0.2", "--entropy-coef-end", "0.0"], "--entropy-coef is unused"),
    (["--n-envs", "0"], "--n-envs must be >= 1"),
    (["--update-every", "0"], "--update-every must be >= 1"),
    (["--reward-mode", "dense"], "invalid choice: 'dense'"),
    (["--param-budget", "0"], "--param-budget must be >= 1"),
    (["--resume", "/nonexistent/ckpt.pt"], "no such checkpoint"),
    (["--num-workers", "0"], "--num-workers must be >= 1"),
    (["--devices", "tpu:7"], "--devices 'tpu:7'"),  # the flag given: it had said --device
])
def test_bad_ppo_flags_fail_in_one_line(argv, needle, capsys):
    assert main(["train", "ppo", "--task", "synthetic", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("esper: error:") and needle in err[0], err


def test_an_interrupted_run_and_its_resumption_are_both_in_the_run_store(tmp_path, monkeypatch):
    """Ctrl-C in the second round, then --resume: the run store holds the stopped run as far as it went and the
    resumed one (a run of its own, its episodes numbered on from the checkpoint). The stopped run's episodes
    had never reached the store."""
    runs = tmp_path / "runs"
    flags = [*TINY, "--update-every", "1", "--episodes", "6", "--runs-dir", str(runs)]
    train = PPOTrainer.train

    def ctrl_c_in_round_two(self, on_round):
        def then_ctrl_c(trainer, results):
            on_round(trainer, results)
            if trainer.episodes_done == 2:
                raise KeyboardInterrupt
        return train(self, then_ctrl_c)

    monkeypatch.setattr(PPOTrainer, "train", ctrl_c_in_round_two)
    assert main(["train", "ppo", *flags]) == 130
    stopped = run_dir(runs)
    monkeypatch.setattr(PPOTrainer, "train", train)
    assert main(["train", "ppo", *flags, "--resume", str(stopped)]) == 0
    (resumed,) = [p for p in runs.iterdir() if p.is_dir() and p != stopped]
    store = RunsDB(runs / "karn.db")
    ids = sorted(r["run_id"] for r in store.runs())
    store.close()
    assert ids == sorted([stopped.name, *(f"{stopped.name}_ep{i:04d}" for i in range(2)),
                          resumed.name, *(f"{resumed.name}_ep{i:04d}" for i in range(2, 6))])


def test_ctrl_c_names_the_checkpoint_to_resume(tmp_path, monkeypatch, capsys):
    """Ctrl-C after a round: one line naming the checkpoint (had been a traceback), which continues the run."""
    flags = [*TINY, "--update-every", "1", "--telemetry-level", "off", "--runs-dir", str(tmp_path / "runs")]
    save = tmp_path / "policy.pt"
    train = PPOTrainer.train

    def ctrl_c_after_a_round(self, on_round):
        def then_ctrl_c(trainer, results):
            on_round(trainer, results)
            raise KeyboardInterrupt
        return train(self, then_ctrl_c)

    monkeypatch.setattr(PPOTrainer, "train", ctrl_c_after_a_round)
    assert main(["train", "ppo", *flags, "--episodes", "4", "--save", str(save)]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"esper: interrupted; continue it with the same flags and --resume {save}"
    monkeypatch.setattr(PPOTrainer, "train", train)
    assert main(["train", "ppo", *flags, "--episodes", "4", "--save", str(save), "--resume", str(save)]) == 0
    assert checkpoint(save)["counters"]["episodes"] == 4


@pytest.mark.parametrize("flags, devices, grouped", [
    ([], ("cuda:0",), True),  # measured fastest there (bench/ppo_envs.py)
    ([], ("cpu",), False),
    ([], ("cuda:0", "cpu"), False),  # every environment's device must be CUDA
    (["--n-envs", "1"], ("cuda:0",), True),  # a group of one whose step is a CUDA graph: faster than a plain run
    (["--n-envs", "1", "--no-cuda-graph"], ("cuda:0",), False),  # an eager one: no faster
    (["--n-envs", "4", "--episodes", "1", "--no-cuda-graph"], ("cuda:0",), False),  # a round of one episode
    (["--n-envs", "2", "--no-cuda-graph"], ("cuda:0", "cuda:1"), False),  # one environment to each device
    (["--n-envs", "2"], ("cuda:0", "cuda:1"), True),
    (["--n-envs", "4", "--no-cuda-graph"], ("cuda:0", "cuda:1"), True),
    (["--n-envs", "5", "--no-cuda-graph"], ("cuda:0", "cuda:1", "cuda:0"), True),  # round robin: 3 and 2
    (["--n-envs", "4", "--no-cuda-graph"], ("cuda:0", "cuda:1", "cuda:0"), False),  # 3 to cuda:0, 1 to cuda:1
    (["--env-processes"], ("cuda:0",), False),  # the way asked for
    (["--no-grouped"], ("cuda:0",), False),
    (["--grouped"], ("cpu",), True),
    (["--precision", "bf16"], ("cuda:0",), False),  # flags grouping cannot take leave the default off, unrefused
    (["--task", "tinystories"], ("cuda:1",), False),  # a host with no grouped form: no choice, nothing said
])
def test_ppo_environments_are_grouped_by_default_on_cuda_only(flags, devices, grouped, capsys):
    from esper.cli import build_parser
    from esper.train_ppo import ppo_grouped

    assert ppo_grouped(build_parser().parse_args(["train", "ppo", *flags]), devices) is grouped
    said = capsys.readouterr().err
    if flags[:1] == ["--precision"]:  # says why not
        assert said.startswith("esper: environments one after another, not grouped as by default on CUDA: grouped "
                               f"runs cannot take {' '.join(flags)}"), said
    else:
        assert said == ""


def test_the_progress_line_says_when_an_update_skipped_minibatches():
    """In red after the update's numbers; nothing for an update that skipped none, or for one logged by a
    checkpoint from before they were counted."""
    from types import SimpleNamespace

    from esper.train_ppo import round_line

    def line(**counted) -> str:
        update = {"entropy": 1.0, "approx_kl": 0.01, "explained_variance": 0.5, "steps_per_second": 3.0, **counted}
        trainer = SimpleNamespace(episodes_done=4, cfg=SimpleNamespace(episodes=8), pending_rounds=0, updates=2,
                                  update_log=[update])
        return round_line(trainer, [{"val_accuracy": 50.0, "return": 0.1, "seed_fates": {"culled": 1}}])

    assert line(nonfinite_skipped=3).endswith("3.0 steps/s  [red]3 minibatches skipped: gradient not finite[/]")
    assert line(nonfinite_skipped=0).endswith("3.0 steps/s") and line().endswith("3.0 steps/s")
