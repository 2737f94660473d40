"""`esper` command line: `esper train heuristic|static ...`, `esper blueprints`.

Every bad flag or combination exits non-zero with one line saying why.
"""

from __future__ import annotations

import argparse
import sys

import torch

from esper.kasmina import HOSTS, build_host, seed_param_count
from esper.kasmina.blueprints import blueprints_for
from esper.leyline import Blueprint, TelemetryLevel, short_name, short_names
from esper.simic import EnvConfig
from esper.tolaria.data import DataError
from esper.tolaria.trainer import TrainConfig

TASK_HOSTS = {"cifar10": "cifar10", "cifar10_deep": "cifar10_deep", "synthetic": "synthetic"}


class UsageError(Exception):
    """A bad flag or combination: reported in one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's default prints the whole usage block first
        raise UsageError(message)


def add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--episodes", type=int, default=1, help="independent runs; episode i uses seed+i")
    p.add_argument("--max-epochs", type=int, default=75, help="epochs per episode")
    p.add_argument("--max-batches", type=int, default=50, help="training batches per epoch (0 = all)")
    p.add_argument("--task", choices=sorted(TASK_HOSTS), default="cifar10")
    p.add_argument("--device", default=None, help="torch device (default: cuda:0 when present, else cpu)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--slots", nargs="+", default=["mid"], help="enabled slots: early mid late")
    p.add_argument("--max-seeds", type=int, default=0, help="seeds that may germinate per episode (0 = no limit)")
    p.add_argument("--data-dir", default=None,
                   help="folder with cifar-10-batches-py/ or cifar10-jpeg.tar.gz (default: $ESPER_DATA_DIR, "
                        "else torchvision's download)")
    p.add_argument("--gpu-preload", action="store_true", help="keep the whole dataset on the device")
    p.add_argument("--telemetry-level", choices=short_names(TelemetryLevel), default="normal")
    p.add_argument("--telemetry-file", default=None, help="also append every event to this JSONL file")
    p.add_argument("--telemetry-dir", default=None, help="also write <dir>/<run_id>.jsonl per episode")
    p.add_argument("--runs-dir", default="runs", help="where run directories are created")


def build_parser() -> Parser:
    parser = Parser(prog="esper", description="Grow neural networks while they train.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="run growth experiments in one process")
    modes = train.add_subparsers(dest="mode", required=True)
    add_train_flags(modes.add_parser("heuristic", help="grow under the rule-based Tamiyo controller"))
    add_train_flags(modes.add_parser("static", help="train the host alone with the same budget"))
    bp = commands.add_parser("blueprints", help="list seed blueprints with their parameter counts")
    bp.add_argument("--task", choices=sorted(TASK_HOSTS), default="cifar10")
    return parser


def resolve_device(requested: str | None) -> str:
    device = requested or ("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except RuntimeError as exc:
        raise UsageError(f"--device {device!r}: {exc}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine")
    return device


def train_config(args: argparse.Namespace):
    from esper.experiment import RunConfig

    for flag, value, least in (("--episodes", args.episodes, 1), ("--max-epochs", args.max_epochs, 1),
                               ("--max-batches", args.max_batches, 0), ("--max-seeds", args.max_seeds, 0)):
        if value < least:
            raise UsageError(f"{flag} must be >= {least}, got {value}")
    slots_known = build_host(TASK_HOSTS[args.task]).slot_positions()
    bad = [s for s in args.slots if s not in slots_known]
    if bad:
        raise UsageError(f"--slots: unknown {' '.join(bad)} (choices: {' '.join(slots_known)})")
    if len(set(args.slots)) != len(args.slots):
        raise UsageError("--slots: a slot is listed twice")
    if args.telemetry_level == "off" and (args.telemetry_file or args.telemetry_dir):
        raise UsageError("--telemetry-file/--telemetry-dir need a --telemetry-level other than off")
    env = EnvConfig(task=args.task, max_epochs=args.max_epochs, slots=tuple(args.slots),
                    max_seeds=args.max_seeds, train=TrainConfig(max_batches=args.max_batches))
    return RunConfig(mode=args.mode, env=env, episodes=args.episodes, seed=args.seed,
                     device=resolve_device(args.device), data_dir=args.data_dir, gpu_preload=args.gpu_preload,
                     telemetry_level=args.telemetry_level, telemetry_file=args.telemetry_file,
                     telemetry_dir=args.telemetry_dir, runs_dir=args.runs_dir)


def cmd_blueprints(args: argparse.Namespace) -> int:
    host = build_host(TASK_HOSTS[args.task])
    channels = host.slot_channels()
    print(f"host {host.spec.name}: {sum(p.numel() for p in host.parameters()):,} parameters")
    print(f"{'blueprint':<12}" + "".join(f"{s + f' ({c}ch)':>16}" for s, c in channels.items()))
    for bp in blueprints_for(host.spec.kind):
        counts = "".join(f"{seed_param_count(bp, c, host.spec.kind):>16,}" for c in channels.values())
        print(f"{short_name(Blueprint, bp):<12}{counts}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "blueprints":
            return cmd_blueprints(args)
        cfg = train_config(args)
    except UsageError as exc:
        print(f"esper: error: {exc}", file=sys.stderr)
        return 2
    from esper.experiment import run

    print(f"device: {cfg.device}", file=sys.stderr)
    try:
        run(cfg)
    except DataError as exc:
        print(f"esper: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
