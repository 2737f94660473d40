"""`esper policy query` and `esper stack status`: the command line's view of a running stack.

Kept apart from cli.py so that `esper train` never imports gRPC or ZeroMQ; the wire code is imported
only when one of these commands runs.
"""

from __future__ import annotations

import argparse
import sys
import urllib.request
from pathlib import Path

from esper.transport.config import StackEndpoints

COMMANDS = ("policy", "stack")


def add_commands(commands: argparse._SubParsersAction) -> None:
    env = StackEndpoints.from_env()
    policy = commands.add_parser("policy", help="talk to a running tamiyo_server")
    query = policy.add_subparsers(dest="policy_command", required=True).add_parser(
        "query", help="send an observation (protobuf JSON) and print the decision")
    query.add_argument("observation", type=Path, help="a JSON file holding one leyline Observation")
    query.add_argument("--tamiyo", default=env.tamiyo_target, help="host:port ($ESPER_TAMIYO_PORT)")
    query.add_argument("--deadline-s", type=float, default=5.0)
    stack = commands.add_parser("stack", help="inspect a running stack")
    status = stack.add_subparsers(dest="stack_command", required=True).add_parser(
        "status", help="health of every process (ports from $ESPER_* or their defaults)")
    status.add_argument("--timeout-s", type=float, default=2.0, help="per check")


def run_command(args: argparse.Namespace) -> int:
    return cmd_policy_query(args) if args.command == "policy" else cmd_stack_status(args)


def cmd_policy_query(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf import json_format

    from esper.leyline import Blueprint, Observation, Operation, short_name
    from esper.transport.policy_service import PolicyUnavailable, RemotePolicy

    try:
        obs = json_format.Parse(args.observation.read_text(), Observation())
    except (OSError, json_format.ParseError) as exc:
        print(f"esper: error: {args.observation}: {exc}", file=sys.stderr)
        return 2
    policy = RemotePolicy(args.tamiyo, deadline_s=args.deadline_s, patience_s=args.deadline_s)
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


def cmd_stack_status(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    env = StackEndpoints.from_env()
    checks = {f"{name} metrics": f"http://{env.host}:{port}/metrics" for name, port in (
        ("nissa_hub", env.hub_metrics), ("tamiyo_server", env.tamiyo_metrics),
        ("tolaria_worker", env.worker_metrics), ("karn", env.karn_metrics))}
    results: dict[str, str] = {}
    with grpc.insecure_channel(env.tamiyo_target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=args.timeout_s)
            results[f"tamiyo_server grpc {env.tamiyo_target}"] = health_pb2.HealthCheckResponse.ServingStatus.Name(
                reply.status)
        except grpc.RpcError as exc:
            results[f"tamiyo_server grpc {env.tamiyo_target}"] = exc.code().name
    for name, url in checks.items():
        try:
            with urllib.request.urlopen(url, timeout=args.timeout_s) as reply:
                results[f"{name} {url}"] = "SERVING" if reply.status == 200 else f"HTTP {reply.status}"
        except OSError as exc:
            results[f"{name} {url}"] = f"DOWN ({getattr(exc, 'reason', exc)})"
    width = max(map(len, results))
    for what, state in results.items():
        print(f"{what:<{width}}  {state}")
    return 0 if all(s == "SERVING" for s in results.values()) else 1
