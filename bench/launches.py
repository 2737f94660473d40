"""Operator dispatches per run-step: one Esper trainer alone against K runs grouped as one network.

A small host on a big GPU is launch-bound: the device waits on Python and the dispatcher, so a step
takes time in proportion to the operators dispatched, not to the images. This counts the top-level
aten operators of a training step (forward, backward, optimizer, batching and augmentation) with
torch.profiler, for the Esper trainer (cifar10 host, `mid` slot empty or, with `--stage`, holding a
conv_heavy seed) and for K such runs as one TrainerGroup (esper.tolaria.grouped: the hosts as the
groups of one network, each run's seed on its group) and, with `--vmap`, for K runs' Esper models as
one torch.func.vmap (bench/concurrency.py --mechanism vmap), and with `--plain`, for the plain loop that
trains one run's architecture (bench/growth_overhead.py's: the ceiling of its ratio). A step's count is
the marginal one, from
epochs of 2 and 6 steps, so what an epoch does once is left out. If a step's time follows its
dispatches, K grouped runs can go at most (K x one run's dispatches) / (the grouped step's
dispatches) times as fast as one run: the ceiling the GPU measurement of bench/concurrency.py
--mechanism grouped is read against. A CPU gives the count, with one difference: on a CPU, SGD steps
the parameters one by one (some 40 of one run's dispatches), where CUDA's default steps them all in a
few foreach operators. One run and a grouped network have the same number of parameter tensors, so on
CUDA both counts drop by the same amount and the ceiling is a little lower than the CPU's.

    python bench/launches.py --data-dir ../shared/data/cifar10 --k 1 2 4 8 [--stage none BLENDING] [--vmap] [--plain]
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from torch.profiler import ProfilerActivity, profile

from esper.kasmina import MorphogeneticModel, build_host, export_model
from esper.tolaria.grouped import GroupMember, TrainerGroup
from esper.transport.config import at_least

from concurrency import esper_trainer, vmapped_trainer
from growth_overhead import cifar10_on_device, grown_model, plain_epoch


def dispatches(fn) -> int:
    """Top-level aten operators `fn` dispatches (those no other aten operator called), after a warm-up."""
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::")
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def per_step(trainers: list, epoch) -> float:
    """Dispatches of one more training step: `epoch()` counted at STEPS[0] and STEPS[1] batches (set on
    every trainer), the difference over the difference, so what an epoch does once (optimizer syncs, a
    group loading and storing its runs' weights, the one device->host transfer) is left out."""
    counts = []
    for steps in STEPS:
        for trainer in trainers:
            trainer.cfg = dataclasses.replace(trainer.cfg, max_batches=steps)
        counts.append(dispatches(epoch))
    return (counts[1] - counts[0]) / (STEPS[1] - STEPS[0])


STEPS = (2, 6)


def plain_per_step(stage: str, data, device) -> float:
    """Dispatches of one more step of the plain loop training the architecture of one run in `stage`: the
    host alone (none), or host and seed as one exported network (growth_overhead's baseline)."""
    model = MorphogeneticModel(build_host("cifar10"), ["mid"]).to(device) if stage == "none" \
        else grown_model("FOSSILIZED", device)
    counts = [dispatches(plain_epoch(export_model(model), data, device, steps)) for steps in STEPS]
    return (counts[1] - counts[0]) / (STEPS[1] - STEPS[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=at_least(1), nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--stage", choices=["none", "TRAINING", "BLENDING", "FOSSILIZED"], nargs="+", default=["none"],
                        help="a conv_heavy seed in every run's mid slot, in this stage; several: run i in the i-th "
                             "(cyclically), against one run in each")
    parser.add_argument("--vmap", action="store_true", help="count the vmap mechanism's step too (--stage none)")
    parser.add_argument("--plain", action="store_true",
                        help="first, one Esper run against the plain loop training its architecture, per stage")
    args, device, data, name = cifar10_on_device(parser, timed=False)  # it counts, it does not time
    if args.vmap and args.stage != ["none"]:
        parser.error("--vmap batches identical models: --stage none only")
    seeded = f", mid slot: {' / '.join(args.stage)} (conv_heavy), run by run" if args.stage != ["none"] else ""
    print(f"# dispatches per training step on {name}, torch {torch.__version__}, batches of 128{seeded}")
    ones = [esper_trainer(data, device, 1, 0, stage) for stage in args.stage]
    esper_steps = [per_step([trainer], trainer.train_epoch) for trainer in ones]
    if args.plain:
        print(f"{'stage':<11}{'esper':>7}{'plain':>7}{'ceiling of esper / plain':>26}")
        for stage, esper in zip(args.stage, esper_steps):
            plain = plain_per_step(stage, data, device)
            print(f"{stage:<11}{esper:>7.1f}{plain:>7.1f}{plain / esper:>25.2f}x")
    alone = sum(esper_steps) / len(ones)
    print(f"esper trainer, one run: {alone:.1f}" + (" (mean over the stages)" if len(ones) > 1 else ""))
    print(f"{'K':>3}{'grouped, per K-step':>21}{'ceiling vs one run':>20}"
          + (f"{'vmap, per K-step':>18}{'ceiling':>9}" if args.vmap else ""))
    for k in args.k:
        members = [esper_trainer(data, device, 1, i, args.stage[i % len(args.stage)], GroupMember) for i in range(k)]
        group = TrainerGroup(members)
        grouped = per_step(members, group.train_epoch)
        line = f"{k:>3}{grouped:>21.1f}{k * alone / grouped:>19.2f}x"
        if args.vmap:
            vmapped, _ = vmapped_trainer(k, data, device)
            counts = [dispatches(lambda steps=steps, vmapped=vmapped: vmapped(steps)) for steps in STEPS]
            per_vmap_step = (counts[1] - counts[0]) / (STEPS[1] - STEPS[0])
            line += f"{per_vmap_step:>18.1f}{k * alone / per_vmap_step:>8.2f}x"
        print(line)


if __name__ == "__main__":
    main()
