"""Run growth experiments in one process: build the objects, drive episodes, write the run directory.

A run directory `runs/<time>_<mode>_<task>_s<seed>/` holds `config.json` (the resolved config),
`telemetry.jsonl` (one leyline TelemetryEvent per line), `summary.json` and `model/` (the grown
network exported as plain layers). While the episode runs it also holds `checkpoint.pt` (with
`checkpoint_every`): the whole episode at its last saved epoch, from which `run(resume=...)` continues
bit for bit on the CPU; it is removed once `summary.json` is written. A grouped run writes its next one as
`checkpoint.next.pt` first (save_together).
"""

from __future__ import annotations

import dataclasses
import json
import os
import reprlib
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch
from google.protobuf import json_format
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from esper.durable import lock_exclusively, write_atomic, write_durably
from esper.kasmina import save_exported
from esper.leyline import (Observation, RunFinished, RunStarted, SeedStage, TelemetryEvent, TelemetryLevel,
                           from_short_name, short_name)
from esper.nissa import JsonlSink, Sink, Telemetry, new_run_id
from esper.simic import EnvConfig, GrowthEnv, load_policy, run_episode
from esper.simic.env import fates_in_words, step_together
from esper.simic.checkpoint import ResumeError, changed_settings, contents_checked, load_checkpoint, save_checkpoint
from esper.tamiyo import HeuristicConfig, HeuristicPolicy, Policy, WaitPolicy, decide_all
from esper.tolaria.data import load_task_data
from esper.tolaria.grouped import MAX_GROUP, GroupMember
from esper.tolaria.trainer import EvalResult, Trainer

MODES = ("heuristic", "static", "learned")


@dataclass(frozen=True)
class RunConfig:
    mode: str = "heuristic"
    """heuristic (grow under the rule-based controller) | static (the host alone, same budget) |
    learned (grow under a saved PPO policy, `policy`)."""
    policy: str | None = None
    """learned: a checkpoint of `esper train ppo --save`; its greedy policy makes every decision."""
    policy_sha256: str = ""
    """learned: the policy file's digest, so that resuming with the file since rewritten (PPO rewrites its
    checkpoint as it trains) is refused, not an episode decided by two policies."""
    env: EnvConfig = field(default_factory=EnvConfig)
    heuristic: HeuristicConfig = field(default_factory=HeuristicConfig)
    episodes: int = 1
    """Independent runs; episode i uses seed + i."""
    seed: int = 42
    device: str = "cpu"
    data_dir: str | None = None
    gpu_preload: bool = False
    """Keep the whole dataset on the device (no host->device copy per batch)."""
    telemetry_level: str = "normal"
    telemetry_file: str | None = None
    """Append every episode's events to this JSONL file (besides the run directory's own)."""
    telemetry_dir: str | None = None
    """Write each episode's events to <dir>/<run_id>.jsonl."""
    runs_dir: str = "runs"
    """Where run directories are created; "{seed}" in it becomes each episode's seed."""
    checkpoint_every: int = 0
    """Write <run_dir>/checkpoint.pt every this many epochs (and after the last); 0 = never. A grouped run also
    saves whenever another run of its group does (save_together)."""
    seed_grafts: tuple[tuple[int, str, str], ...] = ()
    """(seed, slot, blueprint): a seed built in before epoch 1 in the episode of that seed only, besides
    env.grafts (every episode's); how one grouped `esper compare` child trains from-scratch runs that each
    have their own grown architecture."""
    grouped: bool = False
    """CNN hosts: train the episodes at once (GROUP_EPISODES at a time), their hosts as the groups of one
    network and each one's seeds on its group (run_grouped)."""


CHECKPOINT = "checkpoint.pt"
NEXT_CHECKPOINT = "checkpoint.next.pt"
"""A grouped run's next checkpoint, written before any run of its group replaces its own (save_together)."""
EPISODE_FORMAT = "esper.episode/1"
GROUP_EPISODES = MAX_GROUP
"""Episodes a grouped experiment trains at once: 0 to 7, then 8 to 15, and so on; a group holds every run's
model, batches and telemetry open at once. A resume forms the same groups: a cut group's runs all stopped
after the same step (save_together), and the groups before it had finished."""
RESUMABLE_CHANGES = ("episodes", "policy", "device", "data_dir", "gpu_preload", "runs_dir", "telemetry_file",
                     "telemetry_dir", "checkpoint_every", "env.train.cudnn_benchmark",
                     "env.train.cuda_graph")
