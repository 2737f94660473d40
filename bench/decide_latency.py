"""Decide latency over loopback gRPC (unary, batched, streaming) against the same heuristic in-process.

The heuristic called in-process is the baseline: every figure is also printed as a ratio to it.

    .venv/bin/python bench/decide_latency.py [--calls 2000] [--batch 16]

Spawns its own tamiyo_server on a free port and stops it at the end.
"""

from __future__ import annotations

import argparse
import queue
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc
import torch

from esper.leyline import Blueprint, DecideBatchRequest, DecideRequest, Observation, SeedStage, SlotState, \
    TrainingSignals, tamiyo_pb2_grpc
from esper.tamiyo import HeuristicPolicy
from esper.transport.config import at_least
from esper.transport.policy_service import MAX_BATCH

REPO = Path(__file__).resolve().parents[1]


def observation() -> Observation:
    return Observation(run_id="bench", signals=TrainingSignals(epoch=9, max_epochs=75, plateau_epochs=1,
                                                               val_accuracy_history=[50.0] * 10),
                       slots=[SlotState(slot=s, stage=SeedStage.SEED_STAGE_DORMANT) for s in ("early", "mid", "late")],
                       blueprints=[b for b in Blueprint.values() if b])


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def report(name: str, seconds: list[float], per_call: int, baseline_p50: float) -> None:
    q = statistics.quantiles(seconds, n=100)
    p50, p99 = q[49], q[98]
    rate = per_call * len(seconds) / sum(seconds)
    print(f"{name:<22} p50 {p50 * 1e6:9.1f} us  p99 {p99 * 1e6:9.1f} us  {rate:10.0f} decisions/s  "
          f"p50 per decision {p50 / per_call / baseline_p50:7.1f}x in-process")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=at_least(2), default=2000, help="calls of each kind (DecideBatch: calls // batch)")
    p.add_argument("--batch", type=at_least(1, most=MAX_BATCH), default=16, help="observations per DecideBatch")
    args = p.parse_args()
    if args.calls // args.batch < 2:  # percentiles need two timings
        p.error(f"--calls {args.calls} makes {args.calls // args.batch} DecideBatch call(s) of --batch {args.batch}: "
                f"give at least {2 * args.batch} calls")
    server = subprocess.Popen([sys.executable, "-m", "services.tamiyo_server", "--port", "0", "--metrics-port", "-1"],
                              cwd=REPO, stderr=subprocess.PIPE, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    try:
        target = next(line.split()[-1] for line in server.stderr if " bound grpc " in line)
        channel = grpc.insecure_channel(target)
        grpc.channel_ready_future(channel).result(timeout=60)
        stub = tamiyo_pb2_grpc.TamiyoStub(channel)
        obs, policy = observation(), HeuristicPolicy()
        request = DecideRequest(observation=obs)
        batch = DecideBatchRequest(observations=[obs] * args.batch)
        for _ in range(200):  # warm-up: connections, thread pools, caches
            stub.Decide(request, timeout=5)

        local = timed(lambda: policy.decide(obs), args.calls)
        base = statistics.median(local)
        print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
              f"python {platform.python_version()}, grpcio {grpc.__version__}, torch {torch.__version__}, "
              f"{args.calls} calls each")
        report("in-process (baseline)", local, 1, base)
        report("unary Decide", timed(lambda: stub.Decide(request, timeout=5), args.calls), 1, base)
        report(f"DecideBatch x{args.batch}", timed(lambda: stub.DecideBatch(batch, timeout=5),
                                                  args.calls // args.batch), args.batch, base)

        # Streaming: one call, each request answered before the next is sent (a worker's rhythm).
        requests: queue.Queue = queue.Queue()
        responses = stub.DecideStream(iter(requests.get, None), timeout=600)
        stream_times = []
        for i in range(args.calls):
            start = time.perf_counter()
            requests.put(DecideRequest(observation=obs, request_id=i))
            next(responses)
            stream_times.append(time.perf_counter() - start)
        requests.put(None)
        report("DecideStream", stream_times, 1, base)
        channel.close()
    finally:
        server.terminate()
        server.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
