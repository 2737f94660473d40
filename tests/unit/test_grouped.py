"""K runs trained as one grouped network (esper.tolaria.grouped) follow the K runs trained alone."""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console

from support import plain, train_alone
from esper import experiment
from esper.experiment import RunConfig
from esper.kasmina import MorphogeneticModel, build_host
from esper.leyline import Blueprint
from esper.nissa import ListSink, read_jsonl
from esper.simic import EnvConfig
from esper.tolaria.grouped import GroupedCNN, GroupMember, TrainerGroup, sgd, train_grouped
from esper.tolaria.trainer import TrainConfig


def test_grouped_runs_follow_the_runs_trained_alone(synthetic_data):
    """Three synthetic hosts with their own inits and data orders, 6 steps: each group of the grouped
    network ends where its run trained alone ends (weights, BatchNorm statistics, outputs)."""
    k, steps = 3, 6
    hosts = []
    for seed in range(k):
        torch.manual_seed(seed)
        hosts.append(build_host("synthetic"))
    grouped = GroupedCNN.from_hosts(hosts)
    for i, host in enumerate(hosts):  # the groups start as the hosts
        torch.testing.assert_close(grouped.host(i).state_dict(), host.state_dict(), rtol=0, atol=0)

    generators = [torch.Generator().manual_seed(100 + i) for i in range(k)]
    train_grouped(grouped, synthetic_data, generators, steps, sgd(grouped))
    for i, host in enumerate(hosts):
        train_alone(host, synthetic_data, torch.Generator().manual_seed(100 + i), steps)

    x = (synthetic_data.val_x[:64].float() / 255 - torch.tensor(synthetic_data.mean).view(1, -1, 1, 1)) \
        / torch.tensor(synthetic_data.std).view(1, -1, 1, 1)
    grouped.eval()
    together = grouped(torch.cat([x] * k, dim=1))  # [64, K, classes]
    moved = 0.0
    for i, host in enumerate(hosts):
        run = grouped.host(i)
        for name, tensor in host.state_dict().items():
            torch.testing.assert_close(run.state_dict()[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(together[:, i], plain(host).eval()(x), rtol=1e-4, atol=1e-4)
        other = hosts[(i + 1) % k].blocks[0][0].weight
        moved = max(moved, float((host.blocks[0][0].weight - other).detach().abs().max()))
    assert moved > 0  # the runs differ from each other: a mix-up of groups would fail above


def test_only_cnn_hosts_group():
    with pytest.raises(ValueError, match="only CNN hosts"):
        GroupedCNN(build_host("tinystories").spec, 2)


def members(data, seeds, cfg: TrainConfig | None = None, grafts=()) -> list[GroupMember]:
    """A static run's trainer per seed, each with its own init and data order, as GrowthEnv builds them."""
    cfg = cfg or TrainConfig(max_batches=3)
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = MorphogeneticModel(build_host("synthetic"), ["mid"])
        for slot, blueprint in grafts:
            model.graft(slot, blueprint)
        out.append(GroupMember(model, data, cfg, torch.device("cpu"), torch.Generator().manual_seed(seed)))
    return out


def test_a_grouped_static_experiment_follows_its_runs_trained_alone(tmp_path, synthetic_data):
    """`esper train static --grouped`: every episode gets the run directory, telemetry and summary an
    episode alone gets, its events reach the extra sinks (the TUI's), and its losses, parameters and
    FLOPs follow that episode's up to float order."""
    env = EnvConfig(task="synthetic", max_epochs=3, train=TrainConfig(max_batches=5))
    summaries, sinks = {}, {}
    for grouped in (True, False):
        cfg = RunConfig(mode="static", env=env, episodes=3, runs_dir=str(tmp_path / str(grouped) / "seed{seed}"),
                        grouped=grouped)
        sinks[grouped] = ListSink()
        summaries[grouped] = experiment.run(cfg, console=Console(file=io.StringIO()), sinks=(sinks[grouped],))
    seen = {grouped: sorted((e.run_started.seed, e.run_id) for e in sink.events if e.HasField("run_started"))
            for grouped, sink in sinks.items()}
    assert seen[True] == sorted((s["seed"], s["run_id"]) for s in summaries[True]) and len(seen[True]) == 3
    assert len(sinks[True].events) == len(sinks[False].events)
    for seed, together, alone in zip((42, 43, 44), summaries[True], summaries[False], strict=True):
        (run_dir,) = (tmp_path / "True" / f"seed{seed}").iterdir()
        assert together["seed"] == seed and (run_dir / "summary.json").is_file() and (run_dir / "model").is_dir()
        assert json.loads((run_dir / "config.json").read_text())["grouped"] is True
        started = next(e for e in read_jsonl(run_dir / "telemetry.jsonl") if e.HasField("run_started"))
        assert started.run_started.seed == seed
        for key in ("epochs", "total_params", "train_flops"):
            assert together[key] == alone[key], key
        for a, b in zip(together["curve"], alone["curve"], strict=True):
            assert a["train_flops"] == b["train_flops"] and a["stages"] == b["stages"]
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
            assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-3)
    losses = [s["curve"][-1]["train_loss"] for s in summaries[True]]
    assert len(set(losses)) == 3  # the seeds' runs differ: runs given each other's groups would fail above


def test_a_rolled_back_run_forgets_its_momentum_only(synthetic_data):
    """A governor's rollback of one run (Trainer.reset_momentum) clears that run's slice of the group's
    momentum buffers and no other run's."""
    runs = members(synthetic_data, (1, 2, 3))
    group = TrainerGroup(runs)
    group.train_epoch()
    assert all(0 < m.train_epoch()[0] for m in runs)
    runs[1].reset_momentum()
    buffers = [s["momentum_buffer"] for s in group.optimizer.state.values()]
    assert buffers and all(not b.chunk(3)[1].any() and b.chunk(3)[0].any() and b.chunk(3)[2].any() for b in buffers)


def test_a_member_trains_only_through_its_group(synthetic_data):
    (run,) = members(synthetic_data, (1,))
    TrainerGroup([run])
    with pytest.raises(RuntimeError, match="trained by its group"):
        run.train_epoch()
    with pytest.raises(RuntimeError, match="keeps no checkpoint"):
        run.state_dict()
    TrainerGroup([run]).train_epoch()
    run.after_backward = lambda: None  # GrowthEnv's gradient monitor at debug telemetry
    with pytest.raises(RuntimeError, match="has none"):
        run.train_epoch()


@pytest.mark.parametrize("cfg, grafts", [
    (TrainConfig(precision="bf16"), ()),
    (TrainConfig(compile=True), ()),
    (TrainConfig(), (("mid", Blueprint.BLUEPRINT_CONV_LIGHT),)),
])
def test_only_plain_hosts_with_the_plain_recipe_group(cfg, grafts, synthetic_data):
    with pytest.raises(ValueError, match="grouped runs train|only hosts without seeds"):
        TrainerGroup(members(synthetic_data, (1, 2), cfg, grafts))
