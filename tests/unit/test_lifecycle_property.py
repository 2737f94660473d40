"""The seed lifecycle as a state machine: legality, gates, embargo, budget and records.

The property test drives random operation sequences (legal and illegal, any slot, any blueprint) on a
MorphogeneticModel and checks it against an independent shadow of the contract kept in the test: the
mask, `check_legal` and the transition table agree; illegal actions raise and change nothing; legal
ones move exactly as TRANSITIONS says or stay put when the gate refuses; time moves CULLED ->
EMBARGOED -> DORMANT after exactly `embargo_epochs` full epochs; the seed budget holds; every
record's history is the sequence of moves that happened.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esper.kasmina import IllegalAction, LifecycleConfig, MorphogeneticModel, build_host
from esper.kasmina.blueprints import blueprints_for
from esper.kasmina.lifecycle import TRANSITIONS, alpha_at, gate
from esper.leyline import Action, Blueprint, Operation, SeedStage, short_name

S = SeedStage
OP = Operation
ALL_SLOTS = ["early", "mid", "late"]
CNN_BLUEPRINTS = blueprints_for("cnn")
NO_SEED = {S.SEED_STAGE_DORMANT, S.SEED_STAGE_CULLED, S.SEED_STAGE_EMBARGOED}
AUTOMATIC = {(S.SEED_STAGE_CULLED, S.SEED_STAGE_EMBARGOED), (S.SEED_STAGE_EMBARGOED, S.SEED_STAGE_DORMANT)}


def canonical(op: int, slot: str, blueprint: int) -> Action:
    """The form the mask lists: WAIT bare, ADVANCE/CULL with a slot, GERMINATE with slot+blueprint."""
    if op == OP.OPERATION_WAIT:
        return Action(operation=op)
    if op == OP.OPERATION_GERMINATE:
        return Action(operation=op, slot=slot, blueprint=blueprint)
    return Action(operation=op, slot=slot)


def key(a: Action) -> tuple[int, str, int]:
    return (a.operation, a.slot, a.blueprint)


def snapshot(model: MorphogeneticModel):
    slots = {
        name: (s.stage, id(s.seed), s.seed_id, s.blueprint, s.alpha, s.epochs_in_stage,
               s.contribution, s.embargo_epochs_left)
        for name, s in model.slots.items()
    }
    return slots, copy.deepcopy([(r.seed_id, r.slot, r.blueprint, r.params, r.history) for r in model.records])


class Shadow:
    """What the contract says the model's state is, computed without asking the model."""

    def __init__(self, slots: list[str], cfg: LifecycleConfig, max_seeds: int):
        self.cfg, self.max_seeds = cfg, max_seeds
        self.stage = {s: S.SEED_STAGE_DORMANT for s in slots}
        self.epochs_in_stage = {s: 0 for s in slots}
        self.alpha = {s: 0.0 for s in slots}
        self.seed_of: dict[str, int] = {}  # slot -> live seed id (kept through CULLED/EMBARGOED)
        self.culled_at: dict[str, int] = {}
        self.histories: list[list[tuple[str, int]]] = []
        self.poisoned: set[int] = set()  # seed ids given a NaN parameter (G_train must refuse them)

    def legal(self, op: int, slot: str, blueprint: int) -> bool:
        if op == OP.OPERATION_WAIT:
            return True
        if slot not in self.stage or (self.stage[slot], op) not in TRANSITIONS:
            return False
        if op == OP.OPERATION_GERMINATE:
            budget = self.max_seeds == 0 or len(self.histories) < self.max_seeds
            return blueprint in CNN_BLUEPRINTS and budget
        return True

    def all_legal(self) -> set[tuple[int, str, int]]:
        out = {(OP.OPERATION_WAIT, "", 0)}
        for slot in self.stage:
            for op in (OP.OPERATION_GERMINATE, OP.OPERATION_ADVANCE, OP.OPERATION_CULL):
                for bp in CNN_BLUEPRINTS if op == OP.OPERATION_GERMINATE else [0]:
                    if self.legal(op, slot, bp):
                        out.add((op, slot, bp))
        return out

    def gate_passes(self, slot: str, contribution, finite: bool) -> bool:
        stage, cfg = self.stage[slot], self.cfg
        if stage == S.SEED_STAGE_GERMINATED:
            return finite
        if stage == S.SEED_STAGE_TRAINING:
            return (self.epochs_in_stage[slot] >= cfg.min_training_epochs and contribution is not None
                    and contribution[0] > cfg.blend_min_contribution)
        return (self.alpha[slot] >= 1.0 and contribution is not None
                and contribution[0] > cfg.fossilize_k_se * contribution[1])

    def move(self, slot: str, to: int, epoch: int) -> None:
        if to == S.SEED_STAGE_GERMINATED:
            self.histories.append([])
            self.seed_of[slot] = len(self.histories)
        self.histories[self.seed_of[slot] - 1].append((short_name(SeedStage, to), epoch))
        self.stage[slot], self.epochs_in_stage[slot] = to, 0
        if to == S.SEED_STAGE_FOSSILIZED:
            self.alpha[slot] = 1.0
        elif to != S.SEED_STAGE_BLENDING:
            self.alpha[slot] = 0.0
        if to == S.SEED_STAGE_CULLED:
            self.culled_at[slot] = epoch
        if to == S.SEED_STAGE_DORMANT:
            del self.seed_of[slot]

    def begin_epoch(self) -> None:
        for slot, stage in self.stage.items():
            if stage == S.SEED_STAGE_BLENDING:
                self.alpha[slot] = alpha_at(self.epochs_in_stage[slot] + 1, self.cfg)

    def end_epoch(self, epoch: int) -> None:
        for slot in self.stage:
            self.epochs_in_stage[slot] += 1
            if self.stage[slot] == S.SEED_STAGE_CULLED:
                self.move(slot, S.SEED_STAGE_EMBARGOED, epoch)
            # The embargo ends once `embargo_epochs` full epochs after the cull epoch have ended.
            if self.stage[slot] == S.SEED_STAGE_EMBARGOED and epoch >= self.culled_at[slot] + self.cfg.embargo_epochs:
                self.move(slot, S.SEED_STAGE_DORMANT, epoch)


