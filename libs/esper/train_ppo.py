"""`esper train ppo`: learn a growth controller with PPO in one process and write a run directory.

`runs/<time>_ppo_<task>_s<seed>/` holds `config.json` (the resolved config), `telemetry.jsonl` (the
learner's PPOUpdate events, and every episode's decisions, epochs, gates and transitions under its own
run id `<run>_ep<i>`), `summary.json` (every episode's result and every update's statistics, rewritten
after each round) and `checkpoint.pt` (or `--save PATH`), rewritten after each round. `--resume PATH`
continues a checkpoint exactly, up to `--episodes` episodes in all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from esper.cli import UsageError, check_output_file, chosen_grouping, resolve_device
from esper.durable import write_atomic
from esper.experiment import Interrupted
from esper.leyline import RunStarted, TelemetryLevel, from_short_name
from esper.nissa import JsonlSink, Sink, Telemetry, new_run_id
from esper.simic.checkpoint import ResumeError, load_checkpoint, save_checkpoint
from esper.simic.env import GrowthEnv
from esper.simic.env_process import EnvProcess, close_all, start_env_processes
from esper.simic.ppo import PPOConfig
from esper.simic.rewards import MODES, RewardConfig
from esper.simic.trainer import EnvFactory, PPOTrainer, TrainerConfig, check_loadable
from esper.tolaria.data import Dataset, load_task_data
from esper.transport.config import finite


@dataclass(frozen=True)
class PPORunConfig:
    trainer: TrainerConfig
    data_dir: str | None = None
    gpu_preload: bool = False
    """Keep the dataset on each environment device."""
    num_workers: int | None = None
    """CPU threads torch uses for the environments and the policy (torch.set_num_threads); None: torch's
    default. Esper has no DataLoader (datasets are resident tensors), so the original tool's meaning,
    DataLoader workers per environment, has nothing to configure."""
    env_processes: bool = False
    """Step each of the n_envs environments in a process of its own (simic.env_process), so that they
    train at once: faster on a GPU, where one small host leaves the device idle; slower on a 2-core CPU."""
    grouped: bool = False
    """Train the environments' epochs together, each device's (up to 8 at a time) as the groups of one network
    (tolaria.grouped, simic.step_together):
    the mechanism that kept an H100 busiest with small hosts (bench/concurrency.py)."""
    telemetry_level: str = "normal"
    telemetry_file: str | None = None
    telemetry_dir: str | None = None
    runs_dir: str = "runs"
    save: str | None = None
    """Checkpoint path (default: <run dir>/checkpoint.pt)."""
    resume: str | None = None
    """Checkpoint to continue from."""

    @property
    def device(self) -> str:
        return self.trainer.device

    @property
    def mode(self) -> str:
        return "ppo"

    @property
    def env(self):
        """The environments' EnvConfig: with `mode`, what `esper train --tui` reads of any run config."""
        return self.trainer.env

    def data_by_device(self, data: Dataset) -> dict[str, Dataset]:
        """The dataset for each environment device: moved there with --gpu-preload, unless environment
        processes load their own."""
        preload = self.gpu_preload and not self.env_processes
        return {d: data.to(d) if preload else data for d in self.trainer.env_devices}

    def file_sinks(self, run_id: str) -> list[Sink]:
        """--telemetry-file's and --telemetry-dir's sinks for the training run `run_id` (its episodes' events go
        in the same files, under their own run ids); none at --telemetry-level off."""
        if self.telemetry_level == "off":
            return []
        return ([JsonlSink(Path(self.telemetry_file))] if self.telemetry_file else []) + \
            ([JsonlSink(Path(self.telemetry_dir) / f"{run_id}.jsonl")] if self.telemetry_dir else [])

    def start_env_processes(self) -> list[EnvProcess]:
        """With --env-processes, n_envs environment processes on the environment devices; else none."""
        t = self.trainer
        return (start_env_processes(t.n_envs, t.env_config, t.env_devices, self.data_dir, self.gpu_preload,
                                    self.num_workers) if self.env_processes else [])


