"""tolaria_worker: growth episodes on one device, every decision from tamiyo_server, telemetry to the hub.

    python -m services.tolaria_worker --task synthetic --max-epochs 20 [esper train flags]

Takes the flags of `esper train` and builds the same objects; only the policy (RemotePolicy) and one
extra sink (the bus) differ. Its episodes train grouped as `esper train`'s do (--grouped: by default on
CUDA, where the flags allow it), a group's decisions asked of tamiyo_server in one DecideBatch an epoch. It
writes the same run directories under --runs-dir.
When its episodes are done it stays up (idle) until SIGTERM, because honcho stops the whole stack when
any process exits; `--exit-when-done` makes it return instead.

It checkpoints every episode into its run directory after every epoch (--checkpoint-every 1) and on
start continues its experiment, episode by episode (or group by group): the newest run directory under
--runs-dir with the same config and episode seed is resumed from its checkpoint if unfinished (the same
run id and telemetry sequence numbers, so karn sees neither a gap nor a duplicate) and skipped if
finished; only an episode with no such directory starts anew. With --grouped left out, runs trained the
other way than the default are continued that way, when none were trained the default's way. --fresh
starts every episode anew.

    python -m services.tolaria_worker --ppo --task synthetic --max-epochs 20 --n-envs 2 [esper train ppo flags]

`--ppo` makes it a distributed PPO actor (SEED RL): it takes the flags of `esper train ppo` (the same
as simic_learner's), plays rounds of --n-envs episodes with decisions from tamiyo_server --policy
neural (each with its policy version, log-probability and value), and ships each round to
simic_learner as one acked trajectory (raw features and rewards; the learner normalizes them). Each
trajectory is spooled (--spool-dir, default <runs-dir>/spool/<worker-id>) before it is sent and
deleted once acked: a worker restarted with the same --worker-id resends what was unacked under its
old keys and goes on from the next unplayed round. /metrics shows the unacked window, the time spent
waiting for it (a stalled learner) and the bytes spooled.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import torch
from prometheus_client import REGISTRY

from esper.cli import (Parser, UsageError, add_checkpoint_flag, add_grouped_flag, add_train_flags, check_outputs,
                       train_config)
from esper.durable import write_atomic
from esper.experiment import RunConfig, continued_grouping, run
from esper.karn_cli import folder_refusal
from esper.kasmina.lifecycle import IllegalAction
from esper.leyline import TelemetryLevel, from_short_name
from esper.nissa import Telemetry, new_run_id
from esper.simic.actor import NotNeural, remote_act
from esper.simic.checkpoint import ResumeError, changed_settings
from esper.simic.env_process import EnvProcessError, close_all
from esper.simic.rewards import recorded_with
from esper.simic.trainer import RESUMABLE_CHANGES, TrainerConfig, play_episodes
from esper.tamiyo.network import ActionCodec
from esper.tolaria.data import DataError, load_task_data
from esper.train_ppo import PPORunConfig, add_ppo_flags, ppo_config
from esper.transport.auth import add_token_flag, refuse_bind
from esper.transport.bus import PublisherSink, make_context
from esper.transport.config import (MAX_DEADLINE_S, StackEndpoints, at_least, endpoint, grpc_target, metrics_port,
                                    metrics_url)
from esper.transport.lifecycle import StopSignal, Stopped, log_endpoint, run_service, setup_logging, start_metrics
from esper.transport.limits import MAX_WORKER_ID_CHARS
from esper.transport.policy_service import DEFAULT_DEADLINE_S, PolicyUnavailable, RemotePolicy
from esper.transport.trajectories import LiveMetrics, Spool, SpoolBusy, SpoolCorrupt, TrajectorySender


@dataclass(frozen=True)
class Shipping:
    """Where and how a --ppo worker ships its trajectories."""

    learner: str
    """simic_learner's trajectory endpoint."""
    worker_id: str
    """This worker's name in (worker_id, incarnation, sequence) keys."""
    resend_s: float
    """Resend a trajectory the learner has not acked after this long."""
    window: int
    """Stop playing while this many trajectories are unacked (backpressure)."""
    spool_dir: str
    """Where trajectories wait for their ack (one directory per worker id; locked while in use)."""