def check_invariants(model: MorphogeneticModel, shadow: Shadow) -> None:
    for name, slot in model.slots.items():
        assert slot.stage == shadow.stage[name]
        assert (slot.seed is None) == (slot.stage in NO_SEED)
        assert 0.0 <= slot.alpha <= 1.0
        assert slot.alpha == pytest.approx(shadow.alpha[name], abs=1e-12)
        if slot.stage == S.SEED_STAGE_FOSSILIZED:
            assert slot.alpha == 1.0
        elif slot.stage != S.SEED_STAGE_BLENDING:
            assert slot.alpha == 0.0
        assert slot.seed_id == shadow.seed_of.get(name, 0)
        assert (slot.blueprint == Blueprint.BLUEPRINT_UNSPECIFIED) == (slot.stage == S.SEED_STAGE_DORMANT)
        assert slot.epochs_in_stage == shadow.epochs_in_stage[name]
    if model.max_seeds > 0:
        assert model.seeds_germinated <= model.max_seeds
    assert model.seeds_germinated == len(shadow.histories)
    for record, expected in zip(model.records, shadow.histories, strict=True):
        history = [(h["stage"], h["epoch"]) for h in record.history]
        assert history == expected
        stages = [SeedStage.Value("SEED_STAGE_" + s) for s, _ in history]
        assert stages[0] == S.SEED_STAGE_GERMINATED
        allowed = set(TRANSITIONS.items())
        for a, b in zip(stages, stages[1:]):
            assert (a, b) in AUTOMATIC or any(s == a and t == b for (s, _), t in allowed)
        assert record.fate == ("culled" if "CULLED" in [s for s, _ in history] else history[-1][0].lower())


