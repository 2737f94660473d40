"""Trainer.evaluate's counterfactual contributions on a case whose answer is known by construction.

The synthetic host is wired by hand so its prediction is a constant we choose: block 2's BatchNorm
has zero scale and shift (its output is exactly 0), and the head's bias makes class 0 win. A seed in
"late" is a module that adds a constant to one feature channel, which the head maps to another class.
So which images each variant gets right depends only on the labels, and the paired per-image
difference, its mean and its standard error std(diff, unbiased) / sqrt(n) are worked out by hand
below (in percentage points). An unpaired estimate would give the same mean but a different SE.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from esper.kasmina import LifecycleConfig, MorphogeneticModel, build_host
from esper.leyline import Action, Blueprint, Operation, SeedStage
from esper.tolaria.data import Dataset
from esper.tolaria.trainer import Trainer, TrainConfig

S = SeedStage
OP = Operation
# Ten validation labels: six 1s, two 0s, one 2, one 3.
VAL_Y = [1, 0, 1, 2, 1, 0, 1, 3, 1, 1]
TEST_Y = [1, 1, 1, 1]


class ConstantDelta(nn.Module):
    """f(x) = `value` in feature channel `channel`, 0 elsewhere: after pooling, alpha * value there.
    `dim` is where channels are: 1 for [B, C, H, W], -1 for a transformer's stream [B, T, C]."""

    def __init__(self, channel: int, value: float, dim: int = 1):
        super().__init__()
        self.channel, self.value, self.dim = channel, value, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = torch.zeros_like(x)
        delta.select(self.dim, self.channel).fill_(self.value)
        return delta


def rigged_model(stages: dict[str, int]) -> MorphogeneticModel:
    """Host that always predicts class 0 (logits [1, a0, a1, 0], a_c = pooled feature channel c);
    each slot in `stages` holds a real seed advanced to that stage, to be swapped for a ConstantDelta."""
    torch.manual_seed(0)
    model = MorphogeneticModel(build_host("synthetic"), ["mid", "late"],
                               LifecycleConfig(min_training_epochs=0, blend_epochs=1))
    with torch.no_grad():
        bn = model.host.blocks[2][1]
        bn.weight.zero_(), bn.bias.zero_()
        head = model.host.head[2]
        head.weight.zero_()
        head.weight[1, 0] = 1.0  # feature channel 0 -> class 1
        head.weight[2, 1] = 1.0  # feature channel 1 -> class 2
        head.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    for name, stage in stages.items():
        slot = model.slots[name]
        model.execute(Action(operation=OP.OPERATION_GERMINATE, slot=name, blueprint=Blueprint.BLUEPRINT_NORM), 1)
        while slot.stage != stage:
            slot.contribution = (10.0, 0.0)
            if slot.stage == S.SEED_STAGE_BLENDING:
                slot.alpha = 1.0  # G_fossilize wants a finished ramp
            assert model.execute(Action(operation=OP.OPERATION_ADVANCE, slot=name), 1).transitions
    return model


def trainer_for(model: MorphogeneticModel) -> Trainer:
    g = torch.Generator().manual_seed(0)
    images = lambda n: torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g)  # noqa: E731
    data = Dataset(
        name="rigged", train_x=images(8), train_y=torch.zeros(8, dtype=torch.int64),
        val_x=images(len(VAL_Y)), val_y=torch.tensor(VAL_Y), test_x=images(len(TEST_Y)),
        test_y=torch.tensor(TEST_Y), num_classes=4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
    )
    # eval_batch_size 3: four batches, the last one partial, so pairing must survive concatenation.
    return Trainer(model, data, TrainConfig(eval_batch_size=3), torch.device("cpu"), g)


def paired(with_right: list[bool], without_right: list[bool]) -> tuple[float, float]:
    """Mean and standard error (unbiased std / sqrt n) of the per-image difference, in points."""
    diff = [float(a) - float(b) for a, b in zip(with_right, without_right, strict=True)]
    n = len(diff)
    mean = sum(diff) / n
    var = sum((d - mean) ** 2 for d in diff) / (n - 1)
    return 100 * mean, 100 * math.sqrt(var / n)


def test_blending_contribution_is_the_paired_difference_against_alpha_zero():
    """BLENDING seed in "late" at alpha 0.3 adds 10 * 0.3 = 3 to class 1's logit: with it every image
    is predicted 1, without it (alpha 0) every image is predicted 0. Per image the difference is +1
    on the six 1s, -1 on the two 0s, 0 elsewhere: mean 40 points, SE sqrt(6.4/9/10) = 80/3 points."""
    model = rigged_model({"late": S.SEED_STAGE_BLENDING})
    slot = model.slots["late"]
    slot.seed, slot.alpha = ConstantDelta(channel=0, value=10.0), 0.3
    result = trainer_for(model).evaluate("val")

    assert paired([y == 1 for y in VAL_Y], [y == 0 for y in VAL_Y]) == pytest.approx((40.0, 80 / 3))
    mean, se = result.contributions["late"]
    assert mean == pytest.approx(40.0, abs=1e-4)
    assert se == pytest.approx(80 / 3, abs=1e-4)
    assert result.accuracy == pytest.approx(60.0, abs=1e-4)  # the model as it is (alpha 0.3) says 1
    logits = [1.0, 3.0, 0.0, 0.0]
    lse = math.log(sum(math.exp(v) for v in logits))
    assert result.loss == pytest.approx(sum(lse - logits[y] for y in VAL_Y) / len(VAL_Y), abs=1e-5)
    assert slot.alpha == 0.3


