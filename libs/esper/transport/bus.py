"""The telemetry bus over ZeroMQ: framing, the hub's forwarder, a publisher sink and a subscriber.

Topics and framing are documented in proto/esper/leyline/bus.proto. Frames that are not a valid
two-frame telemetry message are counted (by reason) and dropped; nothing on the bus is trusted to be
well formed and no frame is ever unpickled.
"""

from __future__ import annotations

import logging
import uuid
from collections import OrderedDict, deque

import zmq
from google.protobuf.message import DecodeError

from esper.leyline import SnapshotReply, SnapshotRequest, TelemetryEvent
from esper.transport.auth import zmq_context
from esper.transport.config import bracketed, host_port
from esper.transport.limits import (
    MAX_RETAINED_BYTES,
    MAX_RUN_ID_CHARS,
    MAX_SNAPSHOT_REPLY_BYTES,
    MAX_SNAPSHOT_REQUEST_BYTES,
    MAX_SUBSCRIPTION_BYTES,
    MAX_TELEMETRY_BYTES,
)

TELEMETRY_PREFIX = b"esper.telemetry."
HELLO_PREFIX = b"esper.hello."
LINGER_MS = 200
"""Unsent messages to a dead peer are given this long at close; libzmq's default waits forever."""

log = logging.getLogger(__name__)


FRAME_PROBLEMS = ("frame_count", "topic", "payload")
"""The reasons `decode` refuses a message: the bounded label set of every drop counter."""


class MalformedFrame(ValueError):
    """A bus message that is not [topic, TelemetryEvent]; `reason` is a bounded label for metrics."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def make_context(token: str = "", server: bool = False) -> zmq.Context:
    """A context with a short linger and IPv6 (its sockets then take IPv6 addresses as well as IPv4 ones: a
    --host ::1); with a token its sockets authenticate (auth.zmq_context)."""
    ctx = zmq_context(token, server)
    ctx.linger = LINGER_MS
    ctx.ipv6 = True
    return ctx


def encode(event: TelemetryEvent) -> list[bytes]:
    return [TELEMETRY_PREFIX + event.run_id.encode(), event.SerializeToString()]


def decode(frames: list[bytes]) -> TelemetryEvent:
    """Frames -> event, or MalformedFrame naming what was wrong."""
    if len(frames) != 2:
        raise MalformedFrame("frame_count")
    topic, payload = frames
    if not topic.startswith(TELEMETRY_PREFIX):
        raise MalformedFrame("topic")
    event = TelemetryEvent()
    try:
        event.ParseFromString(payload)
    except DecodeError:
        raise MalformedFrame("payload") from None
    if (event.sequence < 1 or event.WhichOneof("payload") is None or len(event.run_id) > MAX_RUN_ID_CHARS
            or topic != TELEMETRY_PREFIX + event.run_id.encode()):
        raise MalformedFrame("payload")
    return event


class PublisherSink:
    """A nissa Sink that publishes every event to the hub.

    An XPUB socket, not PUB: the hub subscribes to everything, and that subscription arriving is how
    the sink knows it is attached (a PUB drops everything sent before that, silently; FIELD-NOTES).
    `wait_attached` blocks for it once, so a run's first events are not lost to the slow joiner.
    `emit` never blocks a trainer: past the high-water mark ZeroMQ drops the event, and every consumer
    counts the hole by sequence number (issue 8, promise 6: measured exactly in test_faults.py).
    """

    def __init__(self, endpoint: str, ctx: zmq.Context | None = None, token: str = ""):
        self._own_ctx = ctx is None
        self.ctx = ctx or make_context(token)
        self.socket = self.ctx.socket(zmq.XPUB)
        self.socket.linger = LINGER_MS
        self.socket.maxmsgsize = MAX_SUBSCRIPTION_BYTES
        self.socket.connect(endpoint)
        self.endpoint = endpoint
        self.published = 0

    def wait_attached(self, timeout_s: float) -> bool:
        """True once the hub's subscription has arrived; False after timeout_s (events still flow
        later if the hub comes up: they are only lost until then, and subscribers count the gap)."""
        attached = bool(self.socket.poll(int(timeout_s * 1000)))
        while self.socket.poll(0):
            self.socket.recv()  # subscription notices: read so they do not queue up
        return attached

    def emit(self, event: TelemetryEvent) -> None:
        self.socket.send_multipart(encode(event))
        self.published += 1

    def close(self) -> None:
        """A run's telemetry ended (Telemetry.close): the bus connection outlives runs, so nothing."""

    def shutdown(self) -> None:
        self.socket.close()
        if self._own_ctx:
            self.ctx.term()