def add_ppo_flags(p: argparse.ArgumentParser, save_default: str = "<run dir>/checkpoint.pt",
                  steps_environments: bool = True) -> None:
    """The PPO flags, on top of the shared training flags (cli.add_train_flags); `save_default` is what
    --save's help names (simic_learner keeps its checkpoint elsewhere). Without `steps_environments` (simic_learner,
    whose workers step them) --help lists neither --anneal-lr, still parsed so that the learner can say why it
    refuses it, nor --grouped, off: the learner has no environments' epochs to group."""
    ppo, reward = PPOConfig(), RewardConfig()
    p.set_defaults(episodes=TrainerConfig.episodes)
    p.add_argument("--n-envs", type=int, default=TrainerConfig.n_envs,
                   help="environments stepped in lockstep with batched policy inference")
    p.add_argument("--update-every", type=int, default=TrainerConfig.update_every,
                   help="episodes per environment between PPO updates (and one after the last)")
    p.add_argument("--lr", type=finite, default=ppo.lr, help="Adam learning rate")
    p.add_argument("--anneal-lr", action="store_true",
                   help=("decay the learning rate linearly over --episodes (CleanRL's anneal_lr)"
                         if steps_environments else argparse.SUPPRESS))
    p.add_argument("--clip-ratio", type=finite, default=ppo.clip_coef, help="PPO clip coefficient")
    p.add_argument("--gamma", type=finite, default=ppo.gamma, help="discount per epoch")
    p.add_argument("--entropy-coef", type=finite, default=None,
                   help=f"entropy bonus, the schedule's start and end unless given (default {ppo.ent_coef})")
    p.add_argument("--entropy-coef-start", type=finite, default=None, help="entropy bonus at episode 0")
    p.add_argument("--entropy-coef-end", type=finite, default=None, help="entropy bonus after the anneal")
    p.add_argument("--entropy-coef-min", type=finite, default=ppo.ent_coef_min,
                   help="floor under the annealed entropy bonus; may not exceed the start coefficient")
    p.add_argument("--entropy-anneal-episodes", type=int, default=ppo.ent_anneal_episodes,
                   help="episodes of the linear anneal from start to end (0: all --episodes)")
    p.add_argument("--reward-mode", choices=MODES, default=reward.mode)
    p.add_argument("--param-budget", type=int, default=reward.param_budget,
                   help="parameters at which the terminal parameter penalty reaches --param-penalty")
    p.add_argument("--param-penalty", type=finite, default=reward.param_penalty)
    p.add_argument("--sparse-scale", type=finite, default=reward.sparse_scale, help="scale of the terminal reward")
    p.add_argument("--devices", nargs="+", default=None,
                   help="environment devices, round robin (default: --device); the policy stays on --device")
    p.add_argument("--num-workers", type=int, default=None,
                   help="CPU threads for torch (there is no DataLoader to give workers to)")
    p.add_argument("--env-processes", action="store_true",
                   help="step each environment in its own process, all at once (for one GPU; see README)")
    p.add_argument("--grouped", action=argparse.BooleanOptionalAction, default=None,
                   help="train the environments' epochs together, their hosts as the groups of one network and "
                        "each one's seeds on its group (CNN hosts, fp32; see README); default: on when the "
                        "environments are on CUDA and not --env-processes, where it was measured faster than one "
                        "after another, and the other flags allow it (under --no-cuda-graph: 2 or more to each "
                        "device); off on the CPU" if steps_environments else argparse.SUPPRESS)
    if not steps_environments:
        p.set_defaults(grouped=False)
    p.add_argument("--save", default=None, help=f"checkpoint path (default: {save_default})")
    p.add_argument("--resume", default=None, help="continue this checkpoint up to --episodes in all")
    p.add_argument("--no-telemetry", action="store_true",
                   help="drop the seed gradient features from the observation (events: --telemetry-level)")


