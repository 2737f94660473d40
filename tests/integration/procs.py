"""Integration-test helpers: spawn real services on 127.0.0.1 (port 0; the real ports are read from
their `bound <name> <address>` log lines), wait for them with generous timeouts (a loaded 2-core
machine), scrape their /metrics, and kill every one at teardown."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0


class Service:
    """One `python -m services.<name>` child; its output is kept in `lines` and echoed on failure."""

    def __init__(self, name: str, args: list[str]):
        env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.name = name
        self.args = args
        self.proc = subprocess.Popen([sys.executable, "-m", f"services.{name}", *args], cwd=REPO, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.endpoints: dict[str, str] = {}
        self._bound: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            words = line.split()
            if "bound" in words and words.index("bound") + 2 < len(words):
                i = words.index("bound")
                self.endpoints[words[i + 1]] = words[i + 2]
                self._bound.put(words[i + 1])

    def wait_bound(self, *names: str, timeout_s: float = START_TIMEOUT_S) -> dict[str, str]:
        deadline = time.monotonic() + timeout_s
        while not set(names) <= set(self.endpoints):
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.output()}")
            try:
                self._bound.get(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{self.name}: no {names} in {timeout_s} s:\n{self.output()}") from None
        return self.endpoints

    def port(self, name: str) -> int:
        return int(self.endpoints[name].rsplit(":", 1)[1].split("/")[0])

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def output(self) -> str:
        return "".join(self.lines[-60:])


def scrape(url: str, token: str = "") -> dict[tuple[str, tuple], float]:
    """/metrics (with the stack's token, if any) -> {(sample name, sorted labels): value}."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    text = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(samples: dict, name: str, **labels) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def start_hub(spawn) -> Service:
    hub = spawn("nissa_hub", "--pub-port", "0", "--sub-port", "0", "--snapshot-port", "0", "--metrics-port", "0")
    hub.wait_bound("publish", "subscribe", "snapshot", "metrics")
    return hub


def start_tamiyo(spawn, port: int = 0) -> Service:
    tamiyo = spawn("tamiyo_server", "--port", str(port), "--metrics-port", "0")
    tamiyo.wait_bound("grpc", "metrics")
    return tamiyo


class Spawner:
    """spawn(name, *args) -> Service; `close()` kills every process it started."""

    def __init__(self) -> None:
        self.started: list[Service] = []

    def __call__(self, name: str, *args: str) -> Service:
        service = Service(name, list(args))
        self.started.append(service)
        return service

    def close(self) -> None:
        for service in self.started:
            service.kill()


def free_ports(n: int = 1) -> list[int]:
    """n distinct loopback ports free right now (all held open until each is known, so none repeats)."""
    socks = [socket.socket() for _ in range(n)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in socks]
    for sock in socks:
        sock.close()
    return ports


# 127.0.0.1, ::1 and ::ffff:127.0.0.1 (gRPC's IPv4-mapped listener) as /proc/net/tcp{,6} write them.
LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


def listening_addresses(pid: int) -> list[str]:
    """Local addresses of the TCP sockets in LISTEN state that process `pid` holds (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
                found.append(fields[1])
    return found
