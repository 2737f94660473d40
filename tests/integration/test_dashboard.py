"""The web dashboard, through its real server: in headless Chromium the page shows a live in-process
run and reconnects after the server restarts; `esper dashboard` late-joins a real hub; and the access
rules hold over plain HTTP and WebSocket (token: 401 without, 200 with; foreign Host or Origin: 403;
no token off loopback: refuses to start)."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import aiohttp
import pytest
from esper import cli
from esper.karn.dashboard.server import Dashboard, DashboardConfig, DashboardThread
from esper.karn.dashboard.state import DashboardState
from esper.karn.tui import QueueSource
from esper.leyline import (
    EpochReport,
    GovernorEvent,
    LifecycleTransition,
    PPOUpdate,
    RunStarted,
    SlotState,
    TelemetryEvent,
    TrainingSignals,
)
from esper.nissa import read_jsonl
from esper.transport.bus import PublisherSink, make_context
from procs import LOOPBACK, REPO, free_ports, listening_addresses, start_hub

CHROMIUM = shutil.which("chromium")
TOKEN = "dashboard-test-token-0123456789"
LINK = re.compile(r"dashboard: (http://\S+)")


class Esper:
    """An `esper ...` child process on loopback; its stderr lines are kept, dashboard links collected."""

    def __init__(self, *args: str):
        env = ({k: v for k, v in os.environ.items() if k != "ESPER_TOKEN"}  # tokens only where a test gives one
               | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
        self.proc = subprocess.Popen([sys.executable, "-m", "esper.cli", *args], cwd=REPO, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.links: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if match := LINK.search(line):
                self.links.put(match.group(1))

    def link(self, timeout_s: float = 60.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                return self.links.get(timeout=0.2)
            except queue.Empty:
                pass
        raise AssertionError(f"no dashboard link (exit status {self.proc.poll()}):\n{''.join(self.lines[-30:])}")

    def wait_for(self, text: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(text in line for line in self.lines):
            assert time.monotonic() < deadline, f"no {text!r} in {timeout_s} s:\n{''.join(self.lines[-30:])}"
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGINT, timeout_s: float = 30.0) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (.ci/run installs Debian's chromium)")
def test_page_shows_a_live_run_and_reconnects_after_a_restart(tmp_path):
    from playwright.sync_api import sync_playwright

    port = free_ports()[0]  # the same address for both servers: the page must find the second by itself
    epochs = 20
    train = Esper("train", "heuristic", "--task", "synthetic", "--max-epochs", str(epochs), "--slots", "early",
                  "mid", "--runs-dir", str(tmp_path), "--dashboard", "--dashboard-port", str(port))
    replay = None
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM)  # while the run starts
        try:
            page = browser.new_page()
            page.goto(train.link())
            page.wait_for_selector("#status[data-state=open]", timeout=30_000)
            seen: list[int] = []  # the watched run's epoch as the page shows it, every 50 ms
            deadline = time.monotonic() + 120
            while not (seen and seen[-1] == epochs and "%" in page.text_content("#watched-test")):
                assert time.monotonic() < deadline, f"page stuck at epochs {seen[-5:]}:\n{''.join(train.lines[-20:])}"
                text = page.text_content("#watched-epoch")
                if text.isdigit() and (not seen or int(text) != seen[-1]):
                    seen.append(int(text))
                time.sleep(0.05)
            cells = page.locator("#timeline rect").count()
            rows = page.locator("#seeds tbody tr").count()
            print(f"epochs shown as they came: {seen}; first shown {seen[0]}, last {seen[-1]}; "
                  f"timeline cells {cells}, seed rows {rows}, val {page.text_content('#watched-val')}, "
                  f"test {page.text_content('#watched-test')}")
            assert seen[0] < epochs and len(seen) >= 3, "the page showed no live progress, only the end"
            assert cells == 2 * epochs and rows == 2  # slots early and mid, every epoch
            assert page.locator("#acc-chart polyline").count() == 1 and page.locator(".test-marker").count() == 1

            train.wait_for("the run is over")  # ctrl-c before it would interrupt the run's last writes
            assert train.stop() == 0, "".join(train.lines[-20:])
            # The timeline draws the stage each epoch trained in, as the run's own curve records it.
            drawn = page.eval_on_selector_all("#timeline rect", "cells => cells.map(c => c.dataset.stage)")
            curve = json.loads(next(tmp_path.glob("*/summary.json")).read_text())["curve"]
            assert drawn == [point["stages"][slot] for point in curve for slot in ("early", "mid")]
            page.wait_for_selector("#status[data-state=closed]", timeout=10_000)
            time.sleep(3.0)  # nothing listens: the page's retries fail and its backoff grows to the cap
            assert page.get_attribute("#status", "data-state") == "closed"
            run_file = next(tmp_path.glob("*/telemetry.jsonl"))  # served again by a new server at the same address
            replay = DashboardThread(Dashboard(DashboardConfig(port=port), title=str(run_file)), read_jsonl(run_file))
            replay.start()
            started = time.monotonic()
            page.wait_for_selector(f"#title:has-text('{run_file}')", timeout=30_000)  # the new server's title
            page.wait_for_selector("#status[data-state=open]", timeout=10_000)
            reconnect_s = time.monotonic() - started
            print(f"the page reconnected {reconnect_s:.2f} s after the new server listened; "
                  f"it shows epoch {page.text_content('#watched-epoch')}")
            assert page.text_content("#watched-epoch") == str(epochs)
            assert reconnect_s < 5.0  # the page retries at most 2.5 s apart (2 s backoff cap, jittered)
        finally:
            browser.close()
            train.kill()
            if replay is not None:
                replay.stop()


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (.ci/run installs Debian's chromium)")
def test_a_statistic_that_is_not_finite_shows_as_a_dash_and_stops_no_panel():
    """Explained variance is NaN when a rollout's returns have no variance: it reaches the page as null,
    whose gauge had thrown and left every later panel (the alerts among them) unrendered."""
    from playwright.sync_api import sync_playwright

    events = [
        event("ppo", 1, run_started=RunStarted(mode="ppo", task="synthetic")),
        epoch_event("ppo_ep0000", 1, 1, alpha=float("nan")),  # a peer's: it reaches the page as null
        event("ppo", 2, ppo_update=PPOUpdate(update=1, entropy=1.0, approx_kl=0.01, clipfrac=0.1,
                                             explained_variance=float("nan"))),
        event("ppo_ep0000", 2, governor=GovernorEvent(epoch=2, cause="divergence", train_loss=9.0, restored_epoch=1)),
    ]
    server = DashboardThread(Dashboard(DashboardConfig(port=0), title="replay"), events)
    link = server.start()[0]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(link)
            page.wait_for_selector("#alerts :text('divergence')", timeout=30_000)
            gauges = page.text_content("#gauges")
            cells = page.eval_on_selector_all("#timeline rect title", "titles => titles.map(t => t.textContent)")
        finally:
            browser.close()
            server.stop()
    print(f"gauges: {gauges!r}; timeline: {cells}; page errors: {errors}")
    assert "explained variance-" in gauges and "clip fraction0.100" in gauges and errors == []
    assert cells == ["mid epoch 1: TRAINING conv_heavy alpha -"]  # its timeline had stopped at alpha.toFixed


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (.ci/run installs Debian's chromium)")
def test_the_page_forgets_runs_as_the_server_does():
    """The page had kept every run it was sent, and the timeline's list every run it had shown: a PPO session's
    episodes, a run each, grew both without end. It keeps the server's number of runs, the one that reported
    least recently forgotten first."""
    from playwright.sync_api import sync_playwright

    source = QueueSource(poll_s=0.02)
    dashboard = Dashboard(DashboardConfig(port=0), title="live")
    dashboard.state = DashboardState(max_runs=3)
    server = DashboardThread(dashboard, source)
    link = server.start()[0]
    runs = [f"ep{i}" for i in range(6)]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM)
        try:
            page = browser.new_page()
            page.goto(link)
            page.wait_for_selector("#status[data-state=open]", timeout=30_000)
            for run in runs:  # live, one after another, as a PPO round's episodes report
                source.emit(event(run, 1, run_started=RunStarted(mode="ppo", task="synthetic")))
                source.emit(epoch_event(run, 2, 1))
            page.wait_for_selector("#watched-run:has-text('ep5')", timeout=30_000)
            listed = page.eval_on_selector_all("#timeline-run option", "options => options.map(o => o.value)")
            curves = page.locator("#acc-chart polyline").count()
            page.reload()  # the snapshot the server keeps: the same runs
            page.wait_for_selector("#watched-run:has-text('ep5')", timeout=30_000)
            listed_anew = page.eval_on_selector_all("#timeline-run option", "options => options.map(o => o.value)")
        finally:
            browser.close()
            server.stop()
    print(f"timeline runs {listed}, after a reload {listed_anew}; accuracy curves {curves}")
    assert listed == listed_anew == ["", "ep3", "ep4", "ep5"] and curves == 3


def event(run: str, sequence: int, **payload) -> TelemetryEvent:
    return TelemetryEvent(run_id=run, sequence=sequence, wall_time=time.time(), **payload)


def epoch_event(run: str, sequence: int, epoch: int, alpha: float = 0.0) -> TelemetryEvent:
    return event(run, sequence, epoch=EpochReport(
        signals=TrainingSignals(epoch=epoch, max_epochs=10, val_accuracy=50.0 + epoch),
        slots=[SlotState(slot="mid", stage=3, blueprint=5, seed_id=1, alpha=alpha)]))


async def get(url: str, headers: dict | None = None) -> int:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers or {}) as response:
        return response.status


async def ws_refusal(url: str, headers: dict | None = None) -> int | None:
    """The handshake's refusal status, None when the WebSocket opened."""
    async with aiohttp.ClientSession() as session:
        try:
            async with session.ws_connect(url, headers=headers or {}):
                return None
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status


