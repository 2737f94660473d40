"""Every service's /metrics server: prometheus_client's, with the stack's token, a body cap, a socket
timeout, and a count of what it refused.

prometheus_client's start_http_server cannot take a token (its only authentication is TLS client
certificates) and waits forever on a client that never finishes its request line; this is the same
WSGI app and thread-per-request server with those gaps closed (issue 8, promises 10 and 12).
"""

from __future__ import annotations

import socket
import sys
import threading
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, Counter, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from esper.transport.auth import wsgi_guard
from esper.transport.limits import HTTP_TIMEOUT_S, MAX_HTTP_BODY_BYTES

REFUSED = Counter("esper_http_requests_refused", "HTTP requests answered with an error, by status code "
                  "(400 unparsable, 401 no token, 413 a body, 414/431 too long, 501 unknown method).", ["code"])


class _Handler(WSGIRequestHandler):
    timeout = HTTP_TIMEOUT_S  # a client silent this long mid-request loses its connection and thread

    def log_message(self, format, *args) -> None:
        """A scrape every second would flood the service's log."""

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server refuses what it cannot parse here, before the WSGI app sees anything."""
        REFUSED.labels(str(code)).inc()
        super().send_error(code, message, explain)


def refuse_bodies(app):
    """A WSGI app that answers 413, unread, any request declaring a body over MAX_HTTP_BODY_BYTES."""
    def capped(environ: dict, start_response):
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = MAX_HTTP_BODY_BYTES + 1
        if length > MAX_HTTP_BODY_BYTES or "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
            start_response("413 Content Too Large", [("Content-Type", "text/plain")])
            return [b"request body too large\n"]
        return app(environ, start_response)
    return capped


def count_refusals(app):
    """A WSGI app that counts the error statuses `app` answers."""
    def counted(environ: dict, start_response):
        def start(status: str, headers, exc_info=None):
            if status[:1] in "45":
                REFUSED.labels(status.split()[0]).inc()
            return start_response(status, headers, exc_info)
        return app(environ, start)
    return counted


def quiet_on_hangup(server: ThreadingWSGIServer, request, client_address) -> None:
    """socketserver prints the traceback of whatever a request's thread raised on the service's stderr: a
    client that hung up before its answer was written (ConnectionResetError, BrokenPipeError) is not news."""
    if not isinstance(sys.exc_info()[1], ConnectionError):
        ThreadingWSGIServer.handle_error(server, request, client_address)


def start_metrics(host: str, port: int, token: str = "", registry=REGISTRY) -> WSGIServer:
    """Serve `registry` on http://host:port/ (port 0: any free port) from a daemon thread, refusing
    requests without the token (401) or with a body (413). Returns the server: `.server_port`, `.shutdown()`."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    server_class = type("MetricsServer", (ThreadingWSGIServer,), {"address_family": family,
                                                                   "handle_error": quiet_on_hangup})
    app = count_refusals(wsgi_guard(refuse_bodies(make_wsgi_app(registry)), token))
    server = make_server(host, port, app, server_class, handler_class=_Handler)
    # serve_forever checks for shutdown() every poll_interval (0.5 s by default): part of every exit.
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="metrics", daemon=True).start()
    return server