"""RunConfig fields a resumed run may change: how many episodes, where and with which extra copies, the path
its policy file is given by (its bytes are policy_sha256's); not what it trains."""


def make_policy(cfg: RunConfig) -> Policy:
    if cfg.mode == "learned":
        return load_policy(cfg.policy)
    return HeuristicPolicy(cfg.heuristic) if cfg.mode == "heuristic" else WaitPolicy()


def episode_env(cfg: RunConfig, seed: int) -> EnvConfig:
    """The episode's environment: cfg.env with the episode's own grafts (RunConfig.seed_grafts) added."""
    own = tuple((slot, blueprint) for s, slot, blueprint in cfg.seed_grafts if s == seed)
    return dataclasses.replace(cfg.env, grafts=cfg.env.grafts + own) if own else cfg.env


def stage_line(obs: Observation) -> str:
    return " ".join(f"{s.slot}:{short_name(SeedStage, s.stage)}" for s in obs.slots)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run; `hint` says how to continue it."""

    def __init__(self, hint: str):
        super().__init__(hint)
        self.hint = hint


def run(cfg: RunConfig, console: Console | None = None, policy: Policy | None = None,
        sinks: tuple[Sink, ...] = (), resume: Path | None = None, continue_runs: bool = False,
        on_finished: Callable[[Path, dict], None] = lambda run_dir, summary: None) -> list[dict]:
    """Run `cfg.episodes` episodes; returns their summaries (also written to each run directory), each
    also given to `on_finished` with its run directory as its episode ends (the run store records it then).
    `policy` replaces the one `cfg.mode` names and `sinks` get every event too: the tolaria worker service
    passes a remote policy and the bus publisher here. Ctrl-C raises Interrupted.

    `resume`, a run directory of this config, continues that episode from its checkpoint, then the
    episodes after it, in the run directories the same experiment began for them (its id, `group` in each
    config.json; a finished one is not run again); a grouped experiment resumes as a whole.
    `continue_runs` continues each episode in the newest run directory of this config and episode seed
    under `runs_dir`, and does not run again one that finished: how a restarted worker picks up its
    experiment. Either raises ResumeError for a run of other settings."""
    console = console or Console(stderr=True)
    # The directory itself, not a name for it: `--resume .` or a `latest` symlink named no run (run_dir.name)
    resume = None if resume is None else Path(os.path.realpath(resume))
    resumed = None if resume is None else episode_of(cfg, resume)
    # An experiment's episodes share an id, so that a resume continues its own siblings, not those of
    # another experiment with the same flags (None: a restarted worker's, which continues whatever it
    # finds, or an experiment's from before they had ids, which continues run directories newer than the
    # resumed one: theirs, unless another experiment of the same flags ran since).
    group = config_differences(cfg, resume)[2] if resume is not None else None
    continue_runs = continue_runs or resume is not None
    # Read once: every episode is decided by the policy policy_sha256 records, though PPO may rewrite its file
    policy = policy or make_policy(cfg)
    device = torch.device(cfg.device)
    data = load_task_data(cfg.env.task, cfg.data_dir, batch_size=cfg.env.train.batch_size)
    if cfg.gpu_preload:
        data = data.to(device)
    summaries: dict[int, dict] = {}
    todo: list[tuple[int, Path | None]] = []  # (episode, the run directory it continues in)
    continued: dict[int, Path] = {}  # a resumed run's may lie outside --runs-dir

    def run_dir_of(episode: int) -> Path:
        return continued.get(episode) or run_parent(cfg.runs_dir, cfg.seed + episode) / summaries[episode]["run_id"]

    for episode in range(0 if cfg.grouped else resumed or 0, cfg.episodes):
        run_dir = resume if episode == resumed else find_run(cfg, cfg.seed + episode, group) if continue_runs else None
        if resume is not None and group is None and not cfg.grouped and run_dir and run_dir.name < resume.name:
            run_dir = None  # an earlier experiment's (a run directory's name begins with its time)
        if run_dir is not None:
            continued[episode] = run_dir
        if run_dir is not None and (run_dir / "summary.json").is_file():
            console.print(f"{run_dir.name}: finished already")
            summaries[episode] = read_summary(run_dir / "summary.json")  # refused, it leaves the checkpoint be
            (run_dir / CHECKPOINT).unlink(missing_ok=True)  # a kill between the summary and this unlink left it
            on_finished(run_dir, summaries[episode])  # recorded again: whatever stopped its recording before
        else:
            todo.append((episode, run_dir))
    new_id = group or uuid.uuid4().hex[:12]
    held_before = set(_held)
    try:
        for _, run_dir in todo:  # before settle_saves or a trim rewrites a file another process may be writing
            run_dir and hold(run_dir)
        if cfg.grouped:
            for first in range(0, cfg.episodes, GROUP_EPISODES):
                if not (group_todo := [(e, d) for e, d in todo if first <= e < first + GROUP_EPISODES]):
                    continue  # the group had finished
                trained = run_grouped(cfg, data, device, console, group_todo, policy, sinks, new_id)
                summaries |= trained
                for episode in sorted(trained):
                    on_finished(run_dir_of(episode), trained[episode])
        else:
            for episode, run_dir in todo:
                summaries[episode] = run_one(cfg, data, device, cfg.seed + episode, console, policy, sinks,
                                             run_dir, new_id)
                on_finished(run_dir_of(episode), summaries[episode])
    except Interrupted:
        raise
    except KeyboardInterrupt:  # between episodes (or groups): say how to go on, as a cut episode does
        if not summaries:
            raise
        raise Interrupted(f"continue the episodes after it with the same flags and --resume "
                          f"{run_dir_of(max(summaries))}") from None
    finally:  # whatever ended it (an error, Ctrl-C, even one inside an Episode's making): a run finished let go
        for run_dir in [d for d, (_, thread) in _held.items() if thread == threading.get_ident()
                        and d not in held_before]:
            release(run_dir)
    return [summaries[episode] for episode in sorted(summaries)]


TRAINING_LOCK = "train.lock"
_held: dict[Path, tuple[TextIO, int]] = {}
"""The run directories this process trains (resolved: one key however the path is spelled), each with its flock
on TRAINING_LOCK and the thread that took it, held until the run finishes or the `run` that began it ends."""


def hold(run_dir: Path) -> None:
    """This process's exclusive lock on `run_dir`, or ResumeError when another process holds it: two processes
    continuing one run (a --resume of a run still training, two workers of one experiment) had each trimmed and
    rewritten its files, the events of one going to a deleted telemetry.jsonl."""
    if run_dir.resolve() in _held:
        return
    if (lock := lock_exclusively(run_dir / TRAINING_LOCK)) is None:
        raise ResumeError(f"{run_dir} is being trained by another process")
    _held[run_dir.resolve()] = lock, threading.get_ident()


def release(run_dir: Path) -> None:
    if held := _held.pop(run_dir.resolve(), None):
        held[0].close()


def config_differences(cfg: RunConfig, run_dir: Path) -> tuple[list[str], int, str | None]:
    """The RunConfig fields (but RESUMABLE_CHANGES) in which `cfg` differs from the run directory's
    config.json, the run's episode seed and its group (a grouped experiment's id; None before groups had
    one); ResumeError when that is not an episode's config (a PPO run's, or no JSON at all)."""
    try:
        saved = json.loads((run_dir / "config.json").read_text())
        differ = changed_settings(cfg, saved, (*RESUMABLE_CHANGES, "episode_seed", "group"))
        return differ, int(saved["episode_seed"]), saved.get("group")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:  # OSError: a folder, a broken link
        raise ResumeError(f"{run_dir} is not a run directory of esper train heuristic|static|learned "
                          f"(config.json: {type(exc).__name__})") from None


def episode_of(cfg: RunConfig, run_dir: Path) -> int:
    """The episode index of `run_dir` in the experiment `cfg` describes; ResumeError if it is not one of its."""
    if not (run_dir / "config.json").is_file():
        raise ResumeError(f"{run_dir} is not a run directory (no config.json)")
    differ, seed, _ = config_differences(cfg, run_dir)
    if differ:
        raise ResumeError(f"{run_dir} was run with other settings: {', '.join(differ)} differ")
    if not 0 <= seed - cfg.seed < cfg.episodes:
        raise ResumeError(f"{run_dir} has episode seed {seed}: not among --seed {cfg.seed} + 0..{cfg.episodes - 1}")
    return seed - cfg.seed


def find_run(cfg: RunConfig, seed: int, group: str | None = None) -> Path | None:
    """The newest run directory under `cfg.runs_dir` of this config and episode seed (and of `group`, when
    one is given), if any."""
    # Newest first: a run directory's name starts with its time.
    for config in sorted(run_parent(cfg.runs_dir, seed).glob("*/config.json"), reverse=True):
        try:
            differ, saved_seed, saved_group = config_differences(cfg, config.parent)
        except ResumeError:  # another kind of run directory (PPO), or not one at all
            continue
        if not differ and saved_seed == seed and group in (None, saved_group):
            return config.parent
    return None


def continued_grouping(cfg: RunConfig) -> RunConfig:
    """`cfg`, or `cfg` with the other grouping where the experiment's runs under `runs_dir` were trained that way
    and none this way: a tolaria_worker restarted with --grouped left out continues its runs as they were
    trained, not anew beside them, when the default changed under it (it follows the device and, under
    --no-cuda-graph, the number of episodes)."""
    seeds = range(cfg.seed, cfg.seed + cfg.episodes)
    other = dataclasses.replace(cfg, grouped=not cfg.grouped)
    if not any(find_run(cfg, seed) for seed in seeds) and any(find_run(other, seed) for seed in seeds):
        return other
    return cfg


def read_summary(path: Path) -> dict:
    """A finished run's summary.json; ResumeError for one that cannot be read (damaged since: a run's results
    are not guessed, nor is it trained again unasked)."""
    try:
        summary = json.loads(path.read_text())
        if not isinstance(summary, dict):
            raise TypeError(f"a JSON {type(summary).__name__}, not an object")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as exc:
        raise ResumeError(f"{path} cannot be read ({type(exc).__name__}): delete its run directory to train that "
                          "run again") from None
    return summary


def resumed(env: GrowthEnv, state: dict, run_dir: Path) -> tuple[Observation, list[dict], float]:
    """`env` continued from `state`, the checkpoint of `run_dir` (Episode.checkpoint_state): the observation
    it steps on from, the curve so far and the wall seconds spent. ResumeError for a checkpoint of another
    run, or one of the right format that cannot be continued (made or damaged by hand: a key missing, a tensor
    of another shape)."""
    path = run_dir / CHECKPOINT
    with contents_checked(path):
        if (saved := state["env"]["run_id"]) != run_dir.name:
            raise ResumeError(f"{path} is the checkpoint of run {saved}, not of {run_dir.name}")
        if not (type(sequence := state["env"]["sequence"]) is int and sequence >= 0):
            raise ValueError(f"telemetry sequence {sequence!r}")
        obs, curve = env.resume(state["env"]), state["curve"]
        if not 0 <= obs.signals.epoch <= env.cfg.max_epochs:
            raise ValueError(f"epoch {obs.signals.epoch} of {env.cfg.max_epochs}")
        if not (isinstance(curve, list) and all(isinstance(point, dict) for point in curve)):
            raise TypeError("its curve is no list of epochs")
        if unknown := [slot.slot for slot in obs.slots if slot.stage not in SeedStage.values()]:
            raise ValueError(f"slots {unknown} in no stage this build knows")
        return obs, list(curve), float(state["wall_seconds"])


def run_parent(runs_dir: str, seed: int) -> Path:
    """The folder episode `seed`'s run directory goes in: `runs_dir` with "{seed}" in it replaced (esper
    compare keeps each seed's run in <out>/runs/<arm>/seed<seed>, whether one process trains it or a group)."""
    return Path(runs_dir.replace("{seed}", str(seed)))


