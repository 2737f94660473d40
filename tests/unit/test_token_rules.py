"""The token rules of esper.transport.auth, without sockets (tests/integration/test_auth.py has them)."""

import pytest

from esper.transport.auth import call_metadata, token_matches, wsgi_guard
from esper.transport.config import bind_refusal, is_loopback

TOKEN = "0123456789abcdef"


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                                ("127.0.0.2", True), ("0.0.0.0", False), ("::", False),
                                                ("10.1.2.3", False)])
def test_only_loopback_binds_without_a_token(host, loopback):
    assert is_loopback(host) is loopback
    assert (bind_refusal(host, "") is None) is loopback
    assert bind_refusal(host, TOKEN) is None  # with a token, anywhere
    assert "at least 16" in bind_refusal(host, "short")


def test_the_token_is_a_bearer_header_and_nothing_else():
    assert token_matches(call_metadata(TOKEN)[0][1], TOKEN)
    for presented in (None, "", TOKEN, f"Bearer {TOKEN}x", f"bearer {TOKEN}", f"Bearer {TOKEN[:-1]}"):
        assert not token_matches(presented, TOKEN), presented
    assert token_matches(None, "") and call_metadata("") == ()  # no token: nothing asked, nothing sent


def test_wsgi_guard_answers_401_before_the_app_runs():
    calls = []

    def app(environ, start_response):
        calls.append(environ["PATH_INFO"])
        start_response("200 OK", [])
        return [b"metrics"]

    def status_of(headers: dict) -> str:
        seen = []
        body = wsgi_guard(app, TOKEN)({"PATH_INFO": "/metrics", **headers}, lambda status, h: seen.append(status))
        return f"{seen[0]} {b''.join(body).decode().strip()}"

    assert status_of({}) == "401 Unauthorized missing or wrong token"
    assert status_of({"HTTP_AUTHORIZATION": f"Bearer {TOKEN}"}) == "200 OK metrics"
    assert calls == ["/metrics"]
