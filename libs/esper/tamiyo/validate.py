"""Is an Observation one a policy can decide on? Observations from another process (the Tamiyo
gRPC service, `esper policy query`) are checked here before any policy sees them, so that a bad
request is refused with a message naming the field instead of failing somewhere inside a policy."""

from __future__ import annotations

import math

from esper.leyline import Blueprint, Observation, SeedStage


def observation_problems(obs: Observation) -> list[str]:
    """Every reason `obs` is unusable; empty when it is fine."""
    problems = []
    if not obs.HasField("signals"):
        return ["observation.signals is missing"]
    s = obs.signals
    if s.max_epochs < 1:
        problems.append(f"signals.max_epochs must be >= 1, got {s.max_epochs}")
    if not 0 <= s.epoch <= max(s.max_epochs, 0):
        problems.append(f"signals.epoch must be in [0, max_epochs], got {s.epoch}")
    for name in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "best_val_accuracy"):
        if not math.isfinite(getattr(s, name)):
            problems.append(f"signals.{name} is not finite")
    if not obs.slots:
        problems.append("observation.slots is empty")
    names = [slot.slot for slot in obs.slots]
    if any(not n for n in names) or len(set(names)) != len(names):
        problems.append(f"slot names must be non-empty and distinct, got {names}")
    for slot in obs.slots:
        if slot.stage not in SeedStage.values() or slot.stage == SeedStage.SEED_STAGE_UNSPECIFIED:
            problems.append(f"slot {slot.slot!r}: invalid stage {slot.stage}")
    if not obs.blueprints:
        problems.append("observation.blueprints is empty")
    for bp in [*obs.blueprints, *obs.recently_culled]:
        if bp not in Blueprint.values() or bp == Blueprint.BLUEPRINT_UNSPECIFIED:
            problems.append(f"invalid blueprint {bp}")
    if obs.max_seeds < 0 or obs.seeds_germinated < 0:
        problems.append("max_seeds and seeds_germinated must be >= 0")
    return problems