def trim_jsonl(path: Path, last_sequence: int) -> list[TelemetryEvent]:
    """Keep a run's JSONL events up to `last_sequence` (its checkpoint's), and return them: the resumed run
    emits the rest again under the same numbers. A line that is no event of this build (cut short by a kill,
    or a hand edit) ends what is kept, as a later sequence number does."""
    if not path.is_file():
        return []
    kept, events = [], []
    for line in path.read_bytes().splitlines(keepends=True):
        try:
            event = json_format.Parse(line.decode("utf-8"), TelemetryEvent())
        except (UnicodeDecodeError, json_format.ParseError):
            break
        if not (0 < event.sequence <= last_sequence and line.endswith(b"\n")):
            break
        kept.append(line)
        events.append(event)
    write_durably(path, lambda f: f.write(b"".join(kept)))
    return events


class Episode:
    """One episode's run directory while it trains: its environment, telemetry, curve and progress bar.
    Made for a seed, whoever steps its `env` calls `epoch_done(obs)` after every step (and saves
    `checkpoint_state()` when it says one is due), then `finish(obs)` writes the summary (run_one steps one
    episode; run_grouped steps a group in lockstep)."""

    def __init__(self, cfg: RunConfig, data, device: torch.device, seed: int, console: Console,
                 run_dir: Path | None = None, trainer_factory=Trainer, group: str | None = None):
        """A new run directory (of the experiment `group`: its id), or `run_dir` continued from its
        checkpoint (from the start, under the same run id, when it has none yet). Nothing of a continued
        run's is written before `begin`: a group's runs are all resumed first, so that a checkpoint refused
        leaves every run of the group as it was."""
        self.cfg, self.data, self.device, self.seed, self.console = cfg, data, device, seed, console
        state = None
        if run_dir is None:
            run_dir = run_parent(cfg.runs_dir, seed) / new_run_id(f"{cfg.mode}_{cfg.env.task}_s{seed}")
            run_dir.mkdir(parents=True, exist_ok=False)
            hold(run_dir)
            config = dataclasses.asdict(cfg) | {"episode_seed": seed} | ({"group": group} if group else {})
            write_atomic(run_dir / "config.json", json.dumps(config, indent=2))
        elif os.path.lexists(run_dir / CHECKPOINT):  # a folder or a broken link there is no "no checkpoint"
            if not (run_dir / CHECKPOINT).is_file():
                raise ResumeError(f"{run_dir / CHECKPOINT} is not a file: move it away to train the run again "
                                  "from its first epoch")
            state = load_checkpoint(run_dir / CHECKPOINT, EPISODE_FORMAT)
        else:  # stopped before its first checkpoint (or with --checkpoint-every 0)
            console.print(f"{run_dir.name}: no checkpoint; starting it again from its first epoch")
        self.run_dir = run_dir
        for path in self.own_files():  # refused now, not as the group's other runs are cut back in begin
            if os.path.lexists(path) and not path.is_file():
                raise ResumeError(f"{path} is not a file: move it away to continue the run")
        self.telemetry = Telemetry(run_dir.name, from_short_name(TelemetryLevel, cfg.telemetry_level))
        """Its sinks once the episode begins."""
        self.env = GrowthEnv(episode_env(cfg, seed), data, device, self.telemetry, trainer_factory)
        self.obs: Observation
        """The observation the episode steps on from: its first, or the resumed run's."""
        self.curve: list[dict]
        self.wall = 0.0
        self.continued = state is not None
        """Continued from a checkpoint (the checkpoint itself is not kept: the env holds what it held)."""
        if state:
            self.obs, self.curve, self.wall = resumed(self.env, state, run_dir)
            console.print(f"{run_dir.name}: resuming after epoch {self.obs.signals.epoch}")

    def own_files(self) -> list[Path]:
        """The run's own telemetry files: its telemetry.jsonl, and its copy in --telemetry-dir."""
        own = [self.run_dir / "telemetry.jsonl"]
        return own + ([Path(self.cfg.telemetry_dir) / f"{self.run_dir.name}.jsonl"] if self.cfg.telemetry_dir else [])

    def begin(self, extra_sinks: tuple[Sink, ...] = ()) -> None:
        """Its telemetry cut back to the checkpoint's events (those replayed to `extra_sinks`, the bus) and
        opened, or a new run's first events; the clock started."""
        cfg, run_id = self.cfg, self.run_dir.name
        sinks = list(extra_sinks)
        if self.telemetry.level != TelemetryLevel.TELEMETRY_LEVEL_OFF:
            own = self.own_files()
            so_far = [trim_jsonl(path, self.telemetry.sequence) for path in own][0]
            if self.continued and not own[0].is_file():  # deleted since: the run goes on, its record from here on
                self.console.print(f"{run_id}: its telemetry.jsonl is gone; it keeps the events from this epoch on")
            # The extra sinks (the bus) get the run so far again: whatever they missed when the stack stopped
            # fills in, and consumers drop what they had by sequence number.
            for event in so_far:
                for sink in extra_sinks:
                    sink.emit(event)
            sinks += [JsonlSink(path) for path in own]
            if cfg.telemetry_file:  # shared by runs: a resumed run's events after its checkpoint appear twice
                sinks.append(JsonlSink(Path(cfg.telemetry_file)))
        self.telemetry.sinks = sinks
        if not self.continued:
            self.telemetry.emit(run_started=RunStarted(mode=cfg.mode, task=cfg.env.task, seed=self.seed,
                                                       device=str(self.device),
                                                       config_json=(self.run_dir / "config.json").read_text()))
            self.obs, self.curve = self.env.reset(self.seed), []
        self.start = time.perf_counter() - self.wall
        self.progress: Progress | None = None

    def show_in(self, progress: Progress) -> None:
        """A bar of this episode in `progress`, moved on by every epoch_done."""
        self.progress = progress
        self.bar = progress.add_task(self.run_dir.name, total=self.cfg.env.max_epochs, acc="-", loss="-", slots="",
                                     completed=self.obs.signals.epoch)

    def epoch_done(self, obs: Observation) -> bool:
        """After each step: the progress bar and the curve; returns whether a checkpoint is due (every
        `checkpoint_every` epochs, and after the last), for whoever steps the episode to save."""
        cfg, env = self.cfg, self.env
        if self.progress is not None:
            self.progress.update(self.bar, completed=obs.signals.epoch, acc=f"{obs.signals.val_accuracy:.2f}%",
                                 loss=f"{obs.signals.train_loss:.3f}", slots=stage_line(obs))
        self.curve.append({
            "epoch": obs.signals.epoch, "val_accuracy": obs.signals.val_accuracy,
            "val_loss": obs.signals.val_loss,
            "train_loss": obs.signals.train_loss, "total_params": obs.signals.total_params,
            "train_flops": env.trainer.train_flops,
            "stages": {slot: short_name(SeedStage, stage) for slot, stage in env.epoch_stages.items()},
        })
        every, epoch = cfg.checkpoint_every, obs.signals.epoch
        return bool(every) and (epoch % every == 0 or epoch == cfg.env.max_epochs)

    def checkpoint_state(self) -> dict:
        """The whole episode as a checkpoint holds it."""
        return {"env": self.env.state_dict(), "curve": self.curve, "wall_seconds": time.perf_counter() - self.start}

    def finish(self, obs: Observation) -> dict:
        """The test accuracy, the final telemetry, the exported model and summary.json; returns the summary."""
        env, run_dir, cfg = self.env, self.run_dir, self.cfg
        test = env.evaluate_test()
        test_accuracy = test.accuracy
        wall = time.perf_counter() - self.start
        self.telemetry.emit(run_finished=RunFinished(val_accuracy=obs.signals.val_accuracy, test_accuracy=test_accuracy,
                                                     test_loss=test.loss,
                                                     total_params=obs.signals.total_params, wall_seconds=wall,
                                                     epochs=obs.signals.epoch))
        self.telemetry.close()
        save_exported(env.model, run_dir / "model", self.data.mean, self.data.std)
        if self.data.tokenizer is not None:  # a language model: `esper sample` needs ids -> text
            self.data.tokenizer.save(run_dir / "model" / "tokenizer.json")
        summary = summarize(env, obs, run_dir.name, cfg, self.seed, str(self.device), test, wall)
        summary |= {"curve": self.curve}
        write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
        (run_dir / CHECKPOINT).unlink(missing_ok=True)
        release(run_dir)
        self.console.print(
            f"{run_dir.name}: val {summary['val_accuracy']:.2f}% (loss {summary['val_loss']:.3f})  "
            f"test {test_accuracy:.2f}% (loss {test.loss:.3f})  params {summary['total_params']:,}  "
            f"seeds: {fates_in_words(summary['seed_counts'])}  "
            f"{wall:.1f}s  -> {run_dir}"
        )
        return summary