@dataclass(frozen=True)
class Config:
    run: RunConfig | PPORunConfig
    """The experiment, exactly as `esper train heuristic` (or, with --ppo, `esper train ppo`) would build it."""
    tamiyo: str
    """host:port of tamiyo_server."""
    hub_pub: str
    """The hub's publish endpoint."""
    host: str
    """Interface for /metrics."""
    metrics_port: int
    """Prometheus /metrics (process metrics, policy retries); 0 = any free port, -1 = off."""
    deadline_s: float
    """Deadline of each Decide call."""
    patience_s: float
    """How long a decision may wait for an unreachable tamiyo_server before the episode fails."""
    exit_when_done: bool
    """Return after the episodes instead of idling until SIGTERM."""
    shipping: Shipping | None
    """--ppo: the trajectory shipping; None for a controller run."""
    token: str
    """Shared secret presented to tamiyo_server, the hub and the learner, and demanded on /metrics."""
    continue_runs: bool = True
    """Continue the runs of this experiment found in --runs-dir (off: --fresh)."""


def parse(argv: list[str] | None) -> Config:
    env = StackEndpoints.from_env()
    p = Parser(prog="python -m services.tolaria_worker", description=__doc__.splitlines()[0],
               epilog="--ppo --help lists a PPO actor's flags as well (esper train ppo's, --learner, --worker-id, ...)")
    add_train_flags(p)
    p.add_argument("--ppo", action="store_true", help="a PPO actor: ship trajectories to simic_learner")
    if "--ppo" in (sys.argv[1:] if argv is None else argv):
        add_ppo_flags(p)
        p.add_argument("--learner", type=endpoint, default=env.tcp(env.learner),
                       help="simic_learner ($ESPER_LEARNER_PORT)")
        p.add_argument("--worker-id", default=socket.gethostname(),
                       help="name in trajectory keys; keep it across restarts (the spool is found by it)")
        p.add_argument("--spool-dir", default=None, help="unacked trajectories (default <runs-dir>/spool/<worker-id>)")
        p.add_argument("--resend-s", type=at_least(0.1, float, MAX_DEADLINE_S), default=10.0,
                       help="resend an unacked trajectory after this long")
        p.add_argument("--window", type=at_least(1), default=4, help="most trajectories unacked at once")
    else:
        add_checkpoint_flag(p)
        add_grouped_flag(p)
        p.add_argument("--fresh", action="store_true", help="start every episode anew, continuing no run")
    p.add_argument("--tamiyo", type=grpc_target, default=env.tamiyo_target,
                   help="tamiyo_server host:port ($ESPER_TAMIYO_PORT)")
    p.add_argument("--hub-pub", type=endpoint, default=env.tcp(env.hub_pub),
                   help="hub publish endpoint ($ESPER_HUB_PUB_PORT)")
    p.add_argument("--host", default=env.host, help="interface for /metrics ($ESPER_HOST)")
    p.add_argument("--metrics-port", type=metrics_port, default=env.worker_metrics, help="$ESPER_WORKER_METRICS_PORT")
    p.add_argument("--deadline-s", type=at_least(0.01, float, MAX_DEADLINE_S), default=DEFAULT_DEADLINE_S,
                   help="deadline of each Decide call (a frozen tamiyo_server is noticed within it)")
    p.add_argument("--patience-s", type=at_least(0, float), default=120.0, help="wait this long for tamiyo_server")
    p.add_argument("--exit-when-done", action="store_true", help="exit after the episodes")
    add_token_flag(p)
    args = p.parse_args(argv)
    # The run is labelled by its controller: tamiyo_server serves the heuristic, or the PPO policy.
    args.mode = "ppo" if args.ppo else "heuristic"
    base = train_config(args)
    check_outputs(base, make=False)
    continue_runs = not getattr(args, "fresh", False)
    if not args.ppo and args.grouped is None and continue_runs:  # a run keeps its own way, as under --resume
        base = continued_grouping(base)
    shipping = None
    if args.ppo:
        base = ppo_config(args, base)
        if not 0 < len(args.worker_id) <= MAX_WORKER_ID_CHARS:  # the learner refuses the trajectories of any other
            raise UsageError(f"--worker-id must be 1 to {MAX_WORKER_ID_CHARS} characters, got {len(args.worker_id)}")
        spool_dir = args.spool_dir or os.path.join(args.runs_dir, "spool", args.worker_id)
        if why := folder_refusal(Path(spool_dir), "--spool-dir"):
            raise UsageError(why)
        shipping = Shipping(learner=args.learner, worker_id=args.worker_id, resend_s=args.resend_s, spool_dir=spool_dir,
                            window=args.window)
    return Config(run=base, tamiyo=args.tamiyo, hub_pub=args.hub_pub, host=args.host,
                  metrics_port=args.metrics_port, deadline_s=args.deadline_s, patience_s=args.patience_s,
                  exit_when_done=args.exit_when_done, shipping=shipping, token=args.token,
                  continue_runs=continue_runs)