def test_esper_dashboard_late_joins_the_bus_and_guards_every_request(spawn):
    hub = start_hub(spawn)
    ctx = make_context()
    publisher = PublisherSink(hub.endpoints["publish"], ctx)
    assert publisher.wait_attached(30.0)
    published = [
        event("r1", 1, run_started=RunStarted(mode="heuristic", task="synthetic", seed=1)),
        epoch_event("r1", 2, 1),
        event("r1", 3, transition=LifecycleTransition(slot="mid", seed_id=1, blueprint=5, from_stage=3, to_stage=6,
                                                      epoch=1, reason="not ready")),
        event("r1", 5, governor=GovernorEvent(epoch=2, cause="divergence", train_loss=float("nan"), restored_epoch=1)),
        event("ppo", 1, ppo_update=PPOUpdate(update=1, entropy=2.0, approx_kl=0.01, clipfrac=0.25,
                                             explained_variance=-0.5)),
    ]
    for e in published:  # sequence 4 of r1 is never sent: a gap the page must report
        publisher.emit(e)
    dashboard = Esper("dashboard", "--hub-sub", hub.endpoints["subscribe"], "--hub-snapshot",
                      hub.endpoints["snapshot"], "--dashboard-port", "0", "--dashboard-token", TOKEN)
    try:
        base = dashboard.link()
        assert base.endswith(f"/?token={TOKEN}")
        addresses = listening_addresses(dashboard.proc.pid)  # issue 8, promise 12: default flags, loopback only
        assert addresses and all(a.split(":")[0] in LOOPBACK for a in addresses), addresses
        root = base.split("?")[0]
        port = int(root.rsplit(":", 1)[1].strip("/"))
        ws_url = root + "ws"
        origin = {"Origin": root.rstrip("/")}

        async def check() -> dict:
            statuses = {
                "page, no token": await get(root),
                "page, ?token": await get(base),
                "page, bearer": await get(root, {"Authorization": f"Bearer {TOKEN}"}),
                "page, wrong token": await get(root + "?token=" + "x" * len(TOKEN)),
                "page, foreign Host": await get(base, {"Host": f"evil.example:{port}"}),
                "page, other port in Host": await get(base, {"Host": f"127.0.0.1:{port + 1}"}),
                "page, foreign Origin": await get(base, {"Origin": "http://evil.example"}),
                "ws, no token": await ws_refusal(ws_url, origin),
                "ws, foreign Origin": await ws_refusal(f"{ws_url}?token={TOKEN}", {"Origin": "http://evil.example"}),
                "ws, null Origin": await ws_refusal(f"{ws_url}?token={TOKEN}", {"Origin": "null"}),
            }
            async with aiohttp.ClientSession() as session, \
                    session.ws_connect(f"{ws_url}?token={TOKEN}", headers=origin) as ws:
                snapshot = await asyncio.wait_for(ws.receive_json(), 30)
                publisher.emit(epoch_event("r1", 6, 2))
                live = await asyncio.wait_for(ws.receive_json(), 30)
            return {"statuses": statuses, "snapshot": snapshot, "live": live}

        result = asyncio.run(check())
    finally:
        publisher.shutdown()
        ctx.term()
    statuses, messages = result["statuses"], result["snapshot"]["messages"]
    print(f"listening on {addresses}; statuses: {statuses}")
    assert statuses == {"page, no token": 401, "page, ?token": 200, "page, bearer": 200, "page, wrong token": 401,
                        "page, foreign Host": 403, "page, other port in Host": 403, "page, foreign Origin": 403,
                        "ws, no token": 401, "ws, foreign Origin": 403, "ws, null Origin": 403}
    alerts = {m["kind"]: m["text"] for m in messages if m["type"] == "alert"}
    runs = {m["run"]: m for m in messages if m["type"] == "run"}
    ppo = next(m for m in messages if m["type"] == "ppo")
    print(f"late-join snapshot: {len(messages)} messages; alerts {alerts}; r1 lost {runs['r1']['lost']}; "
          f"PPO health {ppo['health']}; live: {result['live']}")
    assert set(alerts) == {"cull", "gap", "governor"} and "divergence" in alerts["governor"]
    assert runs["r1"]["lost"] == 1 and runs["r1"]["mode"] == "heuristic"
    assert ppo["health"] == {"entropy": "green", "approx_kl": "green", "clipfrac": "yellow",
                             "explained_variance": "red"}
    assert result["live"]["type"] == "epoch" and result["live"]["epoch"] == 2
    assert dashboard.stop(signal.SIGTERM) == 0, "".join(dashboard.lines[-20:])
    assert hub.stop() == 0