def progress_bars(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("val {task.fields[acc]}  train loss {task.fields[loss]}  {task.fields[slots]}"),
        TimeElapsedColumn(), console=console, transient=False,
    )


def run_one(cfg: RunConfig, data, device: torch.device, seed: int, console: Console,
            policy: Policy, extra_sinks: tuple[Sink, ...] = (), run_dir: Path | None = None,
            group: str | None = None) -> dict:
    """One episode in a new run directory (of the experiment `group`), or continued in `run_dir` from its
    checkpoint."""
    episode = Episode(cfg, data, device, seed, console, run_dir, group=group)
    episode.begin(extra_sinks)

    def save_when_due(obs: Observation) -> None:
        if episode.epoch_done(obs):
            save_checkpoint(episode.checkpoint_state(), episode.run_dir / CHECKPOINT, EPISODE_FORMAT)

    try:
        with progress_bars(console) as progress:
            episode.show_in(progress)
            obs = run_episode(episode.env, policy, seed, save_when_due, episode.obs)
        return episode.finish(obs)
    except KeyboardInterrupt:
        raise Interrupted(resume_hint(cfg, [episode], "it")) from None


def resume_hint(cfg: RunConfig, episodes: list[Episode], them: str) -> str:
    """How to continue the interrupted episodes: --resume continues from their checkpoints, or where none was
    written, trains them again from their first epochs (the hint had promised to continue them either way).
    One that finished before the interrupt (its summary written, its checkpoint gone) the resume keeps."""
    cut = [e for e in episodes if not (e.run_dir / "summary.json").is_file()]
    run_dir = (cut or episodes)[0].run_dir
    anew = [e for e in cut if not (e.run_dir / CHECKPOINT).is_file()]
    hint = f"continue {them} with the same flags and --resume {run_dir}"
    if not anew:
        return hint
    why = "--checkpoint-every 0" if cfg.checkpoint_every == 0 else "stopped before the first checkpoint"
    if len(anew) < len(cut):  # a group continued with an episode begun since
        return f"{hint} ({len(anew)} of {len(cut)} from epoch 1: {why})"
    return f"no checkpoint was written ({why}): the same flags and --resume {run_dir} train {them} again from epoch 1"


