"""tamiyo_server: the policy as a gRPC service (Tamiyo, grpc.health.v1, server reflection).

    python -m services.tamiyo_server [--port 50051] [--policy heuristic|static|neural]

Serves the heuristic, the static baseline, or (`neural`) the PPO policy simic_learner publishes: it
subscribes to the learner's weights, swaps each new version in, and every Decision reports the version
that made it, with the action's log-probability and the critic's value (what a PPO worker records).
The neural policy samples its actions (it is the acting policy of training). Until the first weights
arrive, Decide answers UNAVAILABLE (clients retry) and the Tamiyo health service is NOT_SERVING.
"""

from __future__ import annotations

import argparse
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from esper.leyline import tamiyo_pb2, tamiyo_pb2_grpc
from esper.simic.checkpoint import policy_from_state
from esper.tamiyo import HeuristicPolicy, WaitPolicy
from esper.transport.bus import make_context
from esper.transport.config import StackEndpoints
from esper.transport.lifecycle import StopSignal, log_endpoint, setup_logging
from esper.transport.policy_service import SERVER_OPTIONS, SERVICE_NAME, AwaitingWeights, TamiyoServicer
from esper.transport.trajectories import WeightsSubscriber

POLICIES = {"heuristic": HeuristicPolicy, "static": WaitPolicy, "neural": AwaitingWeights}


@dataclass(frozen=True)
class Config:
    host: str
    """Interface to bind (loopback unless you mean otherwise)."""
    port: int
    """gRPC port; 0 picks a free one (logged)."""
    metrics_port: int
    """Prometheus /metrics port; 0 picks a free one, -1 disables."""
    policy: str
    """heuristic | static | neural (the weights simic_learner publishes)."""
    learner_weights: str
    """simic_learner's weights endpoint (neural only)."""
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
    p.add_argument("--learner-weights", default=env.tcp(env.learner_weights),
                   help="simic_learner weights endpoint, for --policy neural ($ESPER_LEARNER_WEIGHTS_PORT)")
    p.add_argument("--workers", type=int, default=4, help="gRPC server threads")
    p.add_argument("--grace-s", type=float, default=2.0, help="shutdown grace for in-flight calls")
    return Config(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv)
    log = setup_logging("tamiyo_server")
    stop = StopSignal()
    policy = POLICIES[cfg.policy]()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.workers), options=SERVER_OPTIONS)
    servicer = TamiyoServicer(policy)
    tamiyo_pb2_grpc.add_TamiyoServicer_to_server(servicer, server)
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
    neural = cfg.policy == "neural"
    for service in ("", SERVICE_NAME):  # "" is the whole server, as grpc_health_probe asks by default
        ready = not (neural and service == SERVICE_NAME)
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING if ready
                            else health_pb2.HealthCheckResponse.NOT_SERVING)
    log_endpoint(log, "grpc", f"{cfg.host}:{port}")
    if neural:
        def load(version: int, state: dict) -> None:
            servicer.policy = policy_from_state(state, str(version), greedy=False, seed=version)
            health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
            log.info("serving policy ppo version %d", version)

        ctx = make_context()
        subscriber = WeightsSubscriber(ctx, cfg.learner_weights, load)
        receiver = threading.Thread(target=subscriber.serve, args=(stop.fileno(), stop.is_set), daemon=True)
        receiver.start()
        log.info("waiting for policy weights from %s", cfg.learner_weights)
    else:
        log.info("serving policy %s version %s", policy.name, policy.version)

    stop.wait()
    log.info("stopping")
    health_servicer.enter_graceful_shutdown()  # every service NOT_SERVING before calls are refused
    server.stop(cfg.grace_s).wait()
    if cfg.metrics_port >= 0:
        metrics_server.shutdown()
    if neural:
        receiver.join()
        subscriber.close()
        ctx.term()
    stop.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
