"""Is an Observation one a policy can decide on? Observations from another process (the Tamiyo
gRPC service, `esper policy query`) are checked here before any policy sees them, so that a bad
request is refused with a message naming the field instead of failing somewhere inside a policy.

Messages echo what was sent only through `reprlib.repr` (a few dozen characters), and `reason` caps the
whole: gRPC carries it as metadata, and a status over its 16 KiB metadata limit reaches the client as
RESOURCE_EXHAUSTED, without the reason."""

from __future__ import annotations

import math
import reprlib

from esper.leyline import Blueprint, Observation, SeedStage

MAX_REASON_BYTES = 1024
"""A refusal's reason at most, UTF-8 (gRPC percent-encodes it: at most 3 KiB on the wire)."""
SLOT_FLOATS = ("alpha", "contribution", "contribution_se", "loss_contribution")
"""SlotState floats that must be finite. Not seed_grad_norm: a non-finite gradient norm is news about the
seed (it diverged), which the features encode as such (tamiyo.features)."""
SLOT_COUNTS = ("seed_id", "epochs_in_stage", "seed_params", "embargo_epochs_left", "contribution_se",
               "seed_grad_norm")
"""SlotState fields that cannot be negative: the heuristic divides by a blend's epochs and the features take
a norm's log1p, so a negative one had failed inside a policy (UNKNOWN, not INVALID_ARGUMENT)."""
SIGNAL_COUNTS = ("plateau_epochs", "host_params", "total_params")
MAX_ENTRIES = 1024
"""Entries of any repeated field at most (slots, blueprints, recently culled, histories): an environment
sends a few slots and 16 epochs of history; a million blueprints had taken 2 s of a server thread to check."""
STAGES = frozenset(SeedStage.values()) - {SeedStage.SEED_STAGE_UNSPECIFIED}
BLUEPRINTS = frozenset(Blueprint.values()) - {Blueprint.BLUEPRINT_UNSPECIFIED}


def observation_problems(obs: Observation) -> list[str]:
    """Every reason `obs` is unusable; empty when it is fine."""
    problems = []
    if not obs.HasField("signals"):
        return ["observation.signals is missing"]
    s = obs.signals
    lengths = {"slots": obs.slots, "blueprints": obs.blueprints, "recently_culled": obs.recently_culled,
               "signals.val_accuracy_history": s.val_accuracy_history, "signals.val_loss_history": s.val_loss_history}
    if too_long := [f"{name} has {len(entries)} entries" for name, entries in lengths.items()
                    if len(entries) > MAX_ENTRIES]:
        return [f"at most {MAX_ENTRIES} entries in a repeated field: {', '.join(too_long)}"]
    if s.max_epochs < 1:
        problems.append(f"signals.max_epochs must be >= 1, got {s.max_epochs}")
    if not 0 <= s.epoch <= max(s.max_epochs, 0):
        problems.append(f"signals.epoch must be in [0, max_epochs], got {s.epoch}")
    for name in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "best_val_accuracy"):
        if not math.isfinite(getattr(s, name)):
            problems.append(f"signals.{name} is not finite")
    problems += [f"signals.{name} must be >= 0, got {getattr(s, name)}" for name in SIGNAL_COUNTS
                 if getattr(s, name) < 0]
    for name in ("val_accuracy_history", "val_loss_history"):
        if not all(map(math.isfinite, getattr(s, name))):
            problems.append(f"signals.{name} has a value that is not finite")
    if not obs.slots:
        problems.append("observation.slots is empty")
    names = [slot.slot for slot in obs.slots]
    if any(not n for n in names) or len(set(names)) != len(names):
        problems.append(f"slot names must be non-empty and distinct, got {reprlib.repr(names)}")
    for slot in obs.slots:
        if slot.stage not in STAGES:
            problems.append(f"slot {reprlib.repr(slot.slot)}: invalid stage {slot.stage}")
        for name in SLOT_FLOATS:
            if not math.isfinite(getattr(slot, name)):
                problems.append(f"slot {reprlib.repr(slot.slot)}: {name} is not finite")
        problems += [f"slot {reprlib.repr(slot.slot)}: {name} must be >= 0, got {getattr(slot, name)}"
                     for name in SLOT_COUNTS if getattr(slot, name) < 0]
    if not obs.blueprints:
        problems.append("observation.blueprints is empty")
    for bp in [*obs.blueprints, *obs.recently_culled]:
        if bp not in BLUEPRINTS:
            problems.append(f"invalid blueprint {bp}")
    if obs.max_seeds < 0 or obs.seeds_germinated < 0:
        problems.append("max_seeds and seeds_germinated must be >= 0")
    return problems


def reason(problems: list[str], where: str = "") -> str:
    """`problems` as one message, cut to MAX_REASON_BYTES."""
    text = (where + "; ".join(problems)).encode()
    if len(text) <= MAX_REASON_BYTES:
        return text.decode()
    return text[:MAX_REASON_BYTES - 3].decode(errors="ignore") + "..."
