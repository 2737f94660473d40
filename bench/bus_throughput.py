"""Telemetry bus throughput: one publisher -> nissa_hub -> two subscribers, nothing lost.

    .venv/bin/python bench/bus_throughput.py [--events 50000] [--window 500]

The publisher sends in windows of `--window` events and waits until both subscribers have every
event of the window (a credit window; FIELD-NOTES: an unpaced burst overflows the 1,000-message
high-water mark and ZeroMQ drops silently), so the rate printed is one with nothing lost, checked by
sequence numbers. Baseline, in the same process: encoding + decoding the same events with no socket.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import zmq

from esper.karn import RunStore
from esper.leyline import EpochReport, TelemetryEvent, TrainingSignals
from esper.transport.bus import PublisherSink, Subscriber, decode, encode, make_context
from esper.transport.config import at_least

REPO = Path(__file__).resolve().parents[1]


def event(seq: int) -> TelemetryEvent:
    return TelemetryEvent(run_id="bench", sequence=seq, wall_time=time.time(),
                          epoch=EpochReport(signals=TrainingSignals(epoch=seq, max_epochs=75, val_accuracy=50.0,
                                                                    val_accuracy_history=[50.0] * 10)))


def consume(sub: Subscriber, store: RunStore, total: int, done: threading.Event) -> None:
    while store.runs.get("bench") is None or store.runs["bench"].last_sequence < total:
        if sub.socket.poll(100):
            for e in sub.receive():
                store.apply(e)
    done.set()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=at_least(1), default=50_000)  # 0 had waited forever for the first
    p.add_argument("--window", type=at_least(1), default=500)
    args = p.parse_args()
    events = [event(i) for i in range(1, args.events + 1)]

    start = time.perf_counter()
    for e in events:
        decode(encode(e))
    baseline = args.events / (time.perf_counter() - start)

    hub = subprocess.Popen([sys.executable, "-m", "services.nissa_hub", "--pub-port", "0", "--sub-port", "0",
                            "--snapshot-port", "0", "--metrics-port", "-1", "--retain-runs", "1"],
                           cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        endpoints = {}
        for line in hub.stderr:
            if " bound " in line:  # "... bound <name> <address>"
                name, address = line.split()[-2:]
                endpoints[name] = address
            if len(endpoints) == 3:
                break
        ctx = make_context()
        stores, subs, dones = [], [], []
        for _ in range(2):
            sub = Subscriber(ctx, endpoints["subscribe"], endpoints["snapshot"])
            while not sub.synced:  # the hello handshake: the subscription is live
                if sub.socket.poll(100):
                    sub.receive()
            stores.append(RunStore())
            subs.append(sub)
            dones.append(threading.Event())
        publisher = PublisherSink(endpoints["publish"], ctx)
        assert publisher.wait_attached(30)
        threads = [threading.Thread(target=consume, args=(s, st, args.events, d))
                   for s, st, d in zip(subs, stores, dones)]
        for t in threads:
            t.start()
        start = time.perf_counter()
        for i in range(0, args.events, args.window):
            for e in events[i:i + args.window]:
                publisher.emit(e)
            sent = min(i + args.window, args.events)
            while any(s.runs.get("bench") is None or s.runs["bench"].last_sequence < sent for s in stores):
                time.sleep(0.0005)
        elapsed = time.perf_counter() - start
        for t in threads:
            t.join()
        lost = [s.runs["bench"].lost for s in stores]
        received = [len(s.runs["bench"].epochs) for s in stores]
        rate = args.events / elapsed
        print(f"{platform.machine()}, {os.cpu_count()} cpus, pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}, "
              f"{args.events} events of {len(encode(events[0])[1])} bytes, window {args.window}")
        print(f"encode+decode only (baseline)  {baseline:10.0f} events/s")
        print(f"publisher -> hub -> 2 subs     {rate:10.0f} events/s  ({rate / baseline:.2f}x baseline)  "
              f"received {received}  lost {lost}")
        publisher.shutdown()
        for s in subs:
            s.close()
        ctx.term()
    finally:
        hub.terminate()
        hub.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