def ppo_config(args: argparse.Namespace, base) -> PPORunConfig:
    """Validate the PPO flags; `base` is cli.train_config's RunConfig (the shared flags, checked)."""
    given = [f for f, v in (("start", args.entropy_coef_start), ("end", args.entropy_coef_end)) if v is not None]
    if args.entropy_coef is not None and len(given) == 2:
        raise UsageError("--entropy-coef is unused when both --entropy-coef-start and --entropy-coef-end are given")
    if args.entropy_anneal_episodes and not given:
        raise UsageError("--entropy-anneal-episodes needs --entropy-coef-start or --entropy-coef-end to anneal")
    if args.num_workers is not None and args.num_workers < 1:
        raise UsageError(f"--num-workers must be >= 1, got {args.num_workers}")
    if "{seed}" in base.runs_dir:  # it had made a folder named so, in which the run store found nothing
        raise UsageError("--runs-dir: {seed} names each episode's folder, and a PPO run is one folder with all its "
                         "episodes in it")
    devices = tuple(resolve_device(d, "--devices") for d in args.devices or ())
    try:
        ppo = PPOConfig(
            lr=args.lr, anneal_lr=args.anneal_lr, clip_coef=args.clip_ratio, gamma=args.gamma,
            ent_coef=PPOConfig.ent_coef if args.entropy_coef is None else args.entropy_coef,
            ent_coef_start=args.entropy_coef_start, ent_coef_end=args.entropy_coef_end,
            ent_coef_min=args.entropy_coef_min, ent_anneal_episodes=args.entropy_anneal_episodes,
        )
        reward = RewardConfig(mode=args.reward_mode, param_budget=args.param_budget,
                              param_penalty=args.param_penalty, sparse_scale=args.sparse_scale)
        trainer = TrainerConfig(env=base.env, ppo=ppo, reward=reward, episodes=base.episodes, n_envs=args.n_envs,
                                update_every=args.update_every, seed=base.seed, device=base.device,
                                devices=devices, telemetry_features=not args.no_telemetry)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    grouped = ppo_grouped(args, trainer.env_devices)  # once the counts it reads are known to be >= 1
    if args.resume and Path(args.resume).is_dir() and (Path(args.resume) / "checkpoint.pt").is_file():
        args.resume = str(Path(args.resume) / "checkpoint.pt")  # a PPO run's directory: the checkpoint in it
    if args.resume:
        if not Path(args.resume).is_file():
            raise UsageError(f"--resume {args.resume}: no such checkpoint")
        try:
            state = load_checkpoint(Path(args.resume))
            check_loadable(trainer, state, args.resume)
        except ResumeError as exc:
            raise UsageError(f"--resume {args.resume}: {exc}") from None
        if state["counters"]["episodes"] >= trainer.episodes:
            raise UsageError(f"--resume {args.resume} already holds {state['counters']['episodes']} episodes: "
                             f"ask for more with --episodes")
        if note := extension_note(trainer, state):
            print(f"esper: note: --resume {args.resume}: {note}", file=sys.stderr)
    return PPORunConfig(trainer=trainer, data_dir=base.data_dir, gpu_preload=base.gpu_preload,
                        num_workers=args.num_workers, env_processes=args.env_processes, grouped=grouped,
                        telemetry_level=base.telemetry_level, telemetry_file=base.telemetry_file,
                        telemetry_dir=base.telemetry_dir,
                        runs_dir=base.runs_dir, save=args.save, resume=args.resume)


def extension_note(trainer: TrainerConfig, state: dict) -> str:
    """What a --resume to more episodes of a run that had finished does otherwise than a run trained straight
    there ("" where nothing): its last update was made on what was pending at its end, fewer episodes than an
    update takes, and its entropy anneal (over --episodes) spanned fewer episodes."""
    ran = json.loads(state["config_json"])
    done, per_update = state["counters"]["episodes"], trainer.n_envs * trainer.update_every
    if done < ran["episodes"]:
        return ""  # cut mid-run: it continues exactly
    notes = []
    if done % per_update:
        notes.append(f"its run ended with an update on the {done % per_update} episodes pending, where one trained "
                     f"straight to --episodes {trainer.episodes} updates every {per_update}")
    if trainer.ppo.ent_coef_start is not None or trainer.ppo.ent_coef_end is not None:
        if not trainer.ppo.ent_anneal_episodes:
            notes.append(f"the entropy bonus, annealed over --episodes, goes back from its value at the end of "
                         f"{ran['episodes']} episodes to its value after {done} of {trainer.episodes}")
    return "; ".join(notes) + (": it continues, but not as if never stopped" if notes else "")