class RetainedEvents:
    """The hub's memory for late joiners: every event of the `max_runs` runs that reported last (at most
    `max_events` each, oldest dropped first), at most `max_bytes` in all (the oldest events of the run that
    reported longest ago dropped first), so one snapshot reply holds them all. A 75-epoch run is about 400
    events. Runs are kept by their last report, not their first: a learner's run outlives many episodes'."""

    def __init__(self, max_runs: int = 32, max_events: int = 10_000, max_bytes: int = MAX_RETAINED_BYTES):
        self.max_runs = max_runs
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.runs: OrderedDict[str, deque[TelemetryEvent]] = OrderedDict()
        self.bytes = 0

    def add(self, event: TelemetryEvent) -> None:
        events = self.runs.get(event.run_id)
        if events is None:
            events = self.runs[event.run_id] = deque()
            while len(self.runs) > self.max_runs:
                self.bytes -= sum(e.ByteSize() for e in self.runs.popitem(last=False)[1])
        else:
            self.runs.move_to_end(event.run_id)
        if len(events) == self.max_events:
            self.bytes -= events.popleft().ByteSize()
        events.append(event)
        self.bytes += event.ByteSize()
        while self.bytes > self.max_bytes:
            oldest = next(iter(self.runs.values()))
            self.bytes -= oldest.popleft().ByteSize()
            if not oldest:
                self.runs.popitem(last=False)

    def snapshot(self, request: SnapshotRequest) -> SnapshotReply:
        runs = [request.run_id] if request.run_id else list(self.runs)
        return SnapshotReply(events=[e for run in runs for e in self.runs.get(run, ())])


