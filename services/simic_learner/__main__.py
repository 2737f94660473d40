"""simic_learner: PPO updates from the trajectories tolaria workers ship; publishes the policy weights.

    python -m services.simic_learner --task synthetic --n-envs 2 --update-every 1 [esper train ppo flags]

Takes the flags of `esper train ppo` (give the workers the same ones: task, slots, rewards and
features must agree; a trajectory of another task, other reward settings or other shapes is refused) and
builds the same PPOTrainer, through
esper.simic.learner.Learner. Trajectories arrive on a ROUTER (acked, deduplicated:
proto/esper/leyline/simic.proto); after n_envs x update_every episodes PPO updates and the new weights
are published on a PUB socket that tamiyo_server --policy neural subscribes to.

Durability rule: nothing is acked or published before it is committed. The learner reads the
trajectories waiting on its socket (up to MAX_BATCH), applies them (updating whenever enough episodes
are pending), commits one checkpoint (--save, default <runs-dir>/simic_learner.pt: policy, Adam,
normalizers, RNG states, counters, the trajectories not yet learned from, and every decided key),
and only then sends the acks and publishes the weights. A learner killed at any moment therefore
restarts (from --save when it exists, or --resume) with every acked trajectory in its accepted set
and every published version in its past; what it lost was never acked, and the workers resend it.
SIGTERM commits once more. /metrics (--metrics-port) shows accepted, duplicates, refused, pending.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import zmq
from prometheus_client import REGISTRY

from esper.cli import Parser, UsageError, add_train_flags, check_output_file, check_outputs, train_config
from esper.durable import write_atomic
from esper.leyline import AckStatus, TrajectoryAck, RunStarted, TelemetryLevel, from_short_name
from esper.nissa import Telemetry, new_run_id
from esper.simic.checkpoint import ResumeError, contents_checked, load_checkpoint, save_checkpoint
from esper.simic.learner import Learner
from esper.simic.rewards import recorded_with
from esper.train_ppo import PPORunConfig, add_ppo_flags, ppo_config
from esper.transport.auth import add_token_flag, refuse_bind
from esper.transport.bus import PublisherSink, bind_endpoint, make_context
from esper.transport.config import (MAX_DEADLINE_S, StackEndpoints, at_least, endpoint_or_none, metrics_port,
                                    metrics_url, port)
from esper.transport.lifecycle import StopSignal, log_endpoint, run_service, setup_logging, start_metrics
from esper.transport.limits import MAX_TRAJECTORY_BYTES
from esper.transport.trajectories import LiveMetrics, TrajectoryInbox, WeightsPublisher

CHECKPOINT_NAME = "simic_learner.pt"
"""The learner's checkpoint under --runs-dir unless --save names another."""
MAX_BATCH = 64
"""Trajectories applied per commit at most: one fsync for a burst, without delaying its acks long."""


@dataclass(frozen=True)
class Config:
    run: PPORunConfig
    """PPO, rewards, features, exactly as `esper train ppo` builds them from the same flags."""
    host: str
    """Interface to bind."""
    port: int
    """Trajectories (ROUTER); 0 = any free port (logged)."""
    weights_port: int
    """Policy weights (PUB); 0 = any free port (logged)."""
    hub_pub: str
    """The hub's publish endpoint for PPOUpdate telemetry; empty: none."""
    republish_s: float
    """Republish the latest weights this often, for subscribers that joined late."""
    max_policy_lag: int
    """Refuse trajectories acted by a policy more than this many updates old."""
    summary: str | None
    """Write the learner's state (updates, accepted trajectory keys, duplicates) here as JSON."""
    metrics_port: int
    """Prometheus /metrics; 0 = any free port, -1 = off."""
    token: str
    """Shared secret workers and tamiyo_server must present (ZeroMQ PLAIN); empty: none (loopback only)."""


