"""One run of `esper train` end to end: the plain Trainer against a group of one, eager or as a CUDA graph.

`esper train MODE` trains its episodes grouped by default on CUDA (esper.cli.episodes_grouped), a lone
run as a group of one whose step is replayed as a CUDA graph. This times one episode each way, as the
command a researcher types (parsed by esper's own parser, run by esper.experiment.run in this process):
`--no-grouped` (tolaria's plain Trainer, the baseline), `--grouped --no-cuda-graph` (a group of one,
eager) and `--grouped` (its step a graph: CUDA only). Each time is the run's own wall_seconds from its
summary: every epoch's training, evaluation, counterfactual, decision, telemetry and checkpoint, not the
data's loading. The flags are `esper train`'s defaults (50 batches an epoch, the data in host memory)
unless given. One untimed short run of each way warms the process up first; then the ways take turns,
`--repeats` rounds, each round starting with the next way, and the median of each is printed with its
ratio to the plain run's and its median test accuracy (the ways train the same run up to float order: a
growing run's gate may still flip).

    python bench/one_run.py --device cuda --mode heuristic --max-epochs 5 --repeats 3
    python bench/one_run.py --device cuda --max-epochs 3 --max-batches 0 --gpu-preload   # whole epochs
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile

import torch
from rich.console import Console

from esper.cli import SEED_RANGE, build_parser, train_config
from esper.experiment import run
from esper.kasmina import HOSTS
from esper.transport.config import at_least

from growth_overhead import checked_device


def ways(device: str) -> dict[str, list[str]]:
    """Each way's flags by its name; the graph only where there is one to capture."""
    out = {"--no-grouped (plain Trainer)": ["--no-grouped"],
           "--grouped --no-cuda-graph": ["--grouped", "--no-cuda-graph"]}
    if torch.device(device).type == "cuda":
        out["--grouped (default on CUDA)"] = ["--grouped"]
    return out


def train_once(args, flags: list[str], runs_dir: str, max_epochs: int, max_batches: int) -> dict:
    """One episode's summary, trained as `esper train MODE ... FLAGS` would train it."""
    argv = ["train", args.mode, "--task", args.task, "--device", args.device, "--max-epochs", str(max_epochs),
            "--max-batches", str(max_batches), "--seed", str(args.seed), "--runs-dir", runs_dir, *flags]
    argv += ["--data-dir", args.data_dir] if args.data_dir else []
    argv += ["--gpu-preload"] if args.gpu_preload else []
    (summary,) = run(train_config(build_parser().parse_args(argv)), console=Console(file=io.StringIO()))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mode", choices=["static", "heuristic"], default="heuristic")
    parser.add_argument("--task", choices=sorted(HOSTS), default="cifar10")
    parser.add_argument("--max-epochs", type=at_least(1), default=5)
    parser.add_argument("--max-batches", type=at_least(0), default=50, help="training batches per epoch (0 = all)")
    parser.add_argument("--gpu-preload", action="store_true", help="the whole dataset on the device")
    parser.add_argument("--seed", type=at_least(SEED_RANGE.start, most=SEED_RANGE.stop - 1), default=42)
    parser.add_argument("--repeats", type=at_least(1), default=3)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    checked_device(parser, args.device)

    cuda = torch.device(args.device).type == "cuda"
    name = torch.cuda.get_device_name(args.device) if cuda else f"CPU ({os.cpu_count()} cores)"
    print(f"# esper train {args.mode}, one episode, on {name}, torch {torch.__version__}: {args.task}, "
          f"{args.max_epochs} epochs of {args.max_batches or 'all'} batches, data "
          f"{'on the device' if args.gpu_preload else 'in host memory'}, the median of {args.repeats}")
    order = list(ways(args.device).items())
    walls: dict[str, list[float]] = {way: [] for way, _ in order}
    accuracies: dict[str, list[float]] = {way: [] for way, _ in order}
    with tempfile.TemporaryDirectory() as tmp:
        for _, flags in order:  # warm-up: cuDNN's handles, the allocator, the data cache
            train_once(args, flags, os.path.join(tmp, "warm"), max_epochs=1, max_batches=5)
        for i in range(args.repeats):
            for way, flags in order[i % len(order):] + order[:i % len(order)]:
                summary = train_once(args, flags, os.path.join(tmp, f"r{i}"), args.max_epochs, args.max_batches)
                walls[way].append(summary["wall_seconds"])
                accuracies[way].append(summary["test_accuracy"])
    plain = statistics.median(walls[order[0][0]])
    print(f"{'way':<32}{'wall s':>8}{'vs plain':>10}{'test accuracy':>15}")
    for way, seconds in walls.items():
        wall = statistics.median(seconds)
        print(f"{way:<32}{wall:>8.2f}{plain / wall:>9.2f}x{statistics.median(accuracies[way]):>15.2f}")


if __name__ == "__main__":
    main()
