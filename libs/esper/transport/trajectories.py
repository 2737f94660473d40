"""Distributed PPO on ZeroMQ: trajectories worker -> learner with acks, and policy weights learner -> server.

Framing is documented in proto/esper/leyline/simic.proto. Trajectories go DEALER -> ROUTER, not PUSH ->
PULL: a PUSH socket loses whatever was queued for a peer that dies, without an error (FIELD-NOTES, 951 of
2,000 lost). Here every trajectory is tagged (worker_id, incarnation, sequence), the learner acks each
one, and the worker resends what is unacked after `resend_s`; the learner applies a key once and acks
its resends as DUPLICATE (`TrajectoryInbox`), so a trajectory is learned from exactly once while both
ends live. A worker never has more than `window` trajectories unacked (credit-based backpressure: a
slow learner slows the workers instead of filling queues).

Weights are published on a PUB socket and republished every few seconds, so a tamiyo_server that
joins late or restarts (PUB/SUB slow joiner: it would miss a single publication) gets the latest.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import fields

import zmq
from google.protobuf.message import DecodeError

from esper.leyline import AckStatus, PolicyWeights, TrajectoryAck, TrajectoryHeader
from esper.simic.rollout import Rollout
from esper.transport.bus import LINGER_MS, bind_endpoint
from esper.transport.tensors import pack, unpack

POLICY_TOPIC = b"esper.policy"
ROLLOUT_FIELDS = frozenset(f.name for f in fields(Rollout))

log = logging.getLogger(__name__)


class TrajectoryInbox:
    """The learner's side of the protocol, without sockets: frames in, one ack out.

    `apply(rollout)` learns from a rollout and returns None, or a reason to refuse it. Each
    (worker_id, incarnation, sequence) is decided once; a resend gets the same answer (ACCEPTED becomes
    DUPLICATE) and is not applied again. The keys are kept for the learner's lifetime (one per shipped
    chunk of episodes: small).
    """

    def __init__(self, apply: Callable[[Rollout], str | None], version: Callable[[], int]):
        self.apply = apply
        self.version = version
        self.decided: dict[tuple[str, int, int], TrajectoryAck] = {}
        self.accepted: list[tuple[str, int, int]] = []
        self.duplicates = self.rejected = 0

    def handle(self, frames: list[bytes]) -> TrajectoryAck:
        header = TrajectoryHeader()
        try:
            if len(frames) != 2:
                raise DecodeError(f"{len(frames)} frames")
            header.ParseFromString(frames[0])
        except DecodeError as exc:
            self.rejected += 1
            return TrajectoryAck(status=AckStatus.ACK_STATUS_REJECTED, reason=f"malformed message: {exc}")
        key = (header.worker_id, header.incarnation, header.sequence)
        ids = {"worker_id": header.worker_id, "incarnation": header.incarnation, "sequence": header.sequence}
        before = self.decided.get(key)
        if before is not None:
            self.duplicates += 1
            status = AckStatus.ACK_STATUS_DUPLICATE if before.status == AckStatus.ACK_STATUS_ACCEPTED else before.status
            return TrajectoryAck(**ids, status=status, reason=before.reason, policy_version=self.version())
        try:
            tensors = unpack(frames[1])
            if set(tensors) != ROLLOUT_FIELDS:
                raise ValueError(f"tensors {sorted(tensors)} are not the Rollout fields")
            problem = self.apply(Rollout(**tensors))
        except ValueError as exc:
            problem = str(exc)
        if problem is None:
            ack = TrajectoryAck(**ids, status=AckStatus.ACK_STATUS_ACCEPTED, policy_version=self.version())
            self.accepted.append(key)
        else:
            ack = TrajectoryAck(**ids, status=AckStatus.ACK_STATUS_REJECTED, reason=problem,
                                policy_version=self.version())
            self.rejected += 1
        self.decided[key] = ack
        return ack


class TrajectorySender:
    """The worker's side: send with a sequence number, keep until acked, resend after `resend_s`."""

    def __init__(self, ctx: zmq.Context, endpoint: str, worker_id: str, resend_s: float = 5.0, window: int = 4):
        self.socket = ctx.socket(zmq.DEALER)
        self.socket.linger = LINGER_MS
        self.socket.connect(endpoint)
        self.worker_id = worker_id
        self.incarnation = secrets.randbits(63)
        self.resend_s = resend_s
        self.window = window
        self.sequence = 0
        self.unacked: dict[int, tuple[list[bytes], float]] = {}  # sequence -> (frames, last sent)
        self.acked = self.resends = self.rejected = 0
        self.learner_version = 0

    def send(self, rollout: Rollout, task: str, stop: Callable[[], bool]) -> int:
        """Ship one rollout (waiting while `window` are unacked); returns its sequence number."""
        while len(self.unacked) >= self.window and not stop():
            self.poll(self.resend_s)
        steps, envs = rollout.rewards.shape
        header = TrajectoryHeader(worker_id=self.worker_id, incarnation=self.incarnation, sequence=self.sequence,
                                  n_steps=steps, n_envs=envs, obs_dim=rollout.obs.shape[2], task=task)
        frames = [header.SerializeToString(), pack(rollout.tensors())]
        self.unacked[self.sequence] = (frames, 0.0)
        self._transmit(self.sequence)
        self.sequence += 1
        return self.sequence - 1

    def poll(self, timeout_s: float) -> None:
        """Read acks for up to timeout_s (returns at the first), then resend whatever has waited resend_s."""
        if self.socket.poll(int(timeout_s * 1000)):
            while self.socket.poll(0):
                self._ack(self.socket.recv())
        now = time.monotonic()
        for sequence, (_, sent) in list(self.unacked.items()):
            if now - sent >= self.resend_s:
                self.resends += 1
                log.info("trajectory %d unacked after %.1f s: resending", sequence, self.resend_s)
                self._transmit(sequence)

    def flush(self, timeout_s: float, stop: Callable[[], bool]) -> bool:
        """Wait (resending) until every trajectory is acked; False after timeout_s or on stop."""
        give_up = time.monotonic() + timeout_s
        while self.unacked and not stop() and time.monotonic() < give_up:
            self.poll(min(self.resend_s, max(0.0, give_up - time.monotonic())))
        return not self.unacked

    def _transmit(self, sequence: int) -> None:
        frames, _ = self.unacked[sequence]
        try:
            self.socket.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:  # the pipe to the learner is full: the resend timer tries again
            pass
        self.unacked[sequence] = (frames, time.monotonic())

    def _ack(self, payload: bytes) -> None:
        ack = TrajectoryAck()
        try:
            ack.ParseFromString(payload)
        except DecodeError:
            log.warning("malformed ack dropped")
            return
        if (ack.worker_id, ack.incarnation) != (self.worker_id, self.incarnation) or ack.sequence not in self.unacked:
            return  # an ack for a resend already acked
        del self.unacked[ack.sequence]
        self.learner_version = ack.policy_version
        if ack.status == AckStatus.ACK_STATUS_REJECTED:
            self.rejected += 1
            log.error("trajectory %d rejected by the learner: %s", ack.sequence, ack.reason)
        else:
            self.acked += 1

    def close(self) -> None:
        self.socket.close()