def run_grouped(cfg: RunConfig, data, device: torch.device, console: Console, todo: list[tuple[int, Path | None]],
                policy: Policy, sinks: tuple[Sink, ...] = (), group: str = "") -> dict[int, dict]:
    """The episodes `todo` at once (RunConfig.grouped), each in a new run directory or continued in its own;
    returns their summaries by episode. Each is the episode `run_one` would train: its own GrowthEnv, seed,
    data order, decisions, seeds, run directory, telemetry and checkpoints; only the training steps are
    batched, the hosts as the groups of one network and each run's seeds acting on its group
    (esper.tolaria.grouped), so K runs cost about the kernel launches of one plus their seeds'. The
    episodes step together (simic.step_together): every run's operation, the group's epoch, then every
    run's evaluation, governor and telemetry; continued ones may be at different epochs, and each stops
    stepping at its last. `sinks` get every run's events (the TUI's, the dashboard's), as run_one's extra
    sinks do; new run directories are marked as the experiment `group`'s. When any run's checkpoint is due,
    every run that stepped saves one, together (save_together): a resume then finds them all after the same
    step, as they were stepped, whatever epoch each is at."""
    settle_saves([run_dir for _, run_dir in todo if run_dir is not None])
    episodes = {episode: Episode(cfg, data, device, cfg.seed + episode, console, run_dir, GroupMember, group)
                for episode, run_dir in todo}
    for e in episodes.values():  # every run resumed first: one refused, none of the group is touched
        e.begin(sinks)
    last = {episode: e.obs for episode, e in episodes.items()}
    try:
        with progress_bars(console) as progress:
            for e in episodes.values():
                e.show_in(progress)
            while stepping := [episode for episode, e in episodes.items() if e.env.epoch < cfg.env.max_epochs]:
                stepped = step_together([episodes[episode].env for episode in stepping],
                                        decide_all(policy, [last[episode] for episode in stepping]))
                due = False
                for episode, (obs, _) in zip(stepping, stepped):
                    last[episode] = obs
                    due |= episodes[episode].epoch_done(obs)
                if due:
                    save_together([(episodes[episode].run_dir, episodes[episode].checkpoint_state())
                                   for episode in stepping])
        return {episode: e.finish(last[episode]) for episode, e in episodes.items()}
    except KeyboardInterrupt:  # any of the group's runs resumes them all
        # Settled as the resume will settle it, so that the hint says what the resume does
        settle_saves([e.run_dir for e in episodes.values() if not (e.run_dir / "summary.json").is_file()])
        raise Interrupted(resume_hint(cfg, list(episodes.values()), "them")) from None


