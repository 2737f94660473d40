"""Telemetry levels decide what is computed: DEBUG measures the loss landscape's sharpness on its
schedule, NORMAL never runs the measurement, and measuring does not change the run."""

from __future__ import annotations

import pytest
import torch

import esper.simic.env as env_module
from esper.leyline import TelemetryLevel
from esper.nissa import ListSink, Telemetry
from esper.nissa.diagnostics import top_hessian_eigenvalue
from esper.simic import EnvConfig, GrowthEnv, run_episode
from esper.tamiyo import HeuristicConfig, HeuristicPolicy
from esper.tolaria.trainer import TrainConfig

ENV = EnvConfig(task="synthetic", max_epochs=6, slots=("early", "mid"), sharpness_every=2,
                train=TrainConfig(max_batches=3))


def test_power_iteration_finds_the_top_eigenvalue_of_a_quadratic():
    hessian = torch.diag(torch.tensor([5.0, 2.0, -1.0]))
    w = torch.zeros(3, requires_grad=True)
    assert top_hessian_eigenvalue(lambda: 0.5 * w @ hessian @ w, [w], iters=200, tol=1e-7) == pytest.approx(5.0, rel=1e-4)


def episode(level: int, synthetic_data, monkeypatch) -> tuple[list, int]:
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return top_hessian_eigenvalue(*args, **kwargs)

    monkeypatch.setattr(env_module, "top_hessian_eigenvalue", counted)
    sink = ListSink()
    env = GrowthEnv(ENV, synthetic_data, torch.device("cpu"), Telemetry("t", level, sinks=[sink]))
    run_episode(env, HeuristicPolicy(HeuristicConfig(min_epoch_to_germinate=2, plateau_patience=1)), 0)
    return sink.events, len(calls)


def test_debug_measures_sharpness_on_schedule_and_normal_does_not(synthetic_data, monkeypatch):
    normal, normal_calls = episode(TelemetryLevel.TELEMETRY_LEVEL_NORMAL, synthetic_data, monkeypatch)
    debug, debug_calls = episode(TelemetryLevel.TELEMETRY_LEVEL_DEBUG, synthetic_data, monkeypatch)
    assert normal_calls == 0 and debug_calls == 3
    sharpness = {e.epoch.signals.epoch: e.epoch.sharpness for e in debug if e.HasField("epoch")}
    assert all(sharpness[e] > 0 for e in (2, 4, 6)) and all(sharpness[e] == 0 for e in (1, 3, 5))
    assert all(e.epoch.sharpness == 0 for e in normal if e.HasField("epoch"))
    # Measuring leaves the run as it was: the same decisions and accuracies.
    def trace(events):
        return [(e.decision.action.operation, e.decision.action.slot) if e.HasField("decision")
                else e.epoch.signals.val_accuracy for e in events if e.HasField("decision") or e.HasField("epoch")]
    assert trace(debug) == trace(normal)
