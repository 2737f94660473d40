"""`esper` command line: `esper train heuristic|static ...`, `esper blueprints`, `esper sample RUN_DIR`,
`esper policy query`, `esper stack status` (those two in stack_cli.py), `esper tui`, `esper dashboard`,
`esper runs ...`, `esper report` (those in karn_cli.py).

Every bad flag or combination exits non-zero with one line saying why.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import reprlib
import signal
import sys
from pathlib import Path

import torch

from esper.kasmina import HOSTS, build_host, load_exported, seed_param_count
from esper.kasmina.blueprints import blueprints_for
from esper import karn_cli, stack_cli
from esper.karn.dashboard.launch import add_dashboard_flags, dashboard_config, train_with_dashboard
from esper.leyline import Blueprint, TelemetryLevel, short_name, short_names
from esper.nissa import new_run_id
from esper.simic import EnvConfig
from esper.simic.checkpoint import ResumeError, file_sha256
from esper.simic.env_process import EnvProcessError
from esper.tolaria.data import DataError
from esper.tolaria.trainer import TrainConfig
from esper.karn.runs_db import StoreError
from esper.transport.config import ConfigError, Parser, UsageError


def add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--episodes", type=int, default=1, help="independent runs; episode i uses seed+i")
    p.add_argument("--max-epochs", type=int, default=75, help="epochs per episode")
    p.add_argument("--max-batches", type=int, default=50, help="training batches per epoch (0 = all)")
    p.add_argument("--task", choices=sorted(HOSTS), default="cifar10")
    p.add_argument("--device", default=None, help="torch device (default: cuda:0 when present, else cpu)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--slots", nargs="+", default=["mid"], help="enabled slots: early mid late")
    p.add_argument("--max-seeds", type=int, default=0, help="seeds that may germinate per episode (0 = no limit)")
    p.add_argument("--data-dir", default=None,
                   help="folder with cifar-10-batches-py/ or cifar10-jpeg.tar.gz, or TinyStories *.txt[.gz] "
                        "(default: $ESPER_DATA_DIR, else torchvision's download of CIFAR-10)")
    p.add_argument("--gpu-preload", action="store_true", help="keep the whole dataset on the device")
    add_speed_flags(p)
    p.add_argument("--telemetry-level", choices=short_names(TelemetryLevel), default="normal")
    p.add_argument("--telemetry-file", default=None, help="also append every event to this JSONL file")
    p.add_argument("--telemetry-dir", default=None, help="also write <dir>/<run_id>.jsonl per episode")
    p.add_argument("--runs-dir", default="runs",
                   help="where run directories are created; {seed} in it becomes each episode's seed")
    p.add_argument("--graft", action="append", default=[], metavar="[SEED=]SLOT:BLUEPRINT",
                   help="build a seed into the host before epoch 1 (repeatable): train a grown architecture "
                        "from scratch; SEED= only in the episode of that seed (not for ppo, whose environments "
                        "are all built alike)")


def add_speed_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: forward passes under bfloat16 autocast (bench/fast_path.py measures it)")
    p.add_argument("--compile", action="store_true", help="torch.compile the host's blocks (seeds stay eager)")
    p.add_argument("--memory-format", choices=["auto", "channels_last", "contiguous"], default="auto",
                   help="of image batches and conv weights; auto: channels_last on the CPU (measured faster "
                        "there), contiguous on CUDA")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="cuDNN's benchmark mode on CUDA: each convolution shape times cuDNN's algorithms once "
                        "and keeps the fastest")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                   help="grouped runs on CUDA: train each step eagerly instead of replaying it as a CUDA graph")


def add_grouped_flag(p: argparse.ArgumentParser) -> None:
    """--grouped of `esper train heuristic|static|learned` and of tolaria_worker (episodes_grouped)."""
    p.add_argument("--grouped", action=argparse.BooleanOptionalAction, default=None,
                   help="train the --episodes together, 8 at a time, their hosts as the groups of one network and "
                        "each one's seeds on its group (CNN hosts, fp32), each step a CUDA graph on CUDA. Default: "
                        "on CUDA where the other flags allow it (even one run trained faster so: bench/concurrency.py "
                        "--cuda-graph off on); off on the CPU; a resumed run keeps its own way")


def add_checkpoint_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint-every", type=int, default=1, metavar="EPOCHS",
                   help="write <run dir>/checkpoint.pt every this many epochs, to resume from (0 = never); a "
                        "grouped run also saves whenever another run of its group does")


def add_compare_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=sorted(HOSTS), default="cifar10")
    p.add_argument("--max-epochs", type=int, default=40, help="epochs per run, the same for every arm")
    p.add_argument("--max-batches", type=int, default=0, help="training batches per epoch (0 = all)")
    p.add_argument("--seeds", type=int, default=5, help="runs per arm, seeds seed .. seed+N-1")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--slots", nargs="+", default=["mid"])
    p.add_argument("--device", default=None, help="torch device (default: cuda:0 when present, else cpu)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--gpu-preload", action="store_true")
    add_speed_flags(p)
    p.add_argument("--workers", type=int, default=1, help="runs trained at once on the device")
    p.add_argument("--grouped", action=argparse.BooleanOptionalAction, default=None,
                   help="train up to 8 of an arm's seeds at once as one grouped run (esper train MODE "
                        "--grouped), a worker; from-scratch's builds in each seed's own grown architecture "
                        "(default: on CUDA when the other flags allow it, where it was measured faster; off on "
                        "the CPU)")
    p.add_argument("--arms", nargs="+", default=["static", "heuristic", "from-scratch"],
                   choices=["static", "heuristic", "from-scratch", "ppo"])
    p.add_argument("--policy", default=None, metavar="CHECKPOINT",
                   help="a saved PPO policy (esper train ppo --save): adds the arm `ppo`, growth under it, on "
                        "seeds it did not train on (its training episodes' seeds are refused)")
    p.add_argument("--budget", choices=["matched", "original"], default="matched",
                   help="original: also the unmatched static@10 baseline of the original table, at 40 epochs")
    p.add_argument("--out", default=None, help="output folder (default: compare/<time>_<task>)")
    p.add_argument("--resume", default=None, metavar="OUT_DIR",
                   help="finish the interrupted comparison in OUT_DIR (same flags as its first command): "
                        "finished runs are kept, cut-off runs start again (with --grouped, their arm's whole group)")
    p.add_argument("--telemetry-level", choices=short_names(TelemetryLevel), default="normal",
                   help="of every run (normal keeps the decisions and gate values that explain a result)")
    p.add_argument("--db", default=None,
                   help="the SQLite run store every run is recorded in (default runs/karn.db; needs telemetry)")
    p.add_argument("--progress-every", type=float, default=60.0, metavar="SECONDS",
                   help="how often to say how far each running run is (0: never)")


def build_parser() -> Parser:
    parser = Parser(prog="esper", description="Grow neural networks while they train.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="run growth experiments in one process")
    modes = train.add_subparsers(dest="mode", required=True)
    add_train_flags(modes.add_parser("heuristic", help="grow under the rule-based Tamiyo controller"))
    add_train_flags(modes.add_parser("static", help="train the host alone with the same budget"))
    learned = modes.add_parser("learned", help="grow under a saved PPO policy (esper train ppo --save)")
    add_train_flags(learned)
    learned.add_argument("--policy", required=True, metavar="CHECKPOINT",
                         help="a checkpoint of `esper train ppo --save`; its greedy policy decides every epoch")
    for mode in ("heuristic", "static", "learned"):
        karn_cli.add_tui_flag(modes.choices[mode])
        add_checkpoint_flag(modes.choices[mode])
        modes.choices[mode].add_argument(
            "--resume", default=None, metavar="RUN_DIR",
            help="continue the run in RUN_DIR from its checkpoint, then the episodes after it (same flags as the "
                 "run); with --grouped, every episode of the experiment, each in its newest run directory")
        add_grouped_flag(modes.choices[mode])
    from esper.train_ppo import add_ppo_flags  # here, not at the top: esper.train_ppo imports this module

    ppo = modes.add_parser("ppo", help="learn when, where and what to grow with PPO (Simic)")
    add_train_flags(ppo)
    add_ppo_flags(ppo)
    karn_cli.add_tui_flag(ppo)
    for mode_parser in modes.choices.values():
        add_dashboard_flags(mode_parser)
        karn_cli.add_db_flag(mode_parser)
    add_compare_flags(commands.add_parser("compare", help="static vs growth vs from-scratch at the same budget"))
    bp = commands.add_parser("blueprints", help="list seed blueprints with their parameter counts")
    bp.add_argument("--task", choices=sorted(HOSTS), default="cifar10")
    sample = commands.add_parser("sample", help="generate text from a language-model run's final model")
    sample.add_argument("run_dir", help="a run directory of --task tinystories")
    sample.add_argument("--num-samples", type=int, default=3)
    sample.add_argument("--max-tokens", type=int, default=100, help="tokens generated per sample")
    sample.add_argument("--prompt", default="", help="text to continue (default: start a new story)")
    sample.add_argument("--temperature", type=float, default=0.8)
    sample.add_argument("--top-k", type=int, default=40, help="sample among the k likeliest tokens")
    sample.add_argument("--seed", type=int, default=0)
    stack_cli.add_commands(commands)
    karn_cli.add_commands(commands)
    return parser


def resolve_device(requested: str | None, flag: str = "--device") -> str:
    """The device to train on: `requested`, or the first GPU if there is one, else the CPU. UsageError (naming
    `flag`) for one torch cannot name, one other than the CPU or a CUDA GPU (torch names mps, meta, ... that
    Esper's training cannot use: they had failed once a run directory was made), or a GPU this machine lacks."""
    device = requested or ("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except RuntimeError as exc:
        raise UsageError(f"{flag} {device!r}: {exc}") from None
    if parsed.type not in ("cpu", "cuda"):
        raise UsageError(f"{flag} {device}: Esper trains on cpu or cuda[:N]")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{flag} {device}: CUDA is not available on this machine")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


SEED_RANGE = range(-2**31, 2**31)
"""A seed goes into every run's RunStarted event as an int32: one outside had failed there, a run directory made."""


def check_seeds(first: int, count: int, flags: str) -> None:
    """UsageError unless the seeds first .. first + count - 1 are all in SEED_RANGE."""
    if first not in SEED_RANGE or first + count - 1 not in SEED_RANGE:
        raise UsageError(f"{flags}: every seed, {first} to {first + count - 1}, must be from {SEED_RANGE.start} to "
                         f"{SEED_RANGE.stop - 1}")


def train_config(args: argparse.Namespace):
    from esper.experiment import RunConfig

    checkpoint_every = getattr(args, "checkpoint_every", 0)
    for flag, value, least in (("--episodes", args.episodes, 1), ("--max-epochs", args.max_epochs, 1),
                               ("--max-batches", args.max_batches, 0), ("--max-seeds", args.max_seeds, 0),
                               ("--checkpoint-every", checkpoint_every, 0)):
        if value < least:
            raise UsageError(f"{flag} must be >= {least}, got {value}")
    check_seeds(args.seed, args.episodes, "--seed and --episodes")
    host = checked_host(args.task, args.slots)
    if args.telemetry_level == "off" and (args.telemetry_file or args.telemetry_dir):
        raise UsageError("--telemetry-file/--telemetry-dir need a --telemetry-level other than off")
    fitting = [short_name(Blueprint, b) for b in blueprints_for(host.spec.kind)]
    parsed = [parse_graft(g, args.slots, fitting) for g in args.graft]
    grafts = tuple((slot, blueprint) for seed, slot, blueprint in parsed if seed is None)
    seed_grafts = tuple(graft for graft in parsed if graft[0] is not None)
    episode_seeds = range(args.seed, args.seed + args.episodes)
    if seed_grafts and args.mode == "ppo":
        raise UsageError("--graft SEED=...: PPO's environments are all built alike; give SLOT:BLUEPRINT")
    if strays := sorted({seed for seed, _, _ in seed_grafts} - set(episode_seeds)):
        raise UsageError(f"--graft {strays[0]}=...: seed {strays[0]} is not an episode's (--seed {args.seed} "
                         f"--episodes {args.episodes}: {episode_seeds[0]} to {episode_seeds[-1]})")
    for seed in episode_seeds:  # here, not as the episode builds it: that would leave a run directory behind
        slots = [slot for slot, _ in grafts] + [slot for s, slot, _ in seed_grafts if s == seed]
        if twice := [slot for slot in slots if slots.count(slot) > 1]:
            raise UsageError(f"--graft: slot {twice[0]} is grafted twice in the episode of seed {seed} "
                             "(a slot holds one seed)")
    policy = getattr(args, "policy", None)
    env = EnvConfig(task=args.task, max_epochs=args.max_epochs, slots=tuple(args.slots),
                    max_seeds=args.max_seeds, grafts=grafts,
                    seed_grad_norms=policy is not None and policy_spec(policy, args.task).telemetry,
                    train=TrainConfig.for_task(args.task, max_batches=args.max_batches, precision=args.precision,
                                               compile=args.compile, memory_format=args.memory_format,
                                               cudnn_benchmark=args.cudnn_benchmark, cuda_graph=args.cuda_graph))
    # Once every flag is known good (a bad one is one line, not after the default's note on stderr). PPO's:
    # ppo_config (its rounds keep no env state).
    device = resolve_device(args.device)
    grouped = args.mode != "ppo" and episodes_grouped(args, device)
    return RunConfig(mode=args.mode, policy=policy, env=env, episodes=args.episodes, seed=args.seed,
                     policy_sha256=file_sha256(policy),
                     device=device, data_dir=args.data_dir, gpu_preload=args.gpu_preload,
                     telemetry_level=args.telemetry_level, telemetry_file=args.telemetry_file,
                     telemetry_dir=args.telemetry_dir, runs_dir=args.runs_dir,
                     checkpoint_every=checkpoint_every, seed_grafts=seed_grafts, grouped=grouped)


def checked_host(task: str, slots: list[str]):
    """The task's host, once `slots` (--slots) are slots of it, each named once."""
    host = build_host(task)
    slots_known = host.slot_positions()
    bad = [s for s in slots if s not in slots_known]
    if bad:
        raise UsageError(f"--slots: unknown {' '.join(bad)} (choices: {' '.join(slots_known)})")
    if len(set(slots)) != len(slots):
        raise UsageError("--slots: a slot is listed twice")
    return host


def check_grouped(args: argparse.Namespace, also: tuple[str, ...] = ()) -> None:
    """Refuses the flags of `esper train` or `esper compare` that grouped runs cannot take (grouping_refusals),
    and `also` (the command's own)."""
    if bad := grouping_refusals(args) + list(also):
        raise UsageError(f"--grouped trains CNN hosts in fp32, eagerly, without gradient health, in one process: "
                         f"leave out {', '.join(bad)}")


def episodes_grouped(args: argparse.Namespace, device: str) -> bool:
    """Whether `esper train heuristic|static|learned` (or a tolaria_worker) trains its episodes grouped:
    --grouped or --no-grouped as given; by default on CUDA (chosen_grouping), where a group of one, its step
    a CUDA graph, trained 3.1x and 3.5x as fast as a plain run (two H200 calls, bench/concurrency.py
    --cuda-graph on); off on the CPU, where it does not pay (one run: 0.93x, 1.01x, bench/one_run.py; two:
    0.79x, bench/concurrency.py). A resumed run keeps its own way (its config.json's), whatever the device:
    what --resume continues (one run and the episodes after it, or every episode of a group) is the run's,
    not the machine's. tolaria_worker has no --resume: it continues the runs of its flags, in their own way
    when none were trained in the default's (experiment.continued_grouping)."""
    if args.grouped is None and getattr(args, "resume", None):
        try:
            return json.loads((Path(args.resume) / "config.json").read_text()).get("grouped") is True
        except (OSError, ValueError, AttributeError):
            return False  # not a run directory: check_resume says so
    return chosen_grouping(args, torch.device(device).type == "cuda", "episodes one after another",
                           smallest_group=args.episodes)


def compare_grouped(args: argparse.Namespace, device: str) -> bool:
    """Whether `esper compare` trains an arm's seeds as grouped runs: --grouped or --no-grouped as given;
    by default on CUDA, where a 5-seed comparison finished 1.46x sooner than with a process per run (H200,
    bench/compare_grouped.py), unless a flag rules grouping out; off on the CPU, where grouped convolutions
    run slower than K plain ones (0.99x, the same bench on 2 cores). A resumed comparison keeps its own (one
    saved before grouping existed ran a process per run)."""
    from esper.compare import saved_settings

    if args.grouped is None and args.resume and (Path(args.resume) / "compare.json").is_file():
        try:
            return bool(saved_settings(Path(args.resume)).get("grouped", False))
        except ResumeError as exc:
            raise UsageError(f"--resume {exc}") from None
    return chosen_grouping(args, torch.device(device).type == "cuda", "a process per run", smallest_group=args.seeds)


def chosen_grouping(args: argparse.Namespace, cuda: bool, instead: str, smallest_group: int,
                    also: tuple[str, ...] = ()) -> bool:
    """--grouped (its flags checked, with the command's own refusals `also`) or --no-grouped as given. Left
    out, what it means where grouping was measured faster: grouped on CUDA, unless a flag given rules it
    out, which is said on stderr with the way taken `instead`; not grouped on the CPU, nor for a host that
    has no grouped form (a language model's: nothing to say, there was no choice), nor where a group would
    be of one run (`smallest_group`) trained eagerly (--no-cuda-graph): 0.92x and 1.04x a plain run's speed
    on an H200, where one replayed as a CUDA graph trained 3.1x and 3.5x."""
    if args.grouped is not None:
        if args.grouped:
            check_grouped(args, also)
        return args.grouped
    if not cuda or HOSTS[args.task].kind != "cnn" or (smallest_group < 2 and not args.cuda_graph):
        return False
    if refused := grouping_refusals(args):
        print(f"esper: {instead}, not grouped as by default on CUDA: grouped runs cannot take {', '.join(refused)}",
              file=sys.stderr)
    return not refused


def grouping_refusals(args: argparse.Namespace) -> list[str]:
    """The flags given that grouped runs (esper.tolaria.grouped) cannot take: they train CNN hosts in fp32,
    eagerly, with no gradient health (it reads a run's own backward)."""
    refused = [("--task " + args.task, HOSTS[args.task].kind != "cnn"),
               ("--precision bf16", args.precision != "fp32"), ("--compile", args.compile),
               ("--telemetry-level debug", args.telemetry_level == "debug")]
    return [flag for flag, given in refused if given]


def policy_spec(path: str, task: str):
    """The FeatureSpec of a saved policy, checked against the host it is to drive, and the policy built once
    (weights that are not finite had failed as the run built it, its run directory made)."""
    from esper.simic.checkpoint import contents_checked, load_policy
    from esper.tamiyo.features import FeatureSpec

    if not Path(path).is_file():
        raise UsageError(f"--policy {path}: no such file")
    try:
        with contents_checked(path, "used"):  # a key missing, a value of another type: one line, before any run
            spec = load_policy(path).spec
    except ResumeError as exc:
        raise UsageError(f"--policy {exc}") from None
    host = FeatureSpec.for_host(task, spec.param_budget, spec.telemetry)
    if (spec.slots, spec.blueprints) != (host.slots, host.blueprints):
        raise UsageError(f"--policy {path}: trained for a host with slots {spec.slots}, not --task {task}")
    return spec


def check_held_out(policy: str, first_seed: int, seeds: int) -> None:
    """UsageError when a comparison's seeds include episodes the policy learned from (a PPO episode of seed
    s is the run `esper train --seed s` makes: the same host initialization and data order), so the
    learned arm is measured against the heuristic on held-out seeds only."""
    from esper.simic.checkpoint import contents_checked, load_checkpoint
    from esper.simic.trainer import trained_seeds

    try:
        with contents_checked(policy, "used"):
            trained = trained_seeds(load_checkpoint(Path(policy)))
    except ResumeError as exc:
        raise UsageError(f"--policy {exc}") from None
    if -1 in trained:
        raise UsageError(f"--policy {policy}: it learned from episodes whose seeds were not recorded (a learner "
                         "checkpoint from before they were, or trajectories of an older worker), so no seed can be "
                         "shown held out")
    if overlap := sorted(trained & set(range(first_seed, first_seed + seeds))):
        raise UsageError(f"--seed {first_seed}: the policy learned from the episodes of seeds "
                         f"{reprlib.repr(overlap)} (of {len(trained)}): compare it on held-out seeds "
                         f"(--seed {max(trained) + 1} or later)")


def check_resume(cfg, run_dir: str) -> None:
    """--resume names a run directory of this experiment (its config.json matches the flags)."""
    from esper.experiment import episode_of

    try:
        episode_of(cfg, Path(run_dir))
    except ResumeError as exc:
        raise UsageError(f"--resume: {exc}") from None


def parse_graft(text: str, slots: list[str], blueprints: list[str]) -> tuple[int | None, str, str]:
    """[SEED=]SLOT:BLUEPRINT -> (seed or None, slot, blueprint); a seed may be negative, as --seed may."""
    seed, _, graft = text.rpartition("=")
    slot, _, blueprint = graft.partition(":")
    if seed and not seed.removeprefix("-").isdigit():
        raise UsageError(f"--graft {text}: {seed!r} is not a seed (SEED=SLOT:BLUEPRINT)")
    if slot not in slots:
        raise UsageError(f"--graft {text}: slot {slot!r} is not among --slots ({' '.join(slots)})")
    if blueprint not in blueprints:
        raise UsageError(f"--graft {text}: not a blueprint of this host (choices: {', '.join(blueprints)})")
    return (int(seed) if seed else None), slot, blueprint


def compare_config(args: argparse.Namespace):
    from esper.compare import CompareConfig

    for flag, value, least in (("--max-epochs", args.max_epochs, 1), ("--max-batches", args.max_batches, 0),
                               ("--seeds", args.seeds, 1), ("--workers", args.workers, 1)):
        if value < least:
            raise UsageError(f"{flag} must be >= {least}, got {value}")
    check_seeds(args.seed, args.seeds, "--seed and --seeds")
    checked_host(args.task, args.slots)  # every run's `esper train` checks them too, but only once it starts
    if repeated := [arm for arm in args.arms if args.arms.count(arm) > 1]:
        raise UsageError(f"--arms: {repeated[0]} is listed twice")
    if not 0 <= args.progress_every < 1e6:  # also refuses nan and inf, which no timer takes
        raise UsageError(f"--progress-every must be seconds from 0 (never) to 1e6, got {args.progress_every}")
    device = resolve_device(args.device)
    grouped = compare_grouped(args, device)
    if args.budget == "original" and args.max_epochs != 40:
        raise UsageError("--budget original fixes the budget at 40 epochs: leave out --max-epochs")
    if "from-scratch" in args.arms and "heuristic" not in args.arms:
        raise UsageError("--arms from-scratch needs heuristic (it trains the heuristic runs' final architectures)")
    arms = list(args.arms)
    policy_sha256 = ""
    if args.policy:
        if not Path(args.policy).is_file():
            raise UsageError(f"--policy {args.policy}: no such file")
        policy_sha256 = file_sha256(args.policy)  # before the checks: the file they check is this one
        policy_spec(args.policy, args.task)
        check_held_out(args.policy, args.seed, args.seeds)
        if file_sha256(args.policy) != policy_sha256:  # rewritten while checked: the copy's digest would differ
            raise UsageError(f"--policy {args.policy} changed while it was checked (a run saving it?): try again")
        arms += [] if "ppo" in arms else ["ppo"]
    elif "ppo" in arms:
        raise UsageError("--arms ppo needs --policy CHECKPOINT")
    if args.telemetry_level == "off" and args.db:  # as esper train refuses it: a run is recorded from its telemetry
        raise UsageError("--db needs a --telemetry-level other than off: a run is recorded from its telemetry")
    if args.resume and args.out and Path(args.out).resolve() != Path(args.resume).resolve():
        raise UsageError(f"--resume {args.resume} continues that folder: leave out --out {args.out}")
    out = args.resume or args.out or f"compare/{new_run_id(args.task)}"
    return CompareConfig(task=args.task, max_epochs=args.max_epochs, max_batches=args.max_batches,
                         seeds=args.seeds, seed=args.seed, slots=tuple(args.slots),
                         device=device, data_dir=args.data_dir, gpu_preload=args.gpu_preload,
                         precision=args.precision, compile=args.compile, memory_format=args.memory_format,
                         cudnn_benchmark=args.cudnn_benchmark, cuda_graph=args.cuda_graph, workers=args.workers,
                         grouped=grouped, out_dir=out,
                         budget=args.budget, arms=tuple(arms), telemetry_level=args.telemetry_level,
                         progress_every=args.progress_every, policy=args.policy and str(Path(args.policy).resolve()),
                         policy_sha256=policy_sha256, db=str(Path(args.db or CompareConfig.db).resolve()))


def cmd_blueprints(args: argparse.Namespace) -> int:
    host = build_host(args.task)
    channels = host.slot_channels()
    print(f"host {host.spec.name}: {sum(p.numel() for p in host.parameters()):,} parameters")
    print(f"{'blueprint':<12}" + "".join(f"{s + f' ({c}ch)':>16}" for s, c in channels.items()))
    for bp in blueprints_for(host.spec.kind):
        counts = "".join(f"{seed_param_count(bp, c, host.spec.kind):>16,}" for c in channels.values())
        print(f"{short_name(Blueprint, bp):<12}{counts}")
    return 0


MIN_TEMPERATURE = 1e-6
"""The coldest `esper sample` divides logits by: the logits of a trained model are far below 1e32, so none
overflows to inf there."""


def cmd_sample(args: argparse.Namespace) -> int:
    """Print samples from the run's exported model, each cut at the first end of story."""
    from esper.kasmina.transformer import generate
    from esper.tolaria.tokenizer import EOT_TEXT, BPETokenizer

    for flag, value in (("--num-samples", args.num_samples), ("--max-tokens", args.max_tokens),
                        ("--temperature", args.temperature), ("--top-k", args.top_k)):
        if not value > 0 or value == math.inf:  # a NaN temperature passes `<= 0`
            raise UsageError(f"{flag} must be a number > 0, got {value}")
    if args.temperature < MIN_TEMPERATURE:  # logits / 1e-39 overflow: softmax of inf is NaN, and sampling fails
        raise UsageError(f"--temperature must be at least {MIN_TEMPERATURE}, got {args.temperature} (--top-k 1 "
                         "samples the likeliest token always)")
    if args.seed not in SEED_RANGE:
        raise UsageError(f"--seed must be from {SEED_RANGE.start} to {SEED_RANGE.stop - 1}, got {args.seed}")
    model_dir = Path(args.run_dir) / "model"
    if not (model_dir / "tokenizer.json").is_file():
        raise UsageError(f"{args.run_dir}: no model/tokenizer.json (not a language-model run directory)")
    try:
        tokenizer = BPETokenizer.load(model_dir / "tokenizer.json")
        net = load_exported(model_dir)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, IndexError) as exc:  # damaged
        raise UsageError(f"{model_dir} cannot be loaded ({type(exc).__name__}: {exc})".splitlines()[0]) from None
    if tokenizer.vocab_size > (rows := net[0].tok.num_embeddings):  # another run's, copied in: ids past the model's
        raise UsageError(f"{model_dir}: its tokenizer has {tokenizer.vocab_size} tokens, its model {rows}: not the "
                         "tokenizer this model was trained with")
    try:
        prompt = torch.tensor([[tokenizer.eot, *tokenizer.encode(args.prompt)]] * args.num_samples)  # [S, T0]
    except UnicodeEncodeError:  # a command line's bytes that are not UTF-8 arrive as lone surrogates
        raise UsageError("--prompt is not UTF-8 text") from None
    ids = generate(net, prompt, args.max_tokens, net[0].context, temperature=args.temperature,  # net[0]: the stem
                   top_k=args.top_k, generator=torch.Generator().manual_seed(args.seed), vocab=tokenizer.vocab_size)
    for i, row in enumerate(ids[:, 1:].tolist()):
        print(f"--- sample {i + 1}\n{tokenizer.decode(row).split(EOT_TEXT)[0].strip()}")
    return 0


def check_outputs(cfg, make: bool = True) -> None:
    """UsageError for an output folder that cannot be one (a file in its place or on the way to it, or a
    place no folder can be made), found before anything trains: the folders are made here, unless not to
    `make` them (a service checks as it parses: its run makes what it uses)."""
    for flag, folder in (("--runs-dir", karn_cli.store_path(None, cfg.runs_dir).parent),
                         ("--telemetry-dir", cfg.telemetry_dir and Path(cfg.telemetry_dir))):
        if folder and (why := karn_cli.folder_refusal(folder, flag)):
            raise UsageError(why)
        try:
            folder and make and folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"{flag} {folder}: no folder can be made there ({exc.strerror})") from None
    if cfg.telemetry_file:
        check_output_file("--telemetry-file", Path(cfg.telemetry_file), appends=True)


