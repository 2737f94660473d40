"""nissa_hub: the telemetry bus, a validating XSUB -> XPUB forwarder with a late-join snapshot.

    python -m services.nissa_hub [--pub-port 5560] [--sub-port 5561] [--snapshot-port 5562]

Topics and framing: proto/esper/leyline/bus.proto. With a token ($ESPER_TOKEN or --token) every bus
socket demands it (ZeroMQ PLAIN) and /metrics answers 401 without it; off loopback one is required.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from esper.transport.auth import add_token_flag, refuse_bind
from esper.transport.bus import Hub, RetainedEvents, make_context
from esper.transport.config import Parser, StackEndpoints, at_least, metrics_port, metrics_url, port
from esper.transport.lifecycle import StopSignal, log_endpoint, run_service, setup_logging, start_metrics


@dataclass(frozen=True)
class Config:
    host: str
    """Interface to bind."""
    pub_port: int
    """Publishers connect here; 0 = any free port (logged)."""
    sub_port: int
    """Subscribers connect here."""
    snapshot_port: int
    """Snapshot requests (late joiners)."""
    metrics_port: int
    """Prometheus /metrics; -1 disables."""
    retain_runs: int
    """Runs whose events are kept for snapshots."""
    token: str
    """Shared secret every peer and scraper must present; empty: none (loopback only)."""


def parse(argv: list[str] | None) -> Config:
    env = StackEndpoints.from_env()
    p = Parser(prog="python -m services.nissa_hub", description=__doc__.splitlines()[0])
    p.add_argument("--host", default=env.host, help="interface to bind ($ESPER_HOST)")
    p.add_argument("--pub-port", type=port, default=env.hub_pub, help="$ESPER_HUB_PUB_PORT")
    p.add_argument("--sub-port", type=port, default=env.hub_sub, help="$ESPER_HUB_SUB_PORT")
    p.add_argument("--snapshot-port", type=port, default=env.hub_snapshot, help="$ESPER_HUB_SNAPSHOT_PORT")
    p.add_argument("--metrics-port", type=metrics_port, default=env.hub_metrics,
                   help="$ESPER_HUB_METRICS_PORT (-1 = off)")
    p.add_argument("--retain-runs", type=at_least(1), default=32, help="runs kept for late-join snapshots")
    add_token_flag(p)
    return Config(**vars(p.parse_args(argv)))


class HubCollector:
    """The hub's counters, read at scrape time (the hub loop owns them; ints are read atomically)."""

    def __init__(self, hub: Hub):
        self.hub = hub

    def collect(self):
        hub = self.hub
        yield CounterMetricFamily("esper_bus_messages_forwarded", "Telemetry messages forwarded to subscribers.",
                                  value=hub.forwarded)
        dropped = CounterMetricFamily("esper_bus_messages_dropped",
                                      "Malformed or unknown frames dropped, and snapshot replies a peer did not take.",
                                      labels=["reason"])
        for reason, n in hub.dropped.items():
            dropped.add_metric([reason], n)
        yield dropped
        yield GaugeMetricFamily("esper_bus_subscriptions", "Live topic subscriptions on the hub.",
                                value=hub.subscriptions)
        yield CounterMetricFamily("esper_bus_snapshots", "Late-join snapshots served.", value=hub.snapshots)


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv)
    if refuse_bind("nissa_hub", cfg.host, cfg.token):
        return 2
    log = setup_logging("nissa_hub")
    stop = StopSignal()
    ctx = make_context(cfg.token, server=True)
    hub = Hub(ctx, cfg.host, cfg.pub_port, cfg.sub_port, cfg.snapshot_port, RetainedEvents(cfg.retain_runs))
    for name, endpoint in hub.endpoints.items():
        log_endpoint(log, name, endpoint)
    if cfg.metrics_port >= 0:
        REGISTRY.register(HubCollector(hub))
        metrics_server = start_metrics(cfg.host, cfg.metrics_port, cfg.token)
        log_endpoint(log, "metrics", metrics_url(cfg.host, metrics_server.server_port))

    hub.serve(stop.fileno(), stop.is_set)
    log.info("stopping: forwarded %d, dropped %s", hub.forwarded, hub.dropped)
    if cfg.metrics_port >= 0:
        metrics_server.shutdown()
    hub.close()
    ctx.term()
    stop.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(run_service("nissa_hub", main))
