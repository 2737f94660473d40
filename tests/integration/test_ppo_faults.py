"""Distributed PPO under faults (issue 8, promises 1, 2, 8 and 9; issue 5 item 7's restarts): real
simic_learner, tamiyo_server --policy neural, nissa_hub and tolaria_worker --ppo processes on loopback,
`synthetic` with 2-epoch episodes of 2 batches, one episode per trajectory.

The accounting reads the learner's committed checkpoint (what survives any crash) and the workers' own
`trajectory <worker>/<incarnation>/<sequence> acked ...` log lines (what they were told). Durations are
the issue's: SIGKILLs of a worker at random moments for KILL_WINDOW_S = 60 s, a partition of CUT_S =
10 s and a learner stall of STALL_S = 60 s (twice: mid-run, and past a worker's last round). Those take
about four minutes, so they carry the `chaos` marker: the default `pytest` leaves them out, `pytest -m chaos`
runs them, and .ci/run runs both.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
import zmq
from procs import REPO, Service, Spawner, free_ports, metric, scrape, start_hub, wait_until

from esper.leyline import AckStatus, TrajectoryAck, TrajectoryHeader
from esper.simic.checkpoint import load_checkpoint
from esper.nissa import Telemetry
from esper.simic.env import EnvConfig
from esper.simic.learner import Learner
from esper.simic.rewards import COMPONENTS
from esper.simic.rollout import Rollout
from esper.simic.trainer import TrainerConfig
from esper.transport.trajectories import TrajectorySender

PPO = ["--task", "synthetic", "--max-epochs", "2", "--max-batches", "2", "--n-envs", "1", "--update-every", "2",
       "--device", "cpu", "--num-workers", "1"]
KILL_WINDOW_S, CUT_S, STALL_S = 60.0, 10.0, 60.0
ACKED = re.compile(r"trajectory (\S+)/(\d+)/(\d+) acked ACK_STATUS_(ACCEPTED|DUPLICATE)")


@pytest.fixture(scope="module")
def stack(spawn_module, tmp_path_factory):
    """hub, learner and tamiyo_server, shared by the worker tests (each has its own worker ids)."""
    spawn = spawn_module
    tmp = tmp_path_factory.mktemp("stack")
    hub = start_hub(spawn)
    learner = spawn("simic_learner", *PPO, "--port", "0", "--weights-port", "0", "--metrics-port", "0",
                    "--hub-pub", hub.endpoints["publish"], "--save", str(tmp / "learner.pt"), "--republish-s", "0.5",
                    "--max-policy-lag", "1000")
    learner.wait_bound("trajectories", "weights", "metrics")
    tamiyo = spawn("tamiyo_server", "--policy", "neural", "--port", "0", "--metrics-port", "-1",
                   "--learner-weights", learner.endpoints["weights"])
    tamiyo.wait_bound("grpc")
    return {"spawn": spawn, "hub": hub, "learner": learner, "tamiyo": tamiyo, "checkpoint": tmp / "learner.pt"}


def start_worker(spawn, stack: dict, worker_id: str, tmp: Path, episodes: int, learner: str | None = None,
                 *extra: str) -> Service:
    return spawn("tolaria_worker", "--ppo", *PPO, "--episodes", str(episodes), "--worker-id", worker_id,
                 "--spool-dir", str(tmp / "spool" / worker_id), "--runs-dir", str(tmp / "runs"),
                 "--tamiyo", stack["tamiyo"].endpoints["grpc"], "--hub-pub", stack["hub"].endpoints["publish"],
                 "--learner", learner or stack["learner"].endpoints["trajectories"], "--metrics-port", "0",
                 "--exit-when-done", *extra)


def acked_keys(*workers: Service) -> set[tuple[str, int, int]]:
    """Every key the workers were told the learner holds (ACCEPTED or DUPLICATE), from their logs."""
    return {(m[1], int(m[2]), int(m[3])) for w in workers for line in w.lines if (m := ACKED.search(line))}


def committed(stack: dict, worker_id: str) -> list[tuple[str, int, int]]:
    """The keys of `worker_id` the learner accepted, from its last committed checkpoint."""
    inbox = json.loads(load_checkpoint(stack["checkpoint"])["inbox_json"])
    return [(w, i, s) for w, i, s, status, _ in inbox["decided"]
            if w == worker_id and status == AckStatus.ACK_STATUS_ACCEPTED]


def wait_exit(service: Service, timeout_s: float = 120) -> None:
    assert service.proc.wait(timeout_s) == 0, service.output()


@pytest.mark.chaos
def test_a_worker_sigkilled_at_random_moments_loses_nothing_and_counts_nothing_twice(stack, tmp_path):
    """Promise 1: two workers; for KILL_WINDOW_S one is SIGKILLed again and again, each time at a random
    moment (after 1 to 6 of its shipments, then up to 0.1 s more: playing, spooling, sending or awaiting an
    ack), and restarted on its spool; then both are stopped with SIGTERM."""
    spawn, rng = stack["spawn"], random.Random(81)
    steady = start_worker(spawn, stack, "steady", tmp_path, 100_000)
    victims = [start_worker(spawn, stack, "victim", tmp_path, 100_000)]
    started = time.monotonic()
    while time.monotonic() - started < KILL_WINDOW_S:
        shipments = rng.randint(1, 6)
        wait_until(lambda: sum("shipped trajectory" in line for line in victims[-1].lines) >= shipments, 60,
                   f"{shipments} shipments")
        time.sleep(rng.uniform(0.0, 0.1))
        victims[-1].proc.send_signal(signal.SIGKILL)
        victims[-1].proc.wait(10)
        victims.append(start_worker(spawn, stack, "victim", tmp_path, 100_000))
    chaos_s = time.monotonic() - started
    victims[-1].wait_bound("metrics")  # up (its SIGTERM handler installed) before it is stopped
    assert victims[-1].stop() == 0, victims[-1].output()
    assert steady.stop() == 0, steady.output()
    learner = scrape(stack["learner"].endpoints["metrics"])
    for worker, services in (("steady", [steady]), ("victim", victims)):
        accepted, acked = committed(stack, worker), acked_keys(*services)
        lost, twice = acked - set(accepted), len(accepted) - len(set(accepted))
        print(f"{worker}: {len(services) - 1} SIGKILLs in {chaos_s:.1f} s, {len(acked)} trajectories acked, "
              f"{len(accepted)} accepted, {len(lost)} acked but lost, {twice} applied twice")
        assert not lost and twice == 0
    assert len(victims) > 5  # a restarted worker takes seconds to import torch: about one kill per 6-10 s
    print(f"learner /metrics: {metric(learner, 'esper_simic_trajectories_accepted_total'):.0f} accepted, "
          f"{metric(learner, 'esper_simic_trajectory_duplicates_total'):.0f} duplicates (resends not applied)")
    every = json.loads(load_checkpoint(stack["checkpoint"])["inbox_json"])["decided"]
    assert metric(learner, "esper_simic_trajectories_accepted_total") == sum(
        status == AckStatus.ACK_STATUS_ACCEPTED for *_, status, _ in every)


def synthetic_rollouts(n: int, steps: int, envs: int) -> list[Rollout]:
    """n trajectories of random observations (masks all legal, random rewards) acted by the policy the
    learner starts with (same config and seed: its actions, log-probabilities and values), so its PPO
    updates really step; drawn from fixed generators, the same bytes for both runs of the next test."""
    learner = Learner(TrainerConfig(env=EnvConfig(task="synthetic", max_epochs=steps), n_envs=envs, update_every=1),
                      Telemetry("rollouts"))
    agent, heads = learner.trainer.agent, learner.trainer.codec.shape
    g = torch.Generator().manual_seed(82)
    shape = (steps, envs)
    rollouts = []
    for _ in range(n):
        obs = torch.randn(*shape, learner.trainer.spec.dim, generator=g)
        legal = torch.ones(*shape, *heads, dtype=torch.bool)
        with torch.no_grad():
            actions, logprobs, _, values, _ = agent.get_action_and_value(obs.flatten(0, 1), legal.flatten(0, 1),
                                                                         generator=g)
        values = values.view(shape)
        parts = torch.randn(*shape, len(COMPONENTS), generator=g)
        terminated = torch.zeros(shape, dtype=torch.bool)
        terminated[-1] = True
        rollouts.append(Rollout(
            obs=obs, legal=legal, actions=actions.view(*shape, 3), logprobs=logprobs.view(shape), values=values,
            next_values=torch.cat([values[1:], torch.zeros(1, envs)]), rewards=parts.sum(-1), reward_parts=parts,
            terminated=terminated, policy_version=torch.zeros(shape, dtype=torch.int64),
            seeds=torch.zeros(shape, dtype=torch.int64)))
    return rollouts

def learn(tmp: Path, rollouts: list[Rollout], kill_from: int | None) -> tuple[dict, dict]:
    """One learner learning `rollouts` from a TrajectorySender (window 1: arrival order is fixed). With
    kill_from, SIGKILL it as soon as it logs the start of update kill_from (or of a later one, until a kill
    lands before that update's commit) and start it again on the same port and checkpoint."""
    spawn, port = Spawner(), free_ports()[0]
    steps, envs = rollouts[0].rewards.shape
    args = ["--task", "synthetic", "--max-epochs", str(steps), "--n-envs", str(envs), "--update-every", "1",
            "--device", "cpu", "--num-workers", "1", "--port", str(port), "--weights-port", "0", "--hub-pub", "",
            "--metrics-port", "-1", "--max-policy-lag", "100", "--save", str(tmp / "learner.pt")]
    ctx = zmq.Context()
    sender = TrajectorySender(ctx, f"tcp://127.0.0.1:{port}", "solo", resend_s=5.0, window=1)
    info = {"kill_at_update": None}
    try:
        learner = spawn("simic_learner", *args)
        learner.wait_bound("trajectories")

        def ship() -> None:  # the worker's side, while this thread kills and restarts the learner
            for rollout in rollouts:
                sender.send(rollout, "synthetic", lambda: False)
            info["flushed"] = sender.flush(120, lambda: False)

        shipping = threading.Thread(target=ship)
        shipping.start()
        for update in range(kill_from or len(rollouts) + 1, len(rollouts) + 1):
            started = f"update {update}: learning from"
            deadline = time.monotonic() + 60
            while not any(started in line for line in learner.lines) and time.monotonic() < deadline:
                time.sleep(0.001)
            line = next((line for line in learner.lines if started in line), None)
            assert line, learner.output()
            learner.proc.kill()
            killed_after_ms = round(1000 * (time.time() - log_time(line)))
            learner.proc.wait(10)
            learner = spawn("simic_learner", *args)
            learner.wait_bound("trajectories")
            resumed = int(re.search(r"resumed from \S+: version (\d+)", learner.output())[1])
            if resumed == update - 1:  # the kill landed before the commit of `update`
                info.update(kill_at_update=update, resumed=resumed, killed_after_ms=killed_after_ms)
                break
        shipping.join(180)
        assert info.get("flushed"), learner.output()
        if kill_from:  # a trajectory accepted before the kill, resent: the restarted learner knows it
            dealer = ctx.socket(zmq.DEALER)
            dealer.connect(f"tcp://127.0.0.1:{port}")
            header = TrajectoryHeader(worker_id="solo", incarnation=sender.incarnation, sequence=0)
            dealer.send_multipart([header.SerializeToString(), b"resent payload"])
            assert dealer.poll(10_000), "no ack for the resend"
            info["resend_status"] = TrajectoryAck.FromString(dealer.recv()).status
            dealer.close(linger=0)
        info["connects"] = sender.connects
        times = {(m[2], int(m[1])): log_time(line) for line in learner.lines
                 if (m := re.search(r"update (\d+)(: learning| done)", line))}
        info["update_ms"] = [round(1000 * (times[" done", u] - times[": learning", u]))
                             for u in sorted({u for _, u in times}) if {(" done", u), (": learning", u)} <= set(times)]
        assert learner.stop() == 0, learner.output()
    finally:
        sender.close()
        ctx.term()
        spawn.close()
    return load_checkpoint(tmp / "learner.pt"), info


def test_an_environment_process_killed_ends_its_worker_in_one_line_and_leaves_no_child(stack, tmp_path):
    """tolaria_worker --env-processes: SIGKILL one of its environment processes mid-round; the worker
    says which in one error line, exits 1 (a restart continues from its spool) and leaves no child
    behind. Its episodes are long (200 epochs), so the first round is still playing: nothing ships."""
    worker = start_worker(stack["spawn"], stack, "envkill", tmp_path, 4, None, "--env-processes", "--n-envs", "2",
                          "--max-epochs", "200")
    parent = psutil.Process(worker.proc.pid)

    def environments() -> list[psutil.Process]:
        return [c for c in parent.children() if "env_process" in " ".join(c.cmdline())]

    wait_until(lambda: len(environments()) == 2, 60, "two environment processes")
    wait_until(lambda: any("running 4 episode(s)" in line for line in worker.lines), 60, "the first round")
    time.sleep(1.0)  # into the round
    victim, survivor = environments()
    victim.kill()
    assert worker.proc.wait(30) == 1, worker.output()
    errors = [line for line in worker.lines if "ERROR" in line]
    assert len(errors) == 1 and "the environment process on cpu exited (status -9)" in errors[0], worker.output()
    assert "Traceback" not in worker.output()
    _, alive = psutil.wait_procs([survivor], timeout=10)  # it read the end of its input and returned
    assert not alive
    assert not any("shipped trajectory" in line for line in worker.lines)


def test_learner_sigkilled_mid_update_resumes_and_ends_bit_identical(tmp_path):
    """Promise 2: SIGKILL the learner during an update; it restarts from its last commit, the worker side
    resends what was not acked, and the final state equals an unkilled run's, bit for bit (CPU, one torch
    thread, one sender: the same trajectories reach both learners in the same order)."""
    rollouts = synthetic_rollouts(6, steps=20, envs=32)  # 640 rows: 40 minibatch steps, ~0.1 s an update
    straight, plain = learn(tmp_path / "straight", rollouts, kill_from=None)
    killed, info = learn(tmp_path / "killed", rollouts, kill_from=3)
    print(f"updates took {plain['update_ms']} ms (unkilled learner's log); "
          f"killed {info['killed_after_ms']} ms into update {info['kill_at_update']}, resumed at version "
          f"{info['resumed']}, "
          f"{info['connects']} connections to the learner, resend of trajectory 0 after the restart acked "
          f"{AckStatus.Name(info['resend_status'])}")
    assert info["kill_at_update"] is not None and info["resend_status"] == AckStatus.ACK_STATUS_DUPLICATE
    same = {part: all(torch.equal(a, b) for a, b in zip(tensors(straight[part]), tensors(killed[part])))
            for part in ("network", "optimizer", "obs_rms", "reward_rms", "rng")}
    print(f"bit-identical after {straight['counters']['updates']} updates: {same}")
    assert all(same.values()) and straight["counters"] == killed["counters"]
    sequences = [[s for _, _, s, _, _ in json.loads(state["inbox_json"])["decided"]] for state in (straight, killed)]
    assert sequences[0] == sequences[1] == list(range(len(rollouts)))

    # Started on a checkpoint trained with other settings, it refuses to resume rather than mix them.
    refused = subprocess.run([sys.executable, "-m", "services.simic_learner", "--task", "synthetic", "--max-epochs",
                              "3", "--save", str(tmp_path / "killed" / "learner.pt"), "--hub-pub", ""], cwd=REPO,
                             capture_output=True, text=True, timeout=120, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert refused.returncode == 2, refused.stderr
    assert "trained with other settings: env.max_epochs, n_envs, update_every differ" in refused.stderr, refused.stderr


def tensors(tree) -> list[torch.Tensor]:
    """Every tensor in a nested state dict, in a fixed order."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for key in sorted(tree, key=str) for t in tensors(tree[key])]
    if isinstance(tree, list | tuple):
        return [t for item in tree for t in tensors(item)]
    return [torch.tensor(float(tree))] if isinstance(tree, int | float) else []


class FaultProxy:
    """A TCP relay on loopback whose link can be cut: `cut()` resets every relayed connection and stops
    listening (connects are refused, as across a link that is down); `heal()` listens again on the same
    port. It records when it accepted each connection, to time the reconnection."""

    def __init__(self, upstream: str):
        host, port = upstream.removeprefix("tcp://").rsplit(":", 1)
        self.upstream = (host, int(port))
        self.port = 0
        self.relayed: list[socket.socket] = []
        self.accepted_at: list[float] = []
        self._listen()

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def _listen(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.port = self.listener.getsockname()[1]
        self.listener.listen()
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # cut
                return
            self.accepted_at.append(time.monotonic())
            server = socket.create_connection(self.upstream)
            self.relayed += [client, server]
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass

    def cut(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self.listener.close()
        for sock in self.relayed:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self.relayed = []

    heal = _listen


def log_time(line: str) -> float:
    """The wall-clock time of a service log line ('2026-11-26 04:34:07,652 name LEVEL ...')."""
    stamp, ms = line[:23].split(",")
    return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000


@pytest.mark.chaos
def test_a_worker_left_running_resends_its_last_trajectory_however_long_the_learner_stalls(stack, tmp_path):
    """A worker that idles when done (the stack's, without --exit-when-done) had stopped resending its last
    round 60 s into a learner stall and idled with it unacked for good: the learner never learned from it. It now
    resends until the learner answers (or SIGTERM)."""
    learner = stack["learner"].proc
    wait_until(lambda: any("serving policy ppo" in line for line in stack["tamiyo"].lines), 60, "tamiyo's weights")
    learner.send_signal(signal.SIGSTOP)  # tamiyo serves on with the weights it has; nothing is acked
    try:
        worker, quitter = (stack["spawn"]("tolaria_worker", "--ppo", *PPO, "--episodes", "2", "--worker-id", name,
                                          "--spool-dir", str(tmp_path / name), "--runs-dir", str(tmp_path / "runs"),
                                          "--tamiyo", stack["tamiyo"].endpoints["grpc"], "--hub-pub",
                                          stack["hub"].endpoints["publish"], "--learner",
                                          stack["learner"].endpoints["trajectories"], "--metrics-port", "-1",
                                          "--resend-s", "1") for name in ("idler", "quitter"))
        for w in (worker, quitter):
            wait_until(lambda: any("shipped trajectory 1" in line for line in w.lines), 60, "both rounds shipped")
        time.sleep(STALL_S + 5)  # past the 60 s it had waited for acks
        assert not acked_keys(worker, quitter)
        # SIGTERM while it resends ends the wait, not the summary: its rounds stay spooled for a restart.
        quitter.proc.terminate()
        wait_exit(quitter, 30)
        assert any("2 never acked (spooled: a restart resends them)" in line for line in quitter.lines)
        assert not any("stopped mid-episode" in line for line in quitter.lines)
        assert len(list((tmp_path / "quitter").glob("*.traj"))) == 2
    finally:
        learner.send_signal(signal.SIGCONT)
    wait_until(lambda: len(acked_keys(worker)) == 2, 30, "both rounds' acks after the stall")
    assert any("not acked after 60 s: resending them until they are" in line for line in worker.lines)
    assert len(committed(stack, "idler")) == 2 and not list((tmp_path / "idler").glob("*.traj"))
    worker.proc.terminate()
    wait_exit(worker, 30)


@pytest.mark.chaos
def test_a_partition_loses_nothing_and_reconnects_within_2_s(stack, tmp_path):
    """Promise 8: the worker-learner link is cut for CUT_S through a fault proxy, then healed."""
    proxy, episodes = FaultProxy(stack["learner"].endpoints["trajectories"]), 24
    worker = start_worker(stack["spawn"], stack, "partitioned", tmp_path, episodes, proxy.endpoint)
    wait_until(lambda: len(acked_keys(worker)) >= 2, 60, "the worker's first acks")
    proxy.cut()
    time.sleep(CUT_S)
    unacked = metric(scrape(worker.endpoints["metrics"]), "esper_tolaria_trajectories_unacked")
    healed_wall, healed = time.time(), time.monotonic()
    proxy.heal()
    wait_exit(worker)
    proxy.cut()  # closes it
    reconnect = min(t for t in proxy.accepted_at if t >= healed) - healed
    first_ack = min(log_time(line) for line in worker.lines if ACKED.search(line) and log_time(line) >= healed_wall)
    accepted, acked = committed(stack, "partitioned"), acked_keys(worker)
    print(f"cut {CUT_S:.0f} s with {unacked:.0f} unacked: reconnected {reconnect:.2f} s after healing, first ack "
          f"{first_ack - healed_wall:.2f} s after; {len(acked - set(accepted))} acked trajectories lost, "
          f"{len(accepted)} accepted for {episodes} episodes")
    assert unacked >= 1 and reconnect < 2.0 and first_ack - healed_wall < 2.0
    assert acked <= set(accepted) and len(accepted) == len(set(accepted)) == episodes


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.mark.chaos
def test_a_stalled_learner_makes_the_worker_wait_not_grow(stack, tmp_path):
    """Promise 9: SIGSTOP the learner for STALL_S; the worker fills its window (2) and waits, its memory
    flat and the wait on its /metrics; after SIGCONT it finishes with nothing lost."""
    episodes, learner = 16, stack["learner"].proc
    worker = start_worker(stack["spawn"], stack, "patient", tmp_path, episodes, None, "--window", "2")
    wait_until(lambda: len(acked_keys(worker)) >= 2, 60, "the worker's first acks")
    learner.send_signal(signal.SIGSTOP)
    shipped = lambda: sum("shipped trajectory" in line for line in worker.lines)  # noqa: E731
    try:
        start, before, peak, shipped_before = time.monotonic(), rss_bytes(worker.proc.pid), 0, shipped()
        while time.monotonic() - start < STALL_S:
            peak = max(peak, rss_bytes(worker.proc.pid))
            time.sleep(0.25)
        stalled, shipped_during = scrape(worker.endpoints["metrics"]), shipped() - shipped_before
    finally:
        learner.send_signal(signal.SIGCONT)
    wait_exit(worker)
    accepted, acked = committed(stack, "patient"), acked_keys(worker)
    waiting = metric(stalled, "esper_tolaria_trajectory_waiting_seconds")
    print(f"learner stopped {STALL_S:.0f} s: worker RSS {before / 2**20:.1f} MiB -> peak {peak / 2**20:.1f} MiB "
          f"(+{(peak - before) / 2**20:.1f} MiB); /metrics then: "
          f"{metric(stalled, 'esper_tolaria_trajectories_unacked'):.0f} unacked, waiting {waiting:.1f} s, "
          f"{metric(stalled, 'esper_tolaria_spool_bytes'):.0f} bytes spooled, {shipped_during} trajectories "
          f"shipped during the stall; after SIGCONT {len(accepted)} "
          f"accepted for {episodes} episodes, {len(acked - set(accepted))} acked but lost")
    assert peak - before < 256 * 2**20 and shipped_during <= 2 * 2  # the window's credit + acks already sent
    assert metric(stalled, "esper_tolaria_trajectories_unacked") == 2 and waiting > STALL_S / 2
    assert metric(stalled, "esper_tolaria_spool_bytes") > 0
    assert acked <= set(accepted) and len(accepted) == len(set(accepted)) == episodes