class Hub:
    """XSUB (publishers) -> validate -> XPUB (subscribers), plus a ROUTER answering snapshot requests.

    Counters are plain attributes; the service exports them to Prometheus.
    """

    def __init__(self, ctx: zmq.Context, host: str, pub_port: int, sub_port: int, snapshot_port: int,
                 retained: RetainedEvents):
        self.ctx = ctx
        self.retained = retained
        self.xsub = ctx.socket(zmq.XSUB)
        self.xpub = ctx.socket(zmq.XPUB)
        self.router = ctx.socket(zmq.ROUTER)
        self.xsub.maxmsgsize = MAX_TELEMETRY_BYTES
        self.xpub.maxmsgsize = MAX_SUBSCRIPTION_BYTES
        self.router.maxmsgsize = MAX_SNAPSHOT_REQUEST_BYTES
        # Each reply is a full copy of the retained events: queued up to the default HWM of 1,000 per peer, 300
        # requests from a peer that never read took the hub to 1.4 GiB. A Subscriber waits for its one reply, so
        # one queued per peer is enough; ROUTER_MANDATORY turns the silent drop of the rest into a counted EAGAIN.
        self.router.sndhwm = 1
        self.router.router_mandatory = 1
        self.endpoints = {
            "publish": bind_endpoint(self.xsub, host, pub_port),
            "subscribe": bind_endpoint(self.xpub, host, sub_port),
            "snapshot": bind_endpoint(self.router, host, snapshot_port),
        }
        self.xsub.send(b"\x01")  # subscribe to everything: the hub sees (and retains) every event
        self.forwarded = 0
        self.dropped = dict.fromkeys((*FRAME_PROBLEMS, "snapshot_request", "snapshot_reply"), 0)  # zeros: all exist
        self.subscriptions = 0
        self.snapshots = 0

    def serve(self, stop_fd: int, is_stopped) -> None:
        """Forward until the stop file descriptor wakes the poll and `is_stopped()` says so."""
        poller = zmq.Poller()
        for sock in (self.xsub, self.xpub, self.router):
            poller.register(sock, zmq.POLLIN)
        poller.register(stop_fd, zmq.POLLIN)
        while not is_stopped():
            ready = dict(poller.poll())
            if self.xsub in ready:
                self._forward()
            if self.xpub in ready:
                self._subscription()
            if self.router in ready:
                self._snapshot()

    def _forward(self) -> None:
        frames = self.xsub.recv_multipart()
        try:
            event = decode(frames)
        except MalformedFrame as exc:
            self.dropped[exc.reason] += 1
            return
        self.retained.add(event)
        self.xpub.send_multipart(frames)
        self.forwarded += 1

    def _subscription(self) -> None:
        """\\x01topic subscribes, \\x00topic unsubscribes; a hello topic is answered on itself."""
        message = self.xpub.recv()
        if not message:
            return
        subscribed, topic = message[0] == 1, message[1:]
        self.subscriptions += 1 if subscribed else -1
        if subscribed and topic.startswith(HELLO_PREFIX):
            self.xpub.send_multipart([topic, b""])

    def _snapshot(self) -> None:
        frames = self.router.recv_multipart()
        request = SnapshotRequest()
        try:
            if len(frames) != 2:
                raise DecodeError("frame count")
            request.ParseFromString(frames[1])
        except DecodeError:
            self.dropped["snapshot_request"] += 1
            return
        reply = self.retained.snapshot(request).SerializeToString()
        try:
            self.router.send_multipart([frames[0], reply], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno not in (zmq.EAGAIN, zmq.EHOSTUNREACH):
                raise
            self.dropped["snapshot_reply"] += 1  # the peer is not reading its replies (EAGAIN), or is gone
            return
        self.snapshots += 1

    def close(self) -> None:
        for sock in (self.xsub, self.xpub, self.router):
            sock.close()


class Subscriber:
    """Receives telemetry from the hub, starting with a snapshot of what was published before.

    The Clone pattern with a hello handshake (bus.proto): subscribe to the telemetry topic, then to a
    private hello topic; when the hub's hello comes back the subscription is live, so a snapshot taken
    now plus the live stream after it leave no hole. Live events before the hello are dropped (the
    snapshot holds them: delivered first, they would look like a gap); events the snapshot already
    held arrive again live after it, and consumers drop them by sequence (karn's RunStore does). Snapshots
    are requested again after a hub restart, when the hello comes back. With `run_id`, only the events that
    following it shows (`follows`) are given, live or from the snapshot.
    """

    def __init__(self, ctx: zmq.Context, sub_endpoint: str, snapshot_endpoint: str, run_id: str = "",
                 snapshot_timeout_s: float = 5.0):
        self.socket = ctx.socket(zmq.SUB)
        self.socket.linger = LINGER_MS
        self.socket.maxmsgsize = MAX_TELEMETRY_BYTES
        self.hello = HELLO_PREFIX + uuid.uuid4().hex.encode()
        self.socket.subscribe(TELEMETRY_PREFIX + run_id.encode())
        self.socket.subscribe(self.hello)
        self.socket.connect(sub_endpoint)
        self.ctx = ctx
        self.snapshot_endpoint = snapshot_endpoint
        self.dealer = self._connect_dealer()
        self.run_id = run_id
        self.snapshot_timeout_ms = int(snapshot_timeout_s * 1000)
        self.malformed = dict.fromkeys((*FRAME_PROBLEMS, "snapshot"), 0)
        self.snapshots = 0
        self.synced = False

    def receive(self) -> list[TelemetryEvent]:
        """Everything readable now (call when the socket polls readable), snapshot events first."""
        events: list[TelemetryEvent] = []
        while self.socket.poll(0):
            frames = self.socket.recv_multipart()
            if frames[0] == self.hello:
                events.extend(self._snapshot())
                continue
            if not self.synced:  # published before the snapshot is taken, so the snapshot holds it
                continue
            try:
                event = decode(frames)
            except MalformedFrame as exc:
                self.malformed[exc.reason] += 1
                continue
            if follows(self.run_id, event.run_id):  # a subscription matches every id it begins: others too
                events.append(event)
        return events

    def _connect_dealer(self) -> zmq.Socket:
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.linger = LINGER_MS
        dealer.maxmsgsize = MAX_SNAPSHOT_REPLY_BYTES
        dealer.connect(self.snapshot_endpoint)
        return dealer

    def _snapshot(self) -> list[TelemetryEvent]:
        self.dealer.send(SnapshotRequest().SerializeToString())  # every run's: a PPO run's episodes are their own
        if not self.dealer.poll(self.snapshot_timeout_ms):
            log.warning("no snapshot from the hub in %d ms: starting from live events", self.snapshot_timeout_ms)
            # A new socket (a new identity): the late reply would have been taken for the next request's answer,
            # and every later one would have been one behind.
            self.dealer.close()
            self.dealer = self._connect_dealer()
            self.synced = True
            return []
        reply = SnapshotReply()
        try:
            reply.ParseFromString(self.dealer.recv())
        except DecodeError:
            self.malformed["snapshot"] += 1
            self.synced = True  # go on from live events, as without a snapshot
            return []
        self.snapshots += 1
        self.synced = True
        return [event for event in reply.events if follows(self.run_id, event.run_id)]

    def close(self) -> None:
        self.socket.close()
        self.dealer.close()


def follows(run_id: str, event_run_id: str) -> bool:
    """Whether following `run_id` ("": every run) shows an event of `event_run_id`: the run's own and, for a
    PPO run, its episodes' (<run_id>_epNNNN), whose slots and curves are the run's to see."""
    return not run_id or event_run_id == run_id or event_run_id.startswith(run_id + "_ep")


def bind_endpoint(sock: zmq.Socket, host: str, port: int) -> str:
    """Bind host:port (port 0: any free port) and return the endpoint actually bound."""
    if port == 0:
        port = sock.bind_to_random_port(f"tcp://{bracketed(host)}")
    else:
        sock.bind(f"tcp://{host_port(host, port)}")
    return f"tcp://{host_port(host, port)}"
