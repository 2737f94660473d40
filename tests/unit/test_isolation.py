"""Gradient isolation and blending, proven numerically on the tiny synthetic CNN and a tiny transformer.

The lifecycle contract (DESIGN.md): while TRAINING the host's forward values are exactly unchanged by
the seed and the host receives no gradient from the seed path, while the seed learns from the host's
error signal; while BLENDING the output moves from host to host+seed as alpha ramps; a fossilized seed
is ordinary host structure for every later seed. Each test below compares two runs that differ only
in the property under test, so a leak shows up as a bit or gradient that differs. Every test runs on
both host kinds, with each blueprint of that kind where the blueprint matters.
"""

from __future__ import annotations

import copy

import pytest
import torch

from support import TINY_LM
from esper.kasmina import LifecycleConfig, MorphogeneticModel, build_host
from esper.kasmina.blueprints import blueprints_for
from esper.kasmina.hosts import CNNHost, HostSpec, TransformerHost
from esper.leyline import Action, Blueprint, Operation, SeedStage, short_name
from esper.tolaria.trainer import cross_entropy

S = SeedStage
OP = Operation
B = Blueprint
CFG = LifecycleConfig(min_training_epochs=0, blend_epochs=1, embargo_epochs=0)
KINDS = ("cnn", "transformer")
CASES = [(kind, b) for kind in KINDS for b in blueprints_for(kind)]
CASE_IDS = [f"{kind}-{short_name(Blueprint, b)}" for kind, b in CASES]
SLOTS = ["early", "mid", "late"]
# Per kind: the fossil in "early" behind every test, a heavier seed, a light one.
FOSSIL = {"cnn": B.BLUEPRINT_CONV_LIGHT, "transformer": B.BLUEPRINT_MLP}
HEAVY = {"cnn": B.BLUEPRINT_CONV_HEAVY, "transformer": B.BLUEPRINT_ATTENTION}
LIGHT = {"cnn": B.BLUEPRINT_CONV_LIGHT, "transformer": B.BLUEPRINT_LORA}


def drive(model: MorphogeneticModel, slot_name: str, blueprint: int, stage: int) -> None:
    """Germinate and ADVANCE through the real gates until `slot_name` is in `stage`."""
    slot = model.slots[slot_name]
    model.execute(Action(operation=OP.OPERATION_GERMINATE, slot=slot_name, blueprint=blueprint), 1)
    while slot.stage != stage:
        slot.contribution = (10.0, 0.0)  # evidence that passes G_blend and G_fossilize
        if slot.stage == S.SEED_STAGE_BLENDING:
            slot.alpha = 1.0  # G_fossilize also wants a finished ramp
        out = model.execute(Action(operation=OP.OPERATION_ADVANCE, slot=slot_name), 1)
        assert out.transitions, [g.reason for g in out.gates]


def perturb(module: torch.nn.Module, seed: int) -> None:
    """Move every parameter off its init so f(x) != 0: isolation must not rest on a zero-init layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))


def base_model(kind: str = "cnn") -> MorphogeneticModel:
    """Synthetic CNN or tiny transformer host with a (non-trivial) fossilized seed in "early"; "mid"
    and "late" dormant. Both hosts have three blocks."""
    torch.manual_seed(0)
    host = build_host("synthetic") if kind == "cnn" else TransformerHost(TINY_LM)
    model = MorphogeneticModel(host, SLOTS, CFG)
    drive(model, "early", FOSSIL[kind], S.SEED_STAGE_FOSSILIZED)
    perturb(model.slots["early"].seed, 1)
    return model.train()


def batch(kind: str = "cnn", n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [n, 3, 16, 16] and labels [n], or token windows [n, T] and next tokens [n, T]."""
    g = torch.Generator().manual_seed(123)
    if kind == "cnn":
        return torch.randn(n, 3, 16, 16, generator=g), torch.randint(4, (n,), generator=g)
    return tuple(torch.randint(TINY_LM.num_classes, (n, TINY_LM.context), generator=g) for _ in range(2))


