"""Distributed PPO on ZeroMQ: trajectories worker -> learner with acks, and policy weights learner -> server.

Framing is documented in proto/esper/leyline/simic.proto. Trajectories go DEALER -> ROUTER, not PUSH ->
PULL: a PUSH socket loses whatever was queued for a peer that dies, without an error (FIELD-NOTES, 951 of
2,000 lost). Here every trajectory is tagged (worker_id, incarnation, sequence), the learner acks each
one, and the worker resends what is unacked after `resend_s`; the learner applies a key once and acks
its resends as DUPLICATE (`TrajectoryInbox`), so a trajectory is learned from exactly once. Restarts
lose nothing either: a worker spools each trajectory to disk before sending it and deletes it once
acked (`Spool`; a restarted worker resends what is there under the old keys), and the learner acks
only what its committed checkpoint holds, keys included (issue 8, promises 1 and 2). A worker never
has more than `window` trajectories unacked (credit-based backpressure: a slow learner slows the
workers instead of filling queues).

Weights are published on a PUB socket and republished every few seconds, so a tamiyo_server that
joins late or restarts (PUB/SUB slow joiner: it would miss a single publication) gets the latest.
"""

from __future__ import annotations

import json
import logging
import math
import reprlib
import secrets
import struct
import time
from collections.abc import Callable
from pathlib import Path

import zmq
from google.protobuf.message import DecodeError
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from esper.durable import lock_exclusively, write_durably
from esper.leyline import AckStatus, PolicyWeights, TrajectoryAck, TrajectoryHeader
from esper.simic.rollout import Rollout
from esper.transport.bus import LINGER_MS, bind_endpoint
from esper.transport.limits import MAX_REWARDS_JSON_CHARS, MAX_SUBSCRIPTION_BYTES, MAX_WORKER_ID_CHARS
from esper.transport.tensors import pack, unpack

POLICY_TOPIC = b"esper.policy"

log = logging.getLogger(__name__)

Key = tuple[str, int, int]
"""(worker_id, incarnation, sequence): what the learner decides once."""
DECISIONS = frozenset((AckStatus.ACK_STATUS_ACCEPTED, AckStatus.ACK_STATUS_DUPLICATE, AckStatus.ACK_STATUS_REJECTED))
"""The ack statuses that settle a trajectory; any other (a newer learner's, a hostile one's) leaves it unacked."""


class TrajectoryInbox:
    """The learner's side of the protocol, without sockets: frames in, one ack out.

    `apply(rollout)` learns from a rollout and returns None, or a reason to refuse it. Each
    (worker_id, incarnation, sequence) is decided once; a resend gets the same answer (ACCEPTED becomes
    DUPLICATE) and is not applied again. The keys are kept for the learner's lifetime (one per shipped
    chunk of episodes: small) and across restarts: `state()` goes into the learner's checkpoint, which
    is committed before any ack of what it holds is sent (services/simic_learner).
    """

    def __init__(self, apply: Callable[[Rollout], str | None], version: Callable[[], int], task: str = "",
                 rewards: dict | None = None):
        self.apply = apply
        self.version = version
        self.task = task
        """The learner's task: a trajectory played on another is refused (its features may fit all the same)."""
        self.rewards = rewards
        """The learner's RewardConfig as plain values: a trajectory whose rewards were recorded with other
        settings is refused (one from a worker older than the header's rewards_json is taken as it is)."""
        self.decided: dict[Key, TrajectoryAck] = {}
        self.accepted: list[Key] = []
        self.duplicates = self.rejected = 0

    def state(self) -> dict:
        """Every decision (in order) and the counters, as plain values."""
        return {"decided": [[*key, ack.status, ack.reason] for key, ack in self.decided.items()],
                "duplicates": self.duplicates, "rejected": self.rejected}

    def load(self, state: dict) -> None:
        self.decided = {(w, i, s): TrajectoryAck(worker_id=w, incarnation=i, sequence=s, status=status, reason=reason)
                        for w, i, s, status, reason in state["decided"]}
        self.accepted = [key for key, ack in self.decided.items() if ack.status == AckStatus.ACK_STATUS_ACCEPTED]
        self.duplicates, self.rejected = state["duplicates"], state["rejected"]

    def metrics(self) -> dict[str, tuple[str, Callable[[], float]]]:
        """For LiveMetrics: what the learner has decided (restored with its checkpoint)."""
        return {
            "esper_simic_trajectories_accepted_total": ("Trajectories learned from, each once.",
                                                        lambda: len(self.accepted)),
            "esper_simic_trajectory_duplicates_total": ("Resends of a decided trajectory, acked, not applied.",
                                                        lambda: self.duplicates),
            "esper_simic_trajectories_rejected_total": ("Trajectories refused (malformed, mismatched, too stale).",
                                                        lambda: self.rejected),
        }

    def handle(self, frames: list[bytes]) -> TrajectoryAck:
        header = TrajectoryHeader()
        try:
            if len(frames) != 2:
                raise DecodeError(f"{len(frames)} frames")
            header.ParseFromString(frames[0])
            if len(header.worker_id) > MAX_WORKER_ID_CHARS:
                raise DecodeError(f"a worker_id of {len(header.worker_id)} characters (at most {MAX_WORKER_ID_CHARS})")
            if len(header.rewards_json) > MAX_REWARDS_JSON_CHARS:
                raise DecodeError(f"a rewards_json of {len(header.rewards_json)} characters (at most "
                                  f"{MAX_REWARDS_JSON_CHARS})")
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
        if self.task and header.task != self.task:
            problem = f"played on task {header.task!r}; this learner learns {self.task!r}"
        elif self.rewards is not None and header.rewards_json:
            problem = other_rewards(header.rewards_json, self.rewards)
        else:
            problem = None
        if problem is None:
            try:
                problem = self.apply(Rollout.from_tensors(unpack(frames[1])))
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


