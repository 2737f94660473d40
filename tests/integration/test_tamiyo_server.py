"""tamiyo_server over loopback: decisions equal the library's, health and reflection answer, bad
requests get INVALID_ARGUMENT, SIGTERM exits cleanly."""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import pytest
import zmq
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from esper import experiment
from esper.leyline import (
    Blueprint,
    DecideBatchRequest,
    DecideRequest,
    Observation,
    PolicyInfoRequest,
    SeedStage,
    SlotState,
    TrainingSignals,
    tamiyo_pb2_grpc,
)
from esper.nissa import Telemetry
from esper.simic.env import EnvConfig
from esper.simic.learner import Learner
from esper.simic.trainer import TrainerConfig
from esper.tamiyo import HeuristicPolicy
from esper.tamiyo.validate import MAX_REASON_BYTES
from esper.transport.bus import bind_endpoint
from esper.tolaria.trainer import TrainConfig
from esper.transport.policy_service import RemotePolicy, TamiyoServicer
from esper.transport.trajectories import weights_frames

from procs import free_ports, metric, scrape, start_tamiyo, wait_until

BLUEPRINTS = [b for b in Blueprint.values() if b]
accuracy = st.floats(0, 100, width=32)


@st.composite
def observations(draw) -> Observation:
    """Valid observations covering every branch of the heuristic (plateaus, ready gates, harm)."""
    max_epochs = draw(st.integers(1, 80))
    history = draw(st.lists(accuracy, max_size=10))
    names = draw(st.lists(st.sampled_from(["early", "mid", "late"]), min_size=1, max_size=3, unique=True))
    slots = [SlotState(slot=name, stage=draw(st.sampled_from([s for s in SeedStage.values() if s])),
                       epochs_in_stage=draw(st.integers(0, 20)), has_contribution=draw(st.booleans()),
                       contribution=draw(st.floats(-10, 10, width=32)),
                       contribution_se=draw(st.floats(0, 3, width=32)), advance_ready=draw(st.booleans()))
             for name in names]
    signals = TrainingSignals(epoch=draw(st.integers(0, max_epochs)), max_epochs=max_epochs,
                              val_accuracy=draw(accuracy), best_val_accuracy=draw(accuracy),
                              plateau_epochs=draw(st.integers(0, 10)), val_accuracy_history=history)
    return Observation(run_id="t", signals=signals, slots=slots,
                       blueprints=draw(st.lists(st.sampled_from(BLUEPRINTS), min_size=1, unique=True)),
                       seeds_germinated=draw(st.integers(0, 5)), max_seeds=draw(st.integers(0, 5)),
                       recently_culled=draw(st.lists(st.sampled_from(BLUEPRINTS), max_size=3)))


@pytest.fixture(scope="module")
def server(spawn_module):
    """One server for the module: the tests here only read from it."""
    tamiyo = start_tamiyo(spawn_module)
    channel = grpc.insecure_channel(tamiyo.endpoints["grpc"])
    grpc.channel_ready_future(channel).result(timeout=60)
    yield tamiyo, channel
    channel.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(observations(), min_size=1, max_size=8))
def test_unary_batched_and_stream_decide_like_the_library(server, batch):
    _, channel = server
    stub = tamiyo_pb2_grpc.TamiyoStub(channel)
    expected = [HeuristicPolicy().decide(obs) for obs in batch]
    unary = [stub.Decide(DecideRequest(observation=obs), timeout=10).decision for obs in batch]
    batched = list(stub.DecideBatch(DecideBatchRequest(observations=batch), timeout=10).decisions)
    requests = (DecideRequest(observation=obs, request_id=i) for i, obs in enumerate(batch))
    streamed = list(stub.DecideStream(requests, timeout=10))
    assert unary == expected
    assert batched == expected
    assert [r.decision for r in streamed] == expected
    assert [r.request_id for r in streamed] == list(range(len(batch)))


