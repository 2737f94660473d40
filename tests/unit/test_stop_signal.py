"""StopSignal: every service's main thread waits on it, and SIGTERM must end that wait whichever thread
the kernel hands the signal to (gRPC's and ZeroMQ's threads do not block signals)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import signal, sys, threading, time
    from esper.transport.lifecycle import StopSignal

    stop = StopSignal()
    target = sys.argv[1]

    def send() -> None:
        time.sleep(0.2)
        if target == "other thread":  # the signal is delivered to this thread, not to the main one
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
        else:
            signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
        time.sleep(30)  # stays alive, as a server's threads do

    threading.Thread(target=send, daemon=True).start()
    started = time.monotonic()
    stopped = stop.wait()
    print(f"{stopped} {time.monotonic() - started:.2f}")
""")


@pytest.mark.parametrize("target", ["main thread", "other thread"])
def test_wait_returns_when_sigterm_lands_on_any_thread(target):
    """Before the fix, a signal taken by another thread left `wait()` asleep until SIGKILL."""
    child = subprocess.run([sys.executable, "-c", CHILD, target], check=False, capture_output=True, text=True,
                           timeout=20)
    assert child.returncode == 0, child.stderr
    stopped, seconds = child.stdout.split()
    assert stopped == "True"
    assert float(seconds) < 5.0


def test_wait_with_a_timeout_and_no_signal_returns_false():
    child = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        from esper.transport.lifecycle import StopSignal
        print(StopSignal().wait(0.3))
    """)], check=False, capture_output=True, text=True, timeout=20)
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == "False"
