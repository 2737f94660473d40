"""Growth environments in processes of their own, so that PPO's n_envs train at once on one device.

In one process the environments of a round step one after another: on a GPU each leaves the device
idle between its small kernels. bench/concurrency.py measured the ways K runs can share one device
(an H100, the cifar10 host): K processes gave 1.72x, 2.64x and 2.74x the images/s of one run at K = 2,
4, 8; K threads in one process 1.40x, 1.56x, 1.37x (the GIL); batching identical networks is faster but
cannot batch networks that grow differently. So `esper train ppo --env-processes` runs each environment
in a child process (env_process.main) that loads the data once and then plays the
episodes it is given; the policy stays in the parent, which sends every child its decision and then
waits for all of them (SEED RL's split: actors step environments, inference is central).

Between parent and child go length-prefixed frames on the child's stdin and stdout: a JSON header, then
leyline protobuf payloads (a Decision in; an Observation and the telemetry events of the step out). No
pickle. The events are emitted by the parent into the episode's own sinks (run directory, TUI), under
the child's sequence numbers. An episode's numbers are the same in a child as in the parent process,
because every GrowthEnv draws from its own random stream (GrowthEnv.own_rng).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import subprocess
import sys
import traceback
import typing
from typing import BinaryIO

import torch

from esper.leyline import Decision, Observation, TelemetryEvent
from esper.nissa import ListSink, Telemetry
from esper.simic.env import EnvConfig, GrowthEnv
from esper.tolaria.data import load_task_data


class EnvProcessError(RuntimeError):
    """A child environment failed (its message and traceback are in it) or exited."""


# ---------------------------------------------------------------------------------------------- frames
def send(stream: BinaryIO, header: dict, *payloads: bytes) -> None:
    frames = [json.dumps(header | {"payloads": len(payloads)}).encode(), *payloads]
    stream.write(b"".join(struct.pack("<I", len(f)) + f for f in frames))
    stream.flush()


def read_frame(stream: BinaryIO) -> bytes:
    head = stream.read(4)
    if len(head) < 4:
        raise EOFError("the stream ended")
    (size,) = struct.unpack("<I", head)
    frame = stream.read(size)
    if len(frame) < size:
        raise EOFError("the stream ended inside a frame")
    return frame


def receive(stream: BinaryIO) -> tuple[dict, list[bytes]]:
    header = json.loads(read_frame(stream))
    return header, [read_frame(stream) for _ in range(header["payloads"])]


def config_from_dict(cls: type, values: dict):
    """The (frozen, nested) dataclass `dataclasses.asdict` gave `values` from: JSON lists back to tuples."""
    hints = typing.get_type_hints(cls)

    def tuples(value):
        return tuple(tuples(v) for v in value) if isinstance(value, list) else value

    return cls(**{f.name: config_from_dict(hints[f.name], values[f.name]) if dataclasses.is_dataclass(hints[f.name])
                  else tuples(values[f.name]) for f in dataclasses.fields(cls)})


# ---------------------------------------------------------------------------------------------- parent
class EnvProcess:
    """A GrowthEnv in a child process. `reset` and `step` are GrowthEnv's; `send_step` then `receive`
    are the two halves of `step`, so that a round starts every child's epoch before it waits for any
    (simic.actor.step_all). `telemetry` is the current episode's: the child's events are emitted to it."""

    def __init__(self, env: EnvConfig, device: str, data_dir: str | None, gpu_preload: bool, threads: int):
        # Not `-m esper.simic.env_process`: esper.simic imports this module, which would then run twice.
        self.proc = subprocess.Popen([sys.executable, "-c", "from esper.simic.env_process import main; main()"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # stderr: the parent's
        self.device = device
        self.telemetry = Telemetry("")
        self.fates: dict[str, int] = {}
        self._send({"env": dataclasses.asdict(env), "device": device, "data_dir": data_dir,
                    "gpu_preload": gpu_preload, "threads": threads})

    def _exited(self) -> EnvProcessError:
        return EnvProcessError(f"the environment process on {self.device} exited (status {self.proc.wait()}); "
                               f"an error it wrote is above")

    def _send(self, header: dict, *payloads: bytes) -> None:
        try:
            send(self.proc.stdin, header, *payloads)
        except OSError:  # a broken pipe: the child is gone
            raise self._exited() from None

    def _reply(self) -> tuple[dict, list[bytes]]:
        try:
            header, payloads = receive(self.proc.stdout)
        except (EOFError, OSError):
            raise self._exited() from None
        if "error" in header:
            raise EnvProcessError(f"the environment process on {self.device} failed: {header['error']}")
        return header, payloads

    def wait_ready(self) -> None:
        """Until the child has loaded its data (children load theirs at once: call after starting all)."""
        self._reply()

    def send_reset(self, seed: int) -> None:
        tel = self.telemetry
        self._send({"op": "reset", "seed": seed, "run_id": tel.run_id, "level": tel.level, "forward": bool(tel.sinks),
                    "sequence": tel.sequence})  # the child numbers on from what the episode emitted here

    def send_step(self, decision: Decision) -> None:
        self._send({"op": "step"}, decision.SerializeToString())

    def receive(self) -> tuple[Observation, bool]:
        header, (observation, *events) = self._reply()
        for raw in events:
            event = TelemetryEvent.FromString(raw)
            self.telemetry.sequence = event.sequence
            for sink in self.telemetry.sinks:
                sink.emit(event)
        self.fates = header["fates"]
        return Observation.FromString(observation), header["done"]

    def reset(self, seed: int) -> Observation:
        self.send_reset(seed)
        return self.receive()[0]

    def step(self, decision: Decision) -> tuple[Observation, bool]:
        self.send_step(decision)
        return self.receive()

    def seed_fates(self) -> dict[str, int]:
        return self.fates

    def close(self) -> None:
        """End of input: the child returns. One that does not within 10 s is killed."""
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


def start_env_processes(n: int, env: EnvConfig, devices: tuple[str, ...], data_dir: str | None,
                        gpu_preload: bool, threads: int | None = None) -> list[EnvProcess]:
    """n children on `devices` round robin (as simic.actor.make_envs places environments), each with
    `threads` CPU threads (default: this machine's cores shared out), ready when this returns."""
    threads = threads or max(1, (os.cpu_count() or 1) // n)
    procs = [EnvProcess(env, devices[i % len(devices)], data_dir, gpu_preload, threads) for i in range(n)]
    try:
        for proc in procs:
            proc.wait_ready()
    except BaseException:
        close_all(procs)
        raise
    return procs


def close_all(procs: list[EnvProcess]) -> None:
    for proc in procs:
        proc.close()


# ---------------------------------------------------------------------------------------------- child
def serve(inp: BinaryIO, out: BinaryIO) -> None:
    """The child: load the data, say ready, then answer reset and step requests until the input ends."""
    start, _ = receive(inp)
    try:
        torch.set_num_threads(start["threads"])
        env_cfg = config_from_dict(EnvConfig, start["env"])
        device = torch.device(start["device"])
        data = load_task_data(env_cfg.task, start["data_dir"])
        data = data.to(device) if start["gpu_preload"] else data
    except Exception as exc:  # missing data, a bad device: said once, and the child ends
        send(out, {"error": f"{type(exc).__name__}: {exc}"})
        return
    send(out, {"ready": True})
    env, sink = None, ListSink()  # the step's events wait there for the reply that carries them
    while True:
        try:
            header, payloads = receive(inp)
        except EOFError:  # the parent closed our input: done
            return
        try:
            if header["op"] == "reset":
                sink.events.clear()  # what a failed step left
                tel = Telemetry(header["run_id"], header["level"], [sink] if header["forward"] else [])
                tel.sequence = header["sequence"]
                env = GrowthEnv(env_cfg, data, device, tel)
                obs, done = env.reset(header["seed"]), False
            else:
                obs, done = env.step(Decision.FromString(payloads[0]))
            events, sink.events = sink.events, []
            send(out, {"done": done, "fates": env.seed_fates()}, obs.SerializeToString(),
                 *(e.SerializeToString() for e in events))
        except Exception as exc:  # an illegal action, a device error: the parent raises it, this child stays
            traceback.print_exc()
            send(out, {"error": f"{type(exc).__name__}: {exc}"})


def main() -> None:
    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not land among the frames
    try:
        serve(sys.stdin.buffer, out)
    except (KeyboardInterrupt, BrokenPipeError):  # Ctrl-C reaches the whole process group; the parent reports
        pass