def weights_frames(version: int, state: dict) -> list[bytes]:
    """[topic, PolicyWeights, tensors] for a policy state (simic.learner.Learner.policy_state)."""
    header = PolicyWeights(version=version, feature_spec_json=json.dumps(state["feature_spec"]),
                           hidden_size=state["hidden_size"], clip_obs=state["clip_obs"])
    tensors = {f"network.{k}": v for k, v in state["network"].items()}
    tensors |= {f"obs_rms.{k}": v for k, v in state["obs_rms"].items()}
    return [POLICY_TOPIC, header.SerializeToString(), pack(tensors)]


def decode_weights(frames: list[bytes]) -> tuple[int, dict]:
    """The inverse of weights_frames: (version, policy state); ValueError if malformed."""
    if len(frames) != 3 or frames[0] != POLICY_TOPIC:
        raise ValueError("not a policy weights message")
    header = PolicyWeights()
    try:
        header.ParseFromString(frames[1])
    except DecodeError as exc:
        raise ValueError(f"malformed PolicyWeights: {exc}") from None
    tensors = unpack(frames[2])
    state = {"feature_spec": json.loads(header.feature_spec_json), "hidden_size": header.hidden_size,
             "clip_obs": header.clip_obs, "network": {}, "obs_rms": {}}
    for name, tensor in tensors.items():
        part, _, key = name.partition(".")
        if part not in ("network", "obs_rms"):
            raise ValueError(f"unexpected tensor {name!r}")
        state[part][key] = tensor
    return header.version, state


class WeightsPublisher:
    """The learner's PUB socket: the latest policy, sent on every update and again every `republish_s`."""

    def __init__(self, ctx: zmq.Context, host: str, port: int, republish_s: float = 2.0):
        self.socket = ctx.socket(zmq.PUB)
        self.socket.linger = LINGER_MS
        self.endpoint = bind_endpoint(self.socket, host, port)
        self.republish_s = republish_s
        self.frames: list[bytes] = []
        self.sent_at = 0.0

    def publish(self, version: int, state: dict) -> None:
        self.frames = weights_frames(version, state)
        self.republish()

    def republish(self) -> None:
        self.socket.send_multipart(self.frames)
        self.sent_at = time.monotonic()

    def seconds_to_republish(self) -> float:
        return max(0.0, self.sent_at + self.republish_s - time.monotonic())

    def close(self) -> None:
        self.socket.close()


class WeightsSubscriber:
    """tamiyo_server's SUB socket: calls `on_weights(version, state)` for each new version it receives."""

    def __init__(self, ctx: zmq.Context, endpoint: str, on_weights: Callable[[int, dict], None]):
        self.socket = ctx.socket(zmq.SUB)
        self.socket.linger = LINGER_MS
        self.socket.subscribe(POLICY_TOPIC)
        self.socket.connect(endpoint)
        self.on_weights = on_weights
        self.version: int | None = None
        self.malformed = 0

    def serve(self, stop_fd: int, is_stopped: Callable[[], bool]) -> None:
        """Receive until the stop file descriptor wakes the poll and `is_stopped()` says so."""
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(stop_fd, zmq.POLLIN)
        while not is_stopped():
            if self.socket not in dict(poller.poll()):
                continue
            try:
                version, state = decode_weights(self.socket.recv_multipart())
            except ValueError as exc:
                self.malformed += 1
                log.warning("policy weights dropped: %s", exc)
                continue
            if version != self.version:
                self.on_weights(version, state)
                self.version = version

    def close(self) -> None:
        self.socket.close()