def other_rewards(rewards_json: str, ours: dict) -> str | None:
    """Why rewards recorded with the settings `rewards_json` (a trajectory header's) are not the learner's
    `ours`, naming each setting that differs; None when they are the same."""
    try:
        theirs = json.loads(rewards_json)
    except (ValueError, RecursionError):  # RecursionError: nested past what the parser follows ("[[[[...")
        theirs = None
    if not isinstance(theirs, dict):
        return "malformed message: rewards_json is not a JSON object"
    differ = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))
    return ("rewards recorded with other settings: " + ", ".join(
        f"{reprlib.repr(k)[1:-1]} {reprlib.repr(theirs.get(k))} (this learner's: {ours.get(k)!r})" for k in differ)
        ) if differ else None


SPOOL_MAGIC = b"ESPERTJ1"
SPOOL_HEAD = struct.Struct("<8sQI")  # magic, progress, header length; then the header, then the tensors frame


class SpoolBusy(RuntimeError):
    """Another live worker holds this spool directory."""


class SpoolCorrupt(ValueError):
    """A file in the spool is not a whole spooled trajectory (cut short, or not the spool's own): what to do
    with its episodes is the user's call, so the worker stops on it instead of dropping it."""


class Spool:
    """A worker's trajectories on disk from before they are sent until the learner acks them.

    A worker killed with trajectories unacked loses nothing: the next process with the same directory
    resends them byte for byte, under their old (worker_id, incarnation, sequence) keys, so the learner
    recognizes one it had already accepted as DUPLICATE. Each entry is written atomically and durably
    (`write_durably`): a kill or a power cut leaves it whole or absent. Each carries the producer's `progress` when
    it was spooled (a worker: the episodes it has played); `progress` is the largest ever spooled, kept in
    `progress.json` before an acked entry is deleted, so a restarted worker neither replays nor skips a
    round. A lock file (flock) keeps a second live process off the directory.
    """

    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._lock = lock_exclusively(directory / ".lock")
        if self._lock is None:
            raise SpoolBusy(f"{directory} is in use by another worker (give each worker its own "
                            f"--worker-id or --spool-dir)")
        for torn in directory.glob("*.tmp"):  # a write that a kill interrupted: never an entry
            if not torn.is_file():  # nothing a write leaves: a folder had been an IsADirectoryError traceback
                raise SpoolCorrupt(f"{torn} is not a file: move it out of the spool to start")
            torn.unlink()
        self.progress = self._read_progress(directory / "progress.json")
        self.entries: dict[Key, tuple[int, int]] = {}  # key -> (bytes on disk, progress)

    @staticmethod
    def _read_progress(path: Path) -> int:
        """progress.json's value; 0 if there is none, or none readable (torn by a crash: `load` then raises it to
        the largest progress of the entries still spooled)."""
        try:
            progress = json.loads(path.read_text())["progress"]
        except FileNotFoundError:
            return 0
        except (ValueError, KeyError, TypeError):
            progress = None
        if type(progress) is not int:
            log.warning("%s is unreadable: progress from the spooled entries only", path)
            return 0
        return progress

    def load(self) -> dict[Key, list[bytes]]:
        """Every spooled trajectory's frames, by key (oldest first); SpoolCorrupt names a file that is not one."""
        found = {}
        for path in sorted(self.directory.glob("*.traj"), key=lambda p: p.lstat().st_mtime_ns):
            try:
                blob = path.read_bytes()
                magic, progress, length = SPOOL_HEAD.unpack_from(blob)
                if magic != SPOOL_MAGIC or SPOOL_HEAD.size + length > len(blob):
                    raise ValueError("another format, or cut short")
                frames = [blob[SPOOL_HEAD.size:SPOOL_HEAD.size + length], blob[SPOOL_HEAD.size + length:]]
                header = TrajectoryHeader.FromString(frames[0])
            except (OSError, struct.error, ValueError, DecodeError) as exc:  # OSError: a folder, a broken link
                raise SpoolCorrupt(f"{path} is not a whole spooled trajectory ({exc}): move it out of the spool "
                                   "to start (its episodes were played but never reached the learner)") from None
            key = (header.worker_id, header.incarnation, header.sequence)
            found[key] = frames
            self.entries[key] = (len(blob), progress)
            self.progress = max(self.progress, progress)
        return found

    def put(self, key: Key, frames: list[bytes], progress: int) -> None:
        blob = SPOOL_HEAD.pack(SPOOL_MAGIC, progress, len(frames[0])) + frames[0] + frames[1]
        write_durably(self._path(key), lambda f: f.write(blob))
        self.entries[key] = (len(blob), progress)
        self.progress = max(self.progress, progress)

    def remove(self, key: Key) -> None:
        _, progress = self.entries.pop(key)
        if progress >= self.progress:  # the newest entry: its progress must outlive it
            progress_json = json.dumps({"progress": self.progress}).encode()
            write_durably(self.directory / "progress.json", lambda f: f.write(progress_json))
        self._path(key).unlink()  # not synced: a power cut can bring it back, resent and acked DUPLICATE

    @property
    def bytes(self) -> int:
        return sum(size for size, _ in self.entries.values())

    def _path(self, key: Key) -> Path:
        _, incarnation, sequence = key
        return self.directory / f"{incarnation:016x}-{sequence:010d}.traj"

    def close(self) -> None:
        self._lock.close()


