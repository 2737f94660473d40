"""A shared token that every listening socket of the stack can demand (issue 8, promise 12).

One secret, `$ESPER_TOKEN` or `--token`, guards the three kinds of socket the stack listens on:

- gRPC: `TokenInterceptor` answers UNAUTHENTICATED unless the call's `authorization` metadata is
  `Bearer <token>`; clients send `call_metadata(token)`.
- HTTP (/metrics, the dashboard): `wsgi_guard(app, token)` answers 401 without an
  `Authorization: Bearer <token>` header (Prometheus sends it with `authorization: {credentials: ...}`
  in a scrape config). prometheus_client's own server offers only TLS client certificates, no token.
- ZeroMQ: `zmq_context(token, server=...)` makes every socket of the context speak PLAIN (user
  `esper`, password the token), checked by a ZAP handler (pyzmq's ThreadAuthenticator) on the
  binding side. A client without the token never completes the handshake: nothing it sends arrives.

The check never depends on the address, so tests prove it on loopback. Binding anything but
loopback without a token is refused at startup (`bind_refusal`): a stack on a shared machine or
network lets no one in by accident. None of this encrypts: gRPC runs on insecure channels, PLAIN and
the bearer header travel in clear text. The token keeps out other users of a machine or a trusted
network; across an untrusted one, run the stack inside a tunnel (WireGuard, ssh -L).
"""

from __future__ import annotations

import hmac
import sys
from collections.abc import Callable, Iterable

import grpc
import zmq
from zmq.auth.thread import ThreadAuthenticator

from esper.transport.config import TOKEN_VAR, add_token_flag, bind_refusal

__all__ = ["TOKEN_VAR", "TokenContext", "TokenInterceptor", "add_token_flag", "bind_refusal", "call_metadata",
           "refuse_bind", "server_interceptors", "token_matches", "wsgi_guard", "zmq_context"]

METADATA_KEY = "authorization"
ZAP_USER = "esper"


def refuse_bind(prog: str, host: str, token: str) -> bool:
    """True (after printing `<prog>: error: <why>` on stderr) when a service must exit 2 instead of binding."""
    refusal = bind_refusal(host, token)
    if refusal:
        print(f"{prog}: error: {refusal}", file=sys.stderr)
    return refusal is not None


def token_matches(presented: str | None, token: str) -> bool:
    """`presented` is `Bearer <token>` (compared in constant time); anything goes when there is no token."""
    if not token:
        return True
    return presented is not None and hmac.compare_digest(presented.encode(), f"Bearer {token}".encode())


def call_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The metadata a gRPC client adds to every call (empty without a token)."""
    return ((METADATA_KEY, f"Bearer {token}"),) if token else ()


def _deny(request_or_iterator, context: grpc.ServicerContext):
    context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")


_DENY = {  # (request streaming, response streaming) -> a handler of that shape that refuses
    (False, False): grpc.unary_unary_rpc_method_handler(_deny),
    (False, True): grpc.unary_stream_rpc_method_handler(_deny),
    (True, False): grpc.stream_unary_rpc_method_handler(_deny),
    (True, True): grpc.stream_stream_rpc_method_handler(_deny),
}


class TokenInterceptor(grpc.ServerInterceptor):
    """Every method of the server (health and reflection included) needs the token."""

    def __init__(self, token: str):
        self.token = token

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        presented = dict(handler_call_details.invocation_metadata).get(METADATA_KEY)
        if handler is None or token_matches(presented, self.token):
            return handler
        return _DENY[(handler.request_streaming, handler.response_streaming)]


def server_interceptors(token: str) -> list[grpc.ServerInterceptor]:
    """For `grpc.server(..., interceptors=...)`: none without a token."""
    return [TokenInterceptor(token)] if token else []


def wsgi_guard(app: Callable, token: str) -> Callable:
    """A WSGI app that answers 401 unless the request carries `Authorization: Bearer <token>`."""
    if not token:
        return app

    def guarded(environ: dict, start_response: Callable) -> Iterable[bytes]:
        if token_matches(environ.get("HTTP_AUTHORIZATION"), token):
            return app(environ, start_response)
        start_response("401 Unauthorized", [("Content-Type", "text/plain"),
                                             ("WWW-Authenticate", 'Bearer realm="esper"')])
        return [b"missing or wrong token\n"]

    return guarded


class TokenContext(zmq.Context):
    """A ZeroMQ context whose sockets authenticate with PLAIN; `term()` also stops its ZAP handler."""

    authenticator: ThreadAuthenticator | None = None  # declared here: pyzmq maps unknown attributes to options

    def term(self) -> None:
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None
        super().term()


def zmq_context(token: str, server: bool) -> zmq.Context:
    """A context for sockets that bind (`server`: their peers must present the token) or connect
    (they present it). Without a token: a plain context, NULL security as before. A process with
    sockets of both kinds uses two contexts (libzmq: a socket is a PLAIN server or a client)."""
    if not token:
        return zmq.Context()
    ctx = TokenContext()
    if server:
        ctx.authenticator = ThreadAuthenticator(ctx)  # its inproc sockets are made before the defaults below
        ctx.authenticator.start()
        ctx.authenticator.configure_plain(domain="*", passwords={ZAP_USER: token})
        ctx.setsockopt(zmq.PLAIN_SERVER, 1)
    else:
        ctx.setsockopt(zmq.PLAIN_USERNAME, ZAP_USER.encode())
        ctx.setsockopt(zmq.PLAIN_PASSWORD, token.encode())
    return ctx
