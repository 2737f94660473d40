"""The seed lifecycle: one transition table, named gates, the blending schedule.

`TRANSITIONS` is the single source of legality: execution looks a move up in it (an absent move
raises `IllegalAction`) and controllers' action masks are read from it, so nothing is "legal in the
mask but fails when run". Gates guard the ADVANCE moves on evidence; a gate that says no leaves the
seed where it is and is recorded with the values it looked at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from esper.leyline import Action, GateCheck, Operation, SeedStage, enum_name

S = SeedStage
OP = Operation

# (stage, operation) -> next stage. Operations a controller chooses; WAIT is legal everywhere.
TRANSITIONS: dict[tuple[int, int], int] = {
    (S.SEED_STAGE_DORMANT, OP.OPERATION_GERMINATE): S.SEED_STAGE_GERMINATED,
    (S.SEED_STAGE_GERMINATED, OP.OPERATION_ADVANCE): S.SEED_STAGE_TRAINING,
    (S.SEED_STAGE_TRAINING, OP.OPERATION_ADVANCE): S.SEED_STAGE_BLENDING,
    (S.SEED_STAGE_BLENDING, OP.OPERATION_ADVANCE): S.SEED_STAGE_FOSSILIZED,
    (S.SEED_STAGE_GERMINATED, OP.OPERATION_CULL): S.SEED_STAGE_CULLED,
    (S.SEED_STAGE_TRAINING, OP.OPERATION_CULL): S.SEED_STAGE_CULLED,
    (S.SEED_STAGE_BLENDING, OP.OPERATION_CULL): S.SEED_STAGE_CULLED,
}
# Moves time makes at the end of an epoch: CULLED -> EMBARGOED at once, EMBARGOED -> DORMANT when
# the embargo has run out (see MorphogeneticModel.end_epoch).
GATE_OF: dict[tuple[int, int], str] = {
    (S.SEED_STAGE_DORMANT, OP.OPERATION_GERMINATE): "G_germinate",
    (S.SEED_STAGE_GERMINATED, OP.OPERATION_ADVANCE): "G_train",
    (S.SEED_STAGE_TRAINING, OP.OPERATION_ADVANCE): "G_blend",
    (S.SEED_STAGE_BLENDING, OP.OPERATION_ADVANCE): "G_fossilize",
}
LIVE_STAGES = frozenset({S.SEED_STAGE_GERMINATED, S.SEED_STAGE_TRAINING, S.SEED_STAGE_BLENDING})


class IllegalAction(ValueError):
    """An operation the transition table (or the seed budget) does not allow from the current state."""


def legal_operations(stage: int) -> set[int]:
    return {op for (s, op) in TRANSITIONS if s == stage}


def budget_left(seeds_germinated: int, max_seeds: int) -> bool:
    """G_germinate's condition: `max_seeds` 0 means no limit."""
    return max_seeds == 0 or seeds_germinated < max_seeds


def legal_actions(stages: dict[str, int], blueprints: list[int], has_budget: bool) -> list[Action]:
    """Every action the transition table allows for slots in `stages` (name -> stage, host order), WAIT
    first. The one enumeration of legality: execution (MorphogeneticModel.legal_actions) and controllers'
    action masks (tamiyo.network, from an Observation) both call it."""
    actions = [Action(operation=OP.OPERATION_WAIT)]
    for name, stage in stages.items():
        for op in sorted(legal_operations(stage)):
            if op != OP.OPERATION_GERMINATE:
                actions.append(Action(operation=op, slot=name))
            elif has_budget:
                actions += [Action(operation=op, slot=name, blueprint=b) for b in blueprints]
    return actions


def next_stage(stage: int, operation: int) -> int:
    try:
        return TRANSITIONS[(stage, operation)]
    except KeyError:
        raise IllegalAction(
            f"{enum_name(Operation, operation)} is illegal from {enum_name(SeedStage, stage)}"
        ) from None


