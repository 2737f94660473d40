"""The transport classes against hostile or unlucky peers over real loopback sockets, in process: a bad weights
message, an ack of an unknown status, an oversized subscription, a late snapshot reply and a peer that never
reads its snapshots each cost a counted drop or a log line, never a dead thread, a lost trajectory or the
hub's memory (found by a review; the decoders alone are in tests/unit/test_wire_hostile.py)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import pytest
import torch
import zmq
from procs import REPO, wait_until

from esper.leyline import (
    AckStatus,
    PolicyWeights,
    RunStarted,
    SnapshotReply,
    SnapshotRequest,
    TelemetryEvent,
    TrajectoryAck,
    TrajectoryHeader,
)
from esper.simic.rollout import Rollout
from esper.transport.bus import Hub, RetainedEvents, Subscriber, bind_endpoint, make_context
from esper.transport.limits import MAX_SUBSCRIPTION_BYTES, MAX_WORKER_ID_CHARS
from esper.transport.trajectories import (
    POLICY_TOPIC,
    Spool,
    TrajectorySender,
    WeightsPublisher,
    WeightsSubscriber,
    weights_frames,
)

STATE = {"feature_spec": {"task": "synthetic"}, "hidden_size": 8, "clip_obs": 5.0,
         "network": {"w": torch.ones(2, 3)}, "obs_rms": {"mean": torch.zeros(3)}}


@pytest.fixture
def ctx():
    """Every socket of a test, closed at teardown even when the test failed (an open one hangs the next term)."""
    ctx = make_context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def serve(ctx):
    """start(serve) runs `serve(stop_fd, is_stopped)` on a thread; teardown stops it as the services do."""
    stop_r, stop_w = os.pipe()
    stopped = threading.Event()
    threads = []

    def start(target) -> threading.Thread:
        threads.append(threading.Thread(target=target, args=(stop_r, stopped.is_set), daemon=True))
        threads[-1].start()
        return threads[-1]

    yield start
    stopped.set()
    os.write(stop_w, b"x")
    for thread in threads:
        thread.join(10)
    os.close(stop_r)
    os.close(stop_w)


def test_the_weights_receiver_lives_through_malformed_weights(ctx, serve):
    """A tensor name sent as msgpack bin, or feature_spec_json nested 100,000 deep, killed tamiyo_server's
    receiver thread (TypeError, RecursionError): it never loaded another policy."""
    pub = ctx.socket(zmq.PUB)
    endpoint = bind_endpoint(pub, "127.0.0.1", 0)
    received = []
    subscriber = WeightsSubscriber(ctx, endpoint, lambda version, state: received.append(version))
    receiver = serve(subscriber.serve)
    bad = [[POLICY_TOPIC, PolicyWeights(version=9, feature_spec_json="{}").SerializeToString(),
            msgpack.packb({b"network.w": {"dtype": "float32", "shape": [1], "data": bytes(4)}}, use_bin_type=True)],
           [POLICY_TOPIC, PolicyWeights(version=9, feature_spec_json="[" * 100_000).SerializeToString(),
            msgpack.packb({})]]
    for version in (1, 2):  # 1: until the subscription is live (PUB drops before); 2: after two bad ones for sure

        def publish(version=version) -> bool:
            for frames in (*bad, weights_frames(version, STATE)):
                pub.send_multipart(frames)
            return version in received

        wait_until(publish, 10, f"version {version}", interval_s=0.05)
    assert subscriber.malformed >= 2 and receiver.is_alive()
    # Each version is taken once, however often it is republished (every 2 s): tamiyo_server rebuilds the
    # policy, and logs it, on each one it is given (a mutation taking every copy survived).
    assert received == [1, 2], received


def one_sent(ctx: zmq.Context, tmp_path: Path, resend_s: float) -> tuple[zmq.Socket, str, TrajectorySender, int]:
    """A learner's ROUTER, and a sender spooling in `tmp_path` that has sent it one trajectory: (learner, its
    endpoint, sender, the trajectory's sequence)."""
    learner = ctx.socket(zmq.ROUTER)
    endpoint = bind_endpoint(learner, "127.0.0.1", 0)
    sender = TrajectorySender(ctx, endpoint, "w", resend_s=resend_s, spool=Spool(tmp_path))
    rollout = Rollout(**{name: torch.zeros((2, 1, 3), dtype=dtype) for name, dtype in Rollout.DTYPES.items()})
    rollout.rewards = torch.zeros(2, 1)
    sender.poll(5.0)  # the handshake
    return learner, endpoint, sender, sender.send(rollout, "synthetic", stop=lambda: False)