def test_remote_policy_and_policy_info(server):
    tamiyo, _ = server
    policy = RemotePolicy(tamiyo.endpoints["grpc"], deadline_s=10)
    try:
        assert (policy.info().name, policy.info().version) == ("heuristic", "1")
        obs = Observation(signals=TrainingSignals(epoch=9, max_epochs=20, plateau_epochs=4),
                          slots=[SlotState(slot="mid", stage=SeedStage.SEED_STAGE_DORMANT)],
                          blueprints=BLUEPRINTS)
        assert policy.decide(obs) == HeuristicPolicy().decide(obs)
        assert policy.decide_batch([obs, obs]) == [HeuristicPolicy().decide(obs)] * 2
    finally:
        policy.close()


def test_open_streams_take_at_most_half_the_threads(spawn):
    """A DecideStream holds a server thread while it is open: a default server (4 threads) takes 2, refuses a
    third with RESOURCE_EXHAUSTED, and answers Decide and the health check at once beside 2 idle ones (4 had
    taken every thread: both waited past their deadlines). A closed stream frees its place."""
    tamiyo = start_tamiyo(spawn)
    request = DecideRequest(observation=observation())
    with grpc.insecure_channel(tamiyo.endpoints["grpc"]) as channel:
        stub = tamiyo_pb2_grpc.TamiyoStub(channel)
        hold = threading.Event()

        def idle_after_one():  # one request, answered (the stream is open on the server), then nothing
            yield request
            hold.wait(60)

        streams = [stub.DecideStream(idle_after_one(), timeout=60) for _ in range(2)]
        for stream in streams:
            next(stream)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.DecideStream(iter([request]), timeout=10))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
        start = time.monotonic()
        assert stub.Decide(request, timeout=2).decision == HeuristicPolicy().decide(request.observation)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert health.status == health_pb2.HealthCheckResponse.SERVING and time.monotonic() - start < 2
        streams[0].cancel()
        wait_until(lambda: stream_answers(stub, request), 10, "a stream after one was closed")
        hold.set()
    assert tamiyo.stop() == 0, tamiyo.output()


def stream_answers(stub, request: DecideRequest) -> bool:
    try:
        return len(list(stub.DecideStream(iter([request]), timeout=10))) == 1
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()  # the cancel not yet seen
        return False


def test_health_and_reflection(server):
    _, channel = server
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "esper.leyline.Tamiyo"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=10)
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"esper.leyline.Tamiyo", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


def observation(**fields) -> Observation:
    """A valid observation (for the heuristic, and for a neural policy of the synthetic host), `fields` replaced."""
    valid = {"run_id": "t", "signals": TrainingSignals(epoch=1, max_epochs=10, val_accuracy_history=[50.0]),
             "slots": [SlotState(slot="mid", stage=SeedStage.SEED_STAGE_DORMANT)], "blueprints": [1]}
    return Observation(**(valid | fields))


