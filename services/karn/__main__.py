"""karn: subscribes to the telemetry bus, keeps the run store, exports run metrics on /metrics.

    python -m services.karn [--metrics-port 9564]

Starts with a snapshot from the hub, so a karn started (or restarted) mid-run still holds every epoch.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import zmq
from prometheus_client import REGISTRY, start_http_server

from esper.karn import RunStore, RunStoreCollector
from esper.transport.bus import Subscriber, make_context
from esper.transport.config import StackEndpoints
from esper.transport.lifecycle import StopSignal, log_endpoint, setup_logging


@dataclass(frozen=True)
class Config:
    host: str
    """Interface for /metrics."""
    hub_sub: str
    """The hub's subscribe endpoint."""
    hub_snapshot: str
    """The hub's snapshot endpoint."""
    metrics_port: int
    """Prometheus /metrics; 0 = any free port (logged)."""
    max_runs: int
    """Runs kept in the store (and exported); the oldest is forgotten first."""


def parse(argv: list[str] | None) -> Config:
    env = StackEndpoints.from_env()
    p = argparse.ArgumentParser(prog="python -m services.karn", description=__doc__.splitlines()[0])
    p.add_argument("--host", default=env.host, help="interface for /metrics ($ESPER_HOST)")
    p.add_argument("--hub-sub", default=env.tcp(env.hub_sub), help="hub subscribe endpoint")
    p.add_argument("--hub-snapshot", default=env.tcp(env.hub_snapshot), help="hub snapshot endpoint")
    p.add_argument("--metrics-port", type=int, default=env.karn_metrics, help="$ESPER_KARN_METRICS_PORT")
    p.add_argument("--max-runs", type=int, default=64, help="runs kept in the store")
    return Config(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv)
    log = setup_logging("karn")
    stop = StopSignal()
    store = RunStore(cfg.max_runs)
    ctx = make_context()
    subscriber = Subscriber(ctx, cfg.hub_sub, cfg.hub_snapshot)
    REGISTRY.register(RunStoreCollector(store, subscriber.malformed))
    metrics_server, _ = start_http_server(cfg.metrics_port, addr=cfg.host)
    log_endpoint(log, "metrics", f"http://{cfg.host}:{metrics_server.server_port}/metrics")

    poller = zmq.Poller()
    poller.register(subscriber.socket, zmq.POLLIN)
    poller.register(stop.fileno(), zmq.POLLIN)
    while not stop.is_set():
        if subscriber.socket in dict(poller.poll()):
            for event in subscriber.receive():
                store.apply(event)

    log.info("stopping: %d runs, %s events", len(store.runs), dict(store.received))
    metrics_server.shutdown()
    subscriber.close()
    ctx.term()
    stop.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
