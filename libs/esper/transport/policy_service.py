"""The Tamiyo policy over gRPC: a servicer that adapts any library Policy, and RemotePolicy, a Policy
whose decisions come from a tamiyo_server (SEED RL's central inference: workers only step envs).

Build these after any fork(): gRPC's threads and sockets do not survive one (FIELD-NOTES).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterator

import grpc
from google.protobuf.message import DecodeError
from prometheus_client import Counter, Gauge, Histogram

from esper.leyline import (
    DecideBatchRequest,
    DecideBatchResponse,
    DecideRequest,
    DecideResponse,
    Decision,
    Observation,
    Operation,
    PolicyInfo,
    PolicyInfoRequest,
    enum_name,
)
from esper.leyline import tamiyo_pb2_grpc
from esper.tamiyo import Policy
from esper.tamiyo.validate import observation_problems, reason
from esper.transport.auth import call_metadata

log = logging.getLogger(__name__)

SERVICE_NAME = "esper.leyline.Tamiyo"
MAX_BATCH = 1024
"""Observations per DecideBatch: a bound on one request's work (a larger batch is INVALID_ARGUMENT)."""

CHANNEL_OPTIONS = [
    # gRPC's default reconnect backoff starts at 1 s and grows to 120 s: a restarted server would
    # sit unnoticed for minutes. Keep retrying every <= 1 s.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
SERVER_OPTIONS = [("grpc.so_reuseport", 0)]  # a second server on a busy port fails instead of sharing it

DECIDE_SECONDS = Histogram("esper_tamiyo_decide_seconds", "Time to decide one observation (policy only).",
                           buckets=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 1.0))
DECISIONS = Counter("esper_tamiyo_decisions", "Decisions served, by operation.", ["operation"])
INVALID = Counter("esper_tamiyo_invalid_requests", "Requests refused with INVALID_ARGUMENT.")
MALFORMED = Counter("esper_tamiyo_malformed_requests", "Request messages that do not parse (refused INVALID_ARGUMENT).")
RETRIES = Counter("esper_policy_client_retries", "Decide calls retried after UNAVAILABLE or a deadline.")
AVAILABLE = Gauge("esper_policy_client_available",
                  "1 while the last call to tamiyo_server was answered, 0 from its first failed attempt.")
DEFAULT_DEADLINE_S = 2.0
"""A Decide takes milliseconds; a frozen or unreachable server is noticed (and logged, and AVAILABLE
drops to 0) within one deadline, under the 3 s issue 8 asks (promise 5)."""


class PolicyNotReady(RuntimeError):
    """The server has no policy to serve yet: answered UNAVAILABLE, which RemotePolicy retries."""


class AwaitingWeights:
    """The neural policy before simic_learner has published any weights."""

    name = "ppo"
    version = ""

    def decide(self, observation: Observation) -> Decision:
        raise PolicyNotReady("no policy weights from simic_learner yet")


class Unparsable:
    """What a request that does not parse becomes, so the method can refuse it with a reason."""

    def __init__(self, why: str):
        self.why = why


