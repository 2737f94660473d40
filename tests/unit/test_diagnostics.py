"""Telemetry levels decide what is computed: DEBUG measures the loss landscape's sharpness on its
schedule and every layer's gradient health each epoch, NORMAL runs neither measurement, and measuring
does not change the run."""

from __future__ import annotations

import pytest
import torch

import esper.simic.env as env_module
from esper.leyline import Action, Blueprint, Decision, Operation, SeedStage, TelemetryLevel, short_name
from esper.nissa import ListSink, Telemetry
from esper.nissa.diagnostics import GradientMonitor, top_hessian_eigenvalue
from esper.simic import EnvConfig, GrowthEnv, run_episode
from esper.tamiyo import HeuristicConfig, HeuristicPolicy
from esper.tolaria.trainer import TrainConfig

ENV = EnvConfig(task="synthetic", max_epochs=6, slots=("early", "mid"), sharpness_every=2,
                train=TrainConfig(max_batches=3))


def test_power_iteration_finds_the_top_eigenvalue_of_a_quadratic():
    hessian = torch.diag(torch.tensor([5.0, 2.0, -1.0]))
    w = torch.zeros(3, requires_grad=True)
    assert top_hessian_eigenvalue(lambda: 0.5 * w @ hessian @ w, [w], iters=200, tol=1e-7) == pytest.approx(5.0, rel=1e-4)


def episode(level: int, synthetic_data, monkeypatch) -> tuple[list, int, int]:
    """The events of one episode, the sharpness measurements and the gradient monitors it made."""
    calls, monitors = [], []

    def counted(*args, **kwargs):
        calls.append(1)
        return top_hessian_eigenvalue(*args, **kwargs)

    class CountedMonitor(GradientMonitor):
        def __init__(self, *args, **kwargs):
            monitors.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(env_module, "top_hessian_eigenvalue", counted)
    monkeypatch.setattr(env_module, "GradientMonitor", CountedMonitor)
    sink = ListSink()
    env = GrowthEnv(ENV, synthetic_data, torch.device("cpu"), Telemetry("t", level, sinks=[sink]))
    run_episode(env, HeuristicPolicy(HeuristicConfig(min_epoch_to_germinate=2, plateau_patience=1)), 0)
    return sink.events, len(calls), len(monitors)


def test_debug_measures_sharpness_and_gradients_and_normal_does_not(synthetic_data, monkeypatch):
    normal, normal_calls, normal_monitors = episode(TelemetryLevel.TELEMETRY_LEVEL_NORMAL, synthetic_data, monkeypatch)
    debug, debug_calls, debug_monitors = episode(TelemetryLevel.TELEMETRY_LEVEL_DEBUG, synthetic_data, monkeypatch)
    print("sharpness measurements normal/debug", normal_calls, debug_calls,
          "gradient monitors normal/debug", normal_monitors, debug_monitors)
    assert normal_calls == 0 and debug_calls == 3
    assert normal_monitors == 0 and debug_monitors == 6  # one per epoch
    assert all(not e.epoch.gradients for e in normal if e.HasField("epoch"))
    reports = [e.epoch for e in debug if e.HasField("epoch")]
    for report in reports:
        layers = [g.layer for g in report.gradients]
        assert layers[:4] == ["block0", "block1", "block2", "head"]  # the synthetic CNN's stem has no weights
        trained = {s.slot for s in report.slots if short_name(SeedStage, s.stage) in ("TRAINING", "BLENDING",
                                                                                       "FOSSILIZED")}
        assert set(layers[4:]) == {f"seed:{slot}" for slot in trained}
        assert all(0 < g.mean_norm <= g.max_norm < 100 and not g.vanishing and not g.exploding
                   for g in report.gradients)
    assert any(len(r.gradients) > 4 for r in reports)  # a seed was measured
    sharpness = {e.epoch.signals.epoch: e.epoch.sharpness for e in debug if e.HasField("epoch")}
    assert all(sharpness[e] > 0 for e in (2, 4, 6)) and all(sharpness[e] == 0 for e in (1, 3, 5))
    assert all(e.epoch.sharpness == 0 for e in normal if e.HasField("epoch"))
    # Measuring leaves the run as it was: the same decisions and accuracies.
    def trace(events):
        return [(e.decision.action.operation, e.decision.action.slot) if e.HasField("decision")
                else e.epoch.signals.val_accuracy for e in events if e.HasField("decision") or e.HasField("epoch")]
    assert trace(debug) == trace(normal)