def test_an_ack_of_an_unknown_status_leaves_the_trajectory_spooled_and_unacked(ctx, tmp_path: Path):
    """It used to delete the spooled trajectory, then raise ValueError out of poll (AckStatus.Name)."""
    learner, endpoint, sender, sequence = one_sent(ctx, tmp_path, resend_s=0.2)
    for status in (7, AckStatus.ACK_STATUS_UNSPECIFIED, AckStatus.ACK_STATUS_ACCEPTED):  # 7: from a newer build
        wait_until(lambda: sender.poll(0.05) or learner.poll(0), 5, "the trajectory (resent after an unknown ack)")
        identity, _, _ = learner.recv_multipart()
        learner.send_multipart([identity, TrajectoryAck(worker_id="w", incarnation=sender.incarnation,
                                                        sequence=sequence, status=status).SerializeToString()])
        sender.poll(5.0)  # returns once the ack is read
        settled = status == AckStatus.ACK_STATUS_ACCEPTED
        assert (not sender.unacked, not list(tmp_path.glob("*.traj")), sender.acked) == (settled, settled, settled)
    sender.close()


def test_a_refused_trajectory_is_counted_and_said_as_an_error(ctx, tmp_path: Path, caplog):
    """The learner's refusal (its reason) is the worker's one way to learn its episodes were not learned from:
    it is logged as an error and counted apart from the acked (a mutation counting it acked survived)."""
    learner, endpoint, sender, sequence = one_sent(ctx, tmp_path, resend_s=0.2)
    wait_until(lambda: sender.poll(0.05) or learner.poll(0), 5, "the trajectory")
    identity, _, _ = learner.recv_multipart()
    learner.send_multipart([identity, TrajectoryAck(worker_id="w", incarnation=sender.incarnation, sequence=sequence,
                                                    status=AckStatus.ACK_STATUS_REJECTED,
                                                    reason="rewards past 2.01e+08 in magnitude").SerializeToString()])
    with caplog.at_level(logging.ERROR):
        sender.poll(5.0)
    assert (sender.rejected, sender.acked, len(sender.unacked)) == (1, 0, 0)
    assert f"trajectory {sequence} rejected by the learner: rewards past 2.01e+08 in magnitude" in caplog.text
    sender.close()


def test_a_restarted_learner_gets_the_unacked_trajectories_as_soon_as_it_is_connected(ctx, tmp_path: Path):
    """The sender resends every unacked trajectory on each new connection, not --resend-s later (30 s here): a
    mutation that left them to the timer survived even the partition chaos test."""
    learner, endpoint, sender, sequence = one_sent(ctx, tmp_path, resend_s=30.0)
    assert learner.poll(5000)  # it arrived, and the learner went away before acking it
    learner.close(linger=0)
    wait_until(lambda: sender.poll(0.05) or not sender.socket.poll(0, zmq.POLLOUT), 10, "the sender to see it go")
    restarted = ctx.socket(zmq.ROUTER)
    restarted.bind(endpoint)
    started = time.monotonic()
    wait_until(lambda: sender.poll(0.05) or restarted.poll(0), 10, "the trajectory at the restarted learner")
    _, header, _ = restarted.recv_multipart()
    assert TrajectoryHeader.FromString(header).sequence == sequence and time.monotonic() - started < 10
    restarted.close(linger=0)
    sender.close()


def test_only_resends_that_went_out_are_counted(ctx, tmp_path: Path):
    """While the learner is unreachable nothing is queued (ZMQ_IMMEDIATE), so nothing is resent: the counter (and
    a log line) had gone up at every tick of the timer, 59 in a minute at --resend-s 1."""
    free = ctx.socket(zmq.ROUTER)
    endpoint = bind_endpoint(free, "127.0.0.1", 0)
    free.close(linger=0)  # a port nobody listens on, for now
    sender = TrajectorySender(ctx, endpoint, "w", resend_s=0.05, spool=Spool(tmp_path))
    rollout = Rollout(**{name: torch.zeros((2, 1, 3), dtype=dtype) for name, dtype in Rollout.DTYPES.items()})
    rollout.rewards = torch.zeros(2, 1)
    sender.send(rollout, "synthetic", stop=lambda: False)
    for _ in range(10):
        sender.poll(0.05)
    assert sender.resends == 0 and sender.unacked
    learner = ctx.socket(zmq.ROUTER)
    learner.bind(endpoint)
    wait_until(lambda: sender.poll(0.05) or learner.poll(0), 10, "the trajectory, sent on connecting")
    wait_until(lambda: sender.poll(0.05) or sender.resends, 5, "a resend (never acked)")
    learner.close(linger=0)
    sender.close()


def test_the_weights_publisher_refuses_a_subscription_over_the_limit(ctx):
    """It inherited the context's 64 MiB: one 20 MB subscription cost the learner ~900 MiB in libzmq's trie."""
    publisher = WeightsPublisher(ctx, "127.0.0.1", 0)
    disconnects = publisher.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    hostile = ctx.socket(zmq.SUB)
    hostile.subscribe(POLICY_TOPIC + bytes(MAX_SUBSCRIPTION_BYTES))
    hostile.connect(publisher.endpoint)
    assert disconnects.poll(5000), "the publisher kept a connection that sent a subscription over the limit"


