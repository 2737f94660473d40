"""The rule-based controller: grow when validation accuracy plateaus, keep what helps, cull what hurts.

One action per epoch, in this order of priority:
1. CULL a BLENDING seed whose contribution is clearly negative (it hurts), or whose blending has
   cost more than `cull_regression` points of validation accuracy;
2. ADVANCE a seed whose next gate would pass (kasmina reports `advance_ready` with the gate's values);
3. CULL a seed whose gate keeps saying no: `max_training_epochs` in TRAINING, `max_stage_epochs`
   in BLENDING;
4. GERMINATE in the first dormant enabled slot once accuracy has plateaued or a quarter of the
   budget has passed, with the next blueprint in the rotation, skipping blueprints culled recently;
5. WAIT.

The policy keeps nothing between epochs: every decision is a function of the observation alone (its
plateau count, history and recent culls are the environment's signals), so an episode checkpoint
(GrowthEnv.state_dict) holds all a resumed run needs, and a restarted tamiyo_server decides the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from esper.kasmina.lifecycle import budget_left
from esper.leyline import (
    Action,
    Blueprint,
    Decision,
    Observation,
    Operation,
    SeedStage,
    SlotState,
    from_short_name,
    short_name,
)

S = SeedStage
OP = Operation


@dataclass(frozen=True)
class HeuristicConfig:
    plateau_patience: int = 3
    """Germinate after this many epochs without a new best validation accuracy."""
    min_epoch_to_germinate: int = 5
    """Let the host learn the easy part first."""
    germinate_by: float = 0.25
    """Germinate once this fraction of the budget has passed even without a plateau: at a constant
    learning rate accuracy creeps up for a long time, and growth pays most when it comes early (the
    growth oracle in FIELD-NOTES: a block inserted at epoch 10 of 40 came within 0.35 points of the
    same network trained from scratch). 1.0 = only on a plateau."""
    blueprint_rotation: tuple[str, ...] = (
        "conv_heavy", "mlp", "conv_light", "attention", "lora", "depthwise", "norm"
    )
    """Order in which blueprints are tried; the rotation moves on after every germination. Only those
    the host accepts take part: a CNN tries conv_heavy, conv_light, attention, depthwise, norm; a
    transformer mlp, attention, lora, norm (the larger first, as for the CNN)."""
    cull_memory: int = 2
    """A blueprint among the last `cull_memory` culled is skipped while another is available."""
    cull_k_se: float = 2.0
    """Cull a BLENDING seed whose contribution is below -cull_k_se standard errors ..."""
    cull_min_harm: float = 1.0
    """... and below -cull_min_harm points: with few discordant images the standard error is tiny
    and a normal test on it would cull on noise."""
    cull_regression: float = 2.0
    """Cull a BLENDING seed when mean validation accuracy since blending began fell this many points
    below the mean of the `regression_window` epochs before it (means, because one epoch is noisy)."""
    regression_window: int = 3
    max_stage_epochs: int = 12
    """Cull a seed that has sat in BLENDING this long without its gate passing."""
    max_training_epochs: int = 2
    """Cull a TRAINING seed not ready to blend after this many epochs: an isolated seed only drifts
    further (CIFAR-10, conv_heavy in mid: prospective contribution +0.48, -5.3, -21.9 points after
    1, 2, 3 TRAINING epochs; on the H200 one seed in three sat 12 epochs in TRAINING this way)."""

    def __post_init__(self) -> None:
        for name in self.blueprint_rotation:
            from_short_name(Blueprint, name)  # raises on a typo


class HeuristicPolicy:
    name = "heuristic"
    version = "1"

    def __init__(self, cfg: HeuristicConfig = HeuristicConfig()):
        self.cfg = cfg
        self.rotation = [from_short_name(Blueprint, b) for b in cfg.blueprint_rotation]

    def decide(self, obs: Observation) -> Decision:
        action, reason = self._choose(obs)
        return Decision(action=action, reason=reason, policy_name=self.name, policy_version=self.version)

    def _choose(self, obs: Observation) -> tuple[Action, str]:
        cfg, signals = self.cfg, obs.signals
        live = [s for s in obs.slots if s.stage in (S.SEED_STAGE_TRAINING, S.SEED_STAGE_BLENDING)]
        for slot in live:
            if slot.stage != S.SEED_STAGE_BLENDING:
                continue  # a TRAINING seed's contribution is only prospective: its gate judges it
            harm = max(cfg.cull_k_se * slot.contribution_se, cfg.cull_min_harm)
            if slot.has_contribution and slot.contribution < -harm:
                return _cull(slot), f"contribution {slot.contribution:+.2f} < -{harm:.2f} points"
            drop = self._blending_regression(slot, list(signals.val_accuracy_history))
            if drop > cfg.cull_regression:
                return _cull(slot), f"validation accuracy {drop:.2f} points below its level before blending"
        for slot in obs.slots:
            if slot.advance_ready and slot.stage in (S.SEED_STAGE_GERMINATED, S.SEED_STAGE_TRAINING,
                                                     S.SEED_STAGE_BLENDING):
                return Action(operation=OP.OPERATION_ADVANCE, slot=slot.slot), (
                    f"gate for {short_name(SeedStage, slot.stage)} -> next stage passes")
        for slot in live:
            limit = cfg.max_training_epochs if slot.stage == S.SEED_STAGE_TRAINING else cfg.max_stage_epochs
            if slot.epochs_in_stage >= limit:
                return _cull(slot), f"{slot.epochs_in_stage} epochs in {short_name(SeedStage, slot.stage)}"
        dormant = [s for s in obs.slots if s.stage == S.SEED_STAGE_DORMANT]
        plateau = signals.plateau_epochs >= cfg.plateau_patience
        due = signals.epoch >= cfg.germinate_by * signals.max_epochs
        ready = signals.epoch >= cfg.min_epoch_to_germinate and (plateau or due)
        if budget_left(obs.seeds_germinated, obs.max_seeds) and dormant and ready:
            blueprint = self._next_blueprint(obs)
            reason = (f"plateau: {signals.plateau_epochs} epochs without a new best ({signals.best_val_accuracy:.2f}%)"
                      if plateau else f"{cfg.germinate_by:.0%} of the budget passed ({signals.epoch} epochs)")
            return Action(operation=OP.OPERATION_GERMINATE, slot=dormant[0].slot, blueprint=blueprint), reason
        return Action(operation=OP.OPERATION_WAIT), "nothing to do"

    def _blending_regression(self, slot: SlotState, history: list[float]) -> float:
        """Mean accuracy in the window before blending began minus the mean since (0 if unknown)."""
        k = slot.epochs_in_stage
        if slot.stage != S.SEED_STAGE_BLENDING or k == 0 or len(history) <= k:
            return 0.0
        since = history[-k:]
        before = history[-k - self.cfg.regression_window:-k]
        return sum(before) / len(before) - sum(since) / len(since)

    def _next_blueprint(self, obs: Observation) -> int:
        """Rotate through the blueprints this host accepts, skipping recently culled ones if possible."""
        allowed = [b for b in self.rotation if b in obs.blueprints]
        start = obs.seeds_germinated % len(allowed)
        ordered = allowed[start:] + allowed[:start]
        recent = set(list(obs.recently_culled)[-self.cfg.cull_memory:])
        fresh = [b for b in ordered if b not in recent]
        return (fresh or ordered)[0]


def _cull(slot: SlotState) -> Action:
    return Action(operation=OP.OPERATION_CULL, slot=slot.slot)
