"""Export of a grown network as plain layers, and parameter counts taken from the modules themselves.

An export must compute what the grown model computes (fossilized seeds at full strength, a seed caught
mid-blend at its alpha, a TRAINING seed not at all), with no slot machinery left in it, and survive
the architecture.json + weights.pt round trip.
"""

from __future__ import annotations

import pytest
import torch

from esper.kasmina import (
    LifecycleConfig,
    MorphogeneticModel,
    SeedSlot,
    build_host,
    export_model,
    load_exported,
    save_exported,
    seed_param_count,
)
from esper.kasmina.blueprints import blueprints_for
from esper.leyline import Action, Blueprint, Operation, SeedStage

S = SeedStage
OP = Operation
B = Blueprint


def drive(model: MorphogeneticModel, slot_name: str, blueprint: int, stage: int) -> None:
    slot = model.slots[slot_name]
    model.execute(Action(operation=OP.OPERATION_GERMINATE, slot=slot_name, blueprint=blueprint), 1)
    while slot.stage != stage:
        slot.contribution = (10.0, 0.0)
        if slot.stage == S.SEED_STAGE_BLENDING:
            slot.alpha = 1.0
        assert model.execute(Action(operation=OP.OPERATION_ADVANCE, slot=slot_name), 1).transitions


LAYOUTS = {
    # slot -> (blueprint, stage); the BLENDING seed is always the one in "mid" (alpha 0.6).
    "fossil_early": {"early": (B.BLUEPRINT_CONV_HEAVY, S.SEED_STAGE_FOSSILIZED),
                     "mid": (B.BLUEPRINT_ATTENTION, S.SEED_STAGE_BLENDING),
                     "late": (B.BLUEPRINT_CONV_LIGHT, S.SEED_STAGE_TRAINING)},
    "fossil_late": {"early": (B.BLUEPRINT_DEPTHWISE, S.SEED_STAGE_TRAINING),
                    "mid": (B.BLUEPRINT_NORM, S.SEED_STAGE_BLENDING),
                    "late": (B.BLUEPRINT_CONV_HEAVY, S.SEED_STAGE_FOSSILIZED)},
}


def grown_model(layout: str = "fossil_early") -> MorphogeneticModel:
    """A fossilized, a BLENDING (alpha 0.6, in "mid") and a TRAINING seed; every weight moved off its
    init and BatchNorm running stats filled by training-mode passes, so no seed is the identity and
    eval-mode BN is not the trivial (0, 1) normalisation."""
    torch.manual_seed(0)
    model = MorphogeneticModel(build_host("synthetic"), ["early", "mid", "late"],
                               LifecycleConfig(min_training_epochs=0, blend_epochs=1))
    for name, (blueprint, stage) in LAYOUTS[layout].items():
        drive(model, name, blueprint, stage)
    model.slots["mid"].alpha = 0.6
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
        model.train()
        for _ in range(3):
            model(torch.randn(16, 3, 16, 16, generator=g))
    return model.eval()


def inputs() -> torch.Tensor:
    return torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_export_matches_the_grown_model_and_has_no_slots(layout):
    """Eval-mode outputs of the export equal the model's; the export holds no SeedSlot, keeps exactly
    the fossilized and blending seeds (not the TRAINING one), and is independent of the model."""
    model, x = grown_model(layout), inputs()
    net = export_model(model).eval()
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(net(x), expected, rtol=0, atol=1e-6)
    assert not any(isinstance(m, SeedSlot) for m in net.modules())
    n_params = sum(p.numel() for p in net.parameters())
    kept = model.host_param_count + sum(
        model.slots[name].seed_params for name, (_, stage) in LAYOUTS[layout].items()
        if stage != S.SEED_STAGE_TRAINING
    )
    assert n_params == kept

    # The export's blending seed really is at 0.6: at 1.0 (or with the seed dropped) outputs differ.
    with torch.no_grad():
        model.slots["mid"].alpha = 1.0
        assert not torch.allclose(model(x), expected, atol=1e-4)
        model.slots["mid"].alpha = 0.6
        for p in model.parameters():  # a deep copy: later changes to the model do not reach it
            p.add_(1.0)
        torch.testing.assert_close(net(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_save_and_load_round_trip_gives_equal_outputs(tmp_path, layout):
    """architecture.json + weights.pt (weights_only) rebuild a network with the same outputs."""
    model, x = grown_model(layout), inputs()
    save_exported(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["architecture.json", "weights.pt"]
    loaded = load_exported(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-6)
    assert not any(isinstance(m, SeedSlot) for m in loaded.modules())


def _hand_count(blueprint: int, c: int) -> int:
    """Parameter counts worked out from each blueprint's layer list."""
    hidden = max(4, c // 4)
    return {
        B.BLUEPRINT_NORM: 2 * c,  # BN gamma, beta
        B.BLUEPRINT_ATTENTION: (c * hidden + hidden) + (hidden * c + c),  # two Linear layers
        B.BLUEPRINT_DEPTHWISE: 9 * c + 2 * c + c * c + 2 * c,  # dw3x3, BN, 1x1, BN
        B.BLUEPRINT_CONV_LIGHT: 9 * c * c + 2 * c,  # 3x3, BN
        B.BLUEPRINT_CONV_HEAVY: 2 * (9 * c * c + 2 * c),  # (3x3, BN) twice
    }[blueprint]


def test_seed_param_counts_match_the_modules_in_the_slots():
    """seed_param_count equals the hand count and the count of the module germinated in each slot of
    the cifar10 host, the seed record's count, and total_param_count = host + seeds."""
    for blueprint in blueprints_for("cnn"):
        model = MorphogeneticModel(build_host("cifar10"), ["early", "mid", "late"])
        for name, slot in model.slots.items():
            model.execute(Action(operation=OP.OPERATION_GERMINATE, slot=name, blueprint=blueprint), 1)
            modules = sum(p.numel() for p in slot.seed.parameters())
            assert seed_param_count(blueprint, slot.channels) == modules == _hand_count(blueprint, slot.channels)
            assert model.records[-1].params == modules == slot.seed_params
        assert model.total_param_count == model.host_param_count + sum(
            _hand_count(blueprint, c) for c in (32, 64, 128)
        )


def test_cifar10_host_and_conv_heavy_in_mid_have_the_published_counts():
    """The cifar10 host has 94,762 parameters; with conv_heavy in "mid" (64 channels) 168,746."""
    host = build_host("cifar10")
    assert sum(p.numel() for p in host.parameters()) == 94_762
    model = MorphogeneticModel(host, ["mid"])
    model.execute(Action(operation=OP.OPERATION_GERMINATE, slot="mid", blueprint=B.BLUEPRINT_CONV_HEAVY), 1)
    assert model.slots["mid"].channels == 64
    assert model.total_param_count == 168_746
    assert sum(p.numel() for p in model.parameters()) == 168_746