def parse(argv: list[str] | None) -> Config:
    env = StackEndpoints.from_env()
    p = Parser(prog="python -m services.simic_learner", description=__doc__.splitlines()[0])
    add_train_flags(p)
    add_ppo_flags(p, save_default=f"<runs-dir>/{CHECKPOINT_NAME}", steps_environments=False)
    p.add_argument("--host", default=env.host, help="interface to bind ($ESPER_HOST)")
    p.add_argument("--port", type=port, default=env.learner, help="trajectories ($ESPER_LEARNER_PORT; 0 = any)")
    p.add_argument("--weights-port", type=port, default=env.learner_weights,
                   help="policy weights PUB ($ESPER_LEARNER_WEIGHTS_PORT; 0 = any)")
    p.add_argument("--hub-pub", type=endpoint_or_none, default=env.tcp(env.hub_pub),
                   help="hub publish endpoint; '' = no telemetry")
    p.add_argument("--republish-s", type=at_least(0.1, float, MAX_DEADLINE_S), default=2.0,
                   help="republish the weights this often")
    p.add_argument("--max-policy-lag", type=at_least(0), default=4,
                   help="oldest policy version learned from, in updates")
    p.add_argument("--summary", default=None, help="JSON file with the learner's state, rewritten per update")
    p.add_argument("--metrics-port", type=metrics_port, default=env.learner_metrics,
                   help="Prometheus /metrics ($ESPER_LEARNER_METRICS_PORT; 0 = any, -1 = off)")
    add_token_flag(p)
    args = p.parse_args(argv)
    args.mode = "ppo"
    if args.anneal_lr:  # each worker plays --episodes: with two or more the rate would reach 0 halfway or sooner
        raise UsageError("--anneal-lr: the learner cannot know how many episodes its workers will send (each plays "
                         "--episodes), so a decay over --episodes would stop it learning early; anneal in esper "
                         "train ppo")
    run = ppo_config(args, train_config(args))
    if run.save is None:
        run = replace(run, save=str(Path(run.runs_dir) / CHECKPOINT_NAME))
    check_outputs(run, make=False)
    check_output_file("--save", Path(run.save), "the checkpoint file")
    if args.summary:
        check_output_file("--summary", Path(args.summary))
    if (args.entropy_coef_start is not None or args.entropy_coef_end is not None) and not args.entropy_anneal_episodes:
        why = ("--entropy-coef-start/--entropy-coef-end anneal over --episodes, which each worker plays: the learner "
               "counts every worker's, so the anneal ends early")
        if not (run.resume or Path(run.save).is_file()):  # a new run; one trained so goes on as it was
            raise UsageError(f"{why}; give --entropy-anneal-episodes, the episodes of all workers together")
        print(f"simic_learner: warning: {why} (the run continued was trained so)", file=sys.stderr)
    return Config(run=run, host=args.host, port=args.port, weights_port=args.weights_port, hub_pub=args.hub_pub,
                  republish_s=args.republish_s, max_policy_lag=args.max_policy_lag, summary=args.summary,
                  metrics_port=args.metrics_port,
                  token=args.token)


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv)
    if refuse_bind("simic_learner", cfg.host, cfg.token):
        return 2
    log = setup_logging("simic_learner")
    stop = StopSignal()
    if cfg.run.num_workers is not None:
        torch.set_num_threads(cfg.run.num_workers)
    tcfg = cfg.run.trainer
    checkpoint = Path(cfg.run.save)
    # Its own --save once it has one: a restart with the same flags (an .env's --resume) had gone back to
    # --resume, dropping every update and accepted trajectory since. --resume only starts it.
    source = checkpoint if checkpoint.is_file() else Path(cfg.run.resume) if cfg.run.resume else None
    if source == checkpoint and cfg.run.resume and Path(cfg.run.resume).resolve() != checkpoint.resolve():
        log.warning("--resume %s is not read: this learner continues its own --save %s (move that away to begin "
                    "again from %s)", cfg.run.resume, checkpoint, cfg.run.resume)
    run_id = new_run_id(f"ppo-learner_{tcfg.env.task}_s{tcfg.seed}")
    telemetry = Telemetry(run_id, from_short_name(TelemetryLevel, cfg.run.telemetry_level))  # sinks once resumed
    learner = Learner(tcfg, telemetry, cfg.max_policy_lag)
    inbox = TrajectoryInbox(learner.add, lambda: learner.version, task=tcfg.env.task,
                            rewards=recorded_with(tcfg.reward, tcfg.ppo.gamma))
    try:
        state = load_checkpoint(source) if source else None
        if state is not None:
            with contents_checked(source):  # other settings, or a checkpoint damaged by hand: one line, exit 2
                learner.load_state_dict(state)
                if "inbox_json" in state:  # not in an `esper train ppo` checkpoint
                    inbox.load(json.loads(state["inbox_json"]))
    except ResumeError as exc:
        log.error("cannot resume from %s: %s", source, exc)
        stop.close()
        return 2
    ctx = make_context(cfg.token, server=True)  # its sockets bind; the hub sink has its own client context
    ctx.maxmsgsize = MAX_TRAJECTORY_BYTES  # a default for every socket of the context
    sinks = []
    if cfg.hub_pub:
        sinks.append(PublisherSink(cfg.hub_pub, token=cfg.token))
        if not sinks[0].wait_attached(timeout_s=5.0):
            log.warning("hub at %s not attached after 5 s: PPOUpdate events are lost until it is", cfg.hub_pub)
    telemetry.sinks = [*sinks, *cfg.run.file_sinks(run_id)]  # closed with it; the bus's shut down below
    telemetry.emit(run_started=RunStarted(mode="ppo", task=tcfg.env.task, seed=tcfg.seed, device=tcfg.device))
    if state is not None:
        log.info("resumed from %s: version %d, %d trajectories accepted, %d episodes pending", source,
                 learner.version, len(inbox.accepted), learner.pending_episodes)
    commits = 0

    def commit() -> None:
        nonlocal commits
        save_checkpoint(learner.state_dict() | {"inbox_json": json.dumps(inbox.state())}, checkpoint)
        commits += 1

    if cfg.metrics_port >= 0:
        REGISTRY.register(LiveMetrics(inbox.metrics() | {
            "esper_simic_pending_episodes": ("Episodes received and not yet learned from.",
                                             lambda: learner.pending_episodes),
            "esper_simic_policy_version": ("PPO updates done (the version published).", lambda: learner.version),
            "esper_simic_checkpoint_commits_total": ("Checkpoints committed (each before its acks).",
                                                     lambda: commits),
            "esper_simic_nonfinite_minibatches_total": (
                "PPO minibatches not stepped on because their gradient was not finite, over the run.",
                lambda: sum(u.get("nonfinite_skipped", 0) for u in learner.trainer.update_log))}))
        metrics_server = start_metrics(cfg.host, cfg.metrics_port, cfg.token)
        log_endpoint(log, "metrics", metrics_url(cfg.host, metrics_server.server_port))

    router = ctx.socket(zmq.ROUTER)
    router.linger = 0  # acks to a worker that is gone are worthless
    log_endpoint(log, "trajectories", bind_endpoint(router, cfg.host, cfg.port))
    weights = WeightsPublisher(ctx, cfg.host, cfg.weights_port, cfg.republish_s)
    log_endpoint(log, "weights", weights.endpoint)
    weights.publish(learner.version, learner.policy_state())
    log.info("learning %s: %d features, an update every %d episodes", tcfg.env.task, learner.trainer.spec.dim,
             learner.episodes_per_update)

    def write_summary() -> None:
        if cfg.summary:
            state = {"run_id": run_id, "version": learner.version, "episodes": learner.trainer.episodes_done,
                     "accepted": inbox.accepted, "duplicates": inbox.duplicates, "rejected": inbox.rejected,
                     "update_stats": learner.trainer.update_log}
            write_atomic(Path(cfg.summary), json.dumps(state, indent=2))

    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    poller.register(stop.fileno(), zmq.POLLIN)
    while not stop.is_set():
        if router not in dict(poller.poll(weights.seconds_to_republish() * 1000)):
            weights.republish()  # the republish timer (or the stop signal) woke the poll
            continue
        version, decided = learner.version, len(inbox.decided)
        replies = receive_batch(router, inbox, learner, log)
        if len(inbox.decided) > decided:
            commit()  # before any ack: the durability rule
        for identity, ack in replies:
            router.send_multipart([identity, ack.SerializeToString()])
        if learner.version != version:
            weights.publish(learner.version, learner.policy_state())
            write_summary()
            log.info("published version %d", learner.version)

    commit()
    log.info("stopping: version %d, %d trajectories accepted, %d duplicates, %d refused; committed to %s",
             learner.version, len(inbox.accepted), inbox.duplicates, inbox.rejected, checkpoint)
    write_summary()
    if cfg.metrics_port >= 0:
        metrics_server.shutdown()
    weights.close()
    router.close()
    telemetry.close()
    for sink in sinks:
        sink.shutdown()
    ctx.term()
    stop.close()
    return 0


