"""Event sources for the TUI that need more than an iterator: a thread-safe queue an in-process run
feeds from another thread."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

from esper.leyline import TelemetryEvent

_END = object()


class QueueSource:
    """A nissa Sink on the producing side, an iterator on the app's side.

    `emit` may be called from any thread. Iteration ends after `finish()` (the producer is done) or
    `stop()` (the app is closing); `close()` is a run's telemetry ending, which with several episodes
    is not the end of the stream, so it does nothing.
    """

    def __init__(self, poll_s: float = 0.1) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._stopped = threading.Event()
        self.poll_s = poll_s

    def emit(self, event: TelemetryEvent) -> None:
        if not self._stopped.is_set():  # once the app has closed, nobody reads: keeping events would only grow
            self._queue.put(event)

    def close(self) -> None:
        pass

    def finish(self) -> None:
        self._queue.put(_END)

    def stop(self) -> None:
        self._stopped.set()

    def __iter__(self) -> Iterator[TelemetryEvent]:
        while not self._stopped.is_set():
            try:
                item = self._queue.get(timeout=self.poll_s)
            except queue.Empty:
                continue
            if item is _END:
                return
            yield item
