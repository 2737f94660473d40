"""Slowdown of a training epoch with telemetry at `normal` (JSONL file + bus publisher, as the tolaria
worker runs) against `off`, the baseline, in the same process. Target: under 3%.

    .venv/bin/python bench/telemetry_overhead.py [--task synthetic] [--epochs 10] [--rounds 3]

Rounds alternate off/normal so drift (thermal, other load) hits both alike; the publisher is
attached to a real nissa_hub spawned for the run. Same seed, same heuristic decisions in both.
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

from esper.leyline import TelemetryLevel
from esper.nissa import JsonlSink, Telemetry
from esper.simic import EnvConfig, GrowthEnv
from esper.tamiyo import HeuristicPolicy
from esper.tolaria.data import load_task_data
from esper.transport.bus import PublisherSink

REPO = Path(__file__).resolve().parents[1]


def epoch_times(env: GrowthEnv, epochs: int) -> list[float]:
    policy, obs, times = HeuristicPolicy(), env.reset(0), []
    for _ in range(epochs):
        start = time.perf_counter()
        obs, _ = env.step(policy.decide(obs))
        times.append(time.perf_counter() - start)
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="synthetic")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    hub = subprocess.Popen([sys.executable, "-m", "services.nissa_hub", "--pub-port", "0", "--sub-port", "0",
                            "--snapshot-port", "0", "--metrics-port", "-1"], cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        publish = next(line.split()[-1] for line in hub.stderr if " bound publish " in line)
        publisher = PublisherSink(publish)
        assert publisher.wait_attached(30)
        data, device = load_task_data(args.task, None), torch.device("cpu")
        cfg = EnvConfig(task=args.task, max_epochs=args.epochs)
        times: dict[str, list[float]] = {"off": [], "normal": []}
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                for level in ("off", "normal"):
                    if level == "off":
                        telemetry = Telemetry(f"off{r}", TelemetryLevel.TELEMETRY_LEVEL_OFF)
                    else:
                        telemetry = Telemetry(f"normal{r}", TelemetryLevel.TELEMETRY_LEVEL_NORMAL,
                                              [JsonlSink(Path(tmp) / f"{r}.jsonl"), publisher])
                    times[level] += epoch_times(GrowthEnv(cfg, data, device, telemetry), args.epochs)[1:]  # 1st: warm-up
                    telemetry.close()
        publisher.shutdown()
    finally:
        hub.terminate()
        hub.wait(30)
    off, normal = statistics.median(times["off"]), statistics.median(times["normal"])
    print(f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, task {args.task}, "
          f"{args.rounds} rounds x {args.epochs - 1} timed epochs per level")
    print(f"telemetry off (baseline)  median epoch {off * 1e3:8.2f} ms")
    print(f"telemetry normal          median epoch {normal * 1e3:8.2f} ms  ({normal / off:.3f}x baseline, "
          f"{(normal / off - 1) * 100:+.1f}%)  events published {publisher.published}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