def receive_batch(router: zmq.Socket, inbox: TrajectoryInbox, learner: Learner,
                  log: logging.Logger) -> list[tuple[bytes, TrajectoryAck]]:
    """Apply the trajectories waiting on the socket (at most MAX_BATCH), updating whenever enough episodes
    are pending; returns the acks to send once the result is committed.

    `learner.update()` is not guarded: Learner.problem refuses every trajectory that could make it fail, so
    an exception here is a bug, and the learner should stop on it with the traceback. Catching it could only
    drop the pending episodes (accepted and acked: lost silently) or keep them and fail again at every
    arrival; stopping before the commit loses nothing (this batch was not acked, its senders resend it)."""
    replies = []
    while len(replies) < MAX_BATCH and router.poll(0):
        identity, *frames = router.recv_multipart()
        ack = inbox.handle(frames)
        replies.append((identity, ack))
        if ack.status == AckStatus.ACK_STATUS_REJECTED:
            log.warning("trajectory %s/%d refused: %s", ack.worker_id, ack.sequence, ack.reason)
        if ack.status == AckStatus.ACK_STATUS_ACCEPTED and learner.ready():
            log.info("update %d: learning from %d episodes", learner.version + 1, learner.pending_episodes)
            stats = learner.update()
            log.info("update %d done: %d episodes in all, entropy %.3f, approx_kl %.4f, ev %.2f", learner.version,
                     learner.trainer.episodes_done, stats.entropy, stats.approx_kl, stats.explained_variance)
            if stats.nonfinite_skipped:
                log.warning("update %d: %d of its minibatches not stepped on, their gradient not finite",
                            learner.version, stats.nonfinite_skipped)
    return replies


if __name__ == "__main__":
    raise SystemExit(run_service("simic_learner", main))
