"""The transformer host: counterfactual, export, parameter counts, blueprint mask, sampling, an episode.

Isolation and blending on this host are proven by tests/unit/test_isolation.py, which runs every test
on both host kinds. Here, on the same tiny transformer (conftest.TINY_LM), the guarantees that have
language-model specifics: the counterfactual pairs per sequence and reports the loss difference too;
an export (with its tied embedding) computes what the grown model computes and survives the round
trip; parameter counts come from the modules.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from support import TINY_LM
from esper.kasmina import (
    IllegalAction,
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
from esper.kasmina.hosts import HostSpec, TransformerHost
from esper.kasmina.transformer import generate
from esper.leyline import Action, Blueprint, Operation, SeedStage
from esper.nissa import ListSink, Telemetry
from esper.simic import EnvConfig, GrowthEnv, run_episode
from esper.tamiyo import HeuristicConfig, HeuristicPolicy
from esper.tolaria.data import Dataset
from esper.tolaria.trainer import Trainer, TrainConfig
from test_counterfactual import ConstantDelta
from test_isolation import drive, perturb

S = SeedStage
OP = Operation
B = Blueprint
CFG = LifecycleConfig(min_training_epochs=0, blend_epochs=1)


def tokens(n: int, seed: int = 7) -> torch.Tensor:
    return torch.randint(TINY_LM.num_classes, (n, TINY_LM.context), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- counterfactual
class ConstantStream(nn.Module):
    """Stem of the rigged host: every position's stream is [1, 0, 0, 0] whatever the token."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        stream = torch.zeros(*idx.shape, 4)
        stream[..., 0] = 1.0
        return stream  # [B, T, 4]


# Four validation sequences of five next tokens, vocabulary 4.
VAL_Y = [[1, 1, 1, 1, 1], [0, 0, 1, 2, 3], [1, 0, 1, 0, 1], [2, 3, 2, 3, 2]]


def rigged(stage: int, delta: ConstantDelta, alpha: float = 0.0) -> Trainer:
    """A host whose logits are its stream (identity blocks, an identity linear head): it predicts
    token 0 at every position, and the seed in "late" adds to one logit. So which positions each
    variant gets right depends only on the labels."""
    spec = HostSpec("rigged", "transformer", 4, (4, 4, 4), 4, heads=1, context=8)
    torch.manual_seed(0)
    model = MorphogeneticModel(TransformerHost(spec), ["late"], CFG)
    head = nn.Linear(4, 4)
    with torch.no_grad():
        head.weight.copy_(torch.eye(4)), head.bias.zero_()
    model.host.stem, model.host.head = ConstantStream(), head
    model.host.blocks = nn.ModuleList(nn.Identity() for _ in range(3))
    drive(model, "late", B.BLUEPRINT_NORM, stage)
    model.slots["late"].seed, model.slots["late"].alpha = delta, alpha
    y = torch.tensor(VAL_Y)
    data = Dataset("rigged", y, y, y, y, y, y, num_classes=4, mean=(), std=(), kind="tokens")
    # eval_batch_size 3: two batches, the last partial, so pairing must survive concatenation.
    return Trainer(model, data, TrainConfig(eval_batch_size=3), torch.device("cpu"), torch.Generator())


def mean_loss(logits: list[float]) -> float:
    lse = math.log(sum(math.exp(v) for v in logits))
    return sum(lse - logits[t] for seq in VAL_Y for t in seq) / 20


def test_blending_contribution_pairs_per_sequence_and_reports_the_loss_difference():
    """BLENDING seed at alpha 0.3 adds 3 to token 1's logit: with it every position predicts 1,
    without it (alpha 0) every position predicts 0. Per sequence the accuracy difference is
    (#1 - #0) / 5 = [1, -0.2, 0.2, 0]: mean 25 points, SE std / sqrt(4) = 26.3 points. (Paired per
    token it would be 17.6: the tokens of a sequence are not independent samples.)"""
    result = rigged(S.SEED_STAGE_BLENDING, ConstantDelta(1, 10.0, dim=-1), alpha=0.3).evaluate("val")

    diffs = [1.0, -0.2, 0.2, 0.0]
    se = math.sqrt(sum((d - 0.25) ** 2 for d in diffs) / 3 / 4)
    mean, got_se = result.contributions["late"]
    assert mean == pytest.approx(25.0, abs=1e-4)
    assert got_se == pytest.approx(100 * se, abs=1e-4)
    assert result.accuracy == pytest.approx(45.0, abs=1e-4)  # 9 of the 20 next tokens are 1
    with_seed, without = mean_loss([1.0, 3.0, 0.0, 0.0]), mean_loss([1.0, 0.0, 0.0, 0.0])
    assert result.loss == pytest.approx(with_seed, abs=1e-5)
    assert result.loss_contributions["late"] == pytest.approx(without - with_seed, abs=1e-5)


