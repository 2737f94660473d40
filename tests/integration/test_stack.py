"""The whole stack on loopback (hub, tamiyo_server, karn, one tolaria_worker), one heuristic episode on
`synthetic` with tamiyo_server SIGKILLed and restarted mid-episode, then a real Prometheus scraping it.

One module-scoped episode feeds every test here: an episode is the expensive part.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.parse
import urllib.request

import pytest
from procs import LOOPBACK, REPO, free_ports, listening_addresses, metric, scrape, start_hub, start_tamiyo, wait_until

from esper.leyline import EpochReport, TelemetryEvent, TrainingSignals
from esper.transport.bus import PublisherSink, make_context

EPOCHS = 20
DASHBOARD = REPO / "ops" / "grafana" / "dashboards" / "esper.json"


@pytest.fixture(scope="module")
def stack(spawn_module, tmp_path_factory):
    spawn = spawn_module
    hub = start_hub(spawn)
    tamiyo = start_tamiyo(spawn)
    karn = spawn("karn", "--hub-sub", hub.endpoints["subscribe"], "--hub-snapshot", hub.endpoints["snapshot"],
                 "--metrics-port", "0")
    karn.wait_bound("metrics")
    runs = tmp_path_factory.mktemp("runs")
    learner = spawn("simic_learner", "--task", "synthetic", "--port", "0", "--weights-port", "0", "--metrics-port", "0",
                    "--hub-pub", "", "--save", str(runs / "learner.pt"))
    learner.wait_bound("metrics")
    worker = spawn("tolaria_worker", "--task", "synthetic", "--max-epochs", str(EPOCHS), "--device", "cpu",
                   "--tamiyo", tamiyo.endpoints["grpc"], "--hub-pub", hub.endpoints["publish"],
                   "--metrics-port", "0", "--runs-dir", str(runs), "--deadline-s", "2")
    worker.wait_bound("metrics")
    karn_url = karn.endpoints["metrics"]

    # The fault: SIGKILL tamiyo_server mid-episode, let the worker notice, start it again on its port.
    wait_until(lambda: metric(scrape(karn_url), "esper_run_epoch") >= 3, 120, "epoch 3 of the episode")
    tamiyo.kill()
    wait_until(lambda: metric(scrape(worker.endpoints["metrics"]), "esper_policy_client_retries_total") >= 1,
               60, "the worker to retry Decide")
    epoch_at_restart = metric(scrape(karn_url), "esper_run_epoch")
    restarted = start_tamiyo(spawn, port=tamiyo.port("grpc"))
    wait_until(lambda: metric(scrape(karn_url), "esper_run_finished") == 1, 180, "the episode to finish")
    # RunFinished is sent before the worker exports the model and writes summary.json: a loaded machine had
    # let a test look for the summary in between
    wait_until(lambda: any(runs.glob("*/summary.json")), 60, "the episode's summary.json")
    return {"hub": hub, "tamiyo": restarted, "karn": karn, "worker": worker, "learner": learner, "runs": runs,
            "epoch_at_restart": epoch_at_restart}


def test_episode_survives_tamiyo_sigkill_with_every_epoch(stack):
    karn = scrape(stack["karn"].endpoints["metrics"])
    assert stack["epoch_at_restart"] < EPOCHS, "the fault was not mid-episode"
    assert metric(karn, "esper_run_epoch") == EPOCHS
    assert metric(karn, "esper_karn_events_received_total", kind="epoch") == EPOCHS
    assert metric(karn, "esper_run_decisions_total") == EPOCHS  # one decision per epoch, none lost
    assert metric(karn, "esper_karn_events_lost_total") == 0
    assert metric(scrape(stack["worker"].endpoints["metrics"]), "esper_policy_client_retries_total") >= 1
    summary, = stack["runs"].glob("*/summary.json")
    assert json.loads(summary.read_text())["epochs"] == EPOCHS


def test_karn_metrics_describe_the_run(stack):
    karn = scrape(stack["karn"].endpoints["metrics"])
    assert 0 < metric(karn, "esper_run_val_accuracy_percent") <= 100
    assert metric(karn, "esper_run_train_loss") > 0
    assert metric(karn, "esper_run_seeds") >= 1  # every enabled slot is in some stage
    assert metric(karn, "esper_run_epoch_duration_seconds") > 0
    hub = scrape(stack["hub"].endpoints["metrics"])
    assert metric(hub, "esper_bus_messages_forwarded_total") == metric(karn, "esper_karn_events_received_total")


def dashboard_exprs() -> list[str]:
    return [t["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"] for t in panel["targets"]]


@pytest.fixture(scope="module")
def prometheus(stack, tmp_path_factory):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (.ci/run installs Debian's package)")
    tmp = tmp_path_factory.mktemp("prometheus")
    jobs = {"nissa_hub": stack["hub"], "tamiyo_server": stack["tamiyo"], "tolaria_worker": stack["worker"],
            "karn": stack["karn"], "simic_learner": stack["learner"]}
    config = {"global": {"scrape_interval": "1s"}, "scrape_configs": [
        {"job_name": job, "static_configs": [{"targets": [urllib.parse.urlsplit(s.endpoints["metrics"]).netloc]}]}
        for job, s in jobs.items()]}
    (tmp / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    address = f"127.0.0.1:{free_ports()[0]}"
    proc = subprocess.Popen([binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
                             f"--web.listen-address={address}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield f"http://{address}"
    finally:
        proc.kill()
        proc.wait(10)


def query(base: str, expr: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        reply = json.loads(urllib.request.urlopen(url, timeout=5).read())
    except OSError:  # not listening yet
        return []
    assert reply["status"] == "success", reply
    return reply["data"]["result"]


def test_every_dashboard_query_returns_data_from_prometheus(prometheus):
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    for expr in exprs:  # FIELD-NOTES: the first sample takes ~6 s; rate() needs two
        wait_until(lambda: query(prometheus, expr), 60, f"data for {expr!r}", interval_s=0.5)
    up = query(prometheus, "up")
    assert {r["metric"]["job"] for r in up if r["value"][1] == "1"} == {"nissa_hub", "tamiyo_server",
                                                                          "tolaria_worker", "karn", "simic_learner"}


def test_promtool_accepts_ops_config():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (.ci/run installs Debian's prometheus package)")
    out = subprocess.run([promtool, "check", "config", str(REPO / "ops" / "prometheus.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_esper_stack_status_reports_every_process_serving(stack):
    ports = {"ESPER_HUB_METRICS_PORT": stack["hub"].port("metrics"), "ESPER_TAMIYO_PORT": stack["tamiyo"].port("grpc"),
             "ESPER_TAMIYO_METRICS_PORT": stack["tamiyo"].port("metrics"),
             "ESPER_WORKER_METRICS_PORT": stack["worker"].port("metrics"),
             "ESPER_KARN_METRICS_PORT": stack["karn"].port("metrics"),
             "ESPER_LEARNER_METRICS_PORT": stack["learner"].port("metrics")}
    env = os.environ | {name: str(port) for name, port in ports.items()}
    out = subprocess.run([sys.executable, "-m", "esper.cli", "stack", "status"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("SERVING") == 6


def test_a_stack_on_the_ipv6_loopback(spawn):
    """`--host ::1` (or ESPER_HOST=::1): every service listens there, an event crosses the hub to Karn, and
    `esper stack status` finds each one (IPv6 addresses had gone unbracketed: the hub died in a ZMQError, gRPC
    could not bind, and the endpoints ESPER_HOST made were refused by the flags' own types)."""
    ipv6 = ("--host", "::1")
    hub = spawn("nissa_hub", *ipv6, "--pub-port", "0", "--sub-port", "0", "--snapshot-port", "0", "--metrics-port", "0")
    hub.wait_bound("publish", "subscribe", "snapshot", "metrics")
    tamiyo = spawn("tamiyo_server", *ipv6, "--port", "0", "--metrics-port", "0")
    karn = spawn("karn", *ipv6, "--hub-sub", hub.endpoints["subscribe"], "--hub-snapshot", hub.endpoints["snapshot"],
                 "--metrics-port", "0")
    tamiyo.wait_bound("grpc", "metrics")
    karn.wait_bound("metrics")
    assert hub.endpoints["publish"].startswith("tcp://[::1]:") and tamiyo.endpoints["grpc"].startswith("[::1]:")

    ctx = make_context()
    publisher = PublisherSink(hub.endpoints["publish"], ctx)
    assert publisher.wait_attached(30.0)
    publisher.emit(TelemetryEvent(run_id="v6", sequence=1,
                                  epoch=EpochReport(signals=TrainingSignals(epoch=7, max_epochs=10))))
    wait_until(lambda: metric(scrape(karn.endpoints["metrics"]), "esper_run_epoch", run_id="v6") == 7, 60,
               "Karn to see the event")
    publisher.shutdown()
    ctx.term()

    env = os.environ | {"ESPER_HOST": "::1", "ESPER_HUB_METRICS_PORT": str(hub.port("metrics")),
                        "ESPER_TAMIYO_PORT": str(tamiyo.port("grpc")),
                        "ESPER_TAMIYO_METRICS_PORT": str(tamiyo.port("metrics")),
                        "ESPER_KARN_METRICS_PORT": str(karn.port("metrics")),
                        "ESPER_WORKER_METRICS_PORT": "-1", "ESPER_LEARNER_METRICS_PORT": "-1"}
    out = subprocess.run([sys.executable, "-m", "esper.cli", "stack", "status"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.count("SERVING") == 4, out.stdout + out.stderr
    assert "[::1]:" in out.stdout
    for service in (hub, tamiyo, karn):
        addresses = listening_addresses(service.proc.pid)
        assert addresses and all(a.split(":")[0] == "00000000000000000000000001000000" for a in addresses), \
            (service.name, addresses)  # ::1 as /proc/net/tcp6 writes it


def test_the_listener_scan_sees_a_wildcard_bind():
    """The check below can fail: a socket bound to every interface shows up as 00000000."""
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        mine = listening_addresses(os.getpid())
    assert any(a.split(":")[0] not in LOOPBACK for a in mine), mine


def test_every_listening_socket_is_on_loopback_by_default(stack):
    """Issue 8, promise 12: with default flags (no --host) no service listens beyond 127.0.0.1."""
    for name in ("hub", "tamiyo", "karn", "worker", "learner"):
        addresses = listening_addresses(stack[name].proc.pid)
        assert addresses, f"{name} listens on nothing?"
        assert all(a.split(":")[0] in LOOPBACK for a in addresses), (name, addresses)


def test_services_exit_cleanly_on_sigterm(stack):
    """Last: stops the module's stack. Every service returns 0 from SIGTERM."""
    for name in ("worker", "learner", "karn", "tamiyo", "hub"):
        assert stack[name].stop() == 0, stack[name].output()