def capture(slot: torch.nn.Module) -> dict:
    """Record the slot's input, output and the gradient arriving at its output."""
    seen: dict = {}

    def hook(_module, inputs, output):
        seen["x"], seen["out"] = inputs[0], output
        if output.requires_grad:
            output.register_hook(lambda g: seen.__setitem__("grad_out", g))

    slot.register_forward_hook(hook)
    return seen


def host_grads(model: MorphogeneticModel) -> list[torch.Tensor]:
    """Gradients of host_parameters(): the host's own plus every fossilized seed's."""
    return [p.grad.clone() for p in model.host_parameters()]


def upstream_params(model: MorphogeneticModel) -> list[torch.nn.Parameter]:
    """Host structure before the "mid" slot: block 0 and the fossilized "early" seed."""
    return [*model.host.blocks[0].parameters(), *model.slots["early"].seed.parameters()]


def forward_with_constant_delta(model: MorphogeneticModel, x: torch.Tensor, alpha: float, slot_name: str):
    """The model's forward, except `slot_name` adds alpha * f(x) as a constant (no graph to f or x)."""
    x = model.host.stem(x)
    for i, block in enumerate(model.host.blocks):
        x = block(x)
        if i in model.slot_after:
            name = model.slot_after[i]
            if name == slot_name:
                with torch.no_grad():
                    delta = model.slots[name].seed(x)
                x = x + alpha * delta
            else:
                x = model.slots[name](x)
    return model.host.head(x)


# ----------------------------------------------------------------------------- TRAINING
@pytest.mark.parametrize("kind, blueprint", CASES, ids=CASE_IDS)
def test_training_seed_leaves_host_forward_and_gradients_bit_identical(kind, blueprint):
    """A TRAINING seed (perturbed so f(x) != 0) behind a fossilized seed: host outputs and every
    host-parameter gradient are bit-identical to a twin whose slot is DORMANT, the slot's output is
    its input exactly, and a step on the seed alone cannot change the host's outputs."""
    base = base_model(kind)
    grown, twin = copy.deepcopy(base), copy.deepcopy(base)
    drive(grown, "mid", blueprint, S.SEED_STAGE_TRAINING)
    seed = grown.slots["mid"].seed
    perturb(seed, 2)
    seen = capture(grown.slots["mid"])
    x, y = batch(kind)

    out_grown, out_twin = grown(x), twin(x)
    assert torch.equal(out_grown, out_twin)
    assert torch.equal(seen["out"], seen["x"])
    with torch.no_grad():
        assert seed(seen["x"]).abs().max() > 0  # the seed really computes something non-zero

    cross_entropy(out_grown, y).backward()
    cross_entropy(out_twin, y).backward()
    for g_grown, g_twin in zip(host_grads(grown), host_grads(twin), strict=True):
        assert torch.equal(g_grown, g_twin)
    assert any(p.grad.abs().sum() > 0 for p in grown.slots["early"].seed.parameters())

    # Straight-through: the seed's gradient is the host's error signal dL/dx pushed through f.
    delta = seed(seen["x"].detach())
    expected = torch.autograd.grad((delta * seen["grad_out"]).sum(), list(seed.parameters()))
    for p, e in zip(seed.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-7)
    assert any(p.grad.abs().sum() > 0 for p in seed.parameters())

    before = [p.detach().clone() for p in seed.parameters()]
    torch.optim.SGD(seed.parameters(), lr=1.0).step()
    assert any(not torch.equal(b, p) for b, p in zip(before, seed.parameters()))
    assert torch.equal(grown(x), twin(x))


