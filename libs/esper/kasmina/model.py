"""MorphogeneticModel: a host with seed slots, and the execution of lifecycle operations on it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from esper.kasmina.blueprints import blueprints_for, build_seed
from esper.kasmina.hosts import Host
from esper.kasmina.lifecycle import (
    GATE_OF,
    LIVE_STAGES,
    IllegalAction,
    LifecycleConfig,
    alpha_at,
    budget_left,
    gate,
    legal_actions,
    next_stage,
)
from esper.kasmina.slot import SeedSlot
from esper.leyline import (
    Action,
    Blueprint,
    GateCheck,
    LifecycleTransition,
    Operation,
    SeedStage,
    SlotState,
    enum_name,
    short_name,
)

S = SeedStage
OP = Operation


GRAFT_REASON = "grafted: trained from scratch"


@dataclass
class SeedRecord:
    """The life of one seed, for summaries and analytics."""

    seed_id: int
    slot: str
    blueprint: str
    params: int
    history: list[dict] = field(default_factory=list)  # {"stage", "epoch", "reason"}
    grafted: bool = False
    """Built in before epoch 1 (graft: a from-scratch run's architecture), not grown: no germination."""

    @classmethod
    def from_state(cls, record: dict) -> SeedRecord:
        """A record of lifecycle_state(). One saved before `grafted` existed is a graft when its first move
        was one (GRAFT_REASON)."""
        first = record["history"][0]["reason"] if record["history"] else ""
        return cls(**({"grafted": first == GRAFT_REASON} | record))

    @property
    def fate(self) -> str:
        """grafted | fossilized | culled | the live stage it ended the run in."""
        if self.grafted:
            return "grafted"
        stages = [h["stage"] for h in self.history]
        return "culled" if "CULLED" in stages else stages[-1].lower()


@dataclass
class StepOutcome:
    """What executing one operation did: the gate checks it made and the transitions it caused."""

    gates: list[GateCheck] = field(default_factory=list)
    transitions: list[LifecycleTransition] = field(default_factory=list)


class MorphogeneticModel(nn.Module):
    """Host blocks with a SeedSlot after each enabled boundary; executes lifecycle operations."""

    def __init__(
        self,
        host: Host,
        slots: list[str] | tuple[str, ...],
        cfg: LifecycleConfig = LifecycleConfig(),
        max_seeds: int = 0,
    ):
        super().__init__()
        positions = host.slot_positions()
        unknown = [s for s in slots if s not in positions]
        if unknown or not slots:
            raise ValueError(f"unknown slots {unknown} (this host has: {', '.join(positions)})")
        self.host = host
        self.cfg = cfg
        self.max_seeds = max_seeds
        channels = host.slot_channels()
        # Host order, whatever order the user listed them in.
        ordered = [s for s in positions if s in slots]
        self.slots = nn.ModuleDict({s: SeedSlot(s, channels[s], host.spec.kind) for s in ordered})
        self.slot_after = {positions[s]: s for s in ordered}
        if len(self.slot_after) < len(ordered):  # a host of under 3 blocks: one slot would never run
            raise ValueError(f"slots {', '.join(ordered)} share a block on this {len(host.blocks)}-block host: "
                             f"choose slots at different blocks ({positions})")
        self.blueprints = blueprints_for(host.spec.kind)
        self.records: list[SeedRecord] = []

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, variants: tuple[tuple[str, float], ...] = ()) -> torch.Tensor:
        """The model's output. With `variants` ((slot, alpha), ... : evaluation only) the output holds
        1 + len(variants) copies of the batch, one after another: the model as it is, then once per
        variant with that slot's alpha forced. The host's blocks before the first varied slot run once;
        the copies split there. This is the counterfactual, batched with the normal evaluation pass."""
        if variants and self.training:
            raise ValueError("forced alphas are for evaluation: call model.eval() first")
        copies, forced = 1, {slot: (k + 1, alpha) for k, (slot, alpha) in enumerate(variants)}
        x = self.host.stem(x)
        for i, block in enumerate(self.host.blocks):
            x = block(x)
            if i in self.slot_after:
                name = self.slot_after[i]
                if name in forced and copies == 1:
                    copies = 1 + len(variants)
                    x = torch.cat([x] * copies)  # unlike repeat, keeps a channels_last layout
                slot = self.slots[name]
                x = slot.forward_copies(x, copies, *forced[name]) if name in forced else slot(x)
        return self.host.head(x)

    # ---------------------------------------------------------------- parameters
    def host_parameters(self) -> list[nn.Parameter]:
        """The host's own parameters plus every fossilized seed's: what the host optimizer trains."""
        params = list(self.host.parameters())
        for slot in self.slots.values():
            if slot.stage == S.SEED_STAGE_FOSSILIZED:
                params += list(slot.seed.parameters())
        return params

    def live_seeds(self) -> dict[str, SeedSlot]:
        return {name: s for name, s in self.slots.items() if s.stage in LIVE_STAGES}

    @property
    def host_param_count(self) -> int:
        return sum(p.numel() for p in self.host.parameters())

    @property
    def total_param_count(self) -> int:
        return self.host_param_count + sum(s.seed_params for s in self.slots.values())

    # ---------------------------------------------------------------- legality
    @property
    def seeds_germinated(self) -> int:
        """Seeds grown this episode: what --max-seeds limits (grafts are host structure, not growth)."""
        return sum(not r.grafted for r in self.records)

    def budget_left(self) -> bool:
        return budget_left(self.seeds_germinated, self.max_seeds)

    def legal_actions(self) -> list[Action]:
        """Every action the transition table (and the seed budget) allows now, WAIT first."""
        stages = {name: slot.stage for name, slot in self.slots.items()}
        return legal_actions(stages, self.blueprints, self.budget_left())

    def check_legal(self, action: Action) -> None:
        """Raise IllegalAction, saying why, unless `action` is one of `legal_actions()`."""
        if action in self.legal_actions():
            return
        if action.operation == OP.OPERATION_WAIT:
            raise IllegalAction("WAIT takes no slot or blueprint")
        if action.slot not in self.slots:
            raise IllegalAction(f"unknown or disabled slot {action.slot!r} (enabled: {', '.join(self.slots)})")
        slot = self.slots[action.slot]
        next_stage(slot.stage, action.operation)  # raises when the table has no such move
        if action.operation == OP.OPERATION_GERMINATE:
            if action.blueprint not in self.blueprints:
                raise IllegalAction(f"blueprint {enum_name(Blueprint, action.blueprint)} ({action.blueprint}) does "
                                    "not fit this host")
            if not self.budget_left():
                raise IllegalAction(f"seed budget exhausted ({self.max_seeds} germinated)")
        raise IllegalAction(f"{enum_name(OP, action.operation)} takes a slot and no blueprint")

    # ---------------------------------------------------------------- gates
    def advance_gate(self, slot: SeedSlot) -> GateCheck:
        """The gate that guards ADVANCE from the slot's current stage, with current values."""
        cfg = self.cfg
        name = GATE_OF[(slot.stage, OP.OPERATION_ADVANCE)]
        if slot.stage == S.SEED_STAGE_GERMINATED:
            finite = all(bool(torch.isfinite(p).all()) for p in slot.seed.parameters())
            checks = {"seed_params_finite": (float(finite), ">=", 1.0)}
        elif slot.stage == S.SEED_STAGE_TRAINING:
            contribution = slot.contribution[0] if slot.contribution else float("-inf")
            checks = {
                "epochs_in_stage": (slot.epochs_in_stage, ">=", cfg.min_training_epochs),
                "prospective_contribution": (contribution, ">", cfg.blend_min_contribution),
            }
        else:  # BLENDING
            mean, se = slot.contribution if slot.contribution else (float("-inf"), 0.0)
            checks = {
                "alpha": (slot.alpha, ">=", 1.0),
                "contribution": (mean, ">", cfg.fossilize_k_se * se),
            }
        return gate(name, slot.name, slot.seed_id, checks)

    # ---------------------------------------------------------------- execution
    def execute(self, action: Action, epoch: int, reason: str = "") -> StepOutcome:
        """Apply one operation at the start of `epoch`. Illegal -> IllegalAction; a failed gate -> no move."""
        self.check_legal(action)
        out = StepOutcome()
        if action.operation == OP.OPERATION_WAIT:
            return out
        slot = self.slots[action.slot]
        if action.operation == OP.OPERATION_GERMINATE:
            out.gates.append(gate("G_germinate", slot.name, len(self.records) + 1, {
                "seeds_germinated": (self.seeds_germinated, "<", self.max_seeds or float("inf")),
            }))
            self._germinate(slot, action.blueprint)
        elif action.operation == OP.OPERATION_ADVANCE:
            check = self.advance_gate(slot)
            out.gates.append(check)
            if not check.passed:
                return out
        elif action.operation == OP.OPERATION_CULL:
            slot.seed = None  # frees the seed's parameters; the optimizer sync drops its optimizer
        out.transitions.append(self._move(slot, next_stage(slot.stage, action.operation), epoch, reason))
        return out

    def graft(self, slot_name: str, blueprint: int, epoch: int = 0) -> LifecycleTransition:
        """Build a seed into the architecture as host structure from the start, outside the lifecycle:
        how the from-scratch arm trains a grown run's final architecture for the whole budget. Returns
        the move (DORMANT -> FOSSILIZED), for the telemetry to record it as every other."""
        slot = self.slots[slot_name]
        if slot.stage != S.SEED_STAGE_DORMANT:
            raise IllegalAction(f"cannot graft into {slot_name}: it is {SeedStage.Name(slot.stage)}")
        self._germinate(slot, blueprint)
        self.records[-1].grafted = True
        return self._move(slot, S.SEED_STAGE_FOSSILIZED, epoch, GRAFT_REASON)

    def _germinate(self, slot: SeedSlot, blueprint: int) -> None:
        ref = next(self.host.parameters())
        slot.seed = build_seed(blueprint, slot.channels, slot.kind).to(ref.device)
        slot.blueprint = blueprint
        slot.seed_id = len(self.records) + 1
        self.records.append(
            SeedRecord(slot.seed_id, slot.name, short_name(Blueprint, blueprint), slot.seed_params)
        )

    def _move(self, slot: SeedSlot, to_stage: int, epoch: int, reason: str) -> LifecycleTransition:
        transition = LifecycleTransition(
            slot=slot.name, seed_id=slot.seed_id, blueprint=slot.blueprint,
            from_stage=slot.stage, to_stage=to_stage, epoch=epoch, reason=reason,
        )
        if slot.seed_id:
            self.records[slot.seed_id - 1].history.append(
                {"stage": short_name(SeedStage, to_stage), "epoch": epoch, "reason": reason}
            )
        slot.stage = to_stage
        slot.epochs_in_stage = 0
        slot.contribution = None
        if to_stage == S.SEED_STAGE_FOSSILIZED:
            slot.alpha = 1.0
        elif to_stage in (S.SEED_STAGE_CULLED, S.SEED_STAGE_TRAINING, S.SEED_STAGE_GERMINATED):
            slot.alpha = 0.0
        if to_stage == S.SEED_STAGE_EMBARGOED:
            slot.embargo_epochs_left = self.cfg.embargo_epochs
        if to_stage == S.SEED_STAGE_DORMANT:
            slot.blueprint, slot.seed_id = Blueprint.BLUEPRINT_UNSPECIFIED, 0
        return transition

    def cull_live(self, epoch: int, reason: str) -> list[LifecycleTransition]:
        """Cull every live seed (the governor's rollback)."""
        return [
            self.execute(Action(operation=OP.OPERATION_CULL, slot=name), epoch, reason).transitions[0]
            for name in self.live_seeds()
        ]

    def begin_epoch(self) -> None:
        """Set the alpha each BLENDING slot trains with this epoch."""
        for slot in self.slots.values():
            if slot.stage == S.SEED_STAGE_BLENDING:
                slot.alpha = alpha_at(slot.epochs_in_stage + 1, self.cfg)

    def end_epoch(self, epoch: int) -> list[LifecycleTransition]:
        """Count the epoch in every slot's stage and make the moves time makes (cull -> embargo -> dormant)."""
        moves = []
        for slot in self.slots.values():
            slot.epochs_in_stage += 1
            if slot.stage == S.SEED_STAGE_CULLED:
                moves.append(self._move(slot, S.SEED_STAGE_EMBARGOED, epoch, "embargo after cull"))
            elif slot.stage == S.SEED_STAGE_EMBARGOED:
                slot.embargo_epochs_left -= 1
            if slot.stage == S.SEED_STAGE_EMBARGOED and slot.embargo_epochs_left <= 0:
                moves.append(self._move(slot, S.SEED_STAGE_DORMANT, epoch, "embargo over"))
        return moves

    # ---------------------------------------------------------------- checkpoints
    SLOT_FIELDS = ("stage", "blueprint", "seed_id", "alpha", "epochs_in_stage", "embargo_epochs_left",
                   "contribution", "loss_contribution")

    def lifecycle_state(self) -> dict:
        """Every slot's lifecycle fields and every seed's record as plain values. The weights travel in
        `state_dict()`, which a fresh model can only load once `restore_lifecycle` has rebuilt the seeds."""
        return {
            "slots": {name: {f: getattr(slot, f) for f in self.SLOT_FIELDS} | {"has_seed": slot.seed is not None}
                      for name, slot in self.slots.items()},
            "records": [dataclasses.asdict(r) for r in self.records],
        }

    def restore_lifecycle(self, state: dict) -> None:
        """Set slots and records from `lifecycle_state()` on a fresh model of the same host and slots,
        building each seed's module from its blueprint and slot (with fresh weights: load them next)."""
        ref = next(self.host.parameters())
        for name, fields in state["slots"].items():
            slot = self.slots[name]
            for f in self.SLOT_FIELDS:
                setattr(slot, f, fields[f])
            slot.seed = build_seed(slot.blueprint, slot.channels, slot.kind).to(ref.device) if fields["has_seed"] else None
        self.records = [SeedRecord.from_state(r) for r in state["records"]]

    # ---------------------------------------------------------------- views
    def slot_states(self) -> list[SlotState]:
        states = []
        for name, slot in self.slots.items():
            state = SlotState(
                slot=name, stage=slot.stage, blueprint=slot.blueprint, seed_id=slot.seed_id,
                alpha=slot.alpha, epochs_in_stage=slot.epochs_in_stage, seed_params=slot.seed_params,
                embargo_epochs_left=slot.embargo_epochs_left,
            )
            if slot.contribution is not None:
                state.has_contribution = True
                state.contribution, state.contribution_se = slot.contribution
                state.loss_contribution = slot.loss_contribution
            if (slot.stage, OP.OPERATION_ADVANCE) in GATE_OF:
                state.advance_ready = self.advance_gate(slot).passed
            states.append(state)
        return states

