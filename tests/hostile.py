"""Hostile inputs for issue 8, promise 10, importable as `hostile` (like `support`): a seeded generator
of byte strings, a third pure noise and two thirds mutations of a valid encoding (bytes flipped, cut,
inserted, repeated; sometimes a frame more or less), which reach deeper into a decoder than noise."""

from __future__ import annotations

import gc
import random
import time
from collections import Counter


def mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(data) + 1)
        kind = rng.randrange(5)
        if kind == 0 and data:
            data[min(at, len(data) - 1)] = rng.randrange(256)
        elif kind == 1:
            del data[at:]
        elif kind == 2:
            data[at:at] = rng.randbytes(rng.randint(1, 16))
        elif kind == 3:
            data[at:at] = data[at:at + rng.randint(1, 64)] * rng.randint(2, 8)
        else:
            data[at:at] = bytes([rng.choice((0x08, 0x0A, 0x12, 0x1A, 0xFF, 0x80))])  # protobuf tags, varint bits
    return bytes(data)


def hostile(rng: random.Random, valid: list[bytes]) -> list[bytes]:
    """Frames: noise (1-3 frames of 0-300 bytes), or `valid` with one frame mutated."""
    if rng.random() < 1 / 3:
        return [rng.randbytes(rng.randint(0, 300)) for _ in range(rng.randint(1, 3))]
    frames = list(valid)
    i = rng.randrange(len(frames))
    frames[i] = mutate(rng, frames[i])
    if rng.random() < 0.05:
        frames = frames[:-1] if rng.random() < 0.5 else [*frames, rng.randbytes(8)]
    return frames


def barrage(n: int, seed: str, valid: list[bytes], send) -> tuple[Counter, float]:
    """`send(frames, i) -> outcome` for n hostile messages, one at a time: (outcome counts, slowest seconds).

    The heap is frozen meanwhile, as every service freezes its own (esper.transport.lifecycle.StopSignal):
    in pytest's heap (torch, hypothesis, every test module) a full collection took 76-400 ms on the loaded
    2-core box, and landed inside whichever send it interrupted."""
    rng = random.Random(seed)
    outcomes: Counter = Counter()
    slowest = 0.0
    gc.freeze()
    try:
        for i in range(n):
            frames = hostile(rng, valid)
            start = time.perf_counter()
            outcomes[send(frames, i)] += 1
            slowest = max(slowest, time.perf_counter() - start)
    finally:
        gc.unfreeze()
    return outcomes, slowest
