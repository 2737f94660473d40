"""The dashboard's web server (aiohttp): the page at `/`, its live feed on the WebSocket `/ws`.

Events come from any iterable source (the bus follower, a replayed JSONL file, the `QueueSource` an
in-process run feeds), read by a thread that hands each to the event loop; the loop folds them into
the `DashboardState` and forwards the messages to every page. A page joining late gets the state
first (one `snapshot` message), then the live messages. Each page has a bounded queue: a page that
cannot keep up is disconnected rather than let the server's memory grow, and it reconnects to a
fresh snapshot.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from aiohttp import WSCloseCode, web

from esper.karn.dashboard.guard import Guard, link_hosts, served_names
from esper.karn.dashboard.state import DashboardState
from esper.leyline import TelemetryEvent
from esper.transport.config import bind_refusal

INDEX = Path(__file__).with_name("index.html")
PAGE_HEADERS = {
    # The page's own script and styles are inline; it talks only to its own server.
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "connect-src 'self'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",  # the page's address may hold the token
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class DashboardConfig:
    host: str = "127.0.0.1"
    """Interface to listen on. Anything but loopback is an explicit choice and needs `token`."""
    port: int = 8000
    """0: any free port (the printed links name it)."""
    token: str | None = None
    """Required of every request when given (and it must be given off loopback)."""
    max_queue: int = 10_000
    """Messages waiting for one page before it is disconnected (it reconnects to a fresh snapshot)."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--dashboard-port must be in 0..65535, got {self.port}")
        refusal = bind_refusal(self.host, self.token or "")
        if refusal:
            raise ValueError(f"--dashboard-host: {refusal.replace('--token', '--dashboard-token')}")


class _AnsweredBadRequests(logging.Filter):
    """aiohttp answers a request it cannot parse (a URL or header past 8190 bytes, bytes that are not HTTP) with
    400 itself, then logs the parser's traceback at ERROR: keep it out of the terminal the dashboard shares."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        return not (record.exc_info and isinstance(record.exc_info[1], HttpProcessingError))


logging.getLogger("aiohttp.server").addFilter(_AnsweredBadRequests())


class Dashboard:
    """One server; `serve` runs it on the current event loop until `stop` is set."""

    def __init__(self, cfg: DashboardConfig, title: str = ""):
        self.cfg = cfg
        self.title = title
        self.state = DashboardState()
        self.source_status = "waiting"
        """"live" once the source delivers, then "ended", or "failed: why"."""
        self.clients: dict[web.WebSocketResponse, asyncio.Queue] = {}
        self.guard: Guard | None = None
        self.links: list[str] = []
        self._runner: web.AppRunner | None = None

    async def serve(self, source: Iterable[TelemetryEvent], stop: asyncio.Event,
                    ready: Callable[[list[str]], None] = lambda links: None) -> None:
        """Listen (an OSError when the port is taken), call `ready(links)`, follow `source` until `stop`."""
        await self._start()
        ready(self.links)
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._pump, args=(source, loop), name="dashboard-source", daemon=True).start()
        try:
            await stop.wait()
        finally:
            stop_source = getattr(source, "stop", None)
            if stop_source is not None:
                stop_source()
            for ws in list(self.clients):
                await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server stopping")
            await self._runner.cleanup()

    async def _start(self) -> None:
        app = web.Application(middlewares=[self._check])
        app.router.add_get("/", self._index)
        app.router.add_get("/ws", self._websocket)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self.cfg.host or None, self.cfg.port).start()
        except OSError:
            await self._runner.cleanup()
            raise
        port = self._runner.addresses[0][1]
        self.guard = Guard(served_names(self.cfg.host), port, self.cfg.token)
        query = f"?token={quote(self.cfg.token, safe='')}" if self.cfg.token else ""
        self.links = [f"http://{h}:{port}/{query}" for h in link_hosts(self.cfg.host)]

    def _pump(self, source: Iterable[TelemetryEvent], loop: asyncio.AbstractEventLoop) -> None:
        """The source's thread: blocking reads, each event handed to the loop."""
        try:
            try:
                for event in source:
                    loop.call_soon_threadsafe(self.feed, event)
            except Exception as exc:  # a corrupt file, a broken socket: say so on the page, keep what it shows
                loop.call_soon_threadsafe(self._source_is, f"failed: {type(exc).__name__}: {exc}")
                return
            loop.call_soon_threadsafe(self._source_is, "ended")
        except RuntimeError:  # the loop closed first: the server is gone, nobody to tell
            pass

    def feed(self, event: TelemetryEvent) -> None:
        """Fold one event and send what changed to every page (on the loop's thread)."""
        if self.source_status == "waiting":
            self._source_is("live")
        for message in self.state.apply(event):
            self._broadcast(message)

    def _source_is(self, status: str) -> None:
        self.source_status = status
        self._broadcast(self._source_message())

    def _source_message(self) -> dict:
        return {"type": "source", "status": self.source_status, "title": self.title,
                "max_runs": self.state.store.max_runs}

    def _broadcast(self, message: dict) -> None:
        for ws, queue in list(self.clients.items()):
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:
                del self.clients[ws]
                asyncio.ensure_future(ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"too slow"))

    @web.middleware
    async def _check(self, request: web.Request, handler):
        refusal = self.guard.refusal(request.headers.get("Host"), request.headers.get("Origin"),
                                     request.query.get("token"), request.headers.get("Authorization"))
        if refusal is not None:
            status, reason = refusal
            return web.Response(status=status, text=reason + "\n")
        return await handler(request)

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(text=INDEX.read_text(), content_type="text/html", headers=PAGE_HEADERS)

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=10.0, max_msg_size=4096)  # pages send nothing of size
        await ws.prepare(request)
        queue: asyncio.Queue = asyncio.Queue(self.cfg.max_queue)
        snapshot = self.state.snapshot()
        snapshot["messages"].insert(0, self._source_message())
        queue.put_nowait(snapshot)
        self.clients[ws] = queue  # on the loop's thread, as every fold is: nothing falls between the two
        sender = asyncio.create_task(self._send(ws, queue))
        try:
            async for _ in ws:  # the page sends nothing; this ends when it goes
                pass
        finally:
            self.clients.pop(ws, None)
            sender.cancel()
        return ws

    async def _send(self, ws: web.WebSocketResponse, queue: asyncio.Queue) -> None:
        while True:
            message = await queue.get()
            try:
                await ws.send_str(json.dumps(_finite(message), separators=(",", ":")))
            except ConnectionError:
                return


def _finite(value):
    """NaN and infinities (a diverged loss) as null: JSON has no such numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


class DashboardThread:
    """A dashboard on its own thread and event loop, for a process whose main thread trains."""

    def __init__(self, dashboard: Dashboard, source: Iterable[TelemetryEvent]):
        self.dashboard = dashboard
        self.source = source
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="dashboard", daemon=True)

    def start(self) -> list[str]:
        """Start serving; the links to open. Raises what listening raised (a port taken)."""
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self.dashboard.links

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout_s)

    def _run(self) -> None:
        async def main() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            await self.dashboard.serve(self.source, self._stop, lambda links: self._ready.set())

        try:
            asyncio.run(main())
        except BaseException as exc:  # raised again by start() when it failed before serving
            self._error = exc
        finally:
            self._ready.set()