class OtherExperiment(ValueError):
    """The spool holds the rounds of an experiment with other settings."""


def claim_spool(spool: Spool, tcfg: TrainerConfig) -> None:
    """Record in the spool (experiment.json) the experiment whose rounds it holds, or OtherExperiment when it
    holds another's: a worker started with new settings and an old --worker-id had gone on from the old
    experiment's episode count (playing nothing if that had finished) and resent the old rounds to its learner.
    An empty spool, none of whose rounds was ever played, is anyone's."""
    path = spool.directory / "experiment.json"
    if path.is_file() and (spool.progress or any(spool.directory.glob("*.traj"))):
        try:
            differ = changed_settings(tcfg, json.loads(path.read_text()), RESUMABLE_CHANGES)
        except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:
            differ = [f"unreadable: {exc}"]
        if differ:
            raise OtherExperiment(f"{spool.directory} holds the rounds of another experiment ({', '.join(differ)}"
                                  f" differ{'s' if len(differ) == 1 else ''}): delete it to start afresh, or give "
                                  f"this experiment its own --worker-id or --spool-dir")
        return
    write_atomic(path, json.dumps(asdict(tcfg)))


def play_and_ship(cfg: Config, policy: RemotePolicy, publisher: PublisherSink, stop: StopSignal,
                  log: logging.Logger) -> None:
    """--ppo: rounds of n_envs episodes (episode i uses seed + i), each shipped as one trajectory."""
    tcfg, ship = cfg.run.trainer, cfg.shipping
    data = cfg.run.data_by_device(load_task_data(tcfg.env.task, cfg.run.data_dir, batch_size=tcfg.env.train.batch_size))
    spec = tcfg.feature_spec
    level = from_short_name(TelemetryLevel, cfg.run.telemetry_level)
    ctx = make_context(cfg.token)
    spool = Spool(Path(ship.spool_dir))
    claim_spool(spool, tcfg)
    sender = TrajectorySender(ctx, ship.learner, ship.worker_id, ship.resend_s, ship.window, spool)
    REGISTRY.register(LiveMetrics(sender.metrics()))
    act = remote_act(policy, spec)
    processes = cfg.run.start_env_processes()
    # A run id per process: the worker id is stable across restarts, and an episode a kill interrupted is
    # played again from its start, a new run for karn rather than a second copy of the old one.
    run_id = new_run_id(ship.worker_id)
    if cfg.run.num_workers is not None:
        torch.set_num_threads(cfg.run.num_workers)
    files = cfg.run.file_sinks(run_id)  # --telemetry-file, --telemetry-dir: every episode's events, as esper train's
    try:
        for first in range(sender.spool.progress, tcfg.episodes, tcfg.n_envs):
            if stop.is_set():
                break
            episodes = range(first, min(first + tcfg.n_envs, tcfg.episodes))
            rollout, _, _ = play_episodes(tcfg, data, episodes,
                                          lambda e: Telemetry(f"{run_id}_ep{e:04d}", level, [publisher, *files]),
                                          ActionCodec(spec), act, processes=processes, grouped=cfg.run.grouped)
            sequence = sender.send(rollout, tcfg.env.task, stop.is_set, progress=episodes[-1] + 1,
                                   rewards_json=json.dumps(recorded_with(tcfg.reward, tcfg.ppo.gamma)))
            sender.poll(0)
            versions = sorted(set(rollout.policy_version.flatten().tolist()))
            log.info("shipped trajectory %d: episodes %d-%d, policy versions %s", sequence, episodes[0],
                     episodes[-1], versions)
    finally:
        close_all(processes)
        for sink in files:
            sink.close()
    acked = False
    try:  # SIGTERM while waiting for acks ends the wait, not the summary: what is unacked stays spooled
        acked = sender.flush(timeout_s=max(60.0, 3 * ship.resend_s), stop=stop.is_set)
        if not acked and not cfg.exit_when_done and not stop.is_set():  # it idles anyway: the learner may return
            log.warning("%d trajectories not acked after %.0f s: resending them until they are, or SIGTERM",
                        len(sender.unacked), max(60.0, 3 * ship.resend_s))
            acked = sender.flush(timeout_s=math.inf, stop=stop.is_set)
    except Stopped:
        pass
    log.info("trajectories: %d acked, %d refused, %d resends%s", sender.acked, sender.rejected, sender.resends,
             "" if acked else f", {len(sender.unacked)} never acked (spooled: a restart resends them)")
    sender.close()
    ctx.term()


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv)
    if refuse_bind("tolaria_worker", cfg.host, cfg.token):
        return 2
    log = setup_logging("tolaria_worker")
    stop = StopSignal()
    if cfg.metrics_port >= 0:
        metrics_server = start_metrics(cfg.host, cfg.metrics_port, cfg.token)
        log_endpoint(log, "metrics", metrics_url(cfg.host, metrics_server.server_port))
    publisher = PublisherSink(cfg.hub_pub, token=cfg.token)
    if not publisher.wait_attached(timeout_s=10.0):
        log.warning("hub at %s not attached after 10 s: events are lost until it is", cfg.hub_pub)
    policy = RemotePolicy(cfg.tamiyo, cfg.deadline_s, cfg.patience_s, stop=stop.event, token=cfg.token)
    experiment = cfg.run.trainer if cfg.shipping else cfg.run  # both have episodes, env and device
    log.info("running %d episode(s) of %s on %s%s, decisions from %s", experiment.episodes, experiment.env.task,
             experiment.device, " grouped" if cfg.run.grouped else "", cfg.tamiyo)

    status = 0
    try:
        with stop.interrupting():  # a long epoch is cut short: the next start continues from its checkpoint
            if cfg.shipping:
                play_and_ship(cfg, policy, publisher, stop, log)
            else:
                run(cfg.run, policy=policy, sinks=(publisher,), continue_runs=cfg.continue_runs)
        log.info("episodes done: %d events published, %d decide retries", publisher.published, policy.retries)
    except Stopped as exc:
        log.info("stopped mid-episode (%s): a restart continues from the last checkpoint", exc)
    except PolicyUnavailable as exc:  # stopping mid-episode, or tamiyo gone for longer than patience
        status = 0 if stop.is_set() else 1
        log.log(logging.INFO if status == 0 else logging.ERROR, "episode abandoned: %s", exc)
    except (SpoolBusy, SpoolCorrupt, OtherExperiment, ResumeError) as exc:  # ResumeError: a run another trains
        status = 2
        log.error("%s", exc)
    except (DataError, EnvProcessError, NotNeural) as exc:  # missing data; --env-processes: a child died; tamiyo
        status = 1
        log.error("%s", exc)
    except IllegalAction as exc:  # the run is left at its last checkpoint (a PPO round: played again on restart)
        status = 1
        log.error("tamiyo at %s decided an action the run cannot take: %s", cfg.tamiyo, exc)
    except grpc.RpcError as exc:  # an answer RemotePolicy does not wait out (UNAVAILABLE, DEADLINE_EXCEEDED it does)
        status = 1
        log.error("tamiyo at %s refused the decision: %s: %s", cfg.tamiyo, exc.code().name, exc.details())
    if status == 0 and not cfg.exit_when_done:
        stop.wait()

    policy.close()
    publisher.shutdown()
    if cfg.metrics_port >= 0:
        metrics_server.shutdown()
    stop.close()
    return status


if __name__ == "__main__":
    raise SystemExit(run_service("tolaria_worker", main))
