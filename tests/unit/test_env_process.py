"""Environments in processes of their own (esper.simic.env_process) play the episodes one process plays."""

import dataclasses
import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from google.protobuf import json_format

from esper.cli import main
from esper.leyline import Action, Decision, Operation
from esper.nissa import Telemetry, read_jsonl
from esper.simic import EnvConfig, GrowthEnv
from esper.simic.checkpoint import load_checkpoint
from esper.simic.env_process import EnvProcessError, config_from_dict, start_env_processes
from esper.tolaria.trainer import TrainConfig

TINY = ["--task", "synthetic", "--max-epochs", "3", "--max-batches", "1", "--slots", "early", "mid",
        "--n-envs", "2", "--num-workers", "1", "--episodes", "4", "--update-every", "1"]


def test_a_config_crosses_as_json_and_comes_back_equal():
    cfg = EnvConfig(task="synthetic", max_epochs=7, slots=("early", "late"), grafts=(("mid", "conv_heavy"),),
                    train=TrainConfig(max_batches=3, precision="bf16"))
    assert config_from_dict(EnvConfig, json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg


def random_walk(env: GrowthEnv, seed: int, walker: random.Random) -> Iterator[bytes]:
    """An episode of legal actions drawn by `walker`, one at a time (the caller interleaves)."""
    yield env.reset(seed).SerializeToString()
    done = False
    while not done:
        obs, done = env.step(Decision(action=walker.choice(env.legal_actions()), reason="walk"))
        yield obs.SerializeToString()


def test_an_episode_does_not_depend_on_what_other_environments_draw_between_its_steps(synthetic_data):
    cfg = EnvConfig(task="synthetic", max_epochs=8, slots=("early", "mid", "late"), train=TrainConfig(max_batches=2))

    def env() -> GrowthEnv:
        return GrowthEnv(cfg, synthetic_data, torch.device("cpu"), Telemetry("t"))

    alone_env = env()
    alone = list(random_walk(alone_env, 7, random.Random(0)))
    a, b = env(), env()
    interleaved = []
    for mine, _other in zip(random_walk(a, 7, random.Random(0)), random_walk(b, 8, random.Random(1))):
        interleaved.append(mine)  # b's germinations draw initial weights between a's steps
    assert interleaved == alone
    assert sum(r.fate != "dormant" for r in a.model.records) > 0  # seeds were drawn: the check had teeth
    for (name, x), (_, y) in zip(alone_env.model.state_dict().items(), a.model.state_dict().items()):
        assert torch.equal(x, y), name


def episode_events(path: Path, run: str) -> list[dict]:
    """The episodes' events as JSON, without clock readings, run ids relative to the training run's."""
    events = []
    for event in read_jsonl(path):
        if event.HasField("ppo_update") or event.HasField("run_started") and event.run_id == run:
            continue
        d = json.loads(json_format.MessageToJson(event).replace(run, "<run>"))
        del d["wallTime"]
        d.get("epoch", {}).pop("epochSeconds", None)
        d.get("runFinished", {}).pop("wallSeconds", None)
        events.append(d)
    return events


def test_ppo_with_an_environment_process_each_learns_what_ppo_in_one_process_learns(tmp_path):
    out = {}
    for name, extra in (("one", []), ("procs", ["--env-processes"])):
        assert main(["train", "ppo", *TINY, "--runs-dir", str(tmp_path / name), *extra]) == 0
        (run,) = [p for p in (tmp_path / name).iterdir() if p.is_dir()]
        out[name] = run
    one, procs = (json.loads((out[n] / "summary.json").read_text()) for n in ("one", "procs"))
    assert one["episodes"] == procs["episodes"]
    timing = ("steps_per_second", "update_seconds")
    assert ([{k: v for k, v in u.items() if k not in timing} for u in one["update_stats"]]
            == [{k: v for k, v in u.items() if k not in timing} for u in procs["update_stats"]])
    weights = [load_checkpoint(out[n] / "checkpoint.pt")["network"] for n in ("one", "procs")]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    events = [episode_events(out[n] / "telemetry.jsonl", out[n].name) for n in ("one", "procs")]
    assert events[0] == events[1] and len(events[0]) > 4 * 3 * 2  # decisions and epochs of 4 episodes, and more


def test_missing_data_in_an_environment_process_is_a_clear_error(tmp_path):
    with pytest.raises(EnvProcessError, match="DataError.*data-dir"):
        start_env_processes(1, EnvConfig(task="cifar10"), ("cpu",), str(tmp_path / "nowhere"), False, 1)


def test_an_environment_process_reports_an_error_stays_up_and_its_death_is_a_clear_error():
    (proc,) = start_env_processes(1, EnvConfig(task="synthetic", max_epochs=2), ("cpu",), None, False, 1)
    wait = Decision(action=Action(operation=Operation.OPERATION_WAIT))
    try:
        proc.reset(1)
        with pytest.raises(EnvProcessError, match="failed: IllegalAction"):
            proc.step(Decision(action=Action(operation=Operation.OPERATION_ADVANCE, slot="mid")))  # nothing there
        assert proc.step(wait)[0].signals.epoch == 1  # the child goes on
        proc.proc.kill()
        with pytest.raises(EnvProcessError, match="exited"):
            proc.step(wait)
    finally:
        proc.close()