OPS = [OP.OPERATION_UNSPECIFIED, OP.OPERATION_WAIT, OP.OPERATION_GERMINATE, OP.OPERATION_ADVANCE,
       OP.OPERATION_CULL]
# Weighted towards the moves that make progress, so most examples reach BLENDING and FOSSILIZED.
op_strategy = st.sampled_from(OPS + [OP.OPERATION_GERMINATE] * 2 + [OP.OPERATION_ADVANCE] * 6)
contribution_strategy = st.one_of(
    st.none(),
    st.tuples(st.floats(-3.0, 6.0), st.floats(0.0, 2.0)),
    st.tuples(st.floats(1.0, 6.0), st.floats(0.0, 0.4)),  # clearly helpful: the gates should pass
    st.tuples(st.floats(-8.0, -4.0), st.floats(0.0, 2.0)),  # around G_blend's default threshold (-5)
    st.tuples(st.just(-5.0), st.floats(0.0, 2.0)),  # exactly on it: must be refused (strict >)
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    slots=st.lists(st.sampled_from(ALL_SLOTS), min_size=1, max_size=3, unique=True),
    max_seeds=st.sampled_from([0, 0, 1, 2, 3]),
    min_training_epochs=st.integers(0, 2),
    blend_epochs=st.integers(1, 3),
    embargo_epochs=st.integers(0, 3),
    schedule=st.sampled_from(["linear", "cosine"]),
    epochs=st.integers(5, 25),
    fossilize_k_se=st.sampled_from([0.0, 0.0, 1.0, 2.0]),
)
def test_random_operation_sequences_follow_the_contract(
    data, slots, max_seeds, min_training_epochs, blend_epochs, embargo_epochs, schedule, epochs, fossilize_k_se
):
    """Random legal and illegal actions against an independent shadow of the lifecycle contract."""
    cfg = LifecycleConfig(min_training_epochs=min_training_epochs, blend_epochs=blend_epochs,
                          embargo_epochs=embargo_epochs, blend_schedule=schedule,
                          fossilize_k_se=fossilize_k_se)
    torch.manual_seed(0)
    model = MorphogeneticModel(build_host("synthetic"), slots, cfg, max_seeds)
    shadow = Shadow(list(model.slots), cfg, max_seeds)
    check_invariants(model, shadow)
    for epoch in range(1, epochs + 1):
        for _ in range(data.draw(st.integers(1, 3), label="actions")):
            op = data.draw(op_strategy, label="op")
            # Mostly enabled slots; sometimes a disabled or unknown one.
            name = data.draw(st.one_of(st.sampled_from(list(model.slots)),
                                       st.sampled_from(list(model.slots)),
                                       st.sampled_from(ALL_SLOTS + ["bogus", ""])), label="slot")
            blueprint = data.draw(st.sampled_from(list(Blueprint.values())), label="blueprint")
            action = canonical(op, name, blueprint)
            slot = model.slots[name] if name in model.slots else None
            if op == OP.OPERATION_ADVANCE and slot is not None and slot.seed is not None:
                if slot.stage in (S.SEED_STAGE_TRAINING, S.SEED_STAGE_BLENDING):
                    slot.contribution = data.draw(contribution_strategy, label="contribution")
                elif slot.stage == S.SEED_STAGE_GERMINATED and data.draw(st.integers(0, 7), label="poison") == 0:
                    with torch.no_grad():
                        next(slot.seed.parameters()).view(-1)[0] = math.nan
                    shadow.poisoned.add(slot.seed_id)

            expected_legal = shadow.legal(op, name, blueprint)
            assert {key(a) for a in model.legal_actions()} == shadow.all_legal()
            in_mask = key(action) in {key(a) for a in model.legal_actions()}
            try:
                model.check_legal(action)
                checked = True
            except IllegalAction:
                checked = False
            assert in_mask == checked == expected_legal, (action, shadow.stage)

            before = snapshot(model)
            if not expected_legal:
                with pytest.raises(IllegalAction):
                    model.execute(action, epoch)
                assert snapshot(model) == before
                continue
            contribution = slot.contribution if slot is not None else None
            finite = shadow.seed_of.get(name) not in shadow.poisoned
            passes = op != OP.OPERATION_ADVANCE or shadow.gate_passes(name, contribution, finite)
            out = model.execute(action, epoch, reason="test")
            if op == OP.OPERATION_WAIT:
                assert out.transitions == [] and out.gates == []
                assert snapshot(model) == before
                continue
            if op in (OP.OPERATION_GERMINATE, OP.OPERATION_ADVANCE):
                assert len(out.gates) == 1 and out.gates[0].passed == passes, out.gates
            if passes:
                to = TRANSITIONS[(shadow.stage[name], op)]
                assert [(t.slot, t.from_stage, t.to_stage, t.epoch) for t in out.transitions] == [
                    (name, shadow.stage[name], to, epoch)
                ]
                shadow.move(name, to, epoch)
            else:
                assert out.transitions == []
                assert snapshot(model) == before
            check_invariants(model, shadow)

        model.begin_epoch()
        shadow.begin_epoch()
        check_invariants(model, shadow)
        moves = model.end_epoch(epoch)
        stages_before = dict(shadow.stage)
        shadow.end_epoch(epoch)
        assert sorted((t.slot, t.to_stage) for t in moves) == sorted(
            (s, h) for s in shadow.stage for h in _auto_path(stages_before[s], shadow.stage[s])
        )
        check_invariants(model, shadow)
        for name, culled in shadow.culled_at.items():
            # Embargo honoured exactly: no GERMINATE before `embargo_epochs` full epochs after the cull.
            next_epoch = epoch + 1
            can_germinate = model.slots[name].stage == S.SEED_STAGE_DORMANT
            if shadow.stage[name] in NO_SEED:
                assert can_germinate == (next_epoch >= culled + embargo_epochs + 1)


