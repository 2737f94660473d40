"""A comparison's static arm as one grouped run against one process per seed.

`esper compare --arms static` is timed both ways in this session, one after the other, each as the
command a researcher types: its N seeds one `esper train` process each, up to --workers at once
(the default), then all N as one `esper train static --grouped` process (`--group-static`, with
--workers 1: compare gives each of its workers cores / workers threads, and a grouped arm is one). The
wall times include what each way pays per process (Python, torch, the data); the mean test accuracy
of each says they trained the same runs (grouped runs follow their runs alone up to float order).

    python bench/compare_static.py --device cuda --seeds 5 --workers 5 --max-epochs 5 --max-batches 0
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


def compare_seconds(args, out: Path, grouped: bool) -> tuple[float, float]:
    """Wall seconds of the static arm's comparison and its mean test accuracy."""
    cmd = [sys.executable, "-m", "esper.cli", "compare", "--arms", "static", "--task", args.task,
           "--device", args.device, "--seeds", str(args.seeds), "--workers", "1" if grouped else str(args.workers),
           "--max-epochs", str(args.max_epochs), "--max-batches", str(args.max_batches),
           "--out", str(out), "--db", str(out.parent / "karn.db"), "--progress-every", "0"]
    cmd += ["--data-dir", args.data_dir] if args.data_dir else []
    cmd += ["--gpu-preload"] if args.device.startswith("cuda") else []
    cmd += ["--group-static"] if grouped else []
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    runs = json.loads((out / "results.json").read_text())["static"]
    return seconds, sum(r["test_accuracy"] for r in runs) / len(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--task", default="cifar10")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=5, help="processes at once for the per-seed way")
    parser.add_argument("--max-epochs", type=int, default=5)
    parser.add_argument("--max-batches", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()

    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    print(f"# the static arm of esper compare on {name}, torch {torch.__version__}: {args.task}, {args.seeds} "
          f"seeds, {args.max_epochs} epochs of {args.max_batches or 'all'} batches")
    print(f"{'way':<34}{'wall s':>8}{'test acc':>10}{'speed-up':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        alone, alone_acc = compare_seconds(args, Path(tmp) / "alone", grouped=False)
        print(f"{f'a process per seed, {args.workers} at once':<34}{alone:>8.1f}{alone_acc:>10.2f}{1.0:>10.2f}")
        together, together_acc = compare_seconds(args, Path(tmp) / "grouped", grouped=True)
        print(f"{'one grouped process':<34}{together:>8.1f}{together_acc:>10.2f}{alone / together:>10.2f}")


if __name__ == "__main__":
    main()
