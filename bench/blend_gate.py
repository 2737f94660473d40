"""G_blend's evidence: a seed's prospective contribution at the gate, per run.

Also what a lower threshold would have made of the runs it changes. A TRAINING seed may blend once its
prospective contribution (validation accuracy with its alpha forced to 1, minus without it, paired per
image) exceeds `LifecycleConfig.blend_min_contribution`. Probe: run the heuristic on cifar10 with every
training batch (the 40-epoch comparison's setting) for each seed until the first seed leaves TRAINING,
printing its prospective contribution (accuracy points, and the validation loss it removes) after each
TRAINING epoch, and what became of it. With `--branch-to T`, a run whose first gate check fails at
`--threshold` but would pass at T is saved at that epoch boundary, before the decision; `--continue` then
finishes it under a given threshold, so both thresholds continue the same run from the same state
(paired, the shared epochs trained once).

    python bench/blend_gate.py --seeds 42 43 44 --threshold -1 --branch-to -5 --state-dir /tmp/gate
    python bench/blend_gate.py --continue /tmp/gate/seed42.pt --threshold -1   # and --threshold -5
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from esper.cli import SEED_RANGE
from esper.karn_cli import folder_refusal
from esper.kasmina.lifecycle import LifecycleConfig
from esper.leyline import Blueprint, SeedStage, short_name
from esper.nissa import Telemetry
from esper.simic import EnvConfig, GrowthEnv, run_episode
from esper.simic.checkpoint import ResumeError, load_checkpoint, save_checkpoint
from esper.tamiyo import HeuristicPolicy
from esper.tolaria.data import load_task_data
from esper.tolaria.trainer import TrainConfig
from esper.transport.config import at_least, finite

from growth_overhead import checked_device

S = SeedStage
DEFAULT = LifecycleConfig().blend_min_contribution


def env_for(args, data, threshold: float, run_id: str) -> GrowthEnv:
    cfg = EnvConfig(task="cifar10", max_epochs=args.max_epochs, train=TrainConfig(max_batches=0),
                    lifecycle=LifecycleConfig(blend_min_contribution=threshold))
    return GrowthEnv(cfg, data, torch.device(args.device), Telemetry(run_id, sinks=[]))


def probe(args, data, seed: int) -> None:
    """Step the heuristic until the first seed leaves TRAINING; a line per TRAINING epoch, then its fate."""
    env, policy = env_for(args, data, args.threshold, f"blend_gate_s{seed}"), HeuristicPolicy()
    obs, done, watched = env.reset(seed), False, None
    while not done:
        obs, done = env.step(policy.decide(obs))
        slot = next((s for s in obs.slots if s.seed_id and (watched is None or s.seed_id == watched)), None)
        if slot is None:
            continue
        watched = slot.seed_id
        blueprint = short_name(Blueprint, slot.blueprint)
        if slot.stage == S.SEED_STAGE_TRAINING and slot.has_contribution:
            print(f"seed {seed} epoch {obs.signals.epoch:>2} {blueprint:<10} TRAINING epoch {slot.epochs_in_stage}: "
                  f"{slot.contribution:+6.2f} +/- {slot.contribution_se:.2f} points, loss "
                  f"{slot.loss_contribution:+.3f}, gate {'passes' if slot.advance_ready else 'fails'}", flush=True)
            if (args.branch_to is not None and slot.epochs_in_stage == 1 and not slot.advance_ready
                    and slot.contribution > args.branch_to):
                path = Path(args.state_dir) / f"seed{seed}.pt"
                save_checkpoint(env.state_dict(), path)
                print(f"seed {seed}: fails at {args.threshold}, passes at {args.branch_to}: saved {path}", flush=True)
                return
        elif slot.stage not in (S.SEED_STAGE_GERMINATED, S.SEED_STAGE_TRAINING):
            print(f"seed {seed} epoch {obs.signals.epoch:>2} {blueprint:<10} -> {short_name(S, slot.stage)}",
                  flush=True)
            return


def finish(args, data, state: dict) -> None:
    """Continue a saved run (`state`) to its last epoch under `--threshold`; its seeds' fates and accuracies."""
    env = env_for(args, data, args.threshold, state["run_id"])
    obs = run_episode(env, HeuristicPolicy(), 0, start=env.resume(state))
    fates = ", ".join(f"{r.blueprint} {r.fate} (germinated {r.history[0]['epoch']})" for r in env.model.records)
    print(f"{Path(args.resume).name} threshold {args.threshold}: val {obs.signals.val_accuracy:.2f}, "
          f"test {env.evaluate_test().accuracy:.2f}; seeds: {fates}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=at_least(SEED_RANGE.start, most=SEED_RANGE.stop - 1), nargs="+",
                   default=[42, 43, 44])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--max-epochs", type=at_least(1), default=40)
    p.add_argument("--branch-to", type=finite, default=None, help="save runs this lower threshold would change")
    p.add_argument("--state-dir", default="blend_gate_states")
    p.add_argument("--continue", dest="resume", default=None, help="a state saved by --branch-to: finish it")
    p.add_argument("--threshold", type=finite, default=DEFAULT, help="G_blend's threshold (default: LifecycleConfig's)")
    args = p.parse_args()
    checked_device(p, args.device)
    if args.branch_to is not None and (why := folder_refusal(Path(args.state_dir), "--state-dir")):
        p.error(why)
    state = None
    if args.resume:  # read before the data loads, so a wrong path costs nothing
        try:
            state = load_checkpoint(Path(args.resume))
        except FileNotFoundError:
            p.error(f"--continue {args.resume}: no such file")
        except ResumeError as exc:
            p.error(f"--continue {exc}")
    data = load_task_data("cifar10", args.data_dir).to(args.device)
    print(f"# G_blend on {args.device}, torch {torch.__version__}, {args.max_epochs}-epoch budget, all batches; "
          f"threshold {args.threshold} points")
    start = time.perf_counter()
    if args.resume:
        finish(args, data, state)
    else:
        for seed in args.seeds:
            probe(args, data, seed)
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
