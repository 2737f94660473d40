"""tolaria_worker: runs growth episodes on one device, asks tamiyo_server for every decision and
publishes every telemetry event to the hub.

    python -m services.tolaria_worker --task synthetic --max-epochs 20 [esper train flags]

Takes the flags of `esper train` and builds the same objects; only the policy (RemotePolicy) and one
extra sink (the bus) differ. It writes the same run directories under --runs-dir. When its episodes
are done it stays up (idle) until SIGTERM, because honcho stops the whole stack when any process
exits; `--exit-when-done` makes it return instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from prometheus_client import start_http_server

from esper.cli import Parser, UsageError, add_train_flags, train_config
from esper.experiment import RunConfig, run
from esper.transport.bus import PublisherSink
from esper.transport.config import StackEndpoints
from esper.transport.lifecycle import StopSignal, log_endpoint, setup_logging
from esper.transport.policy_service import PolicyUnavailable, RemotePolicy


@dataclass(frozen=True)
class Config:
    run: RunConfig
    """The experiment, exactly as `esper train heuristic` would build it from the same flags."""
    tamiyo: str
    """host:port of tamiyo_server."""
    hub_pub: str
    """The hub's publish endpoint."""
    host: str
    """Interface for /metrics."""
    metrics_port: int
    """Prometheus /metrics (process metrics, policy retries); 0 = any free port, -1 = off."""
    deadline_s: float
    """Deadline of each Decide call."""
    patience_s: float
    """How long a decision may wait for an unreachable tamiyo_server before the episode fails."""
    exit_when_done: bool
    """Return after the episodes instead of idling until SIGTERM."""


def parse(argv: list[str] | None) -> Config:
    env = StackEndpoints.from_env()
    p = Parser(prog="python -m services.tolaria_worker", description=__doc__.splitlines()[0])
    add_train_flags(p)
    p.add_argument("--tamiyo", default=env.tamiyo_target, help="tamiyo_server host:port ($ESPER_TAMIYO_PORT)")
    p.add_argument("--hub-pub", default=env.tcp(env.hub_pub), help="hub publish endpoint ($ESPER_HUB_PUB_PORT)")
    p.add_argument("--host", default=env.host, help="interface for /metrics ($ESPER_HOST)")
    p.add_argument("--metrics-port", type=int, default=env.worker_metrics, help="$ESPER_WORKER_METRICS_PORT")
    p.add_argument("--deadline-s", type=float, default=5.0, help="deadline of each Decide call")
    p.add_argument("--patience-s", type=float, default=120.0, help="wait this long for tamiyo_server")
    p.add_argument("--exit-when-done", action="store_true", help="exit after the episodes")
    args = p.parse_args(argv)
    args.mode = "heuristic"  # the run is labelled by its controller; tamiyo_server serves the heuristic
    return Config(run=train_config(args), tamiyo=args.tamiyo, hub_pub=args.hub_pub, host=args.host,
                  metrics_port=args.metrics_port, deadline_s=args.deadline_s, patience_s=args.patience_s,
                  exit_when_done=args.exit_when_done)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse(argv)
    except UsageError as exc:
        print(f"tolaria_worker: error: {exc}")
        return 2
    log = setup_logging("tolaria_worker")
    stop = StopSignal()
    if cfg.metrics_port >= 0:
        metrics_server, _ = start_http_server(cfg.metrics_port, addr=cfg.host)
        log_endpoint(log, "metrics", f"http://{cfg.host}:{metrics_server.server_port}/metrics")
    publisher = PublisherSink(cfg.hub_pub)
    if not publisher.wait_attached(timeout_s=10.0):
        log.warning("hub at %s not attached after 10 s: events are lost until it is", cfg.hub_pub)
    policy = RemotePolicy(cfg.tamiyo, cfg.deadline_s, cfg.patience_s, stop=stop.event)
    log.info("running %d episode(s) of %s on %s, decisions from %s", cfg.run.episodes, cfg.run.env.task,
             cfg.run.device, cfg.tamiyo)

    status = 0
    try:
        run(cfg.run, policy=policy, sinks=(publisher,))
        log.info("episodes done: %d events published, %d decide retries", publisher.published, policy.retries)
    except PolicyUnavailable as exc:  # stopping mid-episode, or tamiyo gone for longer than patience
        status = 0 if stop.is_set() else 1
        log.log(logging.INFO if status == 0 else logging.ERROR, "episode abandoned: %s", exc)
    if status == 0 and not cfg.exit_when_done:
        stop.wait()

    policy.close()
    publisher.shutdown()
    if cfg.metrics_port >= 0:
        metrics_server.shutdown()
    stop.close()
    return status


if __name__ == "__main__":
    raise SystemExit(main())