def ppo_grouped(args: argparse.Namespace, env_devices: tuple[str, ...]) -> bool:
    """Whether the environments' epochs train grouped: --grouped or --no-grouped as given; by default when
    they are on CUDA and not each in a process (--env-processes, asked for), where a round of 4 environments
    stepped 2.84x and of 8 4.60x as fast as one after another (a process each: 2.90x and 2.85x; H100,
    bench/ppo_envs.py). A device's environments are one group (past 8, several of 2 or more: simic.step_together):
    under --no-cuda-graph only where every device has two or more (an eager group of one was no faster than a
    plain run); with graphs, the default, a
    group of one too, whose steps trained 3.1x and 3.5x as fast as a plain run's on an H200 (as `esper
    train`'s runs, cli.episodes_grouped; not yet timed in a PPO round). Off on the CPU, where grouped
    convolutions run slower than plain ones."""
    if args.grouped is None and args.env_processes:
        return False  # the way asked for
    envs = min(args.n_envs, args.episodes)  # a round's, round robin over the devices (TrainerConfig.env_devices)
    per_device = Counter(env_devices[i % len(env_devices)] for i in range(envs))
    cuda = all(torch.device(d).type == "cuda" for d in env_devices)
    return chosen_grouping(args, cuda, "environments one after another", smallest_group=min(per_device.values()),
                           also=("--env-processes",) if args.env_processes else ())


def check_save(save: Path, resume: str | None) -> None:
    """UsageError, before `esper train ppo` trains, for a --save path that cannot take the checkpoint (a
    folder, or a file on the way to it) or that holds another one: a policy is written over only by the run
    that continues it (--resume the same path). Not simic_learner's: it continues its --save by design."""
    check_output_file("--save", save, "the checkpoint file")
    if save.exists() and not (resume and save.resolve() == Path(resume).resolve()):
        raise UsageError(f"--save {save} holds a checkpoint already: choose another path, or continue that one "
                         f"with --resume {save}")