class TrajectorySender:
    """The worker's side: spool, send with a sequence number, keep until acked, resend.

    A trajectory is resent when unacked after `resend_s`, and at once whenever the connection to the
    learner is (re)established (a socket monitor sees the handshake): a learner that restarted or a
    link that healed gets what it missed without waiting out the timer. The send queue holds at most
    `window` messages and nothing is queued while disconnected (ZMQ_IMMEDIATE), so a stalled learner
    costs the worker at most `window` trajectories of memory, never a pile of resent copies; heartbeats
    notice a silent link. `waited_s` counts the time spent waiting for the window (backpressure).
    """

    HEARTBEAT_IVL_MS = 1000
    HEARTBEAT_TIMEOUT_MS = 5000

    def __init__(self, ctx: zmq.Context, endpoint: str, worker_id: str, resend_s: float = 5.0, window: int = 4,
                 spool: Spool | None = None):
        self.socket = ctx.socket(zmq.DEALER)
        self.socket.linger = LINGER_MS
        self.socket.sndhwm = window
        self.socket.immediate = 1
        self.socket.heartbeat_ivl = self.HEARTBEAT_IVL_MS
        self.socket.heartbeat_timeout = self.HEARTBEAT_TIMEOUT_MS
        self.monitor = self.socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.socket.connect(endpoint)
        self.poller = zmq.Poller()
        self.poller.register(self.socket, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        self.worker_id = worker_id
        self.incarnation = secrets.randbits(63)
        self.resend_s = resend_s
        self.window = window
        self.spool = spool
        self.sequence = 0
        self.unacked: dict[Key, tuple[list[bytes], float]] = {}  # key -> (frames, last sent)
        if spool is not None:
            self.unacked = {key: (frames, 0.0) for key, frames in spool.load().items()}
            if self.unacked:
                log.info("%d spooled trajectories to resend from %s", len(self.unacked), spool.directory)
        self.acked = self.resends = self.rejected = self.connects = 0
        self.waited_s = 0.0
        self.waiting_since: float | None = None

    def send(self, rollout: Rollout, task: str, stop: Callable[[], bool], progress: int = 0,
             rewards_json: str = "") -> int:
        """Ship one rollout played on `task`, its rewards recorded with the RewardConfig `rewards_json` (waiting
        while `window` are unacked; spooled first, with `progress`); returns its sequence number."""
        if len(self.unacked) >= self.window:
            self.waiting_since = time.monotonic()
            while len(self.unacked) >= self.window and not stop():
                self.poll(self.resend_s)
            self.waited_s += time.monotonic() - self.waiting_since
            self.waiting_since = None
        steps, envs = rollout.rewards.shape
        header = TrajectoryHeader(worker_id=self.worker_id, incarnation=self.incarnation, sequence=self.sequence,
                                  n_steps=steps, n_envs=envs, obs_dim=rollout.obs.shape[2], task=task,
                                  rewards_json=rewards_json)
        frames = [header.SerializeToString(), pack(rollout.tensors())]
        key = (self.worker_id, self.incarnation, self.sequence)
        if self.spool is not None:
            self.spool.put(key, frames, progress)
        self.unacked[key] = (frames, 0.0)
        self._transmit(key)
        self.sequence += 1
        return self.sequence - 1

    def poll(self, timeout_s: float) -> None:
        """Read acks and connection events for up to timeout_s (returns at the first), then resend whatever
        has waited resend_s (everything, after a new connection)."""
        events = dict(self.poller.poll(int(timeout_s * 1000)))
        if self.monitor in events:
            while self.monitor.poll(0):
                self.monitor.recv_multipart()
            self.connects += 1
            if self.unacked:
                log.info("connected to the learner: resending %d unacked trajectories", len(self.unacked))
            for key in list(self.unacked):
                self._transmit(key)
        if self.socket in events:
            while self.socket.poll(0):
                self._ack(self.socket.recv())
        now = time.monotonic()
        for key, (_, sent) in list(self.unacked.items()):
            if now - sent >= self.resend_s and self._transmit(key):  # while disconnected nothing goes out
                self.resends += 1
                log.info("trajectory %s/%d unacked after %.1f s: resent", key[0], key[2], self.resend_s)

    def flush(self, timeout_s: float, stop: Callable[[], bool]) -> bool:
        """Wait (resending) until every trajectory is acked; False after timeout_s or on stop."""
        give_up = time.monotonic() + timeout_s
        while self.unacked and not stop() and time.monotonic() < give_up:
            self.poll(min(self.resend_s, max(0.0, give_up - time.monotonic())))
        return not self.unacked

    def _transmit(self, key: Key) -> bool:
        """Send the trajectory now if it can go out; whether it did."""
        frames, _ = self.unacked[key]
        self.unacked[key] = (frames, time.monotonic())
        try:
            self.socket.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:  # not connected, or the queue is full: the next connection or the timer retries
            return False
        return True

    def _ack(self, payload: bytes) -> None:
        ack = TrajectoryAck()
        try:
            ack.ParseFromString(payload)
        except DecodeError:
            log.warning("malformed ack dropped")
            return
        key = (ack.worker_id, ack.incarnation, ack.sequence)
        if key not in self.unacked:
            return  # an ack for a resend already acked
        if ack.status not in DECISIONS:  # checked before anything is forgotten: the trajectory is resent later
            log.warning("trajectory %s/%d/%d: ack with unknown status %d kept unacked", *key, ack.status)
            return
        del self.unacked[key]
        if self.spool is not None:
            self.spool.remove(key)
        status = AckStatus.Name(ack.status)
        log.info("trajectory %s/%d/%d acked %s", *key, status)
        if ack.status == AckStatus.ACK_STATUS_REJECTED:
            self.rejected += 1
            log.error("trajectory %d rejected by the learner: %s", ack.sequence, ack.reason)
        else:
            self.acked += 1

    def metrics(self) -> dict[str, tuple[str, Callable[[], float]]]:
        """For LiveMetrics: the worker's side of the window, the spool and the connection."""
        return {
            "esper_tolaria_trajectories_unacked": ("Trajectories sent and not yet acked (at most the window).",
                                                   lambda: len(self.unacked)),
            "esper_tolaria_trajectory_waiting_seconds": (
                "How long the worker has been waiting for the window now (0: not waiting).",
                lambda: 0.0 if self.waiting_since is None else time.monotonic() - self.waiting_since),
            "esper_tolaria_trajectory_wait_seconds_total": (
                "Time spent waiting for the window (learner backpressure), finished waits.", lambda: self.waited_s),
            "esper_tolaria_spool_bytes": ("Bytes of unacked trajectories in the spool directory.",
                                          lambda: self.spool.bytes if self.spool else 0),
            "esper_tolaria_trajectories_acked_total": ("Trajectories acked accepted or duplicate.",
                                                       lambda: self.acked),
            "esper_tolaria_trajectory_resends_total": ("Resends after the timer (those sent: none while "
                                                       "disconnected).", lambda: self.resends),
            "esper_tolaria_learner_connections_total": ("Handshakes with the learner (1 + reconnections).",
                                                        lambda: self.connects),
        }

    def close(self) -> None:
        self.socket.disable_monitor()
        self.monitor.close()
        self.socket.close()
        if self.spool is not None:
            self.spool.close()


class LiveMetrics:
    """A Prometheus collector reading each value from its owner at scrape time, so no second copy of a
    counter has to be kept in step. name -> (help, read); names ending in _total are counters."""

    def __init__(self, metrics: dict[str, tuple[str, Callable[[], float]]]):
        self.metrics = metrics

    def collect(self):
        for name, (doc, read) in self.metrics.items():
            kind = CounterMetricFamily if name.endswith("_total") else GaugeMetricFamily
            yield kind(name, doc, value=read())


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
    try:
        feature_spec = json.loads(header.feature_spec_json)
    except RecursionError:  # "[[[[..." nested deeper than the interpreter's stack; other bad JSON is a ValueError
        raise ValueError("feature_spec_json nested too deep") from None
    state = {"feature_spec": feature_spec, "hidden_size": header.hidden_size,
             "clip_obs": header.clip_obs, "network": {}, "obs_rms": {}}
    for name, tensor in tensors.items():
        part, _, key = name.partition(".")
        if part not in ("network", "obs_rms"):
            raise ValueError(f"unexpected tensor {reprlib.repr(name)}")
        state[part][key] = tensor
    return header.version, state


class WeightsPublisher:
    """The learner's PUB socket: the latest policy, sent on every update and again every `republish_s`."""

    def __init__(self, ctx: zmq.Context, host: str, port: int, republish_s: float = 2.0):
        self.socket = ctx.socket(zmq.PUB)
        self.socket.linger = LINGER_MS
        self.socket.maxmsgsize = MAX_SUBSCRIPTION_BYTES  # else the context's 64 MiB: one 20 MB topic cost ~900 MiB
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
    """tamiyo_server's SUB socket: calls `on_weights(version, state)` for each new version it receives, and
    `on_malformed()` for each message that does not decode (logged at the 1st, 10th, 100th, ...: a flood of
    garbage shows in the count, not in a line each)."""

    def __init__(self, ctx: zmq.Context, endpoint: str, on_weights: Callable[[int, dict], None],
                 on_malformed: Callable[[], None] = lambda: None):
        self.socket = ctx.socket(zmq.SUB)
        self.socket.linger = LINGER_MS
        self.socket.subscribe(POLICY_TOPIC)
        self.socket.connect(endpoint)
        self.on_weights = on_weights
        self.on_malformed = on_malformed
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
                self.on_malformed()
                if math.log10(self.malformed).is_integer():
                    log.warning("policy weights dropped (%d malformed so far): %s", self.malformed, exc)
                continue
            if version != self.version:
                self.on_weights(version, state)
                self.version = version

    def close(self) -> None:
        self.socket.close()
