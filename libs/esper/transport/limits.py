"""The largest message each listening socket accepts (issue 8, promise 10): one table, documented.

ZeroMQ sockets get `zmq.MAXMSGSIZE` (libzmq drops the connection of a peer that sends a larger frame,
before buffering it); the gRPC server gets `grpc.max_receive_message_length` (a larger request is
RESOURCE_EXHAUSTED); the /metrics servers read no body at all and answer 413 to one over the cap.
Each value is a few times the largest legitimate message measured or bounded below.
"""

from __future__ import annotations

MiB = 1 << 20

MAX_TELEMETRY_BYTES = 1 * MiB
"""One telemetry frame (hub XSUB, subscribers' SUB): an EpochReport is ~1 KiB."""
MAX_SNAPSHOT_REQUEST_BYTES = 4096
"""A SnapshotRequest (hub ROUTER) holds one run id."""
MAX_SNAPSHOT_REPLY_BYTES = 256 * MiB
"""A SnapshotReply (subscribers' DEALER): every retained event, up to 32 runs of a few hundred KiB."""
MAX_RETAINED_BYTES = 64 * MiB
"""The events the hub retains for snapshots, all runs together (oldest dropped first), so that a full SnapshotReply
(these plus a few bytes per event) always fits MAX_SNAPSHOT_REPLY_BYTES: by count alone, 32 runs x 10,000 events
of up to 1 MiB did not."""
MAX_WORKER_ID_CHARS = 255
"""A trajectory's worker_id (a host name by default, and a spool directory's name): the learner keeps every
key it decides for its lifetime, so a longer one is refused as malformed and not kept."""
MAX_RUN_ID_CHARS = 320
"""A telemetry event's run_id (`<start time>_<name>`: a PPO worker's episodes are `<time>_<worker id>_epNNNN`,
at most ~290 characters): every consumer keeps the id of each run it holds, and karn repeats it in every
/metrics label of the run, so a longer one is dropped as malformed. 64 runs of 1 MB ids had made one scrape
1 GB, 15 s."""
MAX_REWARDS_JSON_CHARS = 4096
"""A trajectory header's rewards_json (its RewardConfig and discount: ~300 characters); the learner keeps the
reason it refuses one in every checkpoint, so a longer one is refused as malformed, unread."""
MAX_GRPC_REQUEST_BYTES = 4 * MiB
"""A Decide request (~1 KiB) or a DecideBatch of at most 1,024 observations; gRPC's own default."""
MAX_HTTP_BODY_BYTES = 0
"""/metrics is a GET: a request that declares any body is refused."""
MAX_SUBSCRIPTION_BYTES = 4096
"""A subscription message (XPUB, PUB sockets): one topic prefix."""
MAX_TRAJECTORY_BYTES = 64 * MiB
"""One trajectory frame (learner ROUTER): 75 epochs x 64 envs x ~200 float32 features is ~4 MiB."""
MAX_WEIGHTS_BYTES = 64 * MiB
"""One policy weights frame (tamiyo_server's SUB): the hidden-64 policy is ~0.2 MiB."""
HTTP_TIMEOUT_S = 10.0
"""A /metrics client that sends nothing for this long mid-request is disconnected (a scrape takes ms)."""
