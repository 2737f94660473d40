"""Concurrency: aggregate images/s of K independent training runs on one device against one run alone.

Four mechanisms (`--mechanism`):
- processes: each run is its own process (what `esper compare --workers K` uses). Every child loads
  the data, builds the cifar10 host and the Esper trainer, warms up, says "ready", waits for "go" on
  stdin, trains `--steps` batches of 128 and reports when it finished; the parent times from "go" to
  the last finish.
- grouped: the K runs are the K groups of one grouped network, each run's seed on its group
  (esper.tolaria.grouped.TrainerGroup, as `esper train --grouped` trains them), in this process. Its
  K = 1 is a group of one; the ratios against a plain Trainer's run alone (measured first, in this
  process) are printed beside, as the issue's "one run alone": an eager group of one is slower than a plain
  run (its batches stacked, its head a grouped convolution), one replayed as a CUDA graph far faster.
  `--cuda-graph` on | off (TrainConfig.cuda_graph; on, the default, does something on CUDA only), both for
  a table each in one process: the group's step replayed as a CUDA graph (grouped.CapturedStep) or eager.
- vmap: the K runs' Esper models (the host with an empty `mid` slot) as one torch.func.vmap over their
  stacked weights and BatchNorm statistics, trained in this process. Unlike grouped it needs no grouped
  rewrite of the layers, so it batches any architecture the runs share (a grafted from-scratch network
  too); it still cannot batch runs whose architectures differ. K = 1 is one run through vmap.
- threads: K Esper trainers in this process, each stepped by its own thread on its own CUDA stream, so
  one process's kernels from different runs may overlap (processes only time-slice the GPU without
  MPS). Python holds the GIL between kernel launches, so this measures how much of a launch-bound step
  is Python.
Target on a GPU (issue 3): >= 0.7*K for K <= 8. `--cudnn-benchmark` turns on cuDNN's benchmark mode
(torch.backends.cudnn.benchmark: each convolution shape times cuDNN's algorithms once and keeps the
fastest) in every run, children included; grouped convolutions are where its choice may differ most.
`--memory-format` lays every run's batches and convolution weights out as TrainConfig.memory_format does
(auto: contiguous on CUDA, channels_last on the CPU).
`--stage` gives every run a conv_heavy seed in `mid` (TRAINING, BLENDING or FOSSILIZED), or with several
stages run i the i-th: growing runs, whose seeds a group batches by blueprint and stage (SeedGroups).
K = 1 is then the first stage's run alone.

    python bench/concurrency.py --device cuda --k 1 2 4 8 --steps 300 [--mechanism grouped|vmap|threads]
        [--cudnn-benchmark] [--stage none BLENDING]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def esper_trainer(data, device, steps: int, seed: int, stage: str = "none", trainer_class=None,
                  memory_format: str = "auto", cuda_graph: bool = True):
    """The trainer each run is: the cifar10 host with an empty `mid` slot, or (`stage`) a conv_heavy seed
    there in TRAINING, BLENDING or FOSSILIZED (growth_overhead.grown_model). `trainer_class`: tolaria's
    Trainer, or grouped.GroupMember for a run of a TrainerGroup."""
    import torch

    from esper.kasmina import MorphogeneticModel, build_host
    from esper.tolaria.trainer import Trainer, TrainConfig
    from growth_overhead import grown_model

    torch.manual_seed(seed)  # each run its own initial weights, as each seed's run has
    model = (MorphogeneticModel(build_host("cifar10"), ["mid"]).to(device) if stage == "none"
             else grown_model(stage, device))
    cfg = TrainConfig(max_batches=steps, memory_format=memory_format, cuda_graph=cuda_graph)
    return (trainer_class or Trainer)(model, data, cfg, device, torch.Generator(device=device).manual_seed(seed))


def child(device_name: str, steps: int, data_dir: str | None, cudnn_benchmark: bool, stage: str,
          memory_format: str) -> None:
    import torch

    from esper.tolaria.data import load_cifar10

    torch.backends.cudnn.benchmark = cudnn_benchmark

    device = torch.device(device_name)
    data = load_cifar10(data_dir).to(device)
    trainer = esper_trainer(data, device, steps, os.getpid(), stage, memory_format=memory_format)
    trainer.train_epoch()  # warm-up
    print("ready", flush=True)
    sys.stdin.readline()
    trainer.train_epoch()  # ends in a device->host transfer: the work is done when it returns
    print(f"done {time.time()}", flush=True)


def aggregate(k: int, args) -> float:
    cmd = [sys.executable, __file__, "--child", "--device", args.device, "--steps", str(args.steps),
           "--memory-format", args.memory_format]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    if args.cudnn_benchmark:
        cmd.append("--cudnn-benchmark")
    env = os.environ | {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // k))}
    procs = [subprocess.Popen(cmd + ["--stage", args.stage[i % len(args.stage)]], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env) for i in range(k)]
    for p in procs:
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError("a child failed before it was ready")
    go = time.time()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    finished = [float(p.stdout.readline().split()[1]) for p in procs]
    for p in procs:
        p.wait()
    return k * args.steps * 128 / (max(finished) - go)


def median_seconds(fn, repeats: int) -> float:
    """The median wall time of `repeats` calls of fn (each must end only when the device is done): a single
    300-step epoch on a GPU varied by up to 20% from one call to the next."""
    import statistics

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def grouped_rate(k: int, args) -> float:
    """Images/s of K runs as one TrainerGroup (each run its own init, data order and, with --stage, seed),
    after a warm-up."""
    import dataclasses

    import torch

    from esper.tolaria.data import load_cifar10
    from esper.tolaria.grouped import GroupMember, TrainerGroup

    device = torch.device(args.device)
    data = load_cifar10(args.data_dir).to(device)
    members = [esper_trainer(data, device, 20, i, args.stage[i % len(args.stage)], GroupMember, args.memory_format,
                             args.cuda_graph_now == "on") for i in range(k)]
    group = TrainerGroup(members)
    group.train_epoch()  # warm-up (cuDNN picks its algorithms); ends in a device->host transfer
    for m in members:
        m.cfg = dataclasses.replace(m.cfg, max_batches=args.steps)

    def epoch() -> None:
        group.train_epoch()
        for m in members:
            m.train_epoch()  # hands over the epoch's loss and accuracy, as a run reads them

    rate = k * args.steps * 128 / median_seconds(epoch, args.repeats)
    if args.profile and k == max(args.k):
        args.profiled.append((args.cuda_graph_now, profile_table(epoch, device)))
    return rate


def profile_table(fn, device) -> str:
    """The 15 operators fn spent most of the device's time in (the CPU's, on a CPU), by torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=15)