@dataclass(frozen=True)
class LifecycleConfig:
    """Gate thresholds and schedules; every gate decision records the values it compared."""

    min_training_epochs: int = 1
    """G_blend: epochs a seed must train in isolation before it may blend. Short on purpose: an
    isolated seed gets the host's gradient but never sees its own effect, so it overshoots. Measured
    on CIFAR-10 (conv_heavy in mid, 350 batches an epoch): prospective contribution +0.48 points after
    one TRAINING epoch, -5.3 after two; with 3 epochs no seed ever passed this gate on the H200."""
    blend_min_contribution: float = -5.0
    """G_blend: the TRAINING seed's prospective contribution (accuracy points with alpha forced to 1)
    must exceed this. Negative, because an isolated seed has not been co-adapted yet, and -5 because
    the first blending epoch runs at alpha 1/blend_epochs = 0.2: to first order it costs a fifth of
    this, 1 point, the harm BLENDING's cull tolerates (HeuristicConfig.cull_min_harm). At -1.0 the
    gate sat in the noise of seeds that went on to help: after one TRAINING epoch conv_heavy measured
    -0.14 to -0.84 (standard errors 0.26-0.30) in 6 of 9 CPU runs and -1.06 to -1.38 in the other 3
    (bench/blend_gate.py, all batches), and fell below -1 in 2 of 5 H200 runs, which culled it and
    gained +0.94 and +0.15 points over static at 40 epochs, against +4.0 to +8.7 in the 3 that
    blended it. The 3 CPU runs that -5 decides differently, each continued from the same state both
    ways to 40 epochs, gained +5.00, +2.38 and +6.53 points of test accuracy (conv_heavy fossilized,
    against conv_heavy and conv_light culled, then attention)."""
    blend_epochs: int = 5
    """Epochs over which alpha ramps from 0 to 1."""
    blend_schedule: str = "linear"
    """linear | cosine: the shape of the alpha ramp."""
    fossilize_k_se: float = 0.0
    """G_fossilize: the contribution must exceed this many standard errors of the paired difference.
    0 asks only that the seed is not hurting at alpha = 1: a block that starts as the identity gains
    for tens of epochs after it is kept (FIELD-NOTES' growth oracle), while at the moment blending
    ends a conv_heavy seed on CIFAR-10 measured +0.2 +/- 0.2 points and waited at k = 2 until culled."""
    embargo_epochs: int = 3
    """Epochs a slot stays EMBARGOED after a cull before it may germinate again."""

    def __post_init__(self) -> None:
        if self.blend_schedule not in ("linear", "cosine"):
            raise ValueError(f"blend_schedule must be linear or cosine, not {self.blend_schedule!r}")
        if self.blend_epochs < 1 or self.min_training_epochs < 0 or self.embargo_epochs < 0:
            raise ValueError("blend_epochs >= 1, min_training_epochs >= 0, embargo_epochs >= 0")


def alpha_at(blend_epoch: int, cfg: LifecycleConfig) -> float:
    """Alpha in force during the `blend_epoch`-th epoch of BLENDING (1-based); 1.0 from blend_epochs on."""
    t = min(1.0, blend_epoch / cfg.blend_epochs)
    return t if cfg.blend_schedule == "linear" else 0.5 - 0.5 * math.cos(math.pi * t)


def gate(name: str, slot: str, seed_id: int, checks: dict[str, tuple[float, str, float]]) -> GateCheck:
    """Build a GateCheck from {label: (value, op, threshold)}; it passes when every comparison holds."""
    failed = []
    values, thresholds = {}, {}
    for label, (value, op, threshold) in checks.items():
        values[label] = float(value)
        thresholds[label] = float(threshold)
        ok = {">": value > threshold, ">=": value >= threshold, "<": value < threshold}[op]
        if not ok:
            failed.append(f"{label}={value:.4g} not {op} {threshold:.4g}")
    passed = not failed
    reason = "passed" if passed else "; ".join(failed)
    return GateCheck(
        gate=name, slot=slot, seed_id=seed_id, passed=passed,
        values=values, thresholds=thresholds, reason=reason,
    )