class MalformedRequestCounter(grpc.ServerInterceptor):
    """Counts request messages that do not parse and refuses them with INVALID_ARGUMENT, for every kind of
    method (unary or streaming requests and responses: Health.Watch is unary-stream). Left alone, gRPC
    answers them INTERNAL ("Exception deserializing request!") and logs a traceback for each: a hostile
    client's garbage would read as the server's fault."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse, method = handler.request_deserializer, handler_call_details.method

        def counted(data: bytes):
            try:
                return parse(data)
            except DecodeError as exc:
                MALFORMED.inc()
                return Unparsable(str(exc))

        def refuse(request, context):
            if isinstance(request, Unparsable):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{method}: the request does not parse ({request.why})")
            return request

        def wrap(behaviour, streaming: bool):
            def call(request, context, *respond):  # respond: what gRPC passes an experimental_non_blocking method
                request = (refuse(r, context) for r in request) if streaming else refuse(request, context)
                return behaviour(request, context, *respond)
            # Keep a method non-blocking (Health.Watch is): a blocking Watch holds a worker thread while it lasts.
            call.experimental_non_blocking = getattr(behaviour, "experimental_non_blocking", False)
            return call

        kinds = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
        return handler._replace(request_deserializer=counted, **{
            kind: wrap(getattr(handler, kind), kind.startswith("stream")) for kind in kinds
            if getattr(handler, kind) is not None})


class TamiyoServicer(tamiyo_pb2_grpc.TamiyoServicer):
    """Adapter: proto -> validated Observation -> policy.decide -> proto. No logic of its own.

    A DecideStream holds one of the server's worker threads for as long as it is open, even idle, so at
    most `max_streams` are open at once (tamiyo_server: half its threads); one more is refused with
    RESOURCE_EXHAUSTED. Four idle streams had taken a default server's every thread: Decide and the health
    check waited past their deadlines."""

    def __init__(self, policy: Policy, max_streams: int = 1):
        self.policy = policy
        self._lock = threading.Lock()  # the server has worker threads; policies need not be thread-safe
        self.max_streams = max_streams
        self._streams = threading.BoundedSemaphore(max_streams)

    def _decide(self, obs: Observation, context: grpc.ServicerContext, where: str = "") -> Decision:
        policy = self.policy  # checks and decides with one policy, though tamiyo_server swaps in new weights
        problems = observation_problems(obs)
        if not problems and hasattr(policy, "problems"):
            problems = policy.problems(obs)
        if problems:
            INVALID.inc()
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, reason(problems, where))
        start = time.perf_counter()
        with self._lock:
            try:
                decision = policy.decide(obs)
            except PolicyNotReady as exc:
                context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        DECIDE_SECONDS.observe(time.perf_counter() - start)
        DECISIONS.labels(enum_name(Operation, decision.action.operation)).inc()
        return decision

    def Decide(self, request: DecideRequest, context) -> DecideResponse:
        if not request.HasField("observation"):
            INVALID.inc()
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "DecideRequest.observation is missing")
        return DecideResponse(decision=self._decide(request.observation, context), request_id=request.request_id)

    def DecideBatch(self, request: DecideBatchRequest, context) -> DecideBatchResponse:
        if not 1 <= len(request.observations) <= MAX_BATCH:
            INVALID.inc()
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"DecideBatch needs 1..{MAX_BATCH} observations, got {len(request.observations)}")
        return DecideBatchResponse(decisions=[self._decide(obs, context, f"observations[{i}]: ")
                                              for i, obs in enumerate(request.observations)])

    def DecideStream(self, requests: Iterator[DecideRequest], context) -> Iterator[DecideResponse]:
        if not self._streams.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, (
                f"{self.max_streams} DecideStream calls are open, as many as this server takes (half its --workers "
                "threads): use Decide or DecideBatch, or close a stream" if self.max_streams else
                "this server takes no DecideStream calls (--workers 1: a stream holds a thread while open): use "
                "Decide or DecideBatch"))
        try:
            for request in requests:
                yield DecideResponse(decision=self._decide(request.observation, context,
                                                           f"request_id {request.request_id}: "),
                                     request_id=request.request_id)
        finally:
            self._streams.release()

    def GetPolicyInfo(self, request: PolicyInfoRequest, context) -> PolicyInfo:
        return PolicyInfo(name=self.policy.name, version=self.policy.version)


class PolicyUnavailable(RuntimeError):
    """The server did not answer within the client's patience (or answered a batch with the wrong number of
    decisions), or the client was told to stop."""


class RemotePolicy:
    """A Policy (decide(Observation) -> Decision) that asks a Tamiyo server.

    Every call carries a deadline (and the token, when there is one). UNAVAILABLE and DEADLINE_EXCEEDED
    are retried with exponential backoff and jitter for up to `patience_s` (the caller keeps its state
    and simply waits: a frozen server costs time, not the episode); any other error, INVALID_ARGUMENT
    and UNAUTHENTICATED included, is raised at once. Setting `stop` (the service's stop event) ends the
    wait early with PolicyUnavailable. `available` (and the AVAILABLE gauge) says whether the last
    attempt was answered.
    """

    def __init__(self, target: str, deadline_s: float = DEFAULT_DEADLINE_S, patience_s: float = 120.0,
                 stop: threading.Event | None = None, token: str = ""):
        self.target = target
        self.deadline_s = deadline_s
        self.patience_s = patience_s
        self.stop = stop or threading.Event()
        self.metadata = call_metadata(token)
        self.available = True
        self.unavailable_since = 0.0
        AVAILABLE.set(1)
        self.channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.stub = tamiyo_pb2_grpc.TamiyoStub(self.channel)
        self.name, self.version = "remote", ""
        self.retries = 0

    def decide(self, observation: Observation) -> Decision:
        decision = self._call(self.stub.Decide, DecideRequest(observation=observation)).decision
        self.name, self.version = decision.policy_name, decision.policy_version
        return decision

    def decide_batch(self, observations: list[Observation]) -> list[Decision]:
        decisions = list(self._call(self.stub.DecideBatch, DecideBatchRequest(observations=observations)).decisions)
        if len(decisions) != len(observations):
            raise PolicyUnavailable(f"{self.target} answered {len(decisions)} decisions to {len(observations)} "
                                    f"observations")
        self.name, self.version = decisions[-1].policy_name, decisions[-1].policy_version
        return decisions

    def info(self) -> PolicyInfo:
        return self._call(self.stub.GetPolicyInfo, PolicyInfoRequest())

    def _call(self, method, request):
        give_up = time.monotonic() + self.patience_s
        backoff = 0.05
        while True:
            if self.stop.is_set():
                raise PolicyUnavailable("stopping")
            try:
                # wait_for_ready: a call made while the channel reconnects waits for it (up to the
                # deadline) instead of failing at once.
                reply = method(request, timeout=self.deadline_s, wait_for_ready=True, metadata=self.metadata)
            except grpc.RpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                self._set_available(False, exc.code().name)
                if time.monotonic() + backoff > give_up:
                    raise PolicyUnavailable(f"{self.target}: no answer in {self.patience_s:.0f} s "
                                            f"({exc.code().name})") from exc
                self.retries += 1
                RETRIES.inc()
                log.warning("tamiyo at %s: %s, retrying in %.2f s", self.target, exc.code().name, backoff)
                self.stop.wait(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, 2.0)
            else:
                self._set_available(True)
                return reply

    def _set_available(self, available: bool, why: str = "") -> None:
        """Log the edges only: the first failure and the first answer after failures."""
        if available == self.available:
            return
        self.available = available
        AVAILABLE.set(int(available))
        if available:
            log.info("tamiyo at %s: answering again after %.1f s", self.target,
                        time.monotonic() - self.unavailable_since)
        else:
            self.unavailable_since = time.monotonic()
            log.warning("tamiyo at %s: unavailable (%s)", self.target, why)

    def close(self) -> None:
        self.channel.close()