def run_all(*requests) -> list:
    async def gather():
        return await asyncio.gather(*requests)

    return asyncio.run(gather())


def test_loopback_needs_no_token_but_refuses_a_rebound_name():
    server = DashboardThread(Dashboard(DashboardConfig(port=0)), QueueSource())
    (link,) = server.start()
    try:
        port = int(link.rsplit(":", 1)[1].strip("/"))
        statuses = run_all(
            get(link), get(link, {"Host": f"localhost:{port}"}), get(link, {"Host": f"rebound.example:{port}"}),
            ws_refusal(link + "ws", {"Origin": f"http://localhost:{port}"}),
            ws_refusal(link + "ws", {"Origin": f"http://rebound.example:{port}"}))
    finally:
        server.stop()
    print(f"loopback, no token: page {statuses[:3]} (127.0.0.1, localhost, rebound name); "
          f"ws refusal {statuses[3:]} (own Origin, foreign Origin)")
    assert list(statuses) == [200, 200, 403, None, 403]


def test_off_loopback_needs_a_token(monkeypatch, capsys):
    monkeypatch.delenv("ESPER_TOKEN", raising=False)
    codes = [cli.main(["dashboard", "--dashboard-host", "0.0.0.0", "--file", "x.jsonl"]),
             cli.main(["train", "heuristic", "--task", "synthetic", "--dashboard", "--dashboard-host", "0.0.0.0"])]
    errors = capsys.readouterr().err.strip().splitlines()
    print(f"exit codes {codes}; {errors}")
    assert codes == [2, 2] and len(errors) == 2 and all("without a token" in e for e in errors)

    server = DashboardThread(Dashboard(DashboardConfig(host="0.0.0.0", port=0, token=TOKEN)), QueueSource())
    links = server.start()
    try:
        port = int(links[0].split("?")[0].rsplit(":", 1)[1].strip("/"))
        loopback = f"http://127.0.0.1:{port}/"
        statuses = run_all(get(loopback), get(f"{loopback}?token={TOKEN}"), ws_refusal(loopback + "ws"),
                           ws_refusal(f"{loopback}ws?token={TOKEN}"))
    finally:
        server.stop()
    print(f"0.0.0.0 with a token: links {links}; statuses {statuses}")
    assert links and all(link.endswith(f"?token={TOKEN}") for link in links)
    assert any("127.0.0.1" in link for link in links)
    assert list(statuses) == [401, 200, 401, None]


def test_a_request_that_is_not_http_is_answered_400_without_a_traceback(caplog):
    """aiohttp answers what it cannot parse (a URL past 8190 bytes, bytes that are not HTTP) with 400 itself,
    then had logged the parser's traceback on the terminal the dashboard shares with `esper train`."""
    import socket
    from urllib.parse import urlsplit

    server = DashboardThread(Dashboard(DashboardConfig(port=0), title="replay"), [])
    address = urlsplit(server.start()[0])
    try:
        for request in (b"GARBAGE\r\n\r\n", b"GET /?" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"):
            with socket.create_connection((address.hostname, address.port), timeout=10) as conn:
                conn.sendall(request)
                assert re.match(rb"HTTP/1\.[01] 400 ", conn.recv(64)), request[:10]
        assert asyncio.run(get(f"{address.scheme}://{address.netloc}/")) == 200
    finally:
        server.stop()
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []
