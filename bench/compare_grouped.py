"""A comparison with each arm's seeds as one grouped run against one process per seed.

`esper compare` is timed both ways in this session, one after the other, each as the command a
researcher types with the same --workers: every (arm, seed) one `esper train` process, up to --workers
at once, then with `--grouped`, where each arm's seeds are one `esper train MODE --grouped` process
(from-scratch's building in each seed's own grown architecture). The wall times
include what each way pays per process (Python, torch, the data). Each arm's mean test accuracy both
ways says they trained the same runs (grouped runs follow their runs alone up to float order; a
growing run's gates read accuracies, so a float-order flip of a decision can make one seed's run
differ).

    python bench/compare_grouped.py --device cuda --seeds 5 --workers 5 --max-epochs 5 --max-batches 0
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from esper.kasmina import HOSTS
from esper.tolaria.data import load_task_data
from esper.transport.config import at_least

from growth_overhead import checked_device


def compare(args, out: Path, grouped: bool) -> tuple[float, dict[str, float]]:
    """Wall seconds of the comparison and each arm's mean test accuracy."""
    cmd = [sys.executable, "-m", "esper.cli", "compare", "--arms", *args.arms, "--task", args.task,
           "--device", args.device, "--seeds", str(args.seeds), "--workers", str(args.workers),
           "--max-epochs", str(args.max_epochs), "--max-batches", str(args.max_batches),
           "--out", str(out), "--db", str(out.parent / "karn.db"), "--progress-every", "0"]
    cmd += ["--data-dir", args.data_dir] if args.data_dir else []
    cmd += ["--gpu-preload"] if args.device.startswith("cuda") else []
    cmd.append("--grouped" if grouped else "--no-grouped")  # the default is grouped on CUDA
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    results = json.loads((out / "results.json").read_text())
    return seconds, {arm: sum(r["test_accuracy"] for r in runs) / len(runs) for arm, runs in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--task", choices=sorted(HOSTS), default="cifar10")
    parser.add_argument("--arms", nargs="+", choices=["static", "heuristic", "from-scratch"],
                        default=["static", "heuristic", "from-scratch"])
    parser.add_argument("--seeds", type=at_least(1), default=5)
    parser.add_argument("--workers", type=at_least(1), default=5, help="processes at once, both ways")
    parser.add_argument("--max-epochs", type=at_least(1), default=5)
    parser.add_argument("--max-batches", type=at_least(0), default=0, help="training batches per epoch (0 = all)")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    checked_device(parser, args.device)

    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    print(f"# esper compare --arms {' '.join(args.arms)} on {name}, torch {torch.__version__}: {args.task}, "
          f"{args.seeds} seeds, {args.max_epochs} epochs of {args.max_batches or 'all'} batches, "
          f"{args.workers} workers")
    # Untimed: the first way to run would otherwise pay alone for decoding the data into its cache (1.39x
    # where a filled cache gave 1.06x, on 2 cores).
    load_task_data(args.task, args.data_dir)
    print(f"{'way':<24}{'wall s':>8}{'speed-up':>10}  mean test accuracy per arm")
    with tempfile.TemporaryDirectory() as tmp:
        alone, alone_acc = compare(args, Path(tmp) / "alone", grouped=False)
        print(f"{'a process per run':<24}{alone:>8.1f}{1.0:>10.2f}  "
              + "  ".join(f"{arm} {acc:.2f}" for arm, acc in alone_acc.items()))
        together, together_acc = compare(args, Path(tmp) / "grouped", grouped=True)
        print(f"{'--grouped':<24}{together:>8.1f}{alone / together:>10.2f}  "
              + "  ".join(f"{arm} {acc:.2f}" for arm, acc in together_acc.items()))


if __name__ == "__main__":
    main()