def test_training_contribution_is_alpha_one_minus_the_unchanged_host():
    """A TRAINING seed does not change the output, so the model scores the host's class 0 (20%).
    Its prospective contribution forces alpha to 1, where the seed's +5 on class 2 wins: +1 on the
    one 2, -1 on the two 0s: mean -10 points, SE sqrt(2.9/9/10) points."""
    model = rigged_model({"late": S.SEED_STAGE_TRAINING})
    slot = model.slots["late"]
    slot.seed = ConstantDelta(channel=1, value=5.0)
    result = trainer_for(model).evaluate("val")

    expected_se = 100 * math.sqrt(2.9 / 9 / 10)
    assert paired([y == 2 for y in VAL_Y], [y == 0 for y in VAL_Y]) == pytest.approx((-10.0, expected_se))
    mean, se = result.contributions["late"]
    assert mean == pytest.approx(-10.0, abs=1e-4)
    assert se == pytest.approx(expected_se, abs=1e-4)
    assert result.accuracy == pytest.approx(20.0, abs=1e-4)


def test_seed_whose_removal_changes_nothing_scores_zero_and_split_is_honoured():
    """A TRAINING seed in "mid" feeds block 2, whose output is forced to 0: with or without it every
    prediction is the same, so its contribution is exactly (0, 0), while the BLENDING seed beside it
    is measured as usual. On the test split (all labels 1) the BLENDING seed scores +100 +- 0."""
    model = rigged_model({"mid": S.SEED_STAGE_TRAINING, "late": S.SEED_STAGE_BLENDING})
    model.slots["mid"].seed = ConstantDelta(channel=3, value=50.0)
    model.slots["late"].seed, model.slots["late"].alpha = ConstantDelta(channel=0, value=10.0), 0.3
    trainer = trainer_for(model)

    val = trainer.evaluate("val")
    assert set(val.contributions) == {"mid", "late"}
    assert val.contributions["mid"] == (0.0, 0.0)
    assert val.contributions["late"] == pytest.approx((40.0, 80 / 3), abs=1e-4)
    test = trainer.evaluate("test")
    assert test.contributions["late"] == pytest.approx((100.0, 0.0), abs=1e-4)
    assert test.accuracy == pytest.approx(100.0)
    assert trainer.evaluate("val", counterfactual=False).contributions == {}


def test_fossilized_seed_is_not_probed():
    """Only TRAINING and BLENDING seeds get a counterfactual: a fossilized seed is host structure."""
    model = rigged_model({"late": S.SEED_STAGE_FOSSILIZED})
    model.slots["late"].seed = ConstantDelta(channel=0, value=10.0)
    result = trainer_for(model).evaluate("val")
    assert result.contributions == {}
    assert result.accuracy == pytest.approx(60.0, abs=1e-4)  # the fossil pushes everything to class 1


def test_batched_counterfactual_equals_one_pass_per_variant():
    """Real seeds in three slots (early TRAINING, mid BLENDING at 0.4, late BLENDING at 0.7): the
    contributions of the single batched pass equal those of separate passes over copies of the model
    with the alpha changed by hand (the prefix before "early" runs once, then three copies split)."""
    torch.manual_seed(1)
    model = MorphogeneticModel(build_host("synthetic"), ["early", "mid", "late"],
                               LifecycleConfig(min_training_epochs=0, blend_epochs=1))
    stages = {"early": S.SEED_STAGE_TRAINING, "mid": S.SEED_STAGE_BLENDING, "late": S.SEED_STAGE_BLENDING}
    for name, stage in stages.items():
        slot = model.slots[name]
        model.execute(Action(operation=OP.OPERATION_GERMINATE, slot=name, blueprint=Blueprint.BLUEPRINT_CONV_LIGHT), 1)
        while slot.stage != stage:
            slot.contribution = (10.0, 0.0)
            assert model.execute(Action(operation=OP.OPERATION_ADVANCE, slot=name), 1).transitions
        with torch.no_grad():  # a fresh seed is the identity (last layer zero): give it an effect
            for p in slot.seed.parameters():
                p.normal_(0, 0.5)
    model.slots["mid"].alpha, model.slots["late"].alpha = 0.4, 0.7
    trainer = trainer_for(model)
    result = trainer.evaluate("val")

    x = (trainer.data.val_x.float() / 255 - trainer.mean) / trainer.std
    y = trainer.data.val_y

    def scored(variant: MorphogeneticModel) -> tuple[torch.Tensor, float]:
        """(per-image right or wrong, mean loss) of one model variant, in a pass of its own."""
        with torch.no_grad():
            logits = variant.eval()(x)
        return (logits.argmax(-1) == y).float(), float(torch.nn.functional.cross_entropy(logits, y))

    base, base_loss = scored(model)
    for name, with_alpha in (("early", 1.0), ("mid", 0.0), ("late", 0.0)):
        variant = copy.deepcopy(model)
        slot = variant.slots[name]
        slot.stage, slot.alpha = S.SEED_STAGE_BLENDING, with_alpha  # BLENDING's formula, alpha forced
        other, other_loss = scored(variant)
        training = name == "early"
        diff = other - base if training else base - other
        expected = (float(diff.mean()) * 100, float(diff.std()) * 100 / math.sqrt(len(diff)))
        loss_drop = base_loss - other_loss if training else other_loss - base_loss
        print(name, expected, result.contributions[name], loss_drop, result.loss_contributions[name])
        assert result.contributions[name] == pytest.approx(expected, abs=1e-4)
        assert result.loss_contributions[name] == pytest.approx(loss_drop, abs=1e-5)
        assert abs(loss_drop) > 1e-3  # every seed changes the loss: the check can fail