@pytest.mark.parametrize("kind", KINDS)
def test_a_diverged_training_seed_leaves_the_host_bit_identical(kind):
    """A TRAINING seed whose output is not finite (weights gone to inf: inf - inf is NaN) changes nothing of
    the host either: its outputs and gradients equal the DORMANT twin's, bit for bit. x + (f - f.detach())
    had been NaN there, and the governor had rolled the whole run back for a seed's fault."""
    base = base_model(kind)
    grown, twin = copy.deepcopy(base), copy.deepcopy(base)
    drive(grown, "mid", HEAVY[kind], S.SEED_STAGE_TRAINING)
    seed = grown.slots["mid"].seed
    with torch.no_grad():
        for p in seed.parameters():
            p.fill_(float("inf"))
    seen = capture(grown.slots["mid"])
    x, y = batch(kind)
    out_grown, out_twin = grown(x), twin(x)
    with torch.no_grad():
        assert not torch.isfinite(seed(seen["x"])).all()
    assert torch.equal(out_grown, out_twin)
    cross_entropy(out_grown, y).backward()
    cross_entropy(out_twin, y).backward()
    for g_grown, g_twin in zip(host_grads(grown), host_grads(twin), strict=True):
        assert torch.equal(g_grown, g_twin)


@pytest.mark.parametrize("kind, blueprint", CASES, ids=CASE_IDS)
def test_fresh_training_seed_gets_nonzero_gradient_despite_zero_init(kind, blueprint):
    """Every blueprint's last layer starts at zero, yet the fresh seed must learn: at least one of its
    parameters gets a non-zero gradient from the host's loss (a dead seed would never leave zero)."""
    model = base_model(kind)
    drive(model, "mid", blueprint, S.SEED_STAGE_TRAINING)
    x, y = batch(kind)
    cross_entropy(model(x), y).backward()
    grads = [p.grad for p in model.slots["mid"].seed.parameters()]
    assert all(g is not None for g in grads)
    assert max(float(g.abs().max()) for g in grads) > 1e-6


