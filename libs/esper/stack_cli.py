"""`esper policy query` and `esper stack status`: the command line's view of a running stack.

Kept apart from cli.py so that `esper train` never imports gRPC or ZeroMQ; the wire code is imported
only when one of these commands runs.
"""

from __future__ import annotations

import argparse
import http.client
import sys
import urllib.request
from pathlib import Path

from esper.transport.config import (MAX_DEADLINE_S, StackEndpoints, add_token_flag, at_least, endpoint,
                                    fill_stack_defaults, grpc_target, metrics_url)

COMMANDS = ("policy", "stack")


def add_commands(commands: argparse._SubParsersAction) -> None:
    policy = commands.add_parser("policy", help="talk to a running tamiyo_server")
    query = policy.add_subparsers(dest="policy_command", required=True).add_parser(
        "query", help="send an observation (a protobuf JSON file, or a worker's last from the bus) and print "
                      "the decision")
    query.add_argument("observation", type=Path, nargs="?", help="a JSON file holding one leyline Observation")
    query.add_argument("--from-bus", action="store_true",
                       help="instead of a file: the newest observation a worker decided on, from the hub")
    query.add_argument("--run", default="", help="--from-bus: only this run's observations (default: any run)")
    query.add_argument("--hub-sub", type=endpoint, default=None,
                       help="the hub's subscribe endpoint (default: $ESPER_HOST, $ESPER_HUB_SUB_PORT)")
    query.add_argument("--hub-snapshot", type=endpoint, default=None,
                       help="the hub's snapshot endpoint (default: $ESPER_HOST, $ESPER_HUB_SNAPSHOT_PORT)")
    query.add_argument("--wait-s", type=at_least(0, float, MAX_DEADLINE_S), default=10.0,
                       help="--from-bus: how long to wait for the hub, and for a decision when it holds none yet")
    query.add_argument("--tamiyo", type=grpc_target, default=None,
                       help="host:port (default: $ESPER_HOST, $ESPER_TAMIYO_PORT)")
    query.add_argument("--deadline-s", type=at_least(0.01, float, MAX_DEADLINE_S), default=5.0,
                       help="of the Decide call (nan had retried forever)")
    add_token_flag(query)
    stack = commands.add_parser("stack", help="inspect a running stack")
    status = stack.add_subparsers(dest="stack_command", required=True).add_parser(
        "status", help="health of every process (ports from $ESPER_* or their defaults)")
    status.add_argument("--timeout-s", type=at_least(0.01, float, MAX_DEADLINE_S), default=2.0, help="per check")
    add_token_flag(status)


def run_command(args: argparse.Namespace) -> int:
    fill_stack_defaults(args)
    return cmd_policy_query(args) if args.command == "policy" else cmd_stack_status(args)


def cmd_policy_query(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf import json_format

    from esper.leyline import Blueprint, Observation, Operation, short_name
    from esper.transport.policy_service import PolicyUnavailable, RemotePolicy

    if args.from_bus == (args.observation is not None):
        print("esper: error: give an observation file or --from-bus (one of them)", file=sys.stderr)
        return 2
    if args.from_bus:
        event = newest_observation(args.hub_sub, args.hub_snapshot, args.run, args.wait_s, args.token)
        if event is None:
            where = f"run {args.run!r}" if args.run else "any run"
            print(f"esper: error: no observation from {where} on the hub at {args.hub_sub} in {args.wait_s:g} s "
                  f"(workers publish them with each decision, at --telemetry-level normal or debug)", file=sys.stderr)
            return 1
        obs = event.decision.observation
        print(f"observation: run {event.run_id}, epoch {obs.signals.epoch}/{obs.signals.max_epochs} "
              f"(it chose {short_name(Operation, event.decision.action.operation)})")
    else:
        try:
            obs = json_format.Parse(args.observation.read_text(), Observation())
        except (OSError, ValueError, json_format.ParseError) as exc:  # ValueError: not UTF-8 text
            print(f"esper: error: {args.observation}: {exc}", file=sys.stderr)
            return 2
    policy = RemotePolicy(args.tamiyo, deadline_s=args.deadline_s, patience_s=args.deadline_s, token=args.token)
    try:
        decision = policy.decide(obs)
    except grpc.RpcError as exc:
        print(f"esper: error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2 if exc.code() == grpc.StatusCode.INVALID_ARGUMENT else 1
    except PolicyUnavailable as exc:
        print(f"esper: error: {exc}", file=sys.stderr)
        return 1
    finally:
        policy.close()
    action = decision.action
    words = [short_name(Operation, action.operation), action.slot]
    if action.blueprint:
        words.append(short_name(Blueprint, action.blueprint))
    print(" ".join(filter(None, words)))
    print(f"reason: {decision.reason}")
    print(f"policy: {decision.policy_name} {decision.policy_version}")
    return 0


def newest_observation(sub_endpoint: str, snapshot_endpoint: str, run_id: str, wait_s: float, token: str = ""):
    """Late-join the hub and return the newest decision event that carries its observation (of `run_id`,
    or of any run): from the hub's snapshot when it holds one, else the first one published within
    `wait_s`. None when there is none by then."""
    import time

    from esper.transport.bus import Subscriber, make_context

    ctx = make_context(token)
    subscriber = Subscriber(ctx, sub_endpoint, snapshot_endpoint, run_id)
    newest = None
    deadline = time.monotonic() + wait_s
    try:
        while time.monotonic() < deadline and not (subscriber.synced and newest is not None):
            if subscriber.socket.poll(100):
                for event in subscriber.receive():
                    if event.decision.HasField("observation") and (newest is None or
                                                                   event.wall_time >= newest.wall_time):
                        newest = event
    finally:
        subscriber.close()
        ctx.term()
    return newest


def cmd_stack_status(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from esper.transport.auth import call_metadata

    env = StackEndpoints.from_env()
    checks = {f"{name} metrics": metrics_url(env.host, port) for name, port in (
        ("nissa_hub", env.hub_metrics), ("tamiyo_server", env.tamiyo_metrics),
        ("tolaria_worker", env.worker_metrics), ("karn", env.karn_metrics),
        ("simic_learner", env.learner_metrics)) if port >= 0}  # -1: /metrics switched off, nothing to ask
    results: dict[str, str] = {}
    with grpc.insecure_channel(env.tamiyo_target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=args.timeout_s,
                                                              metadata=call_metadata(args.token))
            results[f"tamiyo_server grpc {env.tamiyo_target}"] = health_pb2.HealthCheckResponse.ServingStatus.Name(
                reply.status)
        except grpc.RpcError as exc:
            results[f"tamiyo_server grpc {env.tamiyo_target}"] = exc.code().name
    for name, url in checks.items():
        try:
            request = urllib.request.Request(url, headers=dict(call_metadata(args.token)))
            with urllib.request.urlopen(request, timeout=args.timeout_s) as reply:
                results[f"{name} {url}"] = "SERVING" if reply.status == 200 else f"HTTP {reply.status}"
        except OSError as exc:
            results[f"{name} {url}"] = f"DOWN ({getattr(exc, 'reason', exc)})"
        except http.client.HTTPException as exc:  # something answers there, but not HTTP
            results[f"{name} {url}"] = f"DOWN (not HTTP: {type(exc).__name__})"
    width = max(map(len, results))
    for what, state in results.items():
        print(f"{what:<{width}}  {state}")
    return 0 if all(s == "SERVING" for s in results.values()) else 1
