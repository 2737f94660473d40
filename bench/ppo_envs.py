"""PPO's environments stepped one after another, in processes of their own, or grouped.

One PPO round (n_envs episodes of --max-epochs epochs, the policy choosing every action) is timed each
way in this process and session, each after an untimed warm-up round: the environments stepped one
after another in this process (`esper train ppo --no-grouped`, the baseline), each in a child process, all
training at once (`--env-processes`, simic.env_process), and their epochs trained together as the
groups of one network (`--grouped`, tolaria.grouped). The children are started and load their data
before the clock starts: that is paid once per training run, not per round. Reports environment
steps (epochs) per second and each way's ratio to the baseline.

    python bench/ppo_envs.py --device cuda --n-envs 2 4 8 --max-epochs 3 --max-batches 100
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from esper.kasmina import HOSTS
from esper.nissa import Telemetry
from esper.simic.env import EnvConfig
from esper.simic.env_process import close_all, start_env_processes
from esper.simic.trainer import PPOTrainer, TrainerConfig
from esper.tolaria.data import load_task_data
from esper.tolaria.trainer import TrainConfig
from esper.transport.config import at_least

from growth_overhead import checked_device

WAYS = ("one", "processes", "grouped")


def round_seconds(trainer: PPOTrainer) -> float:
    """Wall time of one round after a warm-up round (each round's envs start new episodes)."""
    trainer.run_round()
    trainer.episodes_done = 0
    start = time.perf_counter()
    trainer.run_round()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--task", choices=sorted(HOSTS), default="cifar10")
    parser.add_argument("--n-envs", type=at_least(1), nargs="+", default=[2, 4])
    parser.add_argument("--max-epochs", type=at_least(1), default=3)
    parser.add_argument("--max-batches", type=at_least(0), default=100, help="training batches per epoch (0 = all)")
    parser.add_argument("--ways", nargs="+", choices=WAYS[1:], default=list(WAYS[1:]),
                        help="timed against environments one after another")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()

    device = checked_device(parser, args.device)
    data = load_task_data(args.task, args.data_dir)
    preload = device.type == "cuda"
    on_device = {str(device): data.to(device) if preload else data}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"# PPO rounds on {name}, torch {torch.__version__}: {args.task}, {args.max_epochs} epochs of "
          f"{args.max_batches} batches per episode; environment steps (epochs) per second, ratio to one process")
    print(f"{'n_envs':>6}" + "".join(f"{way:>22}" for way in ("one process", *args.ways)))
    for n in args.n_envs:
        env = EnvConfig(task=args.task, max_epochs=args.max_epochs,
                        train=TrainConfig.for_task(args.task, max_batches=args.max_batches))
        cfg = TrainerConfig(env=env, n_envs=n, episodes=n, update_every=1, device=str(device))

        def trainer(cfg: TrainerConfig = cfg) -> PPOTrainer:
            return PPOTrainer(cfg, on_device, Telemetry("learner"), lambda e: Telemetry(f"ep{e}"))

        steps = n * args.max_epochs
        one_s = round_seconds(trainer())
        line = f"{n:>6}{one_s:>8.2f} s{steps / one_s:>7.2f} steps/s"
        for way in args.ways:
            other = trainer()
            if way == "grouped":
                other.grouped = True
            else:
                other.env_processes = start_env_processes(n, other.env_cfg, (str(device),), args.data_dir, preload,
                                                          max(1, torch.get_num_threads() // n))
            try:
                seconds = round_seconds(other)
            finally:
                close_all(other.env_processes)
            line += f"{steps / seconds:>10.2f} steps/s{one_s / seconds:>6.2f}x"
        print(line)


if __name__ == "__main__":
    main()
