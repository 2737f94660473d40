"""simic_learner: PPO updates from the trajectories tolaria workers ship; publishes the policy weights.

    python -m services.simic_learner --task synthetic --n-envs 2 --update-every 1 [esper train ppo flags]

Takes the flags of `esper train ppo` (give the workers the same ones: task, slots, rewards and
features must agree; a mismatched trajectory is refused) and builds the same PPOTrainer, through
esper.simic.learner.Learner. Trajectories arrive on a ROUTER (acked, deduplicated:
proto/esper/leyline/simic.proto); after n_envs x update_every episodes PPO updates, the checkpoint is
written (--save) and the new weights are published on a PUB socket that tamiyo_server --policy neural
subscribes to.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import zmq

from esper.cli import Parser, UsageError, add_train_flags, train_config
from esper.leyline import AckStatus, RunStarted, TelemetryLevel, from_short_name
from esper.nissa import Telemetry
from esper.simic.checkpoint import save_checkpoint
from esper.simic.learner import Learner
from esper.train_ppo import PPORunConfig, add_ppo_flags, ppo_config
from esper.transport.bus import PublisherSink, bind_endpoint, make_context
from esper.transport.config import StackEndpoints
from esper.transport.lifecycle import StopSignal, log_endpoint, setup_logging
from esper.transport.trajectories import TrajectoryInbox, WeightsPublisher


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


def parse(argv: list[str] | None) -> Config:
    env = StackEndpoints.from_env()
    p = Parser(prog="python -m services.simic_learner", description=__doc__.splitlines()[0])
    add_train_flags(p)
    add_ppo_flags(p)
    p.add_argument("--host", default=env.host, help="interface to bind ($ESPER_HOST)")
    p.add_argument("--port", type=int, default=env.learner, help="trajectories ($ESPER_LEARNER_PORT; 0 = any)")
    p.add_argument("--weights-port", type=int, default=env.learner_weights,
                   help="policy weights PUB ($ESPER_LEARNER_WEIGHTS_PORT; 0 = any)")
    p.add_argument("--hub-pub", default=env.tcp(env.hub_pub), help="hub publish endpoint; '' = no telemetry")
    p.add_argument("--republish-s", type=float, default=2.0, help="republish the weights this often")
    p.add_argument("--max-policy-lag", type=int, default=4, help="oldest policy version learned from, in updates")
    p.add_argument("--summary", default=None, help="JSON file with the learner's state, rewritten per update")
    args = p.parse_args(argv)
    args.mode = "ppo"
    run = ppo_config(args, train_config(args))
    if run.resume:
        raise UsageError("--resume is not supported by simic_learner yet")
    return Config(run=run, host=args.host, port=args.port, weights_port=args.weights_port, hub_pub=args.hub_pub,
                  republish_s=args.republish_s, max_policy_lag=args.max_policy_lag, summary=args.summary)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse(argv)
    except UsageError as exc:
        print(f"simic_learner: error: {exc}")
        return 2
    log = setup_logging("simic_learner")
    stop = StopSignal()
    if cfg.run.num_workers is not None:
        torch.set_num_threads(cfg.run.num_workers)
    tcfg = cfg.run.trainer
    ctx = make_context()
    sinks = []
    if cfg.hub_pub:
        sinks.append(PublisherSink(cfg.hub_pub, ctx))
        if not sinks[0].wait_attached(timeout_s=5.0):
            log.warning("hub at %s not attached after 5 s: PPOUpdate events are lost until it is", cfg.hub_pub)
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}_ppo-learner_{tcfg.env.task}_s{tcfg.seed}"
    telemetry = Telemetry(run_id, from_short_name(TelemetryLevel, cfg.run.telemetry_level), sinks)
    telemetry.emit(run_started=RunStarted(mode="ppo", task=tcfg.env.task, seed=tcfg.seed, device=tcfg.device))
    learner = Learner(tcfg, telemetry, cfg.max_policy_lag)
    inbox = TrajectoryInbox(learner.add, lambda: learner.version)

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
            tmp = Path(cfg.summary + ".tmp")
            tmp.write_text(json.dumps(state, indent=2))
            os.replace(tmp, cfg.summary)

    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    poller.register(stop.fileno(), zmq.POLLIN)
    while not stop.is_set():
        if router not in dict(poller.poll(weights.seconds_to_republish() * 1000)):
            weights.republish()  # the republish timer (or the stop signal) woke the poll
            continue
        identity, *frames = router.recv_multipart()
        ack = inbox.handle(frames)
        router.send_multipart([identity, ack.SerializeToString()])
        if ack.status == AckStatus.ACK_STATUS_REJECTED:
            log.warning("trajectory %s/%d refused: %s", ack.worker_id, ack.sequence, ack.reason)
        if ack.status == AckStatus.ACK_STATUS_ACCEPTED and learner.ready():
            stats = learner.update()
            weights.publish(learner.version, learner.policy_state())
            if cfg.run.save:
                save_checkpoint(learner.trainer.state_dict(), Path(cfg.run.save))
            write_summary()
            log.info("update %d: %d episodes, entropy %.3f, approx_kl %.4f, ev %.2f; published version %d",
                     learner.version, learner.trainer.episodes_done, stats.entropy, stats.approx_kl,
                     stats.explained_variance, learner.version)

    log.info("stopping: version %d, %d trajectories accepted, %d duplicates, %d refused", learner.version,
             len(inbox.accepted), inbox.duplicates, inbox.rejected)
    write_summary()
    weights.close()
    router.close()
    telemetry.close()
    for sink in sinks:
        sink.shutdown()
    ctx.term()
    stop.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
