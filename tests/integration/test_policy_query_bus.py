"""`esper policy query --from-bus`: a real hub, tamiyo_server and tolaria_worker; the CLI late-joins
the hub, takes the newest observation the worker decided on, asks tamiyo_server again and prints the
same decision the worker got (and the library gives) for it."""

from __future__ import annotations

from procs import start_hub, start_tamiyo, wait_until

from esper.cli import main
from esper.leyline import Blueprint, Operation, short_name
from esper.stack_cli import newest_observation
from esper.tamiyo import HeuristicPolicy

EPOCHS = 4


def test_policy_query_from_a_workers_last_observation(spawn, tmp_path, capsys):
    hub = start_hub(spawn)
    tamiyo = start_tamiyo(spawn)
    worker = spawn("tolaria_worker", "--task", "synthetic", "--max-epochs", str(EPOCHS), "--max-batches", "3",
                   "--slots", "early", "mid", "--device", "cpu", "--tamiyo", tamiyo.endpoints["grpc"],
                   "--hub-pub", hub.endpoints["publish"], "--metrics-port", "0", "--runs-dir", str(tmp_path))
    worker.wait_bound("metrics")
    sub, snapshot = hub.endpoints["subscribe"], hub.endpoints["snapshot"]

    def last_decision():
        event = newest_observation(sub, snapshot, "", wait_s=2.0)
        return event if event is not None and event.decision.observation.signals.epoch == EPOCHS - 1 else None

    # The worker's last decision is made on the observation after epoch EPOCHS - 1; then it decides no more.
    recorded = wait_until(last_decision, 120, "the worker's last decision on the bus")
    obs = recorded.decision.observation
    cli = ["policy", "query", "--from-bus", "--hub-sub", sub, "--hub-snapshot", snapshot,
           "--tamiyo", tamiyo.endpoints["grpc"]]
    capsys.readouterr()
    status = main(cli)
    out = capsys.readouterr()
    print(out.out)
    assert status == 0, out.err
    lines = out.out.splitlines()
    assert lines[0].startswith(f"observation: run {recorded.run_id}, epoch {EPOCHS - 1}/{EPOCHS}")
    expected = HeuristicPolicy().decide(obs)
    assert expected.action == recorded.decision.action  # the library agrees with what the worker was told
    action = expected.action
    words = [short_name(Operation, action.operation), action.slot,
             short_name(Blueprint, action.blueprint) if action.blueprint else ""]
    assert lines[1] == " ".join(filter(None, words))
    assert f"reason: {expected.reason}" in out.out and recorded.decision.reason == expected.reason

    # --run narrows to one run: an unknown one has no observation, said in one line, exit 1.
    assert main([*cli, "--run", "no-such-run", "--wait-s", "1"]) == 1
    assert "no observation from run 'no-such-run'" in capsys.readouterr().err
    assert worker.stop() == 0, worker.output()