def save_together(saves: list[tuple[Path, dict]]) -> None:
    """The checkpoints of a group's runs after one step, each (run directory, state), saved so that a resume
    finds all of them or none (settle_saves). Saved one after another, a kill between two had left the runs
    an epoch apart, and a run resumed beside other epochs than its own trains its seeds in other seed
    groups: it ended with other results in the last float digits (its seed groups summed in another order).
    Each state is written whole as NEXT_CHECKPOINT, marked with this save's token and its runs, before any
    replaces its run's CHECKPOINT."""
    save = {"token": uuid.uuid4().hex, "runs": [run_dir.name for run_dir, _ in saves]}
    for run_dir, state in saves:
        save_checkpoint(state | {"group_save": save}, run_dir / NEXT_CHECKPOINT, EPISODE_FORMAT)
    for run_dir, _ in saves:
        promote(run_dir)


def promote(run_dir: Path) -> None:
    """A run's next checkpoint becomes its checkpoint. Not fsynced: a rename a power cut loses leaves the next
    checkpoint in place, which settle_saves promotes as it would have been."""
    os.replace(run_dir / NEXT_CHECKPOINT, run_dir / CHECKPOINT)


def settle_saves(run_dirs: list[Path]) -> None:
    """Finishes or undoes a save_together a kill cut short, before the runs in `run_dirs` resume. Where every
    run of the save among them holds its state (as its next checkpoint, or already as its checkpoint), it was
    written whole: the next checkpoints are promoted. Otherwise they are deleted, and the runs resume from the
    step before, together. A run of the save that is not among them (an experiment resumed with fewer
    --episodes) is not resumed now, and does not count."""
    cut_short = {run_dir: saved_by(run_dir / NEXT_CHECKPOINT) for run_dir in run_dirs
                 if (run_dir / NEXT_CHECKPOINT).is_file()}
    if not cut_short:
        return  # the usual resume: no checkpoint need be read here
    if bare := [run_dir for run_dir, save in cut_short.items() if not save]:
        raise ResumeError(f"{bare[0] / NEXT_CHECKPOINT} holds no group save it can be settled by")
    tokens_held = {run_dir.name: {saved_by(run_dir / CHECKPOINT).get("token"), cut_short.get(run_dir, {}).get("token")}
                   for run_dir in run_dirs}
    for run_dir, save in cut_short.items():
        if all(save["token"] in tokens_held[name] for name in save["runs"] if name in tokens_held):
            promote(run_dir)
        else:
            (run_dir / NEXT_CHECKPOINT).unlink()


