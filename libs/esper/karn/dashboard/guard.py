"""Who may talk to the dashboard: the served names (DNS-rebinding protection) and the token.

- Loopback is the default and needs no token. Any other address is an explicit choice that needs a
  token (`--dashboard-token` or `$ESPER_TOKEN`); the server refuses to start without one.
- With a token, every HTTP request and WebSocket handshake must carry it, as `?token=` (the page's
  link has it, and the page passes it on to its WebSocket: browsers cannot set headers there) or as
  `Authorization: Bearer`; otherwise 401.
- Always, loopback too: a request whose Host is not a served name and port, or whose Origin (sent by
  browsers) is another site, gets 403. A page on evil.example whose DNS name is rebound to 127.0.0.1
  sends `Host: evil.example`; a page elsewhere that opens a WebSocket here sends its own Origin.
"""

from __future__ import annotations

import hmac
import socket
from urllib.parse import urlsplit

from esper.transport.config import bracketed, is_loopback  # the services' rule; config imports no wire library

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARDS = frozenset({"0.0.0.0", "::", ""})


def interface_addresses(host: str) -> list[str]:
    """The addresses of this machine's interfaces that a wildcard bind `host` listens on: IPv4 for
    0.0.0.0, IPv4 and IPv6 for :: or "" (link-local ones left out: a URL with them needs a zone id)."""
    import psutil

    families = (socket.AF_INET,) if host == "0.0.0.0" else (socket.AF_INET, socket.AF_INET6)
    return [entry.address for entries in psutil.net_if_addrs().values() for entry in entries
            if entry.family in families and not entry.address.startswith("fe80")]


def served_names(host: str) -> set[str]:
    """The host names a browser may put in Host or Origin for a server bound to `host`."""
    names = {host.lower()}
    if is_loopback(host) or host in WILDCARDS:
        names |= LOOPBACK_NAMES
    if host in WILDCARDS:
        names |= {a.lower() for a in interface_addresses(host)} | {socket.gethostname().lower(), socket.getfqdn().lower()}
    return names - {""}


def link_hosts(host: str) -> list[str]:
    """Where to point a browser: every interface address for a wildcard bind, else the host itself."""
    hosts = interface_addresses(host) if host in WILDCARDS else [host]
    return [bracketed(h) for h in hosts]


class Guard:
    """The checks for one server: `names` and `port` served, `token` (None: none needed)."""

    def __init__(self, names: set[str], port: int, token: str | None):
        self.names = names
        self.port = port
        self.token = token

    def refusal(self, host: str | None, origin: str | None, query_token: str | None,
                authorization: str | None) -> tuple[int, str] | None:
        """(status, reason) to refuse a request with, None to serve it."""
        if not self._served(host, "http"):
            return 403, "this server does not serve that Host"
        if origin is not None and not (origin.startswith(("http://", "https://")) and
                                       self._served(urlsplit(origin).netloc, urlsplit(origin).scheme)):
            return 403, "cross-origin requests are refused"
        if self.token is not None:
            given = query_token or (authorization or "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return 401, "a token is required: open the link the server printed"
        return None

    def _served(self, netloc: str | None, scheme: str) -> bool:
        if not netloc:
            return False
        try:
            parts = urlsplit(f"//{netloc}")
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:  # a port that is not a number
            return False
        return parts.hostname in self.names and port == self.port
