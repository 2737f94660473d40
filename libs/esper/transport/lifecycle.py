"""What every service's main shares: logging, a stop signal, port-0 endpoint reporting, /metrics.

SIGTERM/SIGINT only set an event (honcho sends SIGTERM to every process when one exits; a second
signal changes nothing). Loops that block in a ZeroMQ poll register `StopSignal.fileno()`: Python
writes a byte to that socket when a signal arrives, so the poll wakes without a timeout loop.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import select
import signal
import socket
import sys
import threading
import time

from collections.abc import Callable

import zmq

from esper.transport.config import ConfigError, UsageError
from esper.transport.metrics_http import start_metrics

__all__ = ["StopSignal", "log_endpoint", "run_service", "setup_logging", "start_metrics"]  # every main serves /metrics
CANNOT_BIND = (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES)


def run_service(name: str, main: Callable[[], int]) -> int:
    """A service's `python -m` entry: main()'s exit status, with what the user must fix outside the
    service as one line on stderr instead of a traceback: a bad flag or a malformed ESPER_* variable
    (status 2), an address it cannot listen on, such as a port another stack holds (status 1)."""
    try:
        return main()
    except (ConfigError, UsageError) as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError, zmq.ZMQError) as exc:  # a socket's, gRPC's and ZeroMQ's bind failures
        grpc_bind = isinstance(exc, RuntimeError) and str(exc).startswith("Failed to bind")
        if getattr(exc, "errno", None) not in CANNOT_BIND and not grpc_bind:
            raise
        print(f"{name}: error: cannot listen: {exc}", file=sys.stderr)
        return 1


def setup_logging(name: str) -> logging.Logger:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format=f"%(asctime)s {name} %(levelname)s %(message)s")
    return logging.getLogger(name)


def log_endpoint(log: logging.Logger, name: str, address: str) -> None:
    """One line per bound endpoint, `bound <name> <address>`: tests start services on port 0 and read
    the real ports from these lines."""
    log.info("bound %s %s", name, address)


class Stopped(Exception):
    """SIGTERM or SIGINT arrived inside `StopSignal.interrupting()`."""


class StopSignal:
    """A threading.Event set by SIGTERM or SIGINT, with a file descriptor that becomes readable then.

    Made once per service, after its imports: it also freezes the heap then (gc.freeze), so the
    garbage collector never walks torch's and protobuf's module objects again, neither while serving
    nor at exit. Measured on the loaded 2-core box, tamiyo_server's SIGTERM -> exit: 3.4-4.0 s without
    (mostly the interpreter's final collection), 0.9 s with; honcho kills at 5 s (issue 8, promise 11).
    """

    def __init__(self) -> None:
        gc.freeze()
        self.event = threading.Event()
        self._interrupt = False
        self._read, self._write = socket.socketpair()
        self._read.setblocking(False)
        self._write.setblocking(False)
        signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.event.set()
        if self._interrupt:
            self._interrupt = False
            raise Stopped(signal.Signals(signum).name)

    @contextlib.contextmanager
    def interrupting(self):
        """Inside this block a stop signal also raises `Stopped` in the main thread, at once. For work
        that looks at `is_set()` too rarely to stop in time (a worker checks between epochs, and an
        epoch of CIFAR-10 on a CPU outlasts the 5 s honcho waits before SIGKILL) and that may be cut
        anywhere, because it continues from its last checkpoint (written atomically) when restarted."""
        if self.event.is_set():
            raise Stopped("stop requested before the work began")
        self._interrupt = True
        try:
            yield
        finally:
            self._interrupt = False

    def is_set(self) -> bool:
        return self.event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a stop signal (or `timeout`), waking on the signal's byte, not on the event.

        The kernel may hand SIGTERM to any thread (gRPC's and ZeroMQ's threads do not block signals).
        Python's C-level handler then only records it and writes the wakeup byte; the Python handler
        that sets the event runs in the main thread when that thread next executes bytecode. A main
        thread asleep in `Event.wait()` never does, and the service hung until SIGKILL (tamiyo_server, seen once
        in CI). Waking in `select` on the wakeup socket lets it run."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.event.is_set():
            left = 1.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return False
            readable, _, _ = select.select([self._read], [], [], min(left, 1.0))
            if readable:  # the handler runs at the main thread's next bytecode; give it that moment
                self.event.wait(0.01)
        return True

    def fileno(self) -> int:
        return self._read.fileno()

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        self._read.close()
        self._write.close()