def saved_by(path: Path) -> dict:
    """The save_together that wrote the checkpoint at `path` ({"token", "runs"}); {} for none, or no file;
    ResumeError for a record that is not one."""
    save = load_checkpoint(path, EPISODE_FORMAT).get("group_save", {}) if path.is_file() else {}
    if save and not (isinstance(save, dict) and isinstance(save.get("token"), str)
                     and isinstance(save.get("runs"), list) and all(isinstance(name, str) for name in save["runs"])):
        raise ResumeError(f"{path} holds no group save it can be settled by (group_save {reprlib.repr(save)})")
    return save


def summarize(env: GrowthEnv, obs: Observation, run_id: str, cfg: RunConfig, seed: int, device: str,
              test: EvalResult, wall: float) -> dict:
    return {
        "run_id": run_id,
        "mode": cfg.mode,
        "task": cfg.env.task,
        "seed": seed,
        "device": device,
        "epochs": obs.signals.epoch,
        "wall_seconds": wall,
        "val_accuracy": obs.signals.val_accuracy,
        "val_loss": obs.signals.val_loss,
        "best_val_accuracy": obs.signals.best_val_accuracy,
        "test_accuracy": test.accuracy,
        "test_loss": test.loss,
        "host_params": obs.signals.host_params,
        "total_params": obs.signals.total_params,
        "train_flops": env.trainer.train_flops,
        "seed_counts": env.seed_fates(),
        "seeds": [dataclasses.asdict(r) | {"fate": r.fate} for r in env.model.records],
    }
