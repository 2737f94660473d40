"""Distributed PPO on loopback: simic_learner, tamiyo_server --policy neural and one tolaria_worker --ppo
(and the hub, for telemetry) on `synthetic` with 3-epoch episodes: two rounds of two episodes, two PPO updates,
every trajectory accepted once, and tamiyo_server deciding with the learner's version 2. The worker runs its
environments in processes of their own (--env-processes), or trains them grouped (--grouped).
A duplicate sent after the run is acked DUPLICATE and not applied."""

from __future__ import annotations

import json

import pytest
import torch
import zmq
from procs import start_hub, wait_until

from esper.leyline import AckStatus, TrajectoryAck, TrajectoryHeader
from esper.nissa import Telemetry, read_jsonl
from esper.simic.env import EnvConfig, GrowthEnv
from esper.tolaria.data import load_task_data
from esper.transport.policy_service import RemotePolicy

PPO = ["--task", "synthetic", "--max-epochs", "3", "--n-envs", "2", "--update-every", "1", "--episodes", "4",
       "--device", "cpu"]


@pytest.mark.parametrize("envs", ["--env-processes", "--grouped"])
def test_two_updates_no_duplicates_and_the_server_serves_the_new_version(envs, spawn, tmp_path):
    hub = start_hub(spawn)
    summary = tmp_path / "learner.json"
    learner = spawn("simic_learner", *PPO, "--port", "0", "--weights-port", "0", "--hub-pub", hub.endpoints["publish"],
                    "--summary", str(summary), "--save", str(tmp_path / "learner.pt"), "--republish-s", "0.5",
                    "--telemetry-file", str(tmp_path / "learner.jsonl"))
    learner.wait_bound("trajectories", "weights")
    tamiyo = spawn("tamiyo_server", "--policy", "neural", "--port", "0", "--metrics-port", "-1",
                   "--learner-weights", learner.endpoints["weights"])
    tamiyo.wait_bound("grpc")
    worker = spawn("tolaria_worker", "--ppo", *PPO, "--tamiyo", tamiyo.endpoints["grpc"],
                   "--learner", learner.endpoints["trajectories"], "--hub-pub", hub.endpoints["publish"],
                   "--metrics-port", "-1", "--runs-dir", str(tmp_path / "runs"), "--worker-id", "w0",
                   "--exit-when-done", "--telemetry-file", str(tmp_path / "worker.jsonl"), "--telemetry-dir",
                   str(tmp_path / "worker_runs"), "--num-workers", "1", envs)
    assert worker.proc.wait(120) == 0, worker.output()
    assert "trajectories: 2 acked, 0 refused" in worker.output()
    # --telemetry-file and --telemetry-dir keep every episode's events, as `esper train ppo`'s do (they had
    # been accepted and ignored, by the learner too).
    (per_run,) = (tmp_path / "worker_runs").iterdir()
    for path in (tmp_path / "worker.jsonl", per_run):
        started = [e.run_id for e in read_jsonl(path) if e.HasField("run_started")]
        assert len(started) == len(set(started)) == 4, path

    policy = RemotePolicy(tamiyo.endpoints["grpc"], deadline_s=10)
    try:
        wait_until(lambda: policy.info().version == "2", 30, "tamiyo_server to load version 2")
        env = GrowthEnv(EnvConfig(task="synthetic", max_epochs=3), load_task_data("synthetic", None),
                        torch.device("cpu"), Telemetry("probe"))
        decision = policy.decide(env.reset(0))
        assert (decision.policy_name, decision.policy_version) == ("ppo", "2")
        assert decision.log_prob <= 0
    finally:
        policy.close()

    state = json.loads(summary.read_text())
    accepted = [tuple(key) for key in state["accepted"]]
    assert len(accepted) == len(set(accepted)) == 2 and state["episodes"] == 4 and state["version"] == 2

    # Resend trajectory 0 as if its ack had been lost: acked again, not applied again.
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.connect(learner.endpoints["trajectories"])
    worker_id, incarnation, sequence = accepted[0]
    header = TrajectoryHeader(worker_id=worker_id, incarnation=incarnation, sequence=sequence)
    dealer.send_multipart([header.SerializeToString(), b"resent payload"])
    assert dealer.poll(10_000), "no ack for the resend"
    ack = TrajectoryAck.FromString(dealer.recv())
    dealer.close()
    ctx.term()
    assert (ack.status, ack.sequence, ack.policy_version) == (AckStatus.ACK_STATUS_DUPLICATE, sequence, 2)

    assert learner.stop() == 0 and tamiyo.stop() == 0 and hub.stop() == 0
    state = json.loads(summary.read_text())
    assert state["duplicates"] >= 1 and state["episodes"] == 4 and len(state["accepted"]) == 2
    assert [u["update"] for u in state["update_stats"]] == [1, 2]
    assert len([e for e in read_jsonl(tmp_path / "learner.jsonl") if e.HasField("ppo_update")]) == 2
    assert (tmp_path / "learner.pt").is_file()