def test_training_contribution_forces_alpha_one_against_the_unchanged_host():
    """A TRAINING seed does not change the output (the host predicts 0: 4 of 20 tokens right), and its
    prospective contribution is measured with alpha forced to 1 (+5 on token 2's logit)."""
    result = rigged(S.SEED_STAGE_TRAINING, ConstantDelta(2, 5.0, dim=-1)).evaluate("val")
    diffs = [0.0, -0.2, -0.4, 0.6]  # (#2 - #0) / 5 per sequence
    mean = sum(diffs) / 4
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 3 / 4)
    assert result.accuracy == pytest.approx(20.0, abs=1e-4)
    assert result.contributions["late"] == pytest.approx((100 * mean, 100 * se), abs=1e-4)
    host, seeded = mean_loss([1.0, 0.0, 0.0, 0.0]), mean_loss([1.0, 0.0, 5.0, 0.0])
    assert result.loss == pytest.approx(host, abs=1e-5)
    assert result.loss_contributions["late"] == pytest.approx(host - seeded, abs=1e-5)


# ----------------------------------------------------------------------------- export
def grown_model() -> MorphogeneticModel:
    """Fossilized attention in "early", mlp BLENDING at alpha 0.6 in "mid", lora TRAINING in "late",
    every weight moved off its init so no seed is the identity."""
    torch.manual_seed(0)
    model = MorphogeneticModel(TransformerHost(TINY_LM), ["early", "mid", "late"], CFG)
    drive(model, "early", B.BLUEPRINT_ATTENTION, S.SEED_STAGE_FOSSILIZED)
    drive(model, "mid", B.BLUEPRINT_MLP, S.SEED_STAGE_BLENDING)
    drive(model, "late", B.BLUEPRINT_LORA, S.SEED_STAGE_TRAINING)
    model.slots["mid"].alpha = 0.6
    perturb(model, 1)
    return model.eval()


def test_export_matches_the_grown_model_and_keeps_the_tied_embedding(tiny_lm_registered, tmp_path):
    """The export computes the grown model's logits, keeps the fossil and the blending seed (not the
    TRAINING one), holds no slot, and the saved copy loads back (weights_only) with equal outputs
    and the LM head still tied to the token embedding."""
    model, x = grown_model(), tokens(4)
    net = export_model(model).eval()
    with torch.no_grad():
        expected = model(x)  # [4, T, vocab]
        torch.testing.assert_close(net(x), expected, rtol=0, atol=1e-5)
    assert not any(isinstance(m, SeedSlot) for m in net.modules())
    kept = model.host_param_count + model.slots["early"].seed_params + model.slots["mid"].seed_params
    assert sum(p.numel() for p in net.parameters()) == kept

    save_exported(model, tmp_path)
    loaded = load_exported(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=1e-5)
    assert loaded[0].tok.weight is loaded[-1].out.weight


# ----------------------------------------------------------------------------- parameters and mask
def _hand_count(blueprint: int, c: int) -> int:
    return {
        B.BLUEPRINT_NORM: 2 * c,  # LayerNorm gamma, beta
        B.BLUEPRINT_LORA: 2 * 8 * c,  # down c -> 8, up 8 -> c, no biases
        B.BLUEPRINT_ATTENTION: 2 * c + (3 * c * c + 3 * c) + (c * c + c),  # LN, qkv, proj
        B.BLUEPRINT_MLP: 2 * c + (4 * c * c + 4 * c) + (4 * c * c + c),  # LN, fc, proj
    }[blueprint]


def test_tinystories_host_and_seed_parameter_counts_come_from_the_modules():
    """The tinystories host: tied embedding 2048 x 128, positions 128 x 128, four blocks of two
    LayerNorms, qkv, proj, fc, proj, and a final LayerNorm: 1,071,872. Seeds match the hand count."""
    host = build_host("tinystories")
    block = 4 * 128 + (3 * 128 * 128 + 3 * 128) + (128 * 128 + 128) + (4 * 128 * 128 + 4 * 128) + (4 * 128 * 128 + 128)
    assert sum(p.numel() for p in host.parameters()) == 2048 * 128 + 128 * 128 + 4 * block + 2 * 128 == 1_071_872
    model = MorphogeneticModel(host, ["early", "mid", "late"])
    for name, blueprint in zip(["early", "mid", "late"], [B.BLUEPRINT_MLP, B.BLUEPRINT_ATTENTION, B.BLUEPRINT_LORA]):
        model.execute(Action(operation=OP.OPERATION_GERMINATE, slot=name, blueprint=blueprint), 1)
        assert model.slots[name].seed_params == seed_param_count(blueprint, 128, "transformer")
        assert model.slots[name].seed_params == _hand_count(blueprint, 128) == model.records[-1].params
    for blueprint in blueprints_for("transformer"):
        assert seed_param_count(blueprint, 32, "transformer") == _hand_count(blueprint, 32)