def _auto_path(a: int, b: int) -> list[int]:
    """The stages end_epoch passes through going from a to b."""
    if a == S.SEED_STAGE_CULLED and b == S.SEED_STAGE_DORMANT:
        return [S.SEED_STAGE_EMBARGOED, S.SEED_STAGE_DORMANT]
    return [] if a == b else [b]


# ----------------------------------------------------------------------------- plain unit tests
@pytest.mark.parametrize("stage", list(SeedStage.values()), ids=lambda v: SeedStage.Name(v))
@pytest.mark.parametrize("max_seeds", [0, 1])
def test_mask_equals_transition_table_for_every_stage(stage, max_seeds):
    """The mask for a slot in each stage is WAIT plus exactly the table's moves from that stage
    (GERMINATE once per fitting blueprint, and only while the seed budget lasts)."""
    model = MorphogeneticModel(build_host("synthetic"), ["mid"], LifecycleConfig(), max_seeds)
    if max_seeds:
        model.execute(Action(operation=OP.OPERATION_GERMINATE, slot="mid",
                             blueprint=Blueprint.BLUEPRINT_NORM), 1)  # spends the budget
    model.slots["mid"].stage = stage
    expected = {(OP.OPERATION_WAIT, "", 0)}
    for (s, op) in TRANSITIONS:
        if s != stage:
            continue
        if op == OP.OPERATION_GERMINATE:
            expected |= {(op, "mid", b) for b in CNN_BLUEPRINTS} if not max_seeds else set()
        else:
            expected.add((op, "mid", 0))
    actions = model.legal_actions()
    assert len(actions) == len(expected)
    assert {key(a) for a in actions} == expected
    assert key(actions[0]) == (OP.OPERATION_WAIT, "", 0)