NAN, INF = float("nan"), float("inf")
UNUSABLE = {  # every policy: observation_problems
    "NaN in the accuracy history": observation(signals=TrainingSignals(max_epochs=10, val_accuracy_history=[1, NAN])),
    "inf in the loss history": observation(signals=TrainingSignals(max_epochs=10, val_loss_history=[INF])),
    "slot alpha NaN": observation(slots=[SlotState(slot="mid", stage=1, alpha=NAN)]),
    "slot contribution inf": observation(slots=[SlotState(slot="mid", stage=1, has_contribution=True,
                                                          contribution=INF)]),
    "two 20 KB slot names": observation(slots=[SlotState(slot="z" * 20_000, stage=1)] * 2),
    # Negative counts had failed inside the policies: the features' log1p, the heuristic's blend division.
    "slot seed_grad_norm -1": observation(slots=[SlotState(slot="mid", stage=1, seed_grad_norm=-1.0)]),
    "a blend -1 epochs in": observation(
        signals=TrainingSignals(epoch=3, max_epochs=10, val_accuracy_history=[50.0, 51.0, 52.0]),
        slots=[SlotState(slot="mid", stage=SeedStage.SEED_STAGE_BLENDING, blueprint=1, seed_id=1,
                         epochs_in_stage=-1)]),
}
INVALID = {
    **{case: DecideRequest(observation=obs) for case, obs in UNUSABLE.items()},
    "200 slots of no stage": DecideRequest(observation=observation(slots=[SlotState(slot=f"s{i}")
                                                                          for i in range(200)])),
    "a million blueprints": DecideRequest(observation=observation(blueprints=[1] * 1_000_000)),  # 2 s of checks
    "no observation": DecideRequest(),
    "no signals": DecideRequest(observation=Observation(slots=[SlotState(slot="mid", stage=1)], blueprints=[1])),
    "no slots": DecideRequest(observation=Observation(signals=TrainingSignals(max_epochs=5), blueprints=[1])),
    "unknown stage": DecideRequest(observation=Observation(signals=TrainingSignals(max_epochs=5),
                                                           slots=[SlotState(slot="mid", stage=99)], blueprints=[1])),
    "no blueprints": DecideRequest(observation=Observation(signals=TrainingSignals(max_epochs=5),
                                                           slots=[SlotState(slot="mid", stage=1)])),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_requests_get_invalid_argument(server, case):
    _, channel = server
    stub = tamiyo_pb2_grpc.TamiyoStub(channel)
    request = INVALID[case]
    calls = [lambda: stub.Decide(request, timeout=10),
             lambda: list(stub.DecideStream(iter([request]), timeout=10))]
    if request.HasField("observation"):
        calls.append(lambda: stub.DecideBatch(DecideBatchRequest(observations=[request.observation]), timeout=10))
    for call in calls:
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert 0 < len(info.value.details().encode()) <= MAX_REASON_BYTES


def test_requests_that_do_not_parse_get_invalid_argument(server):
    """Bytes that are not a DecideRequest, unary and mid-stream: INVALID_ARGUMENT with the reason."""
    _, channel = server
    garbage = b"\xff\xff\xff"
    unary = channel.unary_unary("/esper.leyline.Tamiyo/Decide")
    stream = channel.stream_stream("/esper.leyline.Tamiyo/DecideStream")
    watch = channel.unary_stream("/grpc.health.v1.Health/Watch")  # a response stream: refused all the same
    valid = DecideRequest(observation=Observation(signals=TrainingSignals(max_epochs=5),
                                                  slots=[SlotState(slot="mid", stage=1)], blueprints=[1]))
    for call in (lambda: unary(garbage, timeout=10),
                 lambda: list(stream(iter([valid.SerializeToString(), garbage]), timeout=10)),
                 lambda: list(watch(garbage, timeout=10))):
        with pytest.raises(grpc.RpcError) as info:
            call()
        print(info.value.code().name, info.value.details())
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "does not parse" in info.value.details()


def test_health_watch_streams_the_status(server):
    """Health.Watch, wrapped by the malformed-request check, still streams the status of a valid request."""
    _, channel = server
    replies = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert next(replies).status == health_pb2.HealthCheckResponse.SERVING
    replies.cancel()


def test_empty_batch_is_invalid_and_server_keeps_serving(server):
    _, channel = server
    stub = tamiyo_pb2_grpc.TamiyoStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.DecideBatch(DecideBatchRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert stub.GetPolicyInfo(PolicyInfoRequest(), timeout=10).name == "heuristic"


def test_sigterm_exits_cleanly(spawn):
    tamiyo = start_tamiyo(spawn)
    assert tamiyo.stop() == 0, tamiyo.output()
    assert "stopping" in tamiyo.output()


def test_esper_policy_query_prints_the_decision(server, tmp_path):
    from google.protobuf import json_format

    tamiyo, _ = server
    obs = Observation(signals=TrainingSignals(epoch=9, max_epochs=20, plateau_epochs=4),
                      slots=[SlotState(slot="mid", stage=SeedStage.SEED_STAGE_DORMANT)], blueprints=BLUEPRINTS)
    path = tmp_path / "obs.json"
    path.write_text(json_format.MessageToJson(obs))
    cli = [sys.executable, "-m", "esper.cli", "policy", "query", str(path), "--tamiyo", tamiyo.endpoints["grpc"]]
    out = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    expected = HeuristicPolicy().decide(obs)
    assert out.stdout.splitlines()[0].startswith("GERMINATE mid")
    assert f"reason: {expected.reason}" in out.stdout

    path.write_text(json_format.MessageToJson(Observation(signals=TrainingSignals(max_epochs=5))))
    out = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "INVALID_ARGUMENT" in out.stderr


def test_neural_policy_refuses_what_its_network_cannot_decide(spawn):
    """Slots and blueprints outside the network's FeatureSpec, and non-finite fields, are INVALID_ARGUMENT
    (counted as invalid requests), not UNKNOWN with a traceback from inside the policy."""
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    tamiyo = spawn("tamiyo_server", "--port", "0", "--metrics-port", "0", "--policy", "neural",
                   "--learner-weights", bind_endpoint(pub, "127.0.0.1", 0))
    tamiyo.wait_bound("grpc", "metrics")
    config = TrainerConfig(env=EnvConfig(task="synthetic", max_epochs=4, slots=("mid",)), n_envs=1, episodes=1)
    weights = weights_frames(1, Learner(config, Telemetry("weights")).policy_state())
    refused = {
        **UNUSABLE,
        "unknown slot": observation(slots=[SlotState(slot="bogus", stage=1)]),
        "200 slots": observation(slots=[SlotState(slot=f"s{i}" * 100, stage=1) for i in range(200)]),
        "a blueprint the host does not take": observation(blueprints=[Blueprint.BLUEPRINT_LORA]),
    }
    with grpc.insecure_channel(tamiyo.endpoints["grpc"]) as channel:
        stub = tamiyo_pb2_grpc.TamiyoStub(channel)
        deadline = time.monotonic() + 30
        while stub.GetPolicyInfo(PolicyInfoRequest(), timeout=10).version != "1":  # PUB/SUB: until it joined
            assert time.monotonic() < deadline, tamiyo.output()
            pub.send_multipart(weights)
            time.sleep(0.2)
        assert stub.Decide(DecideRequest(observation=observation()), timeout=10).decision.policy_name == "ppo"
        invalid = metric(scrape(tamiyo.endpoints["metrics"]), "esper_tamiyo_invalid_requests_total")
        for case, obs in refused.items():
            with pytest.raises(grpc.RpcError) as info:
                stub.Decide(DecideRequest(observation=obs), timeout=10)
            print(f"{case}: {info.value.code().name} {info.value.details()[:120]}")
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, info.value.details())
            assert 0 < len(info.value.details().encode()) <= MAX_REASON_BYTES
        counted = metric(scrape(tamiyo.endpoints["metrics"]), "esper_tamiyo_invalid_requests_total") - invalid
        assert counted == len(refused)
    pub.close()
    ctx.term()
    assert tamiyo.stop() == 0, tamiyo.output()
    assert "Traceback" not in tamiyo.output()


class MethodsCalled(grpc.ServerInterceptor):
    """The name of every method a server is asked, in order."""

    def __init__(self):
        self.names: list[str] = []

    def intercept_service(self, continuation, handler_call_details):
        self.names.append(handler_call_details.method.rsplit("/", 1)[-1])
        return continuation(handler_call_details)


def test_a_grouped_experiment_asks_a_remote_policy_once_an_epoch_for_all_its_runs(tmp_path):
    """A tolaria worker's grouped runs (experiment.run_grouped with a RemotePolicy) are decided in one
    DecideBatch per epoch, not a Decide per run, and each run gets its own observation's decision: the runs
    end as the same experiment decided in-process does."""
    called = MethodsCalled()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=[called])
    tamiyo_pb2_grpc.add_TamiyoServicer_to_server(TamiyoServicer(HeuristicPolicy()), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    env = EnvConfig(task="synthetic", max_epochs=12, train=TrainConfig(max_batches=3))
    cfg = experiment.RunConfig(mode="heuristic", env=env, episodes=3, grouped=True,
                               runs_dir=str(tmp_path / "remote" / "seed{seed}"))
    remote = RemotePolicy(f"127.0.0.1:{port}")
    try:
        asked = experiment.run(cfg, console=Console(file=io.StringIO()), policy=remote)
    finally:
        remote.close()
        server.stop(None)
    local = experiment.run(dataclasses.replace(cfg, runs_dir=str(tmp_path / "local" / "seed{seed}")),
                           console=Console(file=io.StringIO()))
    assert called.names == ["DecideBatch"] * env.max_epochs
    assert remote.name == HeuristicPolicy.name
    assert any(summary["seeds"] for summary in local)  # the heuristic grew: decisions other than WAIT were routed
    for a, b in zip(asked, local, strict=True):
        assert {k: v for k, v in a.items() if k not in ("run_id", "wall_seconds")} == \
            {k: v for k, v in b.items() if k not in ("run_id", "wall_seconds")}


OBS = Observation(signals=TrainingSignals(epoch=9, max_epochs=20, plateau_epochs=4),
                  slots=[SlotState(slot="mid", stage=SeedStage.SEED_STAGE_DORMANT)], blueprints=BLUEPRINTS)


class CountedStop(threading.Event):
    """A stop event whose waits (the retry backoffs) return at once, recorded; set after `after` of them."""

    def __init__(self, after: int):
        super().__init__()
        self.waits: list[float] = []
        self.after = after

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        if len(self.waits) == self.after:
            self.set()
        return self.is_set()


def test_a_policy_unanswered_backs_off_to_at_most_2_s_and_stops_when_told():
    """Retries double from 0.05 s to at most 2 s (jittered down), so a tamiyo restarted is found within about 2 s
    (uncapped, the wait had grown to ~50 s within the patience); the stop event ends them at once, not the
    patience (120 s) later (a mutation of each survived every test)."""
    from esper.transport.policy_service import PolicyUnavailable

    (port,) = free_ports()  # nothing listens there: every call fails, as for a tamiyo that is down
    stop = CountedStop(after=12)
    policy = RemotePolicy(f"127.0.0.1:{port}", deadline_s=0.02, patience_s=120.0, stop=stop)
    started = time.monotonic()
    try:
        with pytest.raises(PolicyUnavailable, match="stopping"):
            policy.decide(OBS)
    finally:
        policy.close()
    print(f"waits {[round(w, 3) for w in stop.waits]}, stopped after {time.monotonic() - started:.2f} s")
    assert len(stop.waits) == 12 and time.monotonic() - started < 10
    assert max(stop.waits) <= 2.0 and stop.waits[-1] >= 1.0  # capped at 2 s, jittered by 0.5..1


class ShortBatches(TamiyoServicer):
    """A server that answers a DecideBatch with one decision fewer than it was asked."""

    def DecideBatch(self, request, context):
        answer = super().DecideBatch(request, context)
        del answer.decisions[-1]
        return answer


def test_a_batch_answered_short_is_no_answer():
    """Runs are decided by position in a batch: an answer short of one decision is PolicyUnavailable, never
    decisions handed to the wrong runs (a mutation dropping the check survived every test)."""
    from esper.transport.policy_service import PolicyUnavailable

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    tamiyo_pb2_grpc.add_TamiyoServicer_to_server(ShortBatches(HeuristicPolicy()), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    policy = RemotePolicy(f"127.0.0.1:{port}", deadline_s=10)
    try:
        with pytest.raises(PolicyUnavailable, match="answered 1 decisions to 2 observations"):
            policy.decide_batch([OBS, OBS])
    finally:
        policy.close()
        server.stop(None)