def event(sequence: int, task: str = "t") -> TelemetryEvent:
    return TelemetryEvent(run_id="r", sequence=sequence, run_started=RunStarted(task=task))


def test_a_snapshot_reply_that_comes_after_its_timeout_is_not_the_next_ones_answer(ctx):
    """The late reply stayed queued on the DEALER and was taken for the answer to the next request (after a hub
    restart): every snapshot after it was one behind."""
    xpub, router = ctx.socket(zmq.XPUB), ctx.socket(zmq.ROUTER)
    subscriber = Subscriber(ctx, bind_endpoint(xpub, "127.0.0.1", 0), bind_endpoint(router, "127.0.0.1", 0),
                            snapshot_timeout_s=0.3)
    while not (hello := xpub.recv()[1:]).startswith(b"esper.hello."):
        pass

    def sync() -> list[int]:
        xpub.send_multipart([hello, b""])  # the hub's hello: the subscriber requests a snapshot
        assert subscriber.socket.poll(5000)
        return [e.sequence for e in subscriber.receive()]

    assert sync() == []  # the hub is slow: no reply within 0.3 s
    identity, _ = router.recv_multipart()
    router.send_multipart([identity, SnapshotReply(events=[event(1)]).SerializeToString()])  # too late
    time.sleep(0.3)
    answer = threading.Thread(target=lambda: router.send_multipart(
        [router.recv_multipart()[0], SnapshotReply(events=[event(1), event(2), event(3)]).SerializeToString()]),
        daemon=True)
    answer.start()
    assert sync() == [1, 2, 3]
    answer.join(5)
    assert not subscriber.dealer.poll(300)


def test_the_hub_drops_snapshot_replies_a_peer_does_not_read_and_serves_the_others(ctx, serve):
    """A reply is a full copy of the retained events, and 300 requests from one peer that never read were all
    queued: the hub grew to 1.4 GiB."""
    retained = RetainedEvents()
    retained.add(event(1, task="x" * 500_000))
    hub = Hub(ctx, "127.0.0.1", 0, 0, 0, retained)
    serve(hub.serve)
    greedy = ctx.socket(zmq.DEALER)
    greedy.rcvhwm = 1
    greedy.rcvbuf = 4096
    greedy.connect(hub.endpoints["snapshot"])
    n = 300
    for _ in range(n):
        greedy.send(SnapshotRequest().SerializeToString())
    wait_until(lambda: hub.snapshots + hub.dropped["snapshot_reply"] == n, 10, "the hub to answer every request")
    print(f"{n} snapshot requests never read: {hub.snapshots} replies queued, {hub.dropped['snapshot_reply']} dropped")
    assert hub.snapshots < 20  # what TCP buffers take, then one queued
    reader = ctx.socket(zmq.DEALER)
    reader.connect(hub.endpoints["snapshot"])
    reader.send(SnapshotRequest().SerializeToString())
    assert reader.poll(5000) and [e.sequence for e in SnapshotReply.FromString(reader.recv()).events] == [1]


def test_the_hubs_subscriptions_go_down_as_subscribers_leave(ctx, serve):
    """esper_bus_subscriptions had only to be at least 1 in the tests: a mutation that never took one off
    survived. Two subscribers come (to two runs: XPUB passes on a topic's first subscription and its last
    unsubscription only), then one unsubscribes and the other closes."""
    hub = Hub(ctx, "127.0.0.1", 0, 0, 0, RetainedEvents())
    serve(hub.serve)
    subscribers = [ctx.socket(zmq.SUB) for _ in range(2)]
    for sub, run in zip(subscribers, (b"a", b"b")):
        sub.connect(hub.endpoints["subscribe"])
        sub.subscribe(b"esper.telemetry." + run)
    wait_until(lambda: hub.subscriptions == 2, 10, "two subscriptions")
    subscribers[0].unsubscribe(b"esper.telemetry.a")
    wait_until(lambda: hub.subscriptions == 1, 10, f"one left (the hub counts {hub.subscriptions})")
    subscribers[1].close(linger=0)
    wait_until(lambda: hub.subscriptions == 0, 10, f"none left (the hub counts {hub.subscriptions})")
    subscribers[0].close(linger=0)


def test_a_worker_refuses_a_worker_id_the_learner_would_refuse():
    """The learner refuses a worker_id over MAX_WORKER_ID_CHARS (it keeps every key it decides): a worker
    started with one would play episodes whose trajectories are all refused, so it exits 2 at once instead."""
    too_long = "w" * (MAX_WORKER_ID_CHARS + 1)
    out = subprocess.run([sys.executable, "-m", "services.tolaria_worker", "--ppo", "--task", "synthetic",
                          "--worker-id", too_long], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert f"--worker-id must be 1 to {MAX_WORKER_ID_CHARS} characters, got {MAX_WORKER_ID_CHARS + 1}" in out.stderr
