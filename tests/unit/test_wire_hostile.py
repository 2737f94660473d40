"""Hostile input to the wire decoders and the worker's spool, without sockets: each refusal is the decoder's
documented ValueError (the only error its caller catches), what is stored or echoed back stays small, and a
torn spool file costs a log line, not the worker (found by a review; what needs a peer is in
tests/integration/test_transport_hostile.py)."""

from __future__ import annotations

import json

import msgpack
import pytest
import torch

from esper.leyline import (
    AckStatus,
    PolicyWeights,
    RunStarted,
    SnapshotReply,
    SnapshotRequest,
    TelemetryEvent,
    TrajectoryHeader,
)
from esper.simic.rollout import Rollout
from esper.transport import limits
from esper.transport.bus import RetainedEvents
from esper.transport.tensors import pack, unpack
from esper.transport.trajectories import POLICY_TOPIC, Spool, TrajectoryInbox, decode_weights
from support import recorded_syncs

FLOAT = {"dtype": "float32", "shape": [1], "data": bytes(4)}


def trajectory(payload: bytes, sequence: int = 0) -> list[bytes]:
    return [TrajectoryHeader(worker_id="w", incarnation=1, sequence=sequence).SerializeToString(), payload]


def weights(tensors: bytes, feature_spec_json: str = "{}") -> list[bytes]:
    return [POLICY_TOPIC, PolicyWeights(version=1, feature_spec_json=feature_spec_json).SerializeToString(), tensors]


@pytest.mark.parametrize("tensors", [
    {"x": FLOAT | {"shape": [True]}},  # isinstance(True, int): numpy then raised TypeError
    {"x": FLOAT | {"dtype": ["float32"]}},  # unhashable: `in DTYPES` raised TypeError
    {b"x": FLOAT},  # a msgpack bin name: decode_weights' name.partition raised TypeError
], ids=["bool dim", "list dtype", "bin name"])
def test_unpack_refuses_what_pack_never_writes_with_a_value_error(tensors):
    with pytest.raises(ValueError, match="tensor"):
        unpack(msgpack.packb(tensors, use_bin_type=True))


def test_the_inbox_rejects_a_bool_dimension_instead_of_raising():
    """One such frame used to kill simic_learner (TypeError out of TrajectoryInbox.handle)."""
    inbox = TrajectoryInbox(lambda rollout: pytest.fail("applied"), version=lambda: 0)
    ack = inbox.handle(trajectory(msgpack.packb({"obs": FLOAT | {"shape": [True]}})))
    assert ack.status == AckStatus.ACK_STATUS_REJECTED and inbox.rejected == 1


def test_the_inbox_keeps_no_key_of_a_worker_id_no_worker_has():
    """The learner keeps every key it decides for its lifetime (a resend gets the same answer): a worker_id of
    up to 64 MiB per message was memory a sender could make it hold forever."""
    inbox = TrajectoryInbox(lambda rollout: pytest.fail("applied"), version=lambda: 0)
    header = TrajectoryHeader(worker_id="w" * (limits.MAX_WORKER_ID_CHARS + 1), incarnation=1, sequence=0)
    ack = inbox.handle([header.SerializeToString(), pack({})])
    assert ack.status == AckStatus.ACK_STATUS_REJECTED and "worker_id of 256 characters" in ack.reason
    assert inbox.decided == {} and inbox.rejected == 1 and ack.worker_id == ""


@pytest.mark.parametrize("frames", [
    weights(msgpack.packb({b"network.w": FLOAT}, use_bin_type=True)),
    weights(msgpack.packb({}), feature_spec_json="[" * 100_000),  # RecursionError in json.loads
], ids=["bin name", "deep json"])
def test_decode_weights_refuses_malformed_weights_with_a_value_error(frames):
    with pytest.raises(ValueError):
        decode_weights(frames)


def test_refusals_echo_at_most_a_few_hundred_bytes_of_what_was_sent():
    """The inbox keeps every rejection's reason forever, in each checkpoint: 1 MiB tensor names made 60 MiB."""
    huge = "n" * (1 << 20)
    inbox = TrajectoryInbox(lambda rollout: None, version=lambda: 0)
    tiny = {name: torch.zeros((2, 1), dtype=dtype) for name, dtype in Rollout.DTYPES.items()}
    payloads = [msgpack.packb({huge: 0}),  # not a tensor
                msgpack.packb({huge: FLOAT | {"data": bytes(3)}}),  # wrong length
                msgpack.packb({"x": FLOAT | {"shape": [1] * 100_000}}),  # a long shape, echoed
                pack(tiny | {f"{huge}{i}": torch.zeros(1) for i in range(8)})]  # not the Rollout fields
    acks = [inbox.handle(trajectory(payload, sequence)) for sequence, payload in enumerate(payloads)]
    assert [ack.status for ack in acks] == [AckStatus.ACK_STATUS_REJECTED] * 4
    assert max(len(ack.reason) for ack in acks) < 2000, [ack.reason[:300] for ack in acks]
    assert len(json.dumps(inbox.state())) < 8000
    with pytest.raises(ValueError) as refused:
        decode_weights(weights(pack({huge: torch.zeros(1)})))
    assert len(str(refused.value)) < 500