def run_ppo(cfg: PPORunConfig, console: Console | None = None, env_factory: EnvFactory = GrowthEnv,
            sinks: tuple[Sink, ...] = (),
            on_finished: Callable[[Path, dict], None] = lambda run_dir, summary: None) -> dict:
    """Train; returns the summary (also in the run directory, and given with it to `on_finished`: the run store
    records it). Raises DataError (missing data) before anything is written, ResumeError for a checkpoint
    from other settings (ppo_config checks first), Interrupted on Ctrl-C. `sinks` get every event too (the
    learner's and every episode's): `--tui` passes the app's queue."""
    console = console or Console(stderr=True)
    tcfg = cfg.trainer
    if cfg.num_workers is not None:
        torch.set_num_threads(cfg.num_workers)
    resume_state = load_checkpoint(Path(cfg.resume)) if cfg.resume else None
    # loaded here even for --env-processes: a clear error
    data = load_task_data(tcfg.env.task, cfg.data_dir, batch_size=tcfg.env.train.batch_size)

    run_id = new_run_id(f"ppo_{tcfg.env.task}_s{tcfg.seed}")
    run_dir = Path(cfg.runs_dir) / run_id
    run_dir.mkdir(parents=True, exist_ok=False)
    config_json = json.dumps(dataclasses.asdict(cfg), indent=2)
    (run_dir / "config.json").write_text(config_json)
    level = from_short_name(TelemetryLevel, cfg.telemetry_level)
    sinks = list(sinks)
    if level != TelemetryLevel.TELEMETRY_LEVEL_OFF:
        sinks += [JsonlSink(run_dir / "telemetry.jsonl"), *cfg.file_sinks(run_id)]
    telemetry = Telemetry(run_id, level, sinks)
    telemetry.emit(run_started=RunStarted(mode="ppo", task=tcfg.env.task, seed=tcfg.seed, device=tcfg.device,
                                          config_json=config_json))
    trainer = PPOTrainer(tcfg, cfg.data_by_device(data), telemetry,
                         env_telemetry=lambda episode: Telemetry(f"{run_id}_ep{episode:04d}", level, sinks),
                         env_factory=env_factory)
    if resume_state is not None:
        trainer.load_state_dict(resume_state)
    if cfg.env_processes:
        if env_factory is not GrowthEnv:
            raise ValueError("--env-processes runs GrowthEnv only")
        trainer.env_processes = cfg.start_env_processes()
    if cfg.grouped and env_factory is not GrowthEnv:
        raise ValueError("--grouped runs GrowthEnv only")
    trainer.grouped = cfg.grouped
    checkpoint = Path(cfg.save) if cfg.save else run_dir / "checkpoint.pt"
    start = time.perf_counter()

    def summary() -> dict:
        return {"run_id": run_id, "mode": "ppo", "task": tcfg.env.task, "checkpoint": str(checkpoint),
                "episodes_done": trainer.episodes_done, "updates": trainer.updates,
                "global_step": trainer.global_step, "wall_seconds": time.perf_counter() - start,
                "episodes": trainer.episode_log, "update_stats": trainer.update_log}

    def on_round(trainer: PPOTrainer, results: list[dict]) -> None:
        save_checkpoint(trainer.state_dict(), checkpoint)
        write_atomic(run_dir / "summary.json", json.dumps(summary(), indent=2))
        console.print(round_line(trainer, results))

    console.print(f"{run_id}: {tcfg.episodes} episodes, {tcfg.n_envs} envs on {', '.join(tcfg.env_devices)}"
                  f"{' (a process each)' if cfg.env_processes else ' (grouped)' if cfg.grouped else ''}, "
                  f"policy on {tcfg.device}, {trainer.spec.dim} features -> {run_dir}")
    try:
        trainer.train(on_round)
    except KeyboardInterrupt:
        # Recorded as far as it went: a --resume is a run of its own (a new directory, its episodes numbered on
        # from the checkpoint), and the episodes before it had never reached the run store.
        on_finished(run_dir, summary())
        raise Interrupted(f"continue it with the same flags and --resume {checkpoint}" if checkpoint.is_file()
                          else "no round had ended, so nothing was saved") from None
    finally:
        close_all(trainer.env_processes)
    telemetry.close()
    on_finished(run_dir, summary())
    return summary()


def round_line(trainer: PPOTrainer, results: list[dict]) -> str:
    """One console line per round: the episodes' outcome and the last update's health."""
    n = len(results)
    accuracy = sum(r["val_accuracy"] for r in results) / n
    episode_return = sum(r["return"] for r in results) / n
    fates: dict[str, int] = {}
    for r in results:
        for fate, count in r["seed_fates"].items():
            fates[fate] = fates.get(fate, 0) + count
    line = (f"episodes {trainer.episodes_done}/{trainer.cfg.episodes}  val {accuracy:.2f}%  "
            f"return {episode_return:+.3f}  seeds {fates or '{}'}  | ")
    if trainer.pending_rounds:
        rounds_left = trainer.cfg.update_every - trainer.pending_rounds
        return line + f"update {trainer.updates + 1} after {rounds_left} more round(s)"
    last = trainer.update_log[-1]
    nonfinite = last.get("nonfinite_skipped")  # absent from the updates of a checkpoint from before it was counted
    skipped = f"  [red]{nonfinite} minibatches skipped: gradient not finite[/]" if nonfinite else ""
    return line + (f"update {trainer.updates}: entropy {last['entropy']:.2f}  kl {last['approx_kl']:.4f}  "
                   f"ev {last['explained_variance']:.2f}  {last['steps_per_second']:.1f} steps/s{skipped}")

