"""nissa_hub over loopback: late joiners get a snapshot and lose nothing; garbage is counted and dropped."""

from __future__ import annotations

import random
import time

import zmq
from procs import metric, scrape, start_hub, wait_until

from esper.karn import RunStore
from esper.leyline import EpochReport, TelemetryEvent, TrainingSignals
from esper.transport.bus import PublisherSink, Subscriber, encode, make_context


def event(run_id: str, sequence: int) -> TelemetryEvent:
    return TelemetryEvent(run_id=run_id, sequence=sequence,
                          epoch=EpochReport(signals=TrainingSignals(epoch=sequence, max_epochs=1000)))


def drain(subscriber: Subscriber, store: RunStore, until, timeout_s: float = 30.0) -> None:
    """Apply whatever arrives until `until(store)` holds (bounded by timeout_s)."""
    deadline = time.monotonic() + timeout_s
    while not until(store):
        assert time.monotonic() < deadline, f"timed out; store has {dict(store.received)}"
        if subscriber.socket.poll(200):
            for e in subscriber.receive():
                store.apply(e)


def test_late_joiner_gets_snapshot_then_live_with_nothing_lost(spawn):
    hub = start_hub(spawn)
    ctx = make_context()
    publisher = PublisherSink(hub.endpoints["publish"], ctx)
    assert publisher.wait_attached(30.0)
    for seq in range(1, 51):  # before anyone subscribes: only the hub's memory has these
        publisher.emit(event("late", seq))
    wait_until(lambda: metric(scrape(hub.endpoints["metrics"]), "esper_bus_messages_forwarded_total") == 50,
               30, "the hub to forward 50 events")

    subscriber = Subscriber(ctx, hub.endpoints["subscribe"], hub.endpoints["snapshot"])
    store = RunStore()
    drain(subscriber, store, lambda s: subscriber.synced)
    for seq in range(51, 101):
        publisher.emit(event("late", seq))
    drain(subscriber, store, lambda s: s.runs["late"].last_sequence == 100)

    run = store.runs["late"]
    assert sorted(run.epochs) == list(range(1, 101))
    assert run.lost == 0
    assert subscriber.snapshots == 1
    assert metric(scrape(hub.endpoints["metrics"]), "esper_bus_snapshots_total") == 1
    subscriber.close()

    # Following one run takes that run and, for a PPO run, its episodes, each with its history. ZeroMQ
    # subscriptions match by prefix: another run whose id begins so (R2) had come in too, and the episodes had
    # come without their history (the snapshot was the run's alone), as lost events.
    for seq in range(1, 6):
        publisher.emit(event("R_ep0000", seq))
        publisher.emit(event("R2", seq))
    wait_until(lambda: metric(scrape(hub.endpoints["metrics"]), "esper_bus_messages_forwarded_total") == 110,
               30, "the hub to forward them")
    following = Subscriber(ctx, hub.endpoints["subscribe"], hub.endpoints["snapshot"], run_id="R")
    store = RunStore()
    drain(following, store, lambda s: following.synced)
    for name in ("R2", "R_ep0000", "R"):
        publisher.emit(event(name, 6 if name != "R" else 1))
    drain(following, store, lambda s: "R" in s.runs)
    assert sorted(store.runs) == ["R", "R_ep0000"] and sorted(store.runs["R_ep0000"].epochs) == list(range(1, 7))
    assert store.runs["R_ep0000"].lost == store.runs["R"].lost == 0
    following.close()
    publisher.shutdown()
    ctx.term()
    assert hub.stop() == 0, hub.output()


def test_random_frames_are_counted_and_dropped(spawn):
    hub = start_hub(spawn)
    ctx = make_context()
    raw = ctx.socket(zmq.XPUB)  # a publisher that sends garbage, attached like PublisherSink
    raw.sndhwm = 2000  # 1,001 messages in one burst: past the default high-water mark, ZeroMQ drops silently
    raw.connect(hub.endpoints["publish"])
    assert raw.poll(30_000), "the hub never subscribed"
    rng = random.Random(0)
    for _ in range(1000):
        raw.send(rng.randbytes(rng.randrange(0, 200)))
    # The hub still forwards good events; on the same connection this one arrives after the garbage.
    raw.send_multipart(encode(event("after", 1)))
    samples = wait_until(lambda: (s := scrape(hub.endpoints["metrics"]))
                         and metric(s, "esper_bus_messages_forwarded_total") == 1 and s, 30, "the good event")
    assert metric(samples, "esper_bus_messages_dropped_total") == 1000
    assert hub.proc.poll() is None
    raw.close()
    ctx.term()
    assert hub.stop() == 0, hub.output()