def test_blueprint_mask_offers_only_the_transformer_blueprints():
    model = MorphogeneticModel(TransformerHost(TINY_LM), ["mid"])
    expected = [B.BLUEPRINT_NORM, B.BLUEPRINT_LORA, B.BLUEPRINT_ATTENTION, B.BLUEPRINT_MLP]
    assert model.blueprints == expected
    germinate = [a.blueprint for a in model.legal_actions() if a.operation == OP.OPERATION_GERMINATE]
    assert germinate == expected
    with pytest.raises(IllegalAction, match="does not fit"):
        model.execute(Action(operation=OP.OPERATION_GERMINATE, slot="mid", blueprint=B.BLUEPRINT_CONV_HEAVY), 1)
    assert B.BLUEPRINT_LORA not in MorphogeneticModel(build_host("synthetic"), ["mid"]).blueprints


# ----------------------------------------------------------------------------- sampling
def test_generate_keeps_the_prompt_crops_to_the_context_and_is_seeded():
    """Prompt longer than the context: the model only ever sees the last `context` tokens; the same
    generator seed gives the same sample; top_k=1 is greedy decoding."""
    model = MorphogeneticModel(TransformerHost(TINY_LM), ["mid"]).eval()
    prompt = tokens(2)[:, :10].repeat(1, 2)  # [2, 20] > context 16
    seen = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    out = generate(model, prompt, 5, TINY_LM.context, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 25) and torch.equal(out[:, :20], prompt)
    assert max(seen) == TINY_LM.context
    again = generate(model, prompt, 5, TINY_LM.context, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    greedy = generate(model, prompt[:, -4:], 1, TINY_LM.context, top_k=1)
    with torch.no_grad():
        assert torch.equal(greedy[:, -1], model(prompt[:, -4:])[:, -1].argmax(-1))


def test_generate_never_draws_an_id_the_tokenizer_lacks():
    """A tokenizer trained on little text has fewer ids than the model's head; `esper sample` passes its
    size and no id from it up is drawn (one had ended in an IndexError as the sample was decoded)."""
    model = MorphogeneticModel(TransformerHost(TINY_LM), ["mid"]).eval()
    prompt = tokens(4)[:, :3] % 5
    drawn = generate(model, prompt, 30, TINY_LM.context, temperature=5.0, generator=torch.Generator().manual_seed(0))
    assert drawn[:, 3:].max() >= 5  # a hot sample of the whole head draws ids past 5
    kept = generate(model, prompt, 30, TINY_LM.context, temperature=5.0, vocab=5,
                    generator=torch.Generator().manual_seed(0))
    assert kept[:, 3:].max() < 5


# ----------------------------------------------------------------------------- an episode
def test_heuristic_episode_grows_transformer_blueprints(tiny_lm_registered):
    """A short heuristic episode on random tokens: the environment trains the transformer through the
    lifecycle, germinating the rotation's transformer blueprints (mlp first), with finite losses."""
    windows = tokens(96)
    data = Dataset("tokens", windows, windows.roll(-1, 1), windows[:32], windows[:32].roll(-1, 1),
                   windows[:32], windows[:32].roll(-1, 1), num_classes=TINY_LM.num_classes, mean=(), std=(),
                   kind="tokens")
    cfg = EnvConfig(task=TINY_LM.name, max_epochs=6, slots=("early", "late"),
                    train=TrainConfig(batch_size=16, max_batches=3, optimizer="adamw", lr=1e-3, seed_lr=1e-3,
                                      eval_batch_size=16),
                    lifecycle=LifecycleConfig(min_training_epochs=1, blend_epochs=1))
    sink = ListSink()
    env = GrowthEnv(cfg, data, torch.device("cpu"), Telemetry("t", sinks=[sink]))
    obs = run_episode(env, HeuristicPolicy(HeuristicConfig(min_epoch_to_germinate=1, plateau_patience=0)), 0)
    assert obs.signals.epoch == 6 and math.isfinite(obs.signals.val_loss)
    assert [r.blueprint for r in env.model.records] == ["mlp", "attention"]  # the rotation's first two


def test_a_training_step_counts_attention_as_its_matrix_products(monkeypatch):
    """Trainer.step_flops counts the fused attention kernel as the same step with attention written out as
    matrix products (softmax(q k^T / sqrt d) v). torch has no FLOP formula for the CPU's fused kernel: it had
    counted 0, which left 11% of a tinystories step out of esper compare's training FLOPs."""
    torch.manual_seed(0)
    model = MorphogeneticModel(TransformerHost(TINY_LM), ["mid"], CFG)
    x = tokens(8)
    data = Dataset("tiny", x, x, x, x, x, x, num_classes=TINY_LM.num_classes, mean=(), std=(), kind="tokens")

    def counted() -> int:
        return Trainer(model, data, TrainConfig(), torch.device("cpu"), torch.Generator()).step_flops(x, x)

    fused = counted()

    def written_out(q, k, v, is_causal):  # [B, H, T, D] each
        t = q.shape[-2]
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # [B, H, T, T]
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        return scores.softmax(-1) @ v  # [B, H, T, D]

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", written_out)
    t, width = TINY_LM.context, TINY_LM.channels[0]
    attention = 3 * len(TINY_LM.channels) * 2 * (2 * 8 * t * t * width)  # 2 products a block, backward 2x forward
    assert fused == counted() and attention > 0.05 * fused, (fused, attention)
