"""tamiyo_server: the policy as a gRPC service (Tamiyo, grpc.health.v1, server reflection).

    python -m services.tamiyo_server [--port 50051] [--policy heuristic]

Serves the heuristic (or the static baseline); neural weights arrive with the PPO learner.
"""

from __future__ import annotations

import argparse
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from esper.leyline import tamiyo_pb2, tamiyo_pb2_grpc
from esper.tamiyo import HeuristicPolicy, WaitPolicy
from esper.transport.config import StackEndpoints
from esper.transport.lifecycle import StopSignal, log_endpoint, setup_logging
from esper.transport.policy_service import SERVER_OPTIONS, SERVICE_NAME, TamiyoServicer

POLICIES = {"heuristic": HeuristicPolicy, "static": WaitPolicy}


@dataclass(frozen=True)
class Config:
    host: str
    """Interface to bind (loopback unless you mean otherwise)."""
    port: int
    """gRPC port; 0 picks a free one (logged)."""
    metrics_port: int
    """Prometheus /metrics port; 0 picks a free one, -1 disables."""
    policy: str
    """heuristic | static."""
    workers: int
    """gRPC server threads."""
    grace_s: float
    """How long in-flight calls may finish at shutdown."""


def parse(argv: list[str] | None) -> Config:
    env = StackEndpoints.from_env()
    p = argparse.ArgumentParser(prog="python -m services.tamiyo_server", description=__doc__.splitlines()[0])
    p.add_argument("--host", default=env.host, help="interface to bind ($ESPER_HOST)")
    p.add_argument("--port", type=int, default=env.tamiyo, help="gRPC port ($ESPER_TAMIYO_PORT; 0 = any)")
    p.add_argument("--metrics-port", type=int, default=env.tamiyo_metrics,
                   help="/metrics port ($ESPER_TAMIYO_METRICS_PORT; 0 = any, -1 = off)")
    p.add_argument("--policy", choices=sorted(POLICIES), default="heuristic")
    p.add_argument("--workers", type=int, default=4, help="gRPC server threads")
    p.add_argument("--grace-s", type=float, default=2.0, help="shutdown grace for in-flight calls")
    return Config(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv)
    log = setup_logging("tamiyo_server")
    stop = StopSignal()
    policy = POLICIES[cfg.policy]()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.workers), options=SERVER_OPTIONS)
    tamiyo_pb2_grpc.add_TamiyoServicer_to_server(TamiyoServicer(policy), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (tamiyo_pb2.DESCRIPTOR.services_by_name["Tamiyo"].full_name, health.SERVICE_NAME,
             reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
    server.start()
    if cfg.metrics_port >= 0:
        metrics_server, _ = start_http_server(cfg.metrics_port, addr=cfg.host)
        log_endpoint(log, "metrics", f"http://{cfg.host}:{metrics_server.server_port}/metrics")
    for service in ("", SERVICE_NAME):  # "" is the whole server, as grpc_health_probe asks by default
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    log_endpoint(log, "grpc", f"{cfg.host}:{port}")
    log.info("serving policy %s version %s", policy.name, policy.version)

    stop.wait()
    log.info("stopping")
    health_servicer.enter_graceful_shutdown()  # every service NOT_SERVING before calls are refused
    server.stop(cfg.grace_s).wait()
    if cfg.metrics_port >= 0:
        metrics_server.shutdown()
    stop.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
