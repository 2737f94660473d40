"""The fast path's options: channels_last, bf16 autocast and torch.compile against fp32 eager, same trainer, same data.

For the cifar10 host alone and with a conv_heavy seed BLENDING in `mid`, times a training epoch of
`--steps` batches and a validation pass (5,000 images, with the seed's counterfactual) under each
TrainConfig setting: fp32 eager in contiguous memory (the baseline), channels_last, bf16, compile,
compile + bf16, and all three; and fp32 eager in cuDNN's benchmark mode (torch.backends.cudnn.benchmark,
a process-wide switch, so on only while that setting's trainer runs: each convolution shape times
cuDNN's algorithms once and keeps the fastest; nothing on a CPU). The first epoch of each setting is timed apart as its warm-up
(compiling happens there). Settings alternate within each repeat, so drift hits all alike; best of
`--repeats`. A ratio above 1 is faster than the baseline.

    python bench/fast_path.py --device cuda --steps 200
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager

import torch

from esper.kasmina import MorphogeneticModel, build_host
from esper.tolaria.trainer import Trainer, TrainConfig

from growth_overhead import STEPS, STEPS_HELP, cifar10_on_device, grown_model, sync

SETTINGS = {  # every layout named: the default, auto, differs by device
    "fp32": dict(memory_format="contiguous"),
    "channels_last": dict(memory_format="channels_last"),
    "bf16": dict(precision="bf16", memory_format="contiguous"),
    "compile": dict(compile=True, memory_format="contiguous"),
    "compile+bf16": dict(compile=True, precision="bf16", memory_format="contiguous"),
    "all three": dict(compile=True, precision="bf16", memory_format="channels_last"),
    "cudnn_bench": dict(memory_format="contiguous"),
}


@contextmanager
def cudnn_benchmark(on: bool):
    """cuDNN's benchmark mode on (or off) for what runs inside, as it was after."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def model_for(case: str, device: torch.device) -> MorphogeneticModel:
    torch.manual_seed(0)
    return MorphogeneticModel(build_host("cifar10"), ["mid"]).to(device) if case == "host" \
        else grown_model("BLENDING", device)


def timed(fn, device: torch.device, setting: str):
    """(seconds, what fn returned) under `setting`; train_epoch and evaluate end in one device->host transfer."""
    with cudnn_benchmark(setting == "cudnn_bench"):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=STEPS, default=100, help=STEPS_HELP)
    parser.add_argument("--cases", nargs="+", choices=["host", "blending"], default=["host", "blending"])
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS),
                        help="fp32 is always timed: it is the baseline")
    args, device, data, name = cifar10_on_device(parser)
    settings = {s: SETTINGS[s] for s in SETTINGS if s == "fp32" or s in args.settings}
    print(f"# fast path on {name}, torch {torch.__version__}, {args.steps} steps of 128, best of {args.repeats}")
    print(f"{'model':<9}{'setting':<14}{'warm-up s':>10}{'train img/s':>13}{'ratio':>7}{'eval s':>8}{'ratio':>7}"
          f"{'loss':>8}")
    for case in args.cases:
        # Once a case, not once a setting: a reset drops the compiled code of the trainers built before it,
        # which then compiled again in their first timed epoch. Each compiled setting still compiles in its
        # own warm-up (its own modules, and guards that differ: autocast, memory layout).
        torch._dynamo.reset()
        trainers = {}
        for setting, options in settings.items():
            trainer = Trainer(model_for(case, device), data, TrainConfig(max_batches=args.steps, **options),
                              device, torch.Generator(device=data.train_x.device).manual_seed(0))
            warmup = timed(trainer.train_epoch, device, setting)[0] + timed(trainer.evaluate, device, setting)[0]
            trainers[setting] = (trainer, warmup)
        train_s = {s: [] for s in settings}
        eval_s = {s: [] for s in settings}
        loss = {}
        for _ in range(args.repeats):
            for setting, (trainer, _) in trainers.items():
                seconds, (loss[setting], _) = timed(trainer.train_epoch, device, setting)
                train_s[setting].append(seconds)
                eval_s[setting].append(timed(trainer.evaluate, device, setting)[0])
        base_train, base_eval = min(train_s["fp32"]), min(eval_s["fp32"])
        for setting, (_, warmup) in trainers.items():
            t, e = min(train_s[setting]), min(eval_s[setting])
            print(f"{case:<9}{setting:<14}{warmup:>10.1f}{args.steps * 128 / t:>13,.0f}{base_train / t:>7.2f}"
                  f"{e:>8.3f}{base_eval / e:>7.2f}{loss[setting]:>8.3f}")


if __name__ == "__main__":
    main()
