"""tamiyo_server: the policy as a gRPC service (Tamiyo, grpc.health.v1, server reflection).

    python -m services.tamiyo_server [--port 50051] [--policy heuristic|static|neural]

Serves the heuristic, the static baseline, or (`neural`) the PPO policy simic_learner publishes: it
subscribes to the learner's weights, swaps each new version in, and every Decision reports the version
that made it, with the action's log-probability and the critic's value (what a PPO worker records).
The neural policy samples its actions (it is the acting policy of training). Until the first weights
arrive, Decide answers UNAVAILABLE (clients retry) and the Tamiyo health service is NOT_SERVING.

With a token ($ESPER_TOKEN or --token) every gRPC call without it is UNAUTHENTICATED, /metrics answers
401 and the weights subscription presents it; off loopback one is required. SIGTERM: health goes
NOT_SERVING, in-flight calls get --grace-s to finish, then the rest are cancelled (UNAVAILABLE).
"""

from __future__ import annotations

import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter
from esper.leyline import tamiyo_pb2, tamiyo_pb2_grpc
from esper.simic.checkpoint import policy_from_state
from esper.tamiyo import HeuristicPolicy, WaitPolicy
from esper.transport.auth import add_token_flag, refuse_bind, server_interceptors
from esper.transport.bus import make_context
from esper.transport.config import (MAX_DEADLINE_S, Parser, StackEndpoints, at_least, endpoint,
                                    host_port, metrics_port, metrics_url, port)
from esper.transport.lifecycle import StopSignal, log_endpoint, run_service, setup_logging, start_metrics
from esper.transport.limits import MAX_GRPC_REQUEST_BYTES, MAX_WEIGHTS_BYTES
from esper.transport.policy_service import (
    SERVER_OPTIONS,
    SERVICE_NAME,
    AwaitingWeights,
    MalformedRequestCounter,
    TamiyoServicer,
)
from esper.transport.trajectories import WeightsSubscriber

POLICIES = {"heuristic": HeuristicPolicy, "static": WaitPolicy, "neural": AwaitingWeights}
WEIGHTS_REFUSED = Counter("esper_tamiyo_weights_refused",
                          "Policy weights messages refused: malformed, or not building a policy.")


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
    token: str
    """Shared secret every call and scrape must carry; empty: none (loopback only)."""


def parse(argv: list[str] | None) -> Config:
    env = StackEndpoints.from_env()
    p = Parser(prog="python -m services.tamiyo_server", description=__doc__.splitlines()[0])
    p.add_argument("--host", default=env.host, help="interface to bind ($ESPER_HOST)")
    p.add_argument("--port", type=port, default=env.tamiyo, help="gRPC port ($ESPER_TAMIYO_PORT; 0 = any)")
    p.add_argument("--metrics-port", type=metrics_port, default=env.tamiyo_metrics,
                   help="/metrics port ($ESPER_TAMIYO_METRICS_PORT; 0 = any, -1 = off)")
    p.add_argument("--policy", choices=sorted(POLICIES), default="heuristic")
    p.add_argument("--learner-weights", type=endpoint, default=env.tcp(env.learner_weights),
                   help="simic_learner weights endpoint, for --policy neural ($ESPER_LEARNER_WEIGHTS_PORT)")
    p.add_argument("--workers", type=at_least(1), default=4,
                   help="gRPC server threads; DecideStream calls (each holds one while open) take at most half of them")
    p.add_argument("--grace-s", type=at_least(0, float, MAX_DEADLINE_S), default=1.0,
                   help="shutdown grace for in-flight calls (a Decide takes milliseconds; honcho kills at 5 s)")
    add_token_flag(p)
    return Config(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv)
    if refuse_bind("tamiyo_server", cfg.host, cfg.token):
        return 2
    log = setup_logging("tamiyo_server")
    stop = StopSignal()
    policy = POLICIES[cfg.policy]()

    options = [*SERVER_OPTIONS, ("grpc.max_receive_message_length", MAX_GRPC_REQUEST_BYTES)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.workers), options=options,
                         interceptors=[*server_interceptors(cfg.token), MalformedRequestCounter()])
    servicer = TamiyoServicer(policy, max_streams=cfg.workers // 2)
    tamiyo_pb2_grpc.add_TamiyoServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (tamiyo_pb2.DESCRIPTOR.services_by_name["Tamiyo"].full_name, health.SERVICE_NAME,
             reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    grpc_port = server.add_insecure_port(host_port(cfg.host, cfg.port))
    server.start()
    if cfg.metrics_port >= 0:
        metrics_server = start_metrics(cfg.host, cfg.metrics_port, cfg.token)
        log_endpoint(log, "metrics", metrics_url(cfg.host, metrics_server.server_port))
    neural = cfg.policy == "neural"
    for service in ("", SERVICE_NAME):  # "" is the whole server, as grpc_health_probe asks by default
        ready = not (neural and service == SERVICE_NAME)
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING if ready
                            else health_pb2.HealthCheckResponse.NOT_SERVING)
    log_endpoint(log, "grpc", host_port(cfg.host, grpc_port))
    if neural:
        def load(version: int, state: dict) -> None:
            try:
                servicer.policy = policy_from_state(state, str(version), greedy=False, seed=version)
            except Exception as exc:  # noqa: BLE001 - a well-framed message from the wire, any content:
                WEIGHTS_REFUSED.inc()  # refuse it and keep serving; raising would end the receiver thread
                log.error("policy weights version %d refused: %s: %s", version, type(exc).__name__, exc)
                return
            health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
            log.info("serving policy ppo version %d", version)

        ctx = make_context(cfg.token)
        ctx.maxmsgsize = MAX_WEIGHTS_BYTES  # a default for the context's one socket, the SUB below
        subscriber = WeightsSubscriber(ctx, cfg.learner_weights, load, on_malformed=WEIGHTS_REFUSED.inc)
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
    raise SystemExit(run_service("tamiyo_server", main))
