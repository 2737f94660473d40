"""karn: subscribes to the telemetry bus, keeps the run store, exports run metrics on /metrics.

    python -m services.karn [--metrics-port 9564]

Starts with a snapshot from the hub, so a karn started (or restarted) mid-run still holds every epoch.
With --journal it also keeps every event it applied in that file and replays it on start, so its
store survives a restart of the whole stack (the hub's snapshot does not); the Procfile passes one. It
is compacted to the runs the store keeps (--max-runs) at start and whenever it has doubled since (from 64
MiB), so it grows to twice that at most.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import zmq
from prometheus_client import REGISTRY

from esper.karn import RunStore, RunStoreCollector
from esper.karn.store import EventJournal, JournalBusy
from esper.karn_cli import file_refusal
from esper.transport.auth import add_token_flag, refuse_bind
from esper.transport.bus import Subscriber, make_context
from esper.transport.config import Parser, StackEndpoints, at_least, endpoint, metrics_port, metrics_url
from esper.transport.lifecycle import StopSignal, log_endpoint, run_service, setup_logging, start_metrics


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
    """Runs kept in the store (and exported); the one that reported least recently is forgotten first."""
    journal: str
    """File of the store's events, replayed on start and appended to; empty: none (memory only)."""
    token: str
    """Shared secret presented to the hub and demanded on /metrics; empty: none (loopback only)."""


def parse(argv: list[str] | None) -> Config:
    env = StackEndpoints.from_env()
    p = Parser(prog="python -m services.karn", description=__doc__.splitlines()[0])
    p.add_argument("--host", default=env.host, help="interface for /metrics ($ESPER_HOST)")
    p.add_argument("--hub-sub", type=endpoint, default=env.tcp(env.hub_sub), help="hub subscribe endpoint")
    p.add_argument("--hub-snapshot", type=endpoint, default=env.tcp(env.hub_snapshot), help="hub snapshot endpoint")
    p.add_argument("--metrics-port", type=metrics_port, default=env.karn_metrics, help="$ESPER_KARN_METRICS_PORT (-1 = off)")
    p.add_argument("--max-runs", type=at_least(1), default=64, help="runs kept in the store")
    p.add_argument("--journal", default="", help="keep the store in this file across restarts (default: none)")
    add_token_flag(p)
    cfg = Config(**vars(p.parse_args(argv)))
    if cfg.journal and (why := file_refusal(Path(cfg.journal), "--journal")):
        p.error(why)
    return cfg


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv)
    if refuse_bind("karn", cfg.host, cfg.token):
        return 2
    log = setup_logging("karn")
    store = RunStore(cfg.max_runs)
    journal = EventJournal(cfg.journal) if cfg.journal else None
    if journal is not None:
        try:
            log.info("replayed %d events of %s", journal.replay(store), cfg.journal)
        except JournalBusy as exc:
            log.error("%s", exc)
            return 2
    stop = StopSignal()
    ctx = make_context(cfg.token)
    subscriber = Subscriber(ctx, cfg.hub_sub, cfg.hub_snapshot)
    REGISTRY.register(RunStoreCollector(store, subscriber.malformed))
    if cfg.metrics_port >= 0:
        metrics_server = start_metrics(cfg.host, cfg.metrics_port, cfg.token)
        log_endpoint(log, "metrics", metrics_url(cfg.host, metrics_server.server_port))

    poller = zmq.Poller()
    poller.register(subscriber.socket, zmq.POLLIN)
    poller.register(stop.fileno(), zmq.POLLIN)
    while not stop.is_set():
        if subscriber.socket in dict(poller.poll()):
            applied = [event for event in subscriber.receive() if store.apply(event)]
            if journal is not None and applied:
                journal.append(applied)

    log.info("stopping: %d runs, %s events", len(store.runs), dict(store.received))
    if cfg.metrics_port >= 0:
        metrics_server.shutdown()
    if journal is not None:
        journal.close()
    subscriber.close()
    ctx.term()
    stop.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(run_service("karn", main))
