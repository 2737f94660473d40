"""Follow the telemetry bus as a plain iterator of events, for consumers that are not services (the TUI).

The iterator owns its ZeroMQ context and sockets and uses them only from the thread that iterates:
ZeroMQ sockets are not thread-safe, so `stop()` (called from any thread) only sets a flag the loop
checks between polls, and the loop closes the sockets on its way out.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from esper.leyline import TelemetryEvent
from esper.transport.bus import Subscriber, make_context


class BusFollower:
    """Every event on the hub, starting with the snapshot of what was published before (late join).

    Snapshot events arrive again live; consumers drop them by sequence (karn's RunStore does).
    """

    def __init__(self, sub_endpoint: str, snapshot_endpoint: str, run_id: str = "", poll_ms: int = 100,
                 token: str = ""):
        self.sub_endpoint = sub_endpoint
        self.token = token
        self.snapshot_endpoint = snapshot_endpoint
        self.run_id = run_id
        self.poll_ms = poll_ms
        self._stopped = threading.Event()

    def stop(self) -> None:
        self._stopped.set()

    def __iter__(self) -> Iterator[TelemetryEvent]:
        ctx = make_context(self.token)
        subscriber = Subscriber(ctx, self.sub_endpoint, self.snapshot_endpoint, self.run_id)
        try:
            while not self._stopped.is_set():
                if subscriber.socket.poll(self.poll_ms):
                    yield from subscriber.receive()
        finally:
            subscriber.close()
            ctx.term()
