"""Starting the dashboard from the command line: its flags, `esper dashboard` in the foreground, and
`esper train ... --dashboard` beside an in-process run.

The token rule is the stack's (`esper.transport.config.bind_refusal`, which DashboardConfig applies: off
loopback a token is required, and a token has at least 16 characters), so the dashboard and the services
refuse alike. After an
in-process run ends the dashboard stays up, showing the final state, until ctrl-c (or SIGTERM): a run
that ended while nobody looked should still be there to look at. The server (aiohttp) is imported
only when a dashboard is asked for.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading

from esper.transport.config import TOKEN_VAR, host_port, port  # names only: no wire library


DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000


def add_dashboard_flags(p: argparse.ArgumentParser, switch: bool = True) -> None:
    """`switch`: add `--dashboard` itself (the train commands); `esper dashboard` always serves."""
    if switch:
        p.add_argument("--dashboard", action="store_true", help="serve a live web dashboard of the run")
    p.add_argument("--dashboard-host", default=None,
                   help=f"interface to listen on (default {DEFAULT_HOST}); anything but loopback (e.g. 0.0.0.0) "
                        "needs a token")
    p.add_argument("--dashboard-port", type=port, default=None, help=f"default {DEFAULT_PORT}; 0: any free port")
    p.add_argument("--dashboard-token", default=None,
                   help=f"token every request must carry (default: the stack's --token, ${TOKEN_VAR}); "
                        "required off loopback")


def dashboard_config(args: argparse.Namespace):
    """The DashboardConfig the flags ask for, None without `--dashboard`; ValueError (one line) for a
    bad combination: a non-loopback host without a token, a short token, a port out of range, a dashboard
    flag without --dashboard (it had been taken and ignored)."""
    if not getattr(args, "dashboard", True):
        given = [flag for flag, value in (("--dashboard-host", args.dashboard_host),
                                          ("--dashboard-port", args.dashboard_port),
                                          ("--dashboard-token", args.dashboard_token)) if value is not None]
        if given:
            raise ValueError(f"{given[0]} needs --dashboard")
        return None
    if getattr(args, "tui", False):
        raise ValueError("--tui and --dashboard: choose one")
    from esper.karn.dashboard.server import DashboardConfig

    token = args.dashboard_token or getattr(args, "token", "") or os.environ.get(TOKEN_VAR, "")
    host = DEFAULT_HOST if args.dashboard_host is None else args.dashboard_host
    port = DEFAULT_PORT if args.dashboard_port is None else args.dashboard_port
    return DashboardConfig(host=host, port=port, token=token or None)


def print_links(links: list[str]) -> None:
    for link in links:
        print(f"dashboard: {link}", file=sys.stderr, flush=True)


def serve_forever(cfg, source, title: str) -> int:
    """Serve `source` in this thread until SIGINT or SIGTERM; 1 (and a line) when it cannot listen."""
    from esper.karn.dashboard.server import Dashboard

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await Dashboard(cfg, title).serve(source, stop, print_links)

    try:
        asyncio.run(main())
    except OSError as exc:
        return _cannot_listen(cfg, exc)
    return 0


def train_with_dashboard(cfg, run, dashboard) -> int:
    """`run(cfg, sinks=...)` in this thread, feeding a dashboard on another; then serve until ctrl-c.
    1 (and a line) when the dashboard cannot listen: nothing is trained then."""
    from esper.karn.dashboard.server import Dashboard, DashboardThread
    from esper.karn.tui import QueueSource

    source = QueueSource()
    server = DashboardThread(Dashboard(dashboard, title=f"train {cfg.mode} · {cfg.env.task}"), source)
    try:
        print_links(server.start())
    except OSError as exc:
        return _cannot_listen(dashboard, exc)
    try:
        run(cfg, sinks=(source,))
        source.finish()
        print("esper: the run is over; the dashboard stays up (ctrl-c stops it)", file=sys.stderr, flush=True)
        _wait_for_signal()
    finally:
        server.stop()
    return 0


def _cannot_listen(cfg, exc: OSError) -> int:
    print(f"esper: error: the dashboard cannot listen on {host_port(cfg.host, cfg.port)}: {exc.strerror or exc}",
          file=sys.stderr)
    return 1


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()  # a signal interrupts the wait, runs the handler in this thread, and the wait returns
