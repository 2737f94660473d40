"""Issue 8, promise 12 (second half): with a token, every listening socket of every service refuses
whoever lacks it (gRPC UNAUTHENTICATED, HTTP 401, ZeroMQ: the PLAIN handshake fails and nothing
arrives) and serves whoever has it; off loopback, a service without a token refuses to start.

The token check does not look at the address, so everything here stays on 127.0.0.1.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request

import grpc
import pytest
import zmq
from grpc_health.v1 import health_pb2, health_pb2_grpc
from procs import REPO, metric, scrape, wait_until

from esper.leyline import (
    AckStatus,
    DecideRequest,
    EpochReport,
    Observation,
    SlotState,
    TelemetryEvent,
    TrainingSignals,
    TrajectoryAck,
    tamiyo_pb2_grpc,
)
from esper.transport.auth import call_metadata
from esper.transport.bus import PublisherSink, Subscriber, make_context

TOKEN = secrets.token_hex(16)
OBSERVATION = Observation(run_id="t", signals=TrainingSignals(epoch=1, max_epochs=10),
                          slots=[SlotState(slot="mid", stage=1)], blueprints=[1])
SERVICES = {  # name -> arguments that would bind every socket on a free port
    "nissa_hub": ["--pub-port", "0", "--sub-port", "0", "--snapshot-port", "0", "--metrics-port", "0"],
    "tamiyo_server": ["--port", "0", "--metrics-port", "0"],
    "karn": ["--metrics-port", "0"],
    "tolaria_worker": ["--task", "synthetic", "--metrics-port", "0", "--exit-when-done"],
    "simic_learner": ["--task", "synthetic", "--port", "0", "--weights-port", "0", "--metrics-port", "0",
                      "--hub-pub", ""],
}


def env_without_token() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "ESPER_TOKEN"} | {"OMP_NUM_THREADS": "1"}


def test_non_loopback_bind_without_token_exits_2():
    """All five services at once, each asked for 0.0.0.0 (on free ports, should the refusal fail)."""
    results = run_all({name: ([sys.executable, "-m", f"services.{name}", "--host", "0.0.0.0", *args],
                              env_without_token()) for name, args in SERVICES.items()})
    for name, out in results.items():
        print(f"{name}: exit {out.returncode}: {out.stderr.strip()}")
    for name, out in results.items():
        assert out.returncode == 2, (name, out.stdout, out.stderr)
        assert out.stderr.count("\n") == 1 and "without a token" in out.stderr, (name, out.stderr)


def test_a_short_token_is_refused_even_on_loopback():
    out = subprocess.run([sys.executable, "-m", "services.nissa_hub", *SERVICES["nissa_hub"], "--token", "short"],
                         cwd=REPO, env=env_without_token(), capture_output=True, text=True, timeout=60)
    print(out.stderr.strip())
    assert out.returncode == 2 and "at least 16" in out.stderr


def http_status(url: str, token: str = "") -> int:
    request = urllib.request.Request(url, headers=dict(call_metadata(token)))
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture(scope="module")
def stack(spawn_module, tmp_path_factory):
    """hub, tamiyo_server, karn, simic_learner and one short worker episode, all with the token."""
    spawn = spawn_module
    token = ["--token", TOKEN]
    hub = spawn("nissa_hub", *SERVICES["nissa_hub"], *token)
    tamiyo = spawn("tamiyo_server", *SERVICES["tamiyo_server"], *token)
    learner = spawn("simic_learner", *SERVICES["simic_learner"], "--runs-dir", str(tmp_path_factory.mktemp("l")),
                    *token)
    hub.wait_bound("publish", "subscribe", "snapshot", "metrics")
    karn = spawn("karn", "--hub-sub", hub.endpoints["subscribe"], "--hub-snapshot", hub.endpoints["snapshot"],
                 "--metrics-port", "0", *token)
    tamiyo.wait_bound("grpc", "metrics")
    worker = spawn("tolaria_worker", "--task", "synthetic", "--max-epochs", "3", "--max-batches", "2",
                   "--device", "cpu", "--tamiyo", tamiyo.endpoints["grpc"], "--hub-pub", hub.endpoints["publish"],
                   "--metrics-port", "0", "--runs-dir", str(tmp_path_factory.mktemp("runs")), *token)
    karn.wait_bound("metrics")
    worker.wait_bound("metrics")
    learner.wait_bound("trajectories", "weights", "metrics")
    return {"hub": hub, "tamiyo": tamiyo, "karn": karn, "worker": worker, "learner": learner}


def test_http_metrics_need_the_token(stack):
    for name in ("hub", "tamiyo", "karn", "worker", "learner"):
        url = stack[name].endpoints["metrics"]
        statuses = (http_status(url), http_status(url, "x" * 32), http_status(url, TOKEN))
        print(f"{name} /metrics: no token {statuses[0]}, wrong token {statuses[1]}, token {statuses[2]}")
        assert statuses == (401, 401, 200)


def test_grpc_calls_need_the_token(stack):
    with grpc.insecure_channel(stack["tamiyo"].endpoints["grpc"]) as channel:
        tamiyo = tamiyo_pb2_grpc.TamiyoStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        calls = {
            "Decide": lambda md: tamiyo.Decide(DecideRequest(observation=OBSERVATION), timeout=30, metadata=md),
            "DecideStream": lambda md: list(tamiyo.DecideStream(iter([DecideRequest(observation=OBSERVATION)]),
                                                                timeout=30, metadata=md)),
            "Health.Check": lambda md: health.Check(health_pb2.HealthCheckRequest(), timeout=30, metadata=md),
        }
        for name, call in calls.items():
            for metadata in ((), call_metadata("y" * 32)):
                with pytest.raises(grpc.RpcError) as refused:
                    call(metadata)
                print(f"{name} without the token: {refused.value.code().name}")
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert call(call_metadata(TOKEN))


def run_all(commands: dict[str, tuple[list[str], dict[str, str]]]) -> dict[str, subprocess.CompletedProcess]:
    """Run the commands at once (each imports the CLI: seconds on a loaded machine); name -> result."""
    procs = {name: subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (argv, env) in commands.items()}
    results = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=120)
            results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        for proc in procs.values():
            proc.kill()
    return results


def test_cli_sends_the_token(stack, tmp_path):
    from google.protobuf import json_format
    obs = tmp_path / "obs.json"
    obs.write_text(json_format.MessageToJson(OBSERVATION))
    query = [sys.executable, "-m", "esper.cli", "policy", "query", str(obs), "--tamiyo",
             stack["tamiyo"].endpoints["grpc"]]
    ports = {"ESPER_TAMIYO_PORT": str(stack["tamiyo"].port("grpc"))} | {
        f"ESPER_{name.upper()}_METRICS_PORT": str(stack[name].port("metrics"))
        for name in ("hub", "tamiyo", "karn", "worker", "learner")}
    status = [sys.executable, "-m", "esper.cli", "stack", "status"]
    without, with_token = env_without_token() | ports, env_without_token() | ports | {"ESPER_TOKEN": TOKEN}
    r = run_all({"query refused": (query, without), "query served": (query, with_token),
                 "status refused": (status, without), "status served": (status, with_token)})
    print(f"esper policy query: without {r['query refused'].returncode} ({r['query refused'].stderr.strip()}), "
          f"with {r['query served'].returncode}; esper stack status: without {r['status refused'].returncode} "
          f"({r['status refused'].stdout.count('UNAUTHENTICATED')} UNAUTHENTICATED, "
          f"{r['status refused'].stdout.count('Unauthorized')} HTTP 401), with {r['status served'].returncode} "
          f"({r['status served'].stdout.count('SERVING')} SERVING)")
    assert r["query refused"].returncode == 1 and "UNAUTHENTICATED" in r["query refused"].stderr
    assert r["query served"].returncode == 0, r["query served"].stderr
    assert r["status refused"].returncode == 1 and "SERVING" not in r["status refused"].stdout
    assert r["status served"].returncode == 0 and r["status served"].stdout.count("SERVING") == 6


def test_the_bus_needs_the_token(stack):
    """A publisher or subscriber without the token is never attached; the run the worker published
    with it reached karn whole (worker -> hub -> karn, all PLAIN)."""
    hub = stack["hub"].endpoints
    ctx = make_context()
    stranger = PublisherSink(hub["publish"], ctx)
    assert not stranger.wait_attached(2.0)
    listener = Subscriber(ctx, hub["subscribe"], hub["snapshot"])
    friend = PublisherSink(hub["publish"], token=TOKEN)
    assert friend.wait_attached(30.0)
    event = TelemetryEvent(run_id="auth", sequence=1, epoch=EpochReport(signals=TrainingSignals(epoch=1)))
    stranger.emit(event)
    friend.emit(event)
    wait_until(lambda: scrape_with_token(stack["karn"], "esper_karn_events_received_total", kind="epoch") >= 4,
               120, "karn to receive the worker's 3 epochs and the friend's event")
    heard = listener.socket.poll(1000)
    print(f"stranger attached: False; stranger subscriber heard anything: {bool(heard)}; "
          f"karn epochs: {scrape_with_token(stack['karn'], 'esper_karn_events_received_total', kind='epoch')}")
    assert not heard
    assert scrape_with_token(stack["hub"], "esper_bus_messages_forwarded_total") == \
        scrape_with_token(stack["karn"], "esper_karn_events_received_total")
    for sock in (stranger, friend):
        sock.shutdown()
    listener.close()
    ctx.term()


def scrape_with_token(service, name: str, **labels) -> float:
    return metric(scrape(service.endpoints["metrics"], TOKEN), name, **labels)


def test_the_learner_needs_the_token(stack):
    """A trajectory socket without the token gets no ack at all; with it, even garbage is answered."""
    endpoint = stack["learner"].endpoints["trajectories"]
    answered = {}
    for who, token in (("stranger", ""), ("friend", TOKEN)):
        ctx = make_context(token)
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(endpoint)
        dealer.send_multipart([b"not a header", b"not tensors"])
        start = time.monotonic()
        answered[who] = bool(dealer.poll(3000 if token else 2000))
        if answered[who]:
            ack = TrajectoryAck.FromString(dealer.recv())
            print(f"{who}: {AckStatus.Name(ack.status)} ({ack.reason}) after {time.monotonic() - start:.3f} s")
        dealer.close()
        ctx.term()
    print(f"learner answered: {answered}")
    assert answered == {"stranger": False, "friend": True}
