"""Issue 4 (kill and restart any one process without losing the run) and issue 8 promise 4 (a whole-stack
restart continues the run): real processes on loopback, one heuristic episode on `synthetic` each.

What is bit-identical on the CPU: a worker killed and resumed from its episode checkpoint ends with the
same summary (every epoch's accuracies and losses, every seed's blueprint, slot and stage history, test
accuracy) and the same exported weights as `esper train heuristic` run straight through at the same seed;
only the run id (a time stamp) and the wall time differ.

Processes killed and restarted: fault injection, in .ci/run's second pass (`pytest -m chaos`), which keeps
the default run inside its 10 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from procs import REPO, free_ports, metric, scrape, start_hub, start_tamiyo, wait_until

pytestmark = pytest.mark.chaos

EPOCHS = 20
EXPERIMENT = ["--task", "synthetic", "--max-epochs", str(EPOCHS), "--slots", "early", "mid", "late", "--device", "cpu"]
CHILD_ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same experiment straight through in one process, started first so it overlaps the stack tests."""
    runs = tmp_path_factory.mktemp("reference")
    proc = subprocess.Popen([sys.executable, "-m", "esper.cli", "train", "heuristic", *EXPERIMENT, "--runs-dir", str(runs)],
                            cwd=REPO, env=CHILD_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def finished() -> Path:
        assert proc.wait(120) == 0, proc.stderr.read()
        return only_run(runs)

    yield finished
    proc.kill()
    proc.wait()


def only_run(runs: Path) -> Path:
    run_dirs = [p for p in runs.iterdir() if p.is_dir() and (p / "config.json").is_file()]
    assert len(run_dirs) == 1, run_dirs
    return run_dirs[0]


def same_result(run_dir: Path, reference_dir: Path) -> None:
    """Summaries equal but for run id and wall time; exported weights bit-identical; no checkpoint left."""
    ours, theirs = (json.loads((d / "summary.json").read_text()) for d in (run_dir, reference_dir))
    differ = sorted(k for k in ours if ours[k] != theirs[k])
    print(f"summary fields that differ from the straight run: {differ}; val {ours['val_accuracy']:.4f}% "
          f"test {ours['test_accuracy']:.4f}%, seeds {ours['seed_counts']}")
    assert set(differ) <= {"run_id", "wall_seconds"}  # run ids are time stamps: equal within one second
    weights = [torch.load(d / "model" / "weights.pt", weights_only=True) for d in (run_dir, reference_dir)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not list(run_dir.glob("checkpoint*"))  # nor a grouped run's checkpoint.next.pt


def telemetry_sequences(run_dir: Path) -> list[int]:
    return [int(json.loads(line)["sequence"]) for line in (run_dir / "telemetry.jsonl").read_text().splitlines()]


def karn_says(url: str) -> dict:
    m = scrape(url)
    return {"epochs": metric(m, "esper_karn_events_received_total", kind="epoch"),
            "run_started": metric(m, "esper_karn_events_received_total", kind="run_started"),
            "decisions": metric(m, "esper_run_decisions_total"), "lost": metric(m, "esper_karn_events_lost_total"),
            "duplicates": metric(m, "esper_karn_events_duplicate_total"),
            "runs": sum(1 for (name, _), _v in m.items() if name == "esper_run_finished"),
            "finished": metric(m, "esper_run_finished"), "epoch": metric(m, "esper_run_epoch")}


def assert_every_epoch_once(karn: dict) -> None:
    print(f"karn: {karn}")
    assert karn["runs"] == 1 and karn["finished"] == 1 and karn["epoch"] == EPOCHS
    assert karn["epochs"] == EPOCHS and karn["decisions"] == EPOCHS and karn["run_started"] == 1
    assert karn["lost"] == 0


@pytest.fixture(scope="module")
def killed(spawn_module, tmp_path_factory, reference):
    """One episode through hub, tamiyo_server, karn and a worker; the worker SIGKILLed mid-episode and
    started again with the same flags, then karn SIGKILLed mid-run and started again on its journal."""
    spawn = spawn_module
    tmp = tmp_path_factory.mktemp("killed")
    hub = start_hub(spawn)
    tamiyo = start_tamiyo(spawn)

    def start_karn():
        karn = spawn("karn", "--hub-sub", hub.endpoints["subscribe"], "--hub-snapshot", hub.endpoints["snapshot"],
                     "--metrics-port", "0", "--journal", str(tmp / "karn.binpb"))
        karn.wait_bound("metrics")
        return karn

    def start_worker():
        worker = spawn("tolaria_worker", *EXPERIMENT, "--runs-dir", str(tmp / "runs"), "--tamiyo",
                       tamiyo.endpoints["grpc"], "--hub-pub", hub.endpoints["publish"], "--metrics-port", "0",
                       "--exit-when-done")
        worker.wait_bound("metrics")
        return worker

    karn = start_karn()
    worker = start_worker()
    epoch = lambda: metric(scrape(karn.endpoints["metrics"]), "esper_run_epoch")
    wait_until(lambda: epoch() >= 3, 120, "epoch 3")
    worker.kill()
    worker_killed_at = epoch()
    resumed = start_worker()
    wait_until(lambda: epoch() >= worker_killed_at + 2, 120, "the resumed worker's epochs")
    karn_killed_at = epoch()
    karn.kill()
    karn = start_karn()
    assert resumed.proc.wait(120) == 0, resumed.output()
    wait_until(lambda: metric(scrape(karn.endpoints["metrics"]), "esper_run_finished") == 1, 60, "karn to see the end")
    print(f"worker SIGKILLed at epoch {worker_killed_at:.0f}, karn at epoch {karn_killed_at:.0f} of {EPOCHS}")
    return {"karn": karn_says(karn.endpoints["metrics"]), "run_dir": only_run(tmp / "runs"), "resumed": resumed,
            "worker_killed_at": worker_killed_at, "karn_killed_at": karn_killed_at}


def test_a_killed_worker_resumes_its_episode_with_every_epoch_once(killed, reference):
    assert killed["worker_killed_at"] < EPOCHS, "the worker was not killed mid-episode"
    assert any("resuming after epoch" in line for line in killed["resumed"].lines), killed["resumed"].output()
    assert_every_epoch_once(killed["karn"])
    sequences = telemetry_sequences(killed["run_dir"])
    assert sequences == list(range(1, len(sequences) + 1))  # the run's own file: no gap, nothing twice
    ref = reference()
    assert len(sequences) == len(telemetry_sequences(ref))
    same_result(killed["run_dir"], ref)


def test_a_killed_karn_still_holds_every_epoch(killed):
    assert killed["karn_killed_at"] < EPOCHS, "karn was not killed mid-run"
    assert_every_epoch_once(killed["karn"])


def test_a_killed_grouped_worker_resumes_its_group(spawn, tmp_path):
    """A worker training two episodes grouped (--grouped, the default on CUDA) SIGKILLed mid-group and
    started again with the same flags: both runs resume from their checkpoints and end as the same
    experiment under `esper train heuristic --grouped` straight through. Before --grouped, the worker trained
    every episode plainly: on CUDA, at about a third of `esper train`'s speed."""
    experiment = [*EXPERIMENT, "--episodes", "2", "--grouped"]
    straight = tmp_path / "straight"
    subprocess.run([sys.executable, "-m", "esper.cli", "train", "heuristic", *experiment, "--runs-dir", str(straight)],
                   cwd=REPO, env=CHILD_ENV, check=True, capture_output=True)
    hub = start_hub(spawn)
    tamiyo = start_tamiyo(spawn)
    runs = tmp_path / "runs"

    def start_worker():
        worker = spawn("tolaria_worker", *experiment, "--runs-dir", str(runs), "--tamiyo", tamiyo.endpoints["grpc"],
                       "--hub-pub", hub.endpoints["publish"], "--metrics-port", "0", "--exit-when-done")
        worker.wait_bound("metrics")
        return worker

    def by_seed(folder: Path) -> dict[str, Path]:
        run_dirs = [d for d in folder.iterdir() if (d / "config.json").is_file()]
        assert len(run_dirs) <= 2, run_dirs  # a restart that began the runs anew would leave four
        return {d.name.rsplit("_", 1)[1]: d for d in run_dirs}

    def epochs_done() -> list[int]:
        """Each run's last epoch in its telemetry file so far (its whole lines: the worker may be writing one); 0
        for a run whose file is not there yet (a group's run directories are all made before any begins)."""
        def last_epoch(path: Path) -> int:
            text = path.read_text() if path.is_file() else ""
            events = [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()]
            return max((e["epoch"]["signals"].get("epoch", 0) for e in events if "epoch" in e), default=0)
        return [last_epoch(d / "telemetry.jsonl") for d in by_seed(runs).values()] if runs.is_dir() else []

    worker = start_worker()
    wait_until(lambda: len(done := epochs_done()) == 2 and min(done) >= 3, 120, "both runs past epoch 3")
    worker.kill()
    killed_at = epochs_done()
    resumed = start_worker()
    assert resumed.proc.wait(120) == 0, resumed.output()
    print(f"grouped worker SIGKILLed after epochs {killed_at} of {EPOCHS}")
    assert max(killed_at) < EPOCHS, "the worker was not killed mid-group"
    assert sum("resuming after epoch" in line for line in resumed.lines) == 2, resumed.output()
    ours, theirs = by_seed(runs), by_seed(straight)
    assert sorted(ours) == sorted(theirs) == ["s42", "s43"]
    for seed, run_dir in ours.items():
        assert json.loads((run_dir / "config.json").read_text())["grouped"] is True
        sequences = telemetry_sequences(run_dir)
        assert sequences == list(range(1, len(sequences) + 1))
        same_result(run_dir, theirs[seed])


class Honcho:
    """`honcho start` of the Procfile's heuristic stack (hub, tamiyo, karn, worker; the PPO learner has no
    part in a heuristic run) in its own process group, so teardown can kill whatever it left."""

    def __init__(self, env_file: Path, log: Path):
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
        self.log = log
        with log.open("w") as out:  # a file, not a pipe: nobody reads a pipe while the stack runs
            self.proc = subprocess.Popen([sys.executable, "-m", "honcho", "start", "-e", str(env_file), "-f",
                                          str(REPO / "Procfile"), "-d", str(REPO), "hub", "tamiyo", "karn", "worker"],
                                         cwd=REPO, env=CHILD_ENV | {"PATH": path}, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def interrupt(self) -> str:
        """Ctrl-C: SIGINT to honcho, which stops every process; its output."""
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(60)
        return self.log.read_text()

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)


def test_the_whole_stack_stopped_and_started_again_continues_the_run(tmp_path, reference):
    """Issue 8, promise 4: Ctrl-C to `honcho start` mid-run, then `honcho start` again: the same run id
    goes on from its last epoch with its seeds; karn (from its journal) holds every epoch once."""
    ports = dict(zip(["ESPER_HUB_PUB_PORT", "ESPER_HUB_SUB_PORT", "ESPER_HUB_SNAPSHOT_PORT", "ESPER_TAMIYO_PORT",
                      "ESPER_HUB_METRICS_PORT", "ESPER_TAMIYO_METRICS_PORT", "ESPER_WORKER_METRICS_PORT",
                      "ESPER_KARN_METRICS_PORT"], free_ports(8)))
    settings = {**ports, "ESPER_HOST": "127.0.0.1", "OMP_NUM_THREADS": "1",
                "ESPER_KARN_ARGS": f'"--journal {tmp_path / "karn.binpb"}"',
                "ESPER_WORKER_ARGS": f'"{" ".join(EXPERIMENT)} --runs-dir {tmp_path / "runs"}"'}
    env_file = tmp_path / "stack.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    karn_url = f"http://127.0.0.1:{ports['ESPER_KARN_METRICS_PORT']}/metrics"

    def epoch() -> float:
        try:
            return metric(scrape(karn_url), "esper_run_epoch")
        except OSError:  # karn not listening yet
            return -1

    stack = Honcho(env_file, tmp_path / "first.log")
    try:
        wait_until(lambda: epoch() >= 3, 120, "epoch 3 under honcho")
        first = stack.interrupt()
    finally:
        stack.kill()
    events = [json.loads(line) for line in (only_run(tmp_path / "runs") / "telemetry.jsonl").read_text().splitlines()]
    stopped_at = max(e["epoch"]["signals"].get("epoch", 0) for e in events if "epoch" in e)
    stack = Honcho(env_file, tmp_path / "second.log")
    try:
        wait_until(lambda: epoch() == EPOCHS and metric(scrape(karn_url), "esper_run_finished") == 1, 120,
                   "the run to finish after the restart")
        karn = karn_says(karn_url)
        second = stack.interrupt()
    finally:
        stack.kill()
    print(f"stopped at epoch {stopped_at} of {EPOCHS}; restarted: "
          f"{[line.split('| ', 1)[-1] for line in second.splitlines() if 'resuming' in line]}")
    assert 0 < stopped_at < EPOCHS, first
    assert f"resuming after epoch {stopped_at}" in second, second
    assert_every_epoch_once(karn)
    same_result(only_run(tmp_path / "runs"), reference())


def test_sigterm_cuts_a_long_epoch_short_and_the_worker_exits_0_within_5_s(spawn, tmp_path, shared_cifar_dir):
    """Issue 8, promise 11, for a worker whose epoch outlasts honcho's 5 s: CIFAR-10 epochs of 400
    batches (tens of seconds on a CPU). SIGTERM mid-epoch abandons the epoch (a restart continues from
    the last epoch checkpoint) instead of finishing it."""
    hub = start_hub(spawn)
    tamiyo = start_tamiyo(spawn)
    runs = tmp_path / "runs"
    worker = spawn("tolaria_worker", "--task", "cifar10", "--max-epochs", "2", "--max-batches", "400",
                   "--device", "cpu",
                   "--data-dir", str(shared_cifar_dir), "--runs-dir", str(runs), "--tamiyo", tamiyo.endpoints["grpc"],
                   "--hub-pub", hub.endpoints["publish"], "--metrics-port", "0")
    worker.wait_bound("metrics")
    wait_until(lambda: any(runs.glob("*/config.json")), 180, "the episode to start (data loaded)")
    time.sleep(2.0)  # well inside epoch 1
    start = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    status = worker.proc.wait(30)
    seconds = time.monotonic() - start
    print(f"worker SIGTERMed mid-epoch: exit {status} after {seconds:.2f} s")
    assert status == 0, worker.output()
    assert seconds < 5.0
    assert "stopped mid-episode" in worker.output()
    assert not any(runs.glob("*/summary.json"))  # the episode is unfinished, left for a restart


def test_a_killed_hub_restarted_on_its_ports_loses_no_run_and_counts_what_it_dropped(spawn, tmp_path):
    """Issue 4: the hub SIGKILLed mid-episode and started again on the same ports. The episode goes on
    (telemetry never blocks the worker) and ends whole in its run directory; publisher and subscribers
    reconnect by themselves. Nothing is lost silently: karn's applied events plus the events it counted
    lost from sequence gaps equal every event the worker published. (Measured: 0 lost; the worker's
    ZeroMQ queue holds what it publishes while the hub is down, up to its high-water mark.)"""
    epochs = 60
    pub, sub, snap, metrics = free_ports(4)

    def start_hub_on_ports():
        hub = spawn("nissa_hub", "--pub-port", str(pub), "--sub-port", str(sub), "--snapshot-port", str(snap),
                    "--metrics-port", str(metrics))
        hub.wait_bound("publish", "subscribe", "snapshot", "metrics")
        return hub

    hub = start_hub_on_ports()
    tamiyo = start_tamiyo(spawn)
    karn = spawn("karn", "--hub-sub", hub.endpoints["subscribe"], "--hub-snapshot", hub.endpoints["snapshot"],
                 "--metrics-port", "0")
    karn.wait_bound("metrics")
    experiment = [*EXPERIMENT[:EXPERIMENT.index("--max-epochs")], "--max-epochs", str(epochs),
                  *EXPERIMENT[EXPERIMENT.index("--max-epochs") + 2:]]
    worker = spawn("tolaria_worker", *experiment, "--runs-dir", str(tmp_path / "runs"), "--tamiyo",
                   tamiyo.endpoints["grpc"], "--hub-pub", hub.endpoints["publish"], "--metrics-port", "0",
                   "--exit-when-done")
    worker.wait_bound("metrics")
    epoch = lambda: metric(scrape(karn.endpoints["metrics"]), "esper_run_epoch")  # noqa: E731
    wait_until(lambda: epoch() >= 5, 120, "epoch 5")
    hub.kill()
    killed_at = epoch()
    hub = start_hub_on_ports()
    assert worker.proc.wait(180) == 0, worker.output()
    wait_until(lambda: metric(scrape(karn.endpoints["metrics"]), "esper_run_finished") == 1, 60, "karn to see the end")
    karn_view = karn_says(karn.endpoints["metrics"])
    run_dir = only_run(tmp_path / "runs")
    summary = json.loads((run_dir / "summary.json").read_text())
    published = len((run_dir / "telemetry.jsonl").read_text().splitlines())  # the worker's own copy: every event
    applied = sum(v for (name, _), v in scrape(karn.endpoints["metrics"]).items()
                  if name == "esper_karn_events_received_total")
    print(f"hub SIGKILLed at epoch {killed_at:.0f} of {epochs}, restarted; run directory: {summary['epochs']} epochs, "
          f"{published} events; karn applied {applied:.0f} + counted lost {karn_view['lost']:.0f}; {karn_view}")
    assert summary["epochs"] == epochs
    assert karn_view["epoch"] == epochs and karn_view["finished"] == 1
    assert applied + karn_view["lost"] == published  # nothing lost silently