@pytest.mark.parametrize("kind, blueprint", CASES, ids=CASE_IDS)
def test_fresh_seed_is_the_identity_even_at_full_alpha(kind, blueprint):
    """Right after germination f(x) == 0, so forcing alpha to 1 leaves the outputs equal to the host's."""
    base = base_model(kind)
    grown, twin = copy.deepcopy(base), copy.deepcopy(base)
    drive(grown, "mid", blueprint, S.SEED_STAGE_GERMINATED)
    x, _ = batch(kind)
    assert torch.equal(grown(x), twin(x))
    advance = Action(operation=OP.OPERATION_ADVANCE, slot="mid")
    assert grown.execute(advance, 1).transitions[0].to_stage == S.SEED_STAGE_TRAINING
    grown.eval(), twin.eval()  # forced alphas are an evaluation-time view (the counterfactual)
    as_is, at_full_alpha = grown(x, variants=(("mid", 1.0),)).chunk(2)
    torch.testing.assert_close(as_is, twin(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(at_full_alpha, twin(x), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- BLENDING
@pytest.mark.parametrize("kind, blueprint", CASES, ids=CASE_IDS)
def test_blending_output_is_lerp_and_upstream_host_gets_no_seed_gradient(kind, blueprint):
    """At alpha 0.3 the slot outputs lerp(x, x + f(x), 0.3), and every host gradient (upstream ones
    included) equals a reference where the seed's delta is added as a detached constant."""
    alpha = 0.3
    model = base_model(kind)
    drive(model, "mid", blueprint, S.SEED_STAGE_BLENDING)
    slot = model.slots["mid"]
    slot.alpha = alpha
    perturb(slot.seed, 3)
    ref = copy.deepcopy(model)
    seen = capture(slot)
    x, y = batch(kind)

    out = model(x)
    with torch.no_grad():
        f = slot.seed(seen["x"])
    assert f.abs().max() > 0
    # Tolerance: lerp rounds (x + f) - x, a few ulps off x + alpha * f where |f| is large.
    torch.testing.assert_close(seen["out"], torch.lerp(seen["x"], seen["x"] + f, alpha), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(seen["out"], seen["x"])

    out_ref = forward_with_constant_delta(ref, x, alpha, "mid")
    torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-6)
    cross_entropy(out, y).backward()
    cross_entropy(out_ref, y).backward()
    for p, q in zip(upstream_params(model), upstream_params(ref), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-8)
    for g, h in zip(host_grads(model), host_grads(ref), strict=True):
        torch.testing.assert_close(g, h, rtol=1e-6, atol=1e-8)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in slot.seed.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_blending_output_moves_from_host_to_host_plus_seed_as_alpha_ramps(kind):
    """Along the ramp the slot's output is x + a*f(x): alpha 0 gives exactly the host's output (as
    if the slot were DORMANT), alpha 1 gives host + f, and every alpha in between the lerp."""
    model = base_model(kind).eval()
    drive(model, "late", LIGHT[kind], S.SEED_STAGE_BLENDING)
    slot = model.slots["late"]
    perturb(slot.seed, 4)
    seen = capture(slot)
    x, _ = batch(kind)
    with torch.no_grad():
        outs = {}
        for a in (0.0, 0.25, 0.5, 1.0):
            slot.alpha = a
            logits = model(x)
            outs[a] = (logits, seen["out"])
        x_in, f = seen["x"], slot.seed(seen["x"])
        slot.stage = S.SEED_STAGE_DORMANT
        host_logits = model(x)
    assert f.abs().max() > 0
    assert torch.equal(outs[0.0][0], host_logits)
    for a, (_, out) in outs.items():
        torch.testing.assert_close(out, x_in + a * f, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(outs[1.0][0], host_logits, atol=1e-4)


# ----------------------------------------------------------------------------- FOSSILIZED
@pytest.mark.parametrize("kind", KINDS)
def test_fossilized_seed_is_full_strength_and_passes_gradient_to_upstream_host(kind):
    """Fossilized: alpha == 1, the slot outputs x + f(x), and upstream host parameters now receive
    gradient through the seed: they differ from the detached-seed reference and equal a plain x + f(x)."""
    model = base_model(kind)
    drive(model, "mid", HEAVY[kind], S.SEED_STAGE_FOSSILIZED)
    slot = model.slots["mid"]
    assert slot.alpha == 1.0
    perturb(slot.seed, 5)
    detached, plain = copy.deepcopy(model), copy.deepcopy(model)
    seen = capture(slot)
    x, y = batch(kind)

    out = model(x)
    with torch.no_grad():
        f = slot.seed(seen["x"])
    torch.testing.assert_close(seen["out"], seen["x"] + f, rtol=1e-6, atol=1e-6)

    cross_entropy(out, y).backward()
    cross_entropy(forward_with_constant_delta(detached, x, 1.0, "mid"), y).backward()
    plain.slots["mid"].seed.train()
    h = plain.host.blocks[0](plain.host.stem(x))
    h = plain.slots["early"](h)
    h = plain.host.blocks[1](h)
    h = h + plain.slots["mid"].seed(h)
    h = plain.slots["late"](plain.host.blocks[2](h))
    cross_entropy(plain.host.head(h), y).backward()

    ours, cut, full = upstream_params(model), upstream_params(detached), upstream_params(plain)
    assert any(not torch.allclose(p.grad, q.grad, rtol=1e-3, atol=1e-6) for p, q in zip(ours, cut))
    for p, q in zip(ours, full, strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    host_ids = {id(p) for p in model.host_parameters()}
    assert all(id(p) in host_ids for p in slot.seed.parameters())


def test_slots_that_would_share_a_block_are_refused():
    """On a host of two blocks early and mid both follow block 0: one of them would never run."""
    host = CNNHost(HostSpec("two_blocks", "cnn", 3, (8, 16), 4))
    with pytest.raises(ValueError, match="slots early, mid share a block"):
        MorphogeneticModel(host, ("early", "mid"), LifecycleConfig())
    assert list(MorphogeneticModel(host, ("early", "late"), LifecycleConfig()).slots) == ["early", "late"]