def test_a_torn_progress_file_costs_a_log_line_not_the_worker(tmp_path, caplog):
    """What a power cut could leave of a progress.json replaced without fsync: progress then comes from the
    entries still spooled."""
    spool = Spool(tmp_path)
    spool.put(("w", 1, 0), trajectory(b"x"), progress=4)
    spool.close()
    for torn in ("", '{"progr', "[]", '{"progress": "4"}'):
        (tmp_path / "progress.json").write_text(torn)
        caplog.clear()
        again = Spool(tmp_path)
        assert again.progress == 0 and "progress.json is unreadable" in caplog.text
        assert list(again.load()) == [("w", 1, 0)] and again.progress == 4
        again.close()


def test_the_spool_syncs_each_rename_before_anything_depends_on_it(tmp_path):
    """An entry must be on disk before it is sent, and progress.json before the acked entry it outlives is
    unlinked: the file's data fsynced before the rename, and the directory after it (a rename is durable only
    once its directory is)."""
    tmp_path = tmp_path.resolve()  # as /proc/self/fd names it
    spool = Spool(tmp_path)
    with recorded_syncs() as calls:
        spool.put(("w", 9, 0), trajectory(b"x"), progress=4)
        entry = str(spool._path(("w", 9, 0)))
        assert calls == [("fsync", entry + ".tmp"), ("replace", entry), ("fsync", str(tmp_path))]
        calls.clear()
        spool.remove(("w", 9, 0))
    progress = str(tmp_path / "progress.json")
    assert calls == [("fsync", progress + ".tmp"), ("replace", progress), ("fsync", str(tmp_path)),
                     ("unlink", entry)]
    spool.close()


def test_retained_events_fit_one_snapshot_reply_by_dropping_the_oldest_first():
    """Bounded by count only, 32 runs x 10,000 events x up to 1 MiB each outgrew MAX_SNAPSHOT_REPLY_BYTES, and a
    late joiner's DEALER dropped the whole snapshot."""
    def event(run: str, sequence: int) -> TelemetryEvent:
        return TelemetryEvent(run_id=run, sequence=sequence, run_started=RunStarted(task="x" * 1000))

    size = event("a", 1).ByteSize()
    retained = RetainedEvents(max_bytes=10 * size)
    for sequence in range(1, 9):
        retained.add(event("a", sequence))
    for sequence in range(1, 7):
        retained.add(event("b", sequence))
    reply = retained.snapshot(SnapshotRequest())
    assert [(e.run_id, e.sequence) for e in reply.events] == [("a", 5), ("a", 6), ("a", 7), ("a", 8),
                                                              *(("b", s) for s in range(1, 7))]
    assert retained.bytes == 10 * size
    for sequence in range(7, 17):  # run a is gone altogether
        retained.add(event("b", sequence))
    assert [e.sequence for e in retained.snapshot(SnapshotRequest()).events] == list(range(7, 17))
    assert list(retained.runs) == ["b"] and retained.bytes == 10 * size
    # The run that reported last is kept longest, whenever it began: a learner's run beside many episodes' runs.
    retained = RetainedEvents(max_runs=3)
    for i, run in enumerate(["learner", "ep0", "ep1", "ep2", "ep3"]):
        retained.add(event(run, 1))
        retained.add(event("learner", i + 2))
    assert list(retained.runs) == ["ep2", "ep3", "learner"] and len(retained.runs["learner"]) == 6
    # Past max_events a run's oldest events go, whatever their size (the reply's framing bound below counts on it).
    retained = RetainedEvents(max_events=3)
    for sequence in range(1, 6):
        retained.add(TelemetryEvent(run_id="a", sequence=sequence, run_started=RunStarted()))
    assert [e.sequence for e in retained.snapshot(SnapshotRequest()).events] == [3, 4, 5]
    # At the defaults a full snapshot fits, with each event's field tag and length (at most 4 bytes under 2 MiB).
    defaults = RetainedEvents()
    assert limits.MAX_RETAINED_BYTES + defaults.max_runs * defaults.max_events * 4 < limits.MAX_SNAPSHOT_REPLY_BYTES
    assert limits.MAX_TELEMETRY_BYTES < 2 << 20 and SnapshotReply(events=[event("a", 1)]).ByteSize() == size + 3
