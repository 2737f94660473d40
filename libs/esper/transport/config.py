"""Where every process of the stack listens: one table of environment variables with defaults.

The Procfile, `.env`, the services, `esper stack status` and `ops/prometheus.yml` all use these
names; `tests/unit/test_stack_config.py` fails when `.env` or `ops/prometheus.yml` disagree with the
defaults here. Every endpoint is on `ESPER_HOST` (127.0.0.1) unless a service is given `--host`.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import re
import socket
from dataclasses import dataclass, fields

# name -> (default, what listens there)
PORTS: dict[str, tuple[int, str]] = {
    "ESPER_HUB_PUB_PORT": (5560, "nissa_hub: publishers connect here (XSUB)"),
    "ESPER_HUB_SUB_PORT": (5561, "nissa_hub: subscribers connect here (XPUB)"),
    "ESPER_HUB_SNAPSHOT_PORT": (5562, "nissa_hub: late-join snapshot requests (ROUTER)"),
    "ESPER_TAMIYO_PORT": (50051, "tamiyo_server: gRPC Tamiyo, health, reflection"),
    "ESPER_HUB_METRICS_PORT": (9561, "nissa_hub: Prometheus /metrics"),
    "ESPER_TAMIYO_METRICS_PORT": (9562, "tamiyo_server: Prometheus /metrics"),
    "ESPER_WORKER_METRICS_PORT": (9563, "tolaria_worker: Prometheus /metrics"),
    "ESPER_KARN_METRICS_PORT": (9564, "karn: Prometheus /metrics (run metrics)"),
    "ESPER_LEARNER_PORT": (5570, "simic_learner: trajectories from PPO workers (ROUTER, acked)"),
    "ESPER_LEARNER_WEIGHTS_PORT": (5571, "simic_learner: policy weights for tamiyo_server (PUB)"),
    "ESPER_LEARNER_METRICS_PORT": (9565, "simic_learner: Prometheus /metrics (trajectories, updates)"),
}
HOST_VAR, HOST_DEFAULT = "ESPER_HOST", "127.0.0.1"
TOKEN_VAR = "ESPER_TOKEN"
"""The stack's shared secret (esper.transport.auth); here, free of gRPC and ZeroMQ, for command lines."""


def add_token_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--token", default=os.environ.get(TOKEN_VAR, ""),
                        help=f"shared secret of the stack (${TOKEN_VAR}, which is better: a command line is "
                             "visible to every user in ps); a service needs one to listen off loopback")


MIN_TOKEN_CHARS = 16
"""A shorter token is refused: `python -c 'import secrets; print(secrets.token_hex(16))'` makes one."""


def is_loopback(host: str) -> bool:
    """True when every address `host` names is a loopback address ("localhost", 127.0.0.1, ::1)."""
    try:
        infos = socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def bind_refusal(host: str, token: str) -> str | None:
    """Why a server must not start listening on `host` with this token, or None when it may: off loopback
    a token is required, and a token has at least MIN_TOKEN_CHARS characters. The services and the
    dashboard refuse alike."""
    if token and len(token) < MIN_TOKEN_CHARS:
        return f"the token has {len(token)} characters; use at least {MIN_TOKEN_CHARS}"
    if not token and not is_loopback(host):
        return f"refusing to listen on {host!r} without a token: set ${TOKEN_VAR} or pass --token"
    return None


class UsageError(Exception):
    """A bad flag or combination: reported in one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse's, but a bad flag raises UsageError (esper's commands and every service say it in one line)."""

    def error(self, message: str):  # argparse's default prints the whole usage block first
        raise UsageError(message)


class ConfigError(ValueError):
    """An ESPER_* variable that does not hold what it names: one line for the user, not a traceback."""


def port_number(text: str, lowest: int = 0) -> int:
    """`text` as a TCP port (0: any free one; -1, where `lowest` admits it: off), else ValueError."""
    try:
        port = int(text)
    except ValueError:
        port = None
    if port is None or not lowest <= port <= 65535:
        raise ValueError(f"must be a port number, {lowest} to 65535, not {text!r}")
    return port


def port(text: str) -> int:
    """argparse type of a listening port's flag (a port past 65535 had been taken modulo 65536 by gRPC)."""
    try:
        return port_number(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def at_least(lowest: float, kind: type = int, most: float = math.inf):
    """argparse type of a service's count or duration flag: below `lowest` (or above `most`), or not a finite
    number, is refused in one line at start, not when first used (a negative --retain-runs had crashed the hub
    at its first event, a negative --max-policy-lag the learner at its first update, and its checkpoint every
    later start)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < lowest:
            raise argparse.ArgumentTypeError(f"must be at least {lowest}, got {text}")
        if value > most:
            raise argparse.ArgumentTypeError(f"must be at most {most}, got {text}")
        return value
    return parse


MAX_DEADLINE_S = 3600.0
"""A deadline, timeout or interval flag at most: gRPC's clock overflows on a huge one (a 1e308 s deadline
expired at once, as if the server were down; a grace that long failed in its thread), and urllib's timeout and
ZeroMQ's poll raised OverflowError."""
finite = at_least(-math.inf, float)
"""argparse type of a float flag whose range its config checks: nan and inf are refused here (nan passes every
comparison: `--clip-ratio nan` had trained a policy that never changed, `--lr nan` failed inside Adam)."""


HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[\w.-]+):(\d{1,5})")


def is_host_port(text: str) -> bool:
    """HOST:PORT (a name, an IPv4 address or a bracketed IPv6 one), its port from 1 to 65535."""
    match = HOST_PORT.fullmatch(text)
    return match is not None and 0 < int(match[2]) <= 65535


def bracketed(host: str) -> str:
    """A host as it goes before ":PORT" in an address: an IPv6 one in brackets (ESPER_HOST=::1 had made
    tcp://::1:5560, which neither ZeroMQ nor gRPC nor a URL reads as host ::1)."""
    return f"[{host}]" if ":" in host else host


def host_port(host: str, port: int | str) -> str:
    """HOST:PORT for a listener or a target, as is_host_port reads it."""
    return f"{bracketed(host)}:{port}"


def metrics_url(host: str, port: int) -> str:
    """Where a service's /metrics answers."""
    return f"http://{host_port(host, port)}/metrics"


def endpoint(text: str) -> str:
    """argparse type of a ZeroMQ endpoint a service connects to: tcp://HOST:PORT or ipc://PATH (a malformed
    one had ended the service in a ZMQError traceback)."""
    tcp = text.startswith("tcp://") and is_host_port(text.removeprefix("tcp://"))
    if not (tcp or re.fullmatch(r"ipc://\S+", text)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a ZeroMQ endpoint (tcp://HOST:PORT)")
    return text


def grpc_target(text: str) -> str:
    """argparse type of the gRPC server a command calls: HOST:PORT (a malformed one had been retried until the
    deadline, as if the server were down)."""
    if not is_host_port(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a gRPC server's HOST:PORT")
    return text


def endpoint_or_none(text: str) -> str:
    """endpoint, or '' for none."""
    return text and endpoint(text)


def metrics_port(text: str) -> int:
    """argparse type of a /metrics port's flag: a port, or -1 for none."""
    try:
        return port_number(text, lowest=-1)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _port(name: str) -> int:
    try:
        off_allowed = name.endswith("_METRICS_PORT")  # -1: no /metrics
        return port_number(os.environ.get(name, str(PORTS[name][0])), lowest=-1 if off_allowed else 0)
    except ValueError as exc:
        raise ConfigError(f"${name} {exc}") from None


@dataclass(frozen=True)
class StackEndpoints:
    """The resolved endpoints, read from the environment at construction."""

    host: str = ""
    hub_pub: int = 0
    hub_sub: int = 0
    hub_snapshot: int = 0
    tamiyo: int = 0
    hub_metrics: int = 0
    tamiyo_metrics: int = 0
    worker_metrics: int = 0
    karn_metrics: int = 0
    learner: int = 0
    learner_weights: int = 0
    learner_metrics: int = 0

    @classmethod
    def from_env(cls) -> StackEndpoints:
        ports = {f.name: _port("ESPER_" + f.name.upper() + "_PORT") for f in fields(cls) if f.name != "host"}
        return cls(host=os.environ.get(HOST_VAR, HOST_DEFAULT), **ports)

    def tcp(self, port: int) -> str:
        return f"tcp://{host_port(self.host, port)}"

    @property
    def tamiyo_target(self) -> str:
        return host_port(self.host, self.tamiyo)


def fill_stack_defaults(args: argparse.Namespace) -> None:
    """The hub's and tamiyo_server's addresses a command was not given (None), from ESPER_* or their defaults,
    read when the command runs (ConfigError for a malformed variable): read as the parser was built, a
    malformed one had stopped every command, `esper blueprints` and `esper train` too."""
    env = StackEndpoints.from_env()
    for name, default, check in (("hub_sub", env.tcp(env.hub_sub), endpoint),
                                 ("hub_snapshot", env.tcp(env.hub_snapshot), endpoint),
                                 ("tamiyo", env.tamiyo_target, grpc_target)):
        if getattr(args, name, "") is None:
            try:
                setattr(args, name, check(default))
            except argparse.ArgumentTypeError as exc:  # the flags' own check, as a given address gets
                raise ConfigError(f"${HOST_VAR} {env.host!r}: {exc}") from None
