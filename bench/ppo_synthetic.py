"""PPO on the synthetic task: a learning curve against baseline controllers, and environment steps/s.

The controllers are random, WAIT-only and heuristic, on held-out seeds; steps/s with n_envs 1, 4, 8, in
this process.

1. Learning curve. PPO trains on episodes with seeds seed, seed+1, ... and, every `--eval-every`
   rounds, its greedy policy runs `--eval-seeds` held-out episodes (seeds from 100000); the baselines
   run the same held-out episodes once. Reported: mean final validation accuracy, its difference from
   WAIT (the host alone, paired by seed), seeds fossilized/culled per episode.
2. Steps/s. One round (n_envs episodes of `--speed-epochs` epochs, one batched policy forward per
   epoch for all environments) per n_envs, after a warm-up round; ratios against n_envs 1.

    .venv/bin/python bench/ppo_synthetic.py                  # about 10 minutes on 2 loaded CPU cores
    .venv/bin/python bench/ppo_synthetic.py --rounds 4 --eval-every 2 --eval-seeds 2   # a quick look
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time

import torch

from esper.cli import SEED_RANGE, UsageError, checked_host
from esper.leyline import Decision
from esper.nissa import Telemetry
from esper.simic import EnvConfig, GrowthEnv, PPOConfig, PPOTrainer, RewardConfig, TrainerConfig, run_episode
from esper.simic.rewards import MODES
from esper.tamiyo import HeuristicPolicy, Policy, WaitPolicy
from esper.tamiyo.network import OPERATIONS, observation_legal_actions
from esper.tolaria.data import make_synthetic
from esper.transport.config import at_least, finite

HELD_OUT = 100_000


class RandomPolicy:
    """Uniform over the legal operations, then over the legal actions of that operation."""

    name, version = "random", "1"

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def decide(self, observation) -> Decision:
        legal = observation_legal_actions(observation)
        operation = self.rng.choice(sorted({a.operation for a in legal}, key=OPERATIONS.index))
        action = self.rng.choice([a for a in legal if a.operation == operation])
        return Decision(action=action, reason="uniform", policy_name=self.name, policy_version=self.version)


def evaluate(policy: Policy, env_cfg: EnvConfig, data, seeds: list[int]) -> list[dict]:
    results = []
    for seed in seeds:
        env = GrowthEnv(env_cfg, data, torch.device("cpu"), Telemetry("bench"))
        obs = run_episode(env, policy, seed)
        fates = [r.fate for r in env.model.records]
        results.append({"acc": obs.signals.val_accuracy, "fossilized": fates.count("fossilized"),
                        "culled": fates.count("culled")})
    return results


def report(label: str, results: list[dict], wait: list[dict]) -> str:
    accs = [r["acc"] for r in results]
    gains = [r["acc"] - w["acc"] for r, w in zip(results, wait)]
    spread = statistics.stdev(gains) if len(gains) > 1 else 0.0
    return (f"{label:<28} val {statistics.mean(accs):6.2f}%   vs WAIT {statistics.mean(gains):+5.2f} "
            f"(sd {spread:.2f})   fossilized {statistics.mean(r['fossilized'] for r in results):.2f}   "
            f"culled {statistics.mean(r['culled'] for r in results):.2f} per episode")


def learning_curve(args, data) -> None:
    env_cfg = EnvConfig(task="synthetic", max_epochs=args.max_epochs, slots=tuple(args.slots))
    seeds = list(range(HELD_OUT, HELD_OUT + args.eval_seeds))
    print(f"== learning curve: synthetic, {args.max_epochs} epochs, slots {' '.join(args.slots)}, "
          f"{args.n_envs} envs, update every {args.update_every} round(s), lr {args.lr}, {args.reward_mode} reward, "
          f"{args.eval_seeds} held-out seeds")
    start = time.perf_counter()
    wait = evaluate(WaitPolicy(), env_cfg, data, seeds)
    print(report("WAIT (host alone)", wait, wait))
    print(report("random", evaluate(RandomPolicy(0), env_cfg, data, seeds), wait))
    print(report("heuristic", evaluate(HeuristicPolicy(), env_cfg, data, seeds), wait), flush=True)
    cfg = TrainerConfig(env=env_cfg, ppo=PPOConfig(lr=args.lr), reward=RewardConfig(mode=args.reward_mode),
                        episodes=args.rounds * args.n_envs,
                        n_envs=args.n_envs, update_every=args.update_every, seed=args.seed)
    trainer = PPOTrainer(cfg, {"cpu": data}, Telemetry("learner"), lambda e: Telemetry(f"ep{e}"))
    assert not set(seeds) & set(range(args.seed, args.seed + cfg.episodes)), "the held-out seeds are training seeds"
    policy_env = cfg.env_config  # as the policy trained: its environments measure the seed gradient features
    print(report("PPO, 0 episodes", evaluate(trainer.policy(), policy_env, data, seeds), wait), flush=True)

    def on_round(t: PPOTrainer, results) -> None:
        rounds = t.episodes_done // args.n_envs
        if rounds % args.eval_every == 0:
            u = t.update_log[-1] if t.update_log else {}
            print(report(f"PPO, {t.episodes_done} episodes", evaluate(t.policy(), policy_env, data, seeds), wait)
                  + f"   [update {t.updates}: entropy {u.get('entropy', float('nan')):.2f}]", flush=True)

    trainer.train(on_round)
    print(f"({time.perf_counter() - start:.0f} s)")


def steps_per_second(args, data) -> None:
    env_cfg = EnvConfig(task="synthetic", max_epochs=args.speed_epochs, slots=tuple(args.slots))
    print(f"== environment steps/s: synthetic, {args.speed_epochs}-epoch episodes, one round per n_envs "
          f"after a warm-up round, {args.speed_runs} run(s), best kept")
    rates = {}
    for n_envs in (1, 4, 8):
        cfg = TrainerConfig(env=env_cfg, episodes=10**6, n_envs=n_envs, seed=args.seed)
        trainer = PPOTrainer(cfg, {"cpu": data}, Telemetry("learner"), lambda e: Telemetry(f"ep{e}"))
        trainer.run_round()  # warm-up: first architectures' FLOP counts, allocator
        best = 0.0
        for _ in range(args.speed_runs):
            start = time.perf_counter()
            rollout, _ = trainer.run_round()
            best = max(best, rollout.num_steps / (time.perf_counter() - start))
        rates[n_envs] = best
        print(f"n_envs {n_envs}: {best:6.2f} env-steps/s   ratio vs n_envs 1: {best / rates[1]:.2f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-epochs", type=at_least(1), default=20)
    p.add_argument("--slots", nargs="+", default=["mid"])
    p.add_argument("--n-envs", type=at_least(1), default=4)
    p.add_argument("--update-every", type=at_least(1), default=1)
    p.add_argument("--lr", type=finite, default=1e-3)
    p.add_argument("--reward-mode", choices=MODES, default="shaped")
    p.add_argument("--rounds", type=at_least(1), default=40, help="training rounds of n_envs episodes")
    p.add_argument("--eval-every", type=at_least(1), default=10, help="rounds between evaluations")
    p.add_argument("--eval-seeds", type=at_least(1), default=8)
    p.add_argument("--seed", type=at_least(SEED_RANGE.start, most=SEED_RANGE.stop - 1), default=0)
    p.add_argument("--speed-epochs", type=at_least(1), default=5)
    p.add_argument("--speed-runs", type=at_least(1), default=2)
    p.add_argument("--skip-curve", action="store_true")
    p.add_argument("--threads", type=at_least(1), default=1, help="torch CPU threads")
    args = p.parse_args()
    try:
        checked_host("synthetic", args.slots)
    except UsageError as exc:
        p.error(str(exc))
    if args.lr <= 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    training = range(args.seed, args.seed + args.rounds * args.n_envs)
    held_out = range(HELD_OUT, HELD_OUT + args.eval_seeds)
    if not args.skip_curve and training.start < held_out.stop and held_out.start < training.stop:
        p.error(f"--seed {args.seed}: the training seeds, {training[0]} to {training[-1]}, must miss the held-out "
                f"ones, {held_out[0]} to {held_out[-1]}")
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), "
          f"torch {torch.__version__}, CPU")
    data = make_synthetic()
    if not args.skip_curve:
        learning_curve(args, data)
    steps_per_second(args, data)


if __name__ == "__main__":
    main()