def test_gradient_monitor_flags_vanishing_exploding_and_non_finite_layers():
    """Mean and max over batches per group, against norms computed by hand; a group no backward pass
    reached is left out; a tied parameter counts once, in its first group."""
    ok, dead, big, bad, unused = (torch.nn.Parameter(torch.zeros(3)) for _ in range(5))
    monitor = GradientMonitor({"ok": [ok], "dead": [dead], "big": [big, ok], "bad": [bad], "unused": [unused]})
    for scale in (1.0, 3.0):
        ok.grad = torch.full((3,), scale)
        dead.grad = torch.zeros(3)
        big.grad = torch.full((3,), 100.0 * scale)
        bad.grad = torch.tensor([1.0, float("nan"), 0.0]) if scale == 3.0 else torch.ones(3)
        monitor.accumulate()
    report = {g.layer: g for g in monitor.read()}
    print({name: (g.mean_norm, g.max_norm, g.vanishing, g.exploding) for name, g in report.items()})
    assert list(report) == ["ok", "dead", "big", "bad"]
    root3 = 3 ** 0.5
    assert report["ok"].mean_norm == pytest.approx(2 * root3) and report["ok"].max_norm == pytest.approx(3 * root3)
    assert not report["ok"].vanishing and not report["ok"].exploding
    assert report["dead"].vanishing and not report["dead"].exploding
    assert report["big"].mean_norm == pytest.approx(200 * root3) and report["big"].exploding
    assert report["bad"].exploding and not report["bad"].max_norm == report["bad"].max_norm  # NaN kept visible


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: a host sync only exists with a device")
def test_gradient_monitor_never_syncs_with_the_device_per_batch():
    """CUDA's sync debug mode raises on any operation that waits for the device (.item(), .cpu(),
    nonzero): accumulating must not, so DEBUG telemetry keeps the step loop asynchronous."""
    from esper.kasmina import MorphogeneticModel, build_host
    from esper.simic.env import gradient_groups

    model = MorphogeneticModel(build_host("cifar10"), ("mid",)).cuda()
    monitor = GradientMonitor(gradient_groups(model))
    x, y = torch.randn(8, 3, 32, 32, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            monitor.accumulate()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    report = monitor.read()
    print({g.layer: round(g.mean_norm, 4) for g in report})
    assert [g.layer for g in report] == ["block0", "block1", "block2", "head"]


def test_a_training_seed_leaves_the_sharpness_as_it_was(synthetic_data):
    """The loss does not depend on a TRAINING seed (its output is not added), so the measured curvature
    is that of its DORMANT twin's run, epoch for epoch. Differentiating through the seed's straight-through
    gradient measured 2.7 against 1.0 (the review's script)."""
    env = EnvConfig(task="synthetic", max_epochs=4, slots=("mid",), sharpness_every=1, train=TrainConfig(max_batches=3))
    germinate = Action(operation=Operation.OPERATION_GERMINATE, slot="mid", blueprint=Blueprint.BLUEPRINT_CONV_HEAVY)
    advance = Action(operation=Operation.OPERATION_ADVANCE, slot="mid")

    def sharpness(actions: list[Action]) -> list[float]:
        sink = ListSink()
        growth = GrowthEnv(env, synthetic_data, torch.device("cpu"),
                           Telemetry("t", TelemetryLevel.TELEMETRY_LEVEL_DEBUG, sinks=[sink]))
        growth.reset(0)
        for action in actions:
            growth.step(Decision(action=action))
        stages = [short_name(SeedStage, s.stage) for e in sink.events if e.HasField("epoch") for s in e.epoch.slots]
        return [e.epoch.sharpness for e in sink.events if e.HasField("epoch")], stages

    wait = Action(operation=Operation.OPERATION_WAIT)
    grown, stages = sharpness([germinate, advance, wait, wait])
    alone, _ = sharpness([wait] * 4)
    print("stages", stages, "sharpness with the seed", grown, "without", alone)
    assert stages[1:] == ["TRAINING"] * 3 and all(s > 0 for s in alone)
    assert grown == alone


def test_debug_sharpness_measures_a_language_model(tiny_lm_registered):
    """The transformer's attention runs a fused kernel (flash on the CPU) that has no double backward: the
    sharpness probe must take the math kernel, or `--task tinystories --telemetry-level debug` fails at
    its first measurement (a RuntimeError from autograd, epoch 5)."""
    from support import TINY_LM
    from esper.tolaria.data import Dataset

    windows = torch.randint(TINY_LM.num_classes, (32, TINY_LM.context), generator=torch.Generator().manual_seed(0))
    data = Dataset("tokens", windows, windows.roll(-1, 1), windows[:16], windows[:16].roll(-1, 1), windows[:16],
                   windows[:16].roll(-1, 1), num_classes=TINY_LM.num_classes, mean=(), std=(), kind="tokens")
    cfg = EnvConfig(task=TINY_LM.name, max_epochs=2, slots=("mid",), sharpness_every=1,
                    train=TrainConfig(batch_size=8, max_batches=1, optimizer="adamw", lr=1e-3, eval_batch_size=16))
    sink = ListSink()
    env = GrowthEnv(cfg, data, torch.device("cpu"), Telemetry("t", TelemetryLevel.TELEMETRY_LEVEL_DEBUG, sinks=[sink]))
    run_episode(env, HeuristicPolicy(), 0)
    sharpness = [e.epoch.sharpness for e in sink.events if e.HasField("epoch")]
    assert len(sharpness) == 2 and all(s != 0.0 for s in sharpness)