def check_output_file(flag: str, path: Path, what: str = "a file", appends: bool = False) -> None:
    """UsageError, before anything runs, for an output file that cannot be written (karn_cli.file_refusal)."""
    if why := karn_cli.file_refusal(path, flag, what, appends):
        raise UsageError(why)


def cmd_compare(cfg, resume: bool) -> int:
    from esper.compare import CompareBusy, PolicyChanged, RunFailed, compare, differences

    out = Path(cfg.out_dir)
    if why := karn_cli.folder_refusal(out, "--out"):
        raise UsageError(why)
    try:
        if cfg.telemetry_level != "off":  # else its runs record nothing (train_command)
            karn_cli.check_store(Path(cfg.db))  # every run records itself there when it ends: a bad store fails now
    except StoreError as exc:
        raise UsageError(f"--db {exc}") from None
    if resume:
        if not (out / "compare.json").is_file():
            raise UsageError(f"--resume {out}: no compare.json there (not a comparison's folder)")
        try:
            differ = differences(cfg, out)
        except ResumeError as exc:
            raise UsageError(f"--resume {exc}") from None
        if differ:
            raise UsageError(f"--resume {out} was compared with other settings: {', '.join(differ)} differ")
    elif (out / "runs").exists():
        raise UsageError(f"--out {out} already holds a comparison: choose another folder, or --resume {out}")
    way = "each arm's seeds as grouped runs of up to 8" if cfg.grouped else "a process per run"
    print(f"device: {cfg.device}; {way}; {'resuming' if resume else 'writing'} {out}", file=sys.stderr)
    sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler)  # stopped like Ctrl-C: its runs end with it
    try:
        report = compare(cfg, log=lambda line: print(line, file=sys.stderr), resume=resume)
    except KeyboardInterrupt:
        print(f"esper: compare interrupted; finish it with the same flags and --resume {out}", file=sys.stderr)
        return 130
    except RunFailed as exc:  # its other runs were stopped, as at Ctrl-C
        print(f"esper: error: {exc}; finish the comparison with the same flags and --resume {out}", file=sys.stderr)
        return 1
    except (PolicyChanged, CompareBusy) as exc:
        print(f"esper: error: {exc}", file=sys.stderr)
        return 2
    except ResumeError as exc:  # a finished run's summary damaged since
        print(f"esper: error: --resume {exc}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    print(report.read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "blueprints":
            return cmd_blueprints(args)
        if args.command == "sample":
            return cmd_sample(args)
        if args.command in stack_cli.COMMANDS:
            return stack_cli.run_command(args)
        if args.command in karn_cli.COMMANDS:
            return karn_cli.run_command(args)
        if args.command == "compare":
            return cmd_compare(compare_config(args), resume=args.resume is not None)
        cfg = train_config(args)
        if args.mode == "ppo":
            from esper.train_ppo import check_save, ppo_config

            cfg = ppo_config(args, cfg)
            if cfg.save:
                check_save(Path(cfg.save), cfg.resume)
        try:
            dashboard = dashboard_config(args)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if args.mode != "ppo" and args.resume:
            check_resume(cfg, args.resume)
        if args.mode == "learned":  # a look at a training episode is allowed; as a measurement it is said
            try:
                check_held_out(args.policy, cfg.seed, cfg.episodes)
            except UsageError as exc:
                print(f"esper: warning: {exc}", file=sys.stderr)
        check_outputs(cfg)
        if args.mode == "ppo":
            from esper.train_ppo import run_ppo as run
        else:
            from esper.experiment import run

            if args.resume:
                run = functools.partial(run, resume=Path(args.resume))
        if args.telemetry_level == "off" and args.db:  # the store is built from a run's telemetry
            raise UsageError("--db needs a --telemetry-level other than off: a run is recorded from its telemetry")
        if args.telemetry_level == "off" and (watching := [f for f in ("--tui", "--dashboard")
                                                           if getattr(args, f[2:], False)]):
            raise UsageError(f"{watching[0]} shows the run's telemetry: it needs a --telemetry-level other than off")
        if args.telemetry_level != "off":
            run = karn_cli.recording(run, karn_cli.store_path(args.db, cfg.runs_dir))
    except (UsageError, ConfigError) as exc:  # ConfigError: a malformed ESPER_* variable
        print(f"esper: error: {exc}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"esper: error: --db {exc}", file=sys.stderr)
        return 2
    print(f"device: {cfg.device}", file=sys.stderr)
    try:
        if getattr(args, "tui", False):
            karn_cli.train_with_tui(cfg, run)
        elif dashboard is not None:
            return train_with_dashboard(cfg, run, dashboard)
        else:
            run(cfg)
    except (DataError, EnvProcessError) as exc:  # missing data; an environment process that failed or died
        print(f"esper: error: {exc}", file=sys.stderr)
        return 1
    except ResumeError as exc:  # a checkpoint that is not one (torn, or another file): found before training
        print(f"esper: error: --resume {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # experiment.Interrupted says how to continue
        print(f"esper: interrupted{'; ' + exc.hint if hasattr(exc, 'hint') else ''}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # `python -m esper.cli` (how compare starts its runs): through the module
    # esper.cli itself, so that the UsageError train_ppo raises is the class main() catches, not a copy of it
    from esper.cli import main as esper_main

    raise SystemExit(esper_main())
