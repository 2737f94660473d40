"""What every service's main shares: logging, a stop signal, and port-0 endpoint reporting.

SIGTERM/SIGINT only set an event (honcho sends SIGTERM to every process when one exits; a second
signal changes nothing). Loops that block in a ZeroMQ poll register `StopSignal.fileno()`: Python
writes a byte to that socket when a signal arrives, so the poll wakes without a timeout loop.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading


def setup_logging(name: str) -> logging.Logger:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format=f"%(asctime)s {name} %(levelname)s %(message)s")
    return logging.getLogger(name)


def log_endpoint(log: logging.Logger, name: str, address: str) -> None:
    """One line per bound endpoint, `bound <name> <address>`: tests start services on port 0 and read
    the real ports from these lines."""
    log.info("bound %s %s", name, address)


class StopSignal:
    """A threading.Event set by SIGTERM or SIGINT, with a file descriptor that becomes readable then."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._read, self._write = socket.socketpair()
        self._read.setblocking(False)
        self._write.setblocking(False)
        signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self.event.wait(timeout)

    def fileno(self) -> int:
        return self._read.fileno()

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        self._read.close()
        self._write.close()
