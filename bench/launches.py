"""Operator dispatches per run-step: one Esper trainer alone against K runs grouped as one network.

A small host on a big GPU is launch-bound: the device waits on Python and the dispatcher, so a step
takes time in proportion to the operators dispatched, not to the images. This counts the top-level
aten operators of a training step (forward, backward, optimizer, batching and augmentation) with
torch.profiler, for the Esper trainer (cifar10 host, empty `mid` slot) and for K runs as the groups of
one network (esper.tolaria.grouped) and, with `--vmap`, for K runs' Esper models as one torch.func.vmap
(bench/concurrency.py --mechanism vmap). If a step's time follows its dispatches, K grouped runs can go at
most (K x one run's dispatches) / (the grouped step's dispatches) times as fast as one run: the
ceiling the GPU measurement of bench/concurrency.py --mechanism grouped is read against. A CPU gives
the count, with one difference: on a CPU, SGD steps the parameters one by one (some 40 of one run's
dispatches), where CUDA's default steps them all in a few foreach operators. One run and a grouped
network have the same number of parameter tensors, so on CUDA both counts drop by the same amount
and the ceiling is a little lower than the CPU's.

    python bench/launches.py --data-dir ../shared/data/cifar10 --k 1 2 4 8 [--vmap]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from esper.kasmina import HOSTS, MorphogeneticModel, build_host
from esper.tolaria.grouped import GroupedCNN, sgd, train_grouped
from esper.tolaria.trainer import Trainer, TrainConfig

from concurrency import vmapped_trainer
from growth_overhead import cifar10_on_device


def dispatches(fn) -> int:
    """Top-level aten operators `fn` dispatches (those no other aten operator called), after a warm-up."""
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::")
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--vmap", action="store_true", help="count the vmap mechanism's step too")
    args, device, data, name = cifar10_on_device(parser, timed=False)  # it counts, it does not time
    print(f"# dispatches per training step on {name}, torch {torch.__version__}, batches of 128, "
          f"mean of {args.steps} steps")
    model = MorphogeneticModel(build_host("cifar10"), ["mid"]).to(device)
    trainer = Trainer(model, data, TrainConfig(max_batches=args.steps), device,
                      torch.Generator(device=device).manual_seed(0))
    alone = dispatches(trainer.train_epoch) / args.steps
    print(f"esper trainer, one run: {alone:.1f}")
    print(f"{'K':>3}{'grouped, per K-step':>21}{'ceiling vs one run':>20}"
          + (f"{'vmap, per K-step':>18}{'ceiling':>9}" if args.vmap else ""))
    for k in args.k:
        grouped = GroupedCNN(HOSTS["cifar10"], k).to(device)
        generators = [torch.Generator(device=device).manual_seed(i) for i in range(k)]
        optimizer = sgd(grouped)
        train_grouped(grouped, data, generators, 1, optimizer)

        def grouped_steps(grouped=grouped, generators=generators, optimizer=optimizer) -> None:
            train_grouped(grouped, data, generators, args.steps, optimizer)

        per_step = dispatches(grouped_steps) / args.steps
        line = f"{k:>3}{per_step:>21.1f}{k * alone / per_step:>19.2f}x"
        if args.vmap:
            vmapped, _ = vmapped_trainer(k, data, device)
            per_vmap_step = dispatches(lambda vmapped=vmapped: vmapped(args.steps)) / args.steps
            line += f"{per_vmap_step:>18.1f}{k * alone / per_vmap_step:>8.2f}x"
        print(line)


if __name__ == "__main__":
    main()
