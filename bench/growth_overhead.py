"""Growth overhead: images/s training the growing model against a plain PyTorch loop, same architecture.

For a conv_heavy seed in the cifar10 host's `mid` slot, in TRAINING, BLENDING and FOSSILIZED, the
Esper trainer (slots, per-seed optimizers, on-device accumulation) is timed against the plainest loop
that trains the same computation: the exported nn.Sequential (host + residual seed), one SGD, the same
on-device batches and augmentation. The plain network is always host + x + f(x): a TRAINING seed's
forward and backward run too (straight-through), so that is the work to compare against. Both run
in this process after a warm-up, as `--repeats` pairs of epochs timed one after the other, the first
of a pair alternating; the ratio is the median of the pairs' ratios, so drift in the machine's speed
(on a GPU it moved the plain loop by 20% between stages) hits both sides of a ratio alike.
Target (issue 3): ratio >= 0.90.

    python bench/growth_overhead.py --device cuda --steps 300 --repeats 9
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from esper.cli import UsageError, resolve_device
from esper.kasmina import MorphogeneticModel, build_host, export_model
from esper.leyline import Action, Blueprint, Operation, SeedStage
from esper.tolaria.augment import train_batches
from esper.tolaria.data import load_cifar10
from esper.tolaria.trainer import Trainer, TrainConfig, layout
from esper.transport.config import at_least

STAGES = {"TRAINING": 1, "BLENDING": 2, "FOSSILIZED": 3}  # ADVANCEs after germination
MAX_STEPS = 351
"""Full batches of 128 in CIFAR-10's 45,000 training images: an epoch stops there, so a --steps above it had
trained 351 batches and overstated images/s, computed as steps x 128 / seconds."""
STEPS = at_least(1, most=MAX_STEPS)
"""argparse type of a --steps: 1 to MAX_STEPS (0, TrainConfig's "all", had counted no images)."""
STEPS_HELP = f"batches of 128 per timed epoch, 1 to {MAX_STEPS}: CIFAR-10's epoch ends there (45,000 images)"


def grown_model(stage: str, device: torch.device) -> MorphogeneticModel:
    model = MorphogeneticModel(build_host("cifar10"), ["mid"])
    model.execute(Action(operation=Operation.OPERATION_GERMINATE, slot="mid",
                         blueprint=Blueprint.BLUEPRINT_CONV_HEAVY), 0)
    slot = model.slots["mid"]
    for _ in range(STAGES[stage]):
        slot.contribution, slot.epochs_in_stage, slot.alpha = (10.0, 0.1), 10, 1.0  # let every gate pass
        model.execute(Action(operation=Operation.OPERATION_ADVANCE, slot="mid"), 0)
    if stage == "BLENDING":
        slot.alpha = 0.5
    assert slot.stage == getattr(SeedStage, f"SEED_STAGE_{stage}")
    return model.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def esper_epoch(model, data, device, steps: int):
    """An epoch of the Esper trainer, warmed up (and the one-off FLOP count of this architecture done).
    train_epoch ends in one device->host transfer, so a timed call is complete when it returns."""
    trainer = Trainer(model, data, TrainConfig(max_batches=steps), device,
                      torch.Generator(device=data.train_x.device).manual_seed(0))
    trainer.train_epoch()
    return trainer.train_epoch


def plain_epoch(net, data, device, steps: int):
    """An epoch of the plain loop, warmed up, in the memory format the trainer picks on this device
    (TrainConfig's default)."""
    fmt = layout(TrainConfig.memory_format, device)
    net.to(memory_format=fmt)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    mean, std = data.channel_stats(device)
    gen = torch.Generator(device=data.train_x.device).manual_seed(0)
    net.train()

    def epoch() -> None:
        for xb, yb in train_batches(data.train_x, data.train_y, batch_size=128, max_batches=steps,
                                    generator=gen, device=device, mean=mean, std=std, memory_format=fmt):
            loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(device)

    epoch()
    return epoch


def images_per_s(epoch, device, steps: int) -> float:
    sync(device)
    start = time.perf_counter()
    epoch()
    return steps * 128 / (time.perf_counter() - start)


def checked_device(parser: argparse.ArgumentParser, name: str) -> torch.device:
    """--device `name`, or the parser's one-line error for a device torch cannot name, one Esper does not train
    on, CUDA on a machine without it, or a GPU it lacks (esper.cli.resolve_device's checks): these had been
    tracebacks, some after the data had loaded."""
    try:
        return torch.device(resolve_device(name))
    except UsageError as exc:
        parser.error(str(exc))


def cifar10_on_device(parser: argparse.ArgumentParser, timed: bool = True):
    """Parse --device/--data-dir, and --repeats for a `timed` benchmark (besides the caller's own flags),
    and put CIFAR-10 on the device: (args, device, data, the device's name for the header)."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    if timed:
        parser.add_argument("--repeats", type=at_least(1), default=3)
    parser.add_argument("--data-dir", default=None, help="as for esper train (default: $ESPER_DATA_DIR)")
    args = parser.parse_args()
    device = checked_device(parser, args.device)
    data = load_cifar10(args.data_dir).to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return args, device, data, name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=STEPS, default=100, help=STEPS_HELP)
    args, device, data, name = cifar10_on_device(parser)
    print(f"# growth overhead on {name}, torch {torch.__version__}, {args.steps} steps of 128, "
          f"{args.repeats} alternating pairs: median (min-max) of each pair's ratio")
    print(f"{'stage':<11}{'esper img/s':>14}{'plain img/s':>14}{'ratio':>8}{'range':>13}")
    for stage in STAGES:
        torch.manual_seed(0)
        esper = esper_epoch(grown_model(stage, device), data, device, args.steps)
        plain = plain_epoch(export_model(grown_model("FOSSILIZED", device)), data, device, args.steps)
        pairs = []  # side by side in time, so drift hits both of a pair alike; who goes first alternates
        for repeat in range(args.repeats):
            order = (esper, plain) if repeat % 2 == 0 else (plain, esper)
            rates = dict(zip(order, (images_per_s(epoch, device, args.steps) for epoch in order)))
            pairs.append((rates[esper], rates[plain]))
        ratios = sorted(e / p for e, p in pairs)
        print(f"{stage:<11}{statistics.median(e for e, _ in pairs):>14,.0f}"
              f"{statistics.median(p for _, p in pairs):>14,.0f}{statistics.median(ratios):>8.2f}"
              f"{ratios[0]:>7.2f}-{ratios[-1]:.2f}")


if __name__ == "__main__":
    main()