def test_alpha_schedule_linear_and_cosine_hand_values():
    """alpha_at(k) is the alpha of the k-th blending epoch: k/n linearly, (1 - cos(pi k/n))/2 on the
    cosine ramp, 1.0 from the n-th epoch on."""
    lin = LifecycleConfig(blend_epochs=4, blend_schedule="linear")
    cos = LifecycleConfig(blend_epochs=4, blend_schedule="cosine")
    assert [alpha_at(k, lin) for k in range(0, 7)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    expected_cos = [0.0, 0.1464466094067262, 0.5, 0.8535533905932737, 1.0, 1.0, 1.0]
    assert [alpha_at(k, cos) for k in range(0, 7)] == pytest.approx(expected_cos, abs=1e-12)
    assert alpha_at(1, LifecycleConfig(blend_epochs=1, blend_schedule="cosine")) == 1.0
    three = LifecycleConfig(blend_epochs=3)
    assert [alpha_at(k, three) for k in (1, 2, 3)] == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_blending_alpha_follows_schedule_epoch_by_epoch():
    """Advanced to BLENDING at the start of an epoch, the slot trains that epoch with alpha_at(1), the
    next with alpha_at(2), ...; G_fossilize refuses until alpha has reached 1."""
    cfg = LifecycleConfig(min_training_epochs=0, blend_epochs=3, blend_schedule="cosine")
    model = MorphogeneticModel(build_host("synthetic"), ["mid"], cfg)
    slot = model.slots["mid"]
    model.execute(Action(operation=OP.OPERATION_GERMINATE, slot="mid", blueprint=Blueprint.BLUEPRINT_NORM), 1)
    model.execute(Action(operation=OP.OPERATION_ADVANCE, slot="mid"), 1)
    slot.contribution = (0.5, 0.1)
    model.execute(Action(operation=OP.OPERATION_ADVANCE, slot="mid"), 1)
    assert slot.stage == S.SEED_STAGE_BLENDING
    seen = []
    for epoch in (1, 2, 3):
        model.begin_epoch()
        seen.append(slot.alpha)
        slot.contribution = (5.0, 1.0)
        check = model.advance_gate(slot)
        assert check.passed == (epoch == 3), check.reason
        model.end_epoch(epoch)
    assert seen == pytest.approx([0.25, 0.75, 1.0], abs=1e-12)


@pytest.mark.parametrize("kwargs", [
    {"blend_schedule": "step"},
    {"blend_schedule": ""},
    {"blend_epochs": 0},
    {"blend_epochs": -2},
    {"min_training_epochs": -1},
    {"embargo_epochs": -1},
])
def test_lifecycle_config_rejects_bad_values(kwargs):
    """A config that would make a gate or the ramp meaningless fails loudly at construction."""
    with pytest.raises(ValueError):
        LifecycleConfig(**kwargs)


def test_lifecycle_config_accepts_the_boundary_values():
    cfg = LifecycleConfig(blend_epochs=1, min_training_epochs=0, embargo_epochs=0, blend_schedule="cosine")
    assert (cfg.blend_epochs, cfg.min_training_epochs, cfg.embargo_epochs) == (1, 0, 0)


def test_gate_records_values_thresholds_and_names_the_failed_comparison():
    """A gate check carries every value and threshold it compared, and its reason names exactly the
    comparisons that failed (strict vs non-strict boundaries respected)."""
    check = gate("G_blend", "mid", 7, {
        "epochs_in_stage": (1, ">=", 2),
        "prospective_contribution": (0.5, ">", -1.0),
        "boundary_strict": (1.0, ">", 1.0),
        "boundary_loose": (1.0, ">=", 1.0),
        "less": (3.0, "<", 3.0),
    })
    assert (check.gate, check.slot, check.seed_id, check.passed) == ("G_blend", "mid", 7, False)
    assert dict(check.values) == {"epochs_in_stage": 1.0, "prospective_contribution": 0.5,
                                  "boundary_strict": 1.0, "boundary_loose": 1.0, "less": 3.0}
    assert dict(check.thresholds) == {"epochs_in_stage": 2.0, "prospective_contribution": -1.0,
                                      "boundary_strict": 1.0, "boundary_loose": 1.0, "less": 3.0}
    assert "epochs_in_stage=1 not >= 2" in check.reason
    assert "boundary_strict=1 not > 1" in check.reason
    assert "less=3 not < 3" in check.reason
    assert "prospective_contribution" not in check.reason and "boundary_loose" not in check.reason

    ok = gate("G_train", "early", 1, {"seed_params_finite": (1.0, ">=", 1.0)})
    assert ok.passed and ok.reason == "passed"


def test_refused_advance_stays_put_and_reports_why():
    """G_blend with min_training_epochs=2 refuses a seed that has trained one epoch: no move, and the
    GateCheck names epochs_in_stage; after one more epoch the same ADVANCE goes through."""
    cfg = LifecycleConfig(min_training_epochs=2)
    model = MorphogeneticModel(build_host("synthetic"), ["late"], cfg)
    slot = model.slots["late"]
    model.execute(Action(operation=OP.OPERATION_GERMINATE, slot="late", blueprint=Blueprint.BLUEPRINT_DEPTHWISE), 1)
    model.execute(Action(operation=OP.OPERATION_ADVANCE, slot="late"), 1)
    model.end_epoch(1)
    slot.contribution = (0.0, 0.5)
    out = model.execute(Action(operation=OP.OPERATION_ADVANCE, slot="late"), 2)
    assert out.transitions == [] and slot.stage == S.SEED_STAGE_TRAINING
    assert not out.gates[0].passed and "epochs_in_stage=1 not >= 2" in out.gates[0].reason
    model.end_epoch(2)
    slot.contribution = (0.0, 0.5)
    out = model.execute(Action(operation=OP.OPERATION_ADVANCE, slot="late"), 3)
    assert out.gates[0].passed and slot.stage == S.SEED_STAGE_BLENDING


@pytest.mark.parametrize("mean, se, passed", [(1.5, 0.5, True), (3.0, 2.0, False), (4.0, 2.0, False),
                                              (4.5, 2.0, True)])
def test_g_fossilize_asks_for_k_standard_errors(mean, se, passed):
    """With fossilize_k_se=2 the contribution must exceed 2 x its standard error, strictly: 1.5 passes at se 0.5
    and 3.0 fails at se 2.0, either of which k alone (without se) would judge the other way."""
    model = MorphogeneticModel(build_host("synthetic"), ["late"], LifecycleConfig(fossilize_k_se=2.0))
    slot = model.slots["late"]
    slot.stage, slot.alpha, slot.contribution = S.SEED_STAGE_BLENDING, 1.0, (mean, se)
    check = model.advance_gate(slot)
    assert (check.gate, check.passed, dict(check.thresholds)["contribution"]) == ("G_fossilize", passed, 2 * se)


def test_a_move_forgets_the_contribution_measured_in_the_stage_before():
    """A contribution is measured for a seed in a stage: after any move it is unknown until measured again. A
    mutation that kept it past the move survived every other test; it left a slot DORMANT again after a cull
    and its embargo reporting the culled seed's -7 points (to observations, features, the next seed's gates)."""
    model = MorphogeneticModel(build_host("synthetic"), ["mid"], LifecycleConfig(min_training_epochs=0))
    slot = model.slots["mid"]
    model.execute(Action(operation=OP.OPERATION_GERMINATE, slot="mid", blueprint=Blueprint.BLUEPRINT_NORM), 1)
    for operation in (OP.OPERATION_ADVANCE, OP.OPERATION_CULL):
        slot.contribution = (-7.0, 1.0)
        model.execute(Action(operation=operation, slot="mid"), 1)
        assert slot.contribution is None, SeedStage.Name(slot.stage)
    epoch = 1
    while slot.stage != S.SEED_STAGE_DORMANT:
        model.begin_epoch()
        model.end_epoch(epoch)
        epoch += 1
    assert slot.contribution is None and not model.slot_states()[0].has_contribution
