"""Slowdown of a training epoch at each telemetry level against `off`, the baseline, in the same process.

The levels are `minimal`, `normal` and `debug`, their events to a JSONL file and a bus publisher, as the
tolaria worker runs. Target for `normal`: under 3%. `debug` pays for what only it computes: every layer's
gradient norms each batch and, every 5th epoch, the loss sharpness (20 double-backward passes).

    .venv/bin/python bench/telemetry_overhead.py [--task synthetic] [--epochs 10] [--rounds 3]
        [--levels off minimal normal debug] [--device cpu] [--max-batches 50]

Each round runs every level once, in an order rotated round by round, so drift (thermal, other load)
and position in the round hit every level alike; the publisher is attached to a real nissa_hub spawned
for the run. Same seed, same heuristic decisions at every level.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from esper.kasmina import HOSTS
from esper.leyline import TelemetryLevel, from_short_name, short_names
from esper.nissa import JsonlSink, Telemetry
from esper.simic import EnvConfig, GrowthEnv
from esper.tamiyo import HeuristicPolicy
from esper.tolaria.data import load_task_data
from esper.tolaria.trainer import TrainConfig
from esper.transport.bus import PublisherSink
from esper.transport.config import at_least

from growth_overhead import checked_device

REPO = Path(__file__).resolve().parents[1]


def epoch_times(env: GrowthEnv, epochs: int) -> list[float]:
    policy, obs, times = HeuristicPolicy(), env.reset(0), []
    for _ in range(epochs):
        start = time.perf_counter()
        obs, _ = env.step(policy.decide(obs))
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)
        times.append(time.perf_counter() - start)
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=sorted(HOSTS), default="synthetic")
    p.add_argument("--epochs", type=at_least(2), default=10, help="per run; the first is untimed (a warm-up)")
    p.add_argument("--rounds", type=at_least(1), default=3)
    p.add_argument("--levels", nargs="+", choices=short_names(TelemetryLevel), default=short_names(TelemetryLevel))
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-batches", type=at_least(0), default=50, help="training batches per epoch (0 = all)")
    args = p.parse_args()
    device = checked_device(p, args.device)
    levels = ["off", *[level for level in args.levels if level != "off"]]  # off: always, the baseline
    torch.set_num_threads(1)
    hub = subprocess.Popen([sys.executable, "-m", "services.nissa_hub", "--pub-port", "0", "--sub-port", "0",
                            "--snapshot-port", "0", "--metrics-port", "-1"], cwd=REPO, stderr=subprocess.PIPE,
                           text=True)
    try:
        publish = next(line.split()[-1] for line in hub.stderr if " bound publish " in line)
        publisher = PublisherSink(publish)
        assert publisher.wait_attached(30)
        data = load_task_data(args.task, None).to(device)
        cfg = EnvConfig(task=args.task, max_epochs=args.epochs,
                        train=TrainConfig.for_task(args.task, max_batches=args.max_batches))
        times: dict[str, list[float]] = {level: [] for level in levels}
        events: dict[str, int] = dict.fromkeys(levels, 0)
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                for level in levels[r % len(levels):] + levels[:r % len(levels)]:
                    sinks = [] if level == "off" else [JsonlSink(Path(tmp) / f"{level}{r}.jsonl"), publisher]
                    telemetry = Telemetry(f"{level}{r}", from_short_name(TelemetryLevel, level), sinks)
                    env = GrowthEnv(cfg, data, device, telemetry)
                    times[level] += epoch_times(env, args.epochs)[1:]  # the first epoch warms up
                    events[level] += telemetry.sequence
                    telemetry.close()
        publisher.shutdown()
    finally:
        hub.terminate()
        hub.wait(30)
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(f"{platform.machine()}, {os.cpu_count()} cpus{gpu}, torch {torch.__version__}, task {args.task} on "
          f"{device}, {args.max_batches} batches an epoch, {args.rounds} rounds x {args.epochs - 1} timed epochs "
          f"per level")
    # The median resists load spikes; the mean carries debug's periodic sharpness epochs.
    off, off_mean = statistics.median(times["off"]), statistics.fmean(times["off"])
    for level in levels:
        median, mean = statistics.median(times[level]), statistics.fmean(times[level])
        print(f"telemetry {level:<8} median epoch {median * 1e3:8.2f} ms  {median / off:.3f}x off "
              f"({(median / off - 1) * 100:+5.1f}%)   mean {mean * 1e3:8.2f} ms  {mean / off_mean:.3f}x off   "
              f"events {events[level]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
