"""G_blend's evidence: a seed's prospective contribution at the gate, per run.

A TRAINING seed may blend once its prospective contribution (validation accuracy with its alpha
forced to 1, minus without it, paired per image) exceeds `LifecycleConfig.blend_min_contribution`.
This runs the heuristic on cifar10 with every training batch (the 40-epoch comparison's setting) for
each seed until the first seed leaves TRAINING, and prints that seed's prospective contribution (in
accuracy points, and as the validation loss it removes) after each of its TRAINING epochs, and what
became of it. It stops there, so a run costs about a third of a full one.

    python bench/blend_gate.py --seeds 42 43 44 --device cpu
"""

from __future__ import annotations

import argparse
import time

import torch

from esper.kasmina.lifecycle import LifecycleConfig
from esper.leyline import Blueprint, SeedStage, short_name
from esper.nissa import Telemetry
from esper.simic import EnvConfig, GrowthEnv
from esper.tamiyo import HeuristicPolicy
from esper.tolaria.data import load_task_data
from esper.tolaria.trainer import TrainConfig

S = SeedStage


def probe(env: GrowthEnv, seed: int) -> list[str]:
    """Step the heuristic until the first seed leaves TRAINING; one line per TRAINING epoch, then its fate."""
    policy, lines = HeuristicPolicy(), []
    obs, done, watched = env.reset(seed), False, None
    while not done:
        obs, done = env.step(policy.decide(obs))
        slot = next((s for s in obs.slots if s.seed_id and (watched is None or s.seed_id == watched)), None)
        if slot is None:
            continue
        watched = slot.seed_id
        blueprint = short_name(Blueprint, slot.blueprint)
        if slot.stage == S.SEED_STAGE_TRAINING and slot.has_contribution:
            lines.append(f"seed {seed} epoch {obs.signals.epoch:>2} {blueprint:<10} TRAINING epoch "
                         f"{slot.epochs_in_stage}: {slot.contribution:+6.2f} +/- {slot.contribution_se:.2f} points, "
                         f"loss {slot.loss_contribution:+.3f}, gate {'passes' if slot.advance_ready else 'fails'}")
        elif slot.stage not in (S.SEED_STAGE_GERMINATED, S.SEED_STAGE_TRAINING):
            lines.append(f"seed {seed} epoch {obs.signals.epoch:>2} {blueprint:<10} -> {short_name(S, slot.stage)}")
            break
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--max-epochs", type=int, default=40)
    args = p.parse_args()
    device = torch.device(args.device)
    data = load_task_data("cifar10", args.data_dir).to(device)
    cfg = EnvConfig(task="cifar10", max_epochs=args.max_epochs, train=TrainConfig(max_batches=0))
    print(f"# G_blend on {device}, torch {torch.__version__}: threshold {LifecycleConfig().blend_min_contribution} "
          f"points, {args.max_epochs}-epoch budget, all batches")
    for seed in args.seeds:
        start = time.perf_counter()
        env = GrowthEnv(cfg, data, device, Telemetry(f"blend_gate_s{seed}", sinks=[]))
        for line in probe(env, seed):
            print(line, flush=True)
        print(f"seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