def plain_rate(args) -> float:
    """Images/s of one plain Trainer's run alone (the first --stage), in this process, after a warm-up."""
    import dataclasses

    import torch

    from esper.tolaria.data import load_cifar10

    device = torch.device(args.device)
    data = load_cifar10(args.data_dir).to(device)
    trainer = esper_trainer(data, device, 20, 0, args.stage[0], memory_format=args.memory_format)
    trainer.train_epoch()  # warm-up; ends in a device->host transfer
    trainer.cfg = dataclasses.replace(trainer.cfg, max_batches=args.steps)
    return args.steps * 128 / median_seconds(trainer.train_epoch, args.repeats)


def vmapped_trainer(k: int, data, device):
    """A function training K Esper models (the cifar10 host, an empty `mid` slot) `steps` batches, as
    one vmap over their stacked weights (torch.func), each run with its own data order, one SGD over the
    stacked weights (element-wise, so each run's own). Returns it and the stacked weights."""
    import copy

    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, stack_module_state, vmap

    from esper.kasmina import MorphogeneticModel, build_host
    from esper.tolaria.augment import stacked_train_batches

    models = [MorphogeneticModel(build_host("cifar10"), ["mid"]).to(device).train() for _ in range(k)]
    params, buffers = stack_module_state(models)  # [K, ...] leaves; BatchNorm statistics updated in place
    skeleton = copy.deepcopy(models[0]).to("meta")
    optimizer = torch.optim.SGD(params.values(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    losses = vmap(lambda p, b, x, y: F.cross_entropy(functional_call(skeleton, (p, b), (x,)), y))
    generators = [torch.Generator(device=device).manual_seed(i) for i in range(k)]
    mean, std = data.channel_stats(device)

    def train(steps: int) -> None:
        for xb, yb in stacked_train_batches(data.train_x, data.train_y, batch_size=128, max_batches=steps,
                                            generators=generators, device=device, mean=mean, std=std):
            loss = losses(params, buffers, xb, yb).sum()  # each run's gradient is its own mean loss's
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return train, params


def vmapped_rate(k: int, args) -> float:
    """Images/s of K Esper models as one vmap (vmapped_trainer), after a warm-up."""
    import torch

    from esper.tolaria.data import load_cifar10

    device = torch.device(args.device)
    data = load_cifar10(args.data_dir).to(device)
    train, params = vmapped_trainer(k, data, device)
    train(20)  # warm-up
    next(iter(params.values())).sum().item()

    def epoch() -> None:
        train(args.steps)
        next(iter(params.values())).sum().item()  # wait for the device

    return k * args.steps * 128 / median_seconds(epoch, args.repeats)


def threaded_rate(k: int, args) -> float:
    """Images/s of K trainers stepped by K threads, each on its own CUDA stream, after a warm-up."""
    import contextlib
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from esper.tolaria.data import load_cifar10

    device = torch.device(args.device)
    data = load_cifar10(args.data_dir).to(device)
    trainers = [esper_trainer(data, device, args.steps, i, args.stage[i % len(args.stage)],
                              memory_format=args.memory_format) for i in range(k)]
    streams = [torch.cuda.Stream(device) if device.type == "cuda" else None for _ in range(k)]
    if device.type == "cuda":
        torch.cuda.synchronize()  # data and weights were written on the default stream

    def epoch(i: int) -> None:  # ends in a device->host transfer on the run's stream: the work is done
        with torch.cuda.stream(streams[i]) if streams[i] is not None else contextlib.nullcontext():
            trainers[i].train_epoch()

    with ThreadPoolExecutor(k) as pool:
        list(pool.map(epoch, range(k)))  # warm-up
        return k * args.steps * 128 / median_seconds(lambda: list(pool.map(epoch, range(k))), args.repeats)


def main() -> None:
    import torch

    from esper.transport.config import at_least
    from growth_overhead import STEPS, STEPS_HELP, checked_device

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--k", type=at_least(1), nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=STEPS, default=300, help=STEPS_HELP)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--mechanism", choices=["processes", "grouped", "vmap", "threads"], default="processes")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="cuDNN benchmark mode in every run")
    parser.add_argument("--stage", choices=["none", "TRAINING", "BLENDING", "FOSSILIZED"], nargs="+", default=["none"],
                        help="a conv_heavy seed in every run's mid slot, in this stage; several: run i in the i-th "
                             "(cyclically); vmap: none only")
    parser.add_argument("--repeats", type=at_least(1), default=1,
                        help="timed epochs per K (and of the plain run), their median (not processes: one each)")
    parser.add_argument("--profile", action="store_true",
                        help="grouped: also print where the largest K's epoch spent the device's time")
    parser.add_argument("--memory-format", choices=["auto", "channels_last", "contiguous"], default="auto",
                        help="every run's TrainConfig.memory_format (vmap: contiguous, whatever this says)")
    parser.add_argument("--cuda-graph", choices=["on", "off"], nargs="+", default=["on"],
                        help="grouped: the step replayed as a CUDA graph (on, on CUDA only) or eager (off); both: "
                             "a table each")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    checked_device(parser, args.device)
    if args.mechanism == "vmap" and args.stage != ["none"]:
        parser.error("--mechanism vmap batches identical models: --stage none only")
    if (args.profile or args.cuda_graph != ["on"]) and args.mechanism != "grouped":
        parser.error("--profile and --cuda-graph are --mechanism grouped's")
    if args.child:
        return child(args.device, args.steps, args.data_dir, args.cudnn_benchmark, args.stage[0], args.memory_format)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    how = {"processes": "one process per run", "grouped": "the runs as groups of one network",
           "vmap": "the runs' models as one vmap", "threads": "one thread and CUDA stream per run"}[args.mechanism]
    rate_of = {"processes": aggregate, "grouped": grouped_rate, "vmap": vmapped_rate,
               "threads": threaded_rate}[args.mechanism]
    layout = "" if args.mechanism == "vmap" else f", memory format {args.memory_format}"  # vmap's: contiguous
    mode = (", cuDNN benchmark mode" if args.cudnn_benchmark else "") + layout + (
        f", mid slot: {' / '.join(args.stage)} (conv_heavy), run by run" if args.stage != ["none"] else "")
    repeats = f", median of {args.repeats}" if args.repeats > 1 and args.mechanism != "processes" else ""
    print(f"# concurrency on {name}, torch {torch.__version__}, {how}{mode}, {args.steps} steps of 128{repeats}")
    alone = plain_rate(args) if args.mechanism == "grouped" else None
    if alone is not None:
        print(f"one plain run alone: {alone:,.0f} img/s; 'vs one run' is against a group of one, 'vs plain' against it")
    args.profiled = []
    for args.cuda_graph_now in args.cuda_graph:
        if len(args.cuda_graph) > 1:
            print(f"## the step as a CUDA graph: {args.cuda_graph_now}")
        print(f"{'K':>3}{'aggregate img/s':>18}{'vs one run':>12}{'target':>8}" + ("   vs plain" if alone else ""))
        one = rate_of(1, args)  # the baseline, whatever --k lists
        for k in args.k:
            rate = one if k == 1 else rate_of(k, args)
            beside_plain = f"{rate / alone:>10.2f}x" if alone else ""
            print(f"{k:>3}{rate:>18,.0f}{rate / one:>11.2f}x{0.7 * k:>7.1f}x{beside_plain}")
    for cuda_graph, table in args.profiled:
        print(f"# where K = {max(args.k)}'s epoch spent the time, the step as a CUDA graph: {cuda_graph}\n{table}")


if __name__ == "__main__":
    main()
