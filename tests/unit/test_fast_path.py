"""The training loop is a plain PyTorch loop, bit for bit; TrainConfig's speed options: bf16 autocast
keeps isolation exact and trains like fp32; a compiled host trains like the eager one, keeps its
checkpoint names, and still grows."""

from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch
from torch._dynamo.utils import counters

from support import train_alone
from esper.kasmina import MorphogeneticModel, build_host
from esper.leyline import Action, Blueprint, Operation, SeedStage
from esper.tolaria.data import Dataset, load_task_data
from esper.tolaria.trainer import Trainer, TrainConfig, cross_entropy

S = SeedStage


def germinate(model: MorphogeneticModel, advance: int = 0) -> None:
    """conv_heavy in `mid`, then `advance` ADVANCEs with every gate's values made to pass."""
    model.execute(Action(operation=Operation.OPERATION_GERMINATE, slot="mid",
                         blueprint=Blueprint.BLUEPRINT_CONV_HEAVY), 0)
    slot = model.slots["mid"]
    for _ in range(advance):
        slot.contribution, slot.epochs_in_stage, slot.alpha = (10.0, 0.1), 10, 1.0
        model.execute(Action(operation=Operation.OPERATION_ADVANCE, slot="mid"), 0)


def trainer(cfg: TrainConfig, model: MorphogeneticModel | None = None) -> Trainer:
    torch.manual_seed(0)
    model = model or MorphogeneticModel(build_host("synthetic"), ["mid"])
    data = load_task_data("synthetic", None)
    return Trainer(model, data, cfg, torch.device("cpu"), torch.Generator().manual_seed(0))


@pytest.mark.parametrize("memory_format, layout", [("contiguous", torch.contiguous_format),
                                                   ("channels_last", torch.channels_last),
                                                   ("auto", torch.channels_last)])  # auto, on the CPU
def test_the_trainer_trains_a_static_host_exactly_as_a_plain_pytorch_loop(memory_format, layout):
    """Esper's loop (slots, on-device loss and hit sums, one sync per epoch) adds no arithmetic: a host
    with an empty slot ends 8 steps bit-identical to the plainest loop over the same batches, in the
    same memory format. So a static arm's accuracy is the plain loop's, and growth is measured against
    an honest baseline."""
    esper = trainer(TrainConfig(max_batches=8, memory_format=memory_format))
    assert esper.model.host.blocks[0][0].weight.is_contiguous(memory_format=layout)
    host = copy.deepcopy(esper.model.host)
    initial = copy.deepcopy(host.state_dict())
    esper.train_epoch()

    train_alone(host, esper.data, torch.Generator().manual_seed(0), steps=8, memory_format=layout)
    trained = esper.model.host.state_dict()
    assert not torch.equal(trained["blocks.0.0.weight"], initial["blocks.0.0.weight"])  # it trained
    torch.testing.assert_close(host.state_dict(), trained, rtol=0, atol=0)


def test_precision_must_be_known():
    with pytest.raises(ValueError, match="fp32 or bf16"):
        TrainConfig(precision="fp16")
    with pytest.raises(ValueError, match="auto, channels_last or contiguous"):
        TrainConfig(memory_format="nhwc")


@pytest.mark.parametrize("dtype, layout", [(torch.bfloat16, torch.contiguous_format),
                                           (torch.float32, torch.channels_last),
                                           (torch.bfloat16, torch.channels_last)])
def test_a_training_seed_stays_isolated_bit_for_bit_in_bf16_and_channels_last(dtype, layout):
    torch.manual_seed(0)
    twin = MorphogeneticModel(build_host("synthetic"), ["mid"])
    grown = copy.deepcopy(twin)
    germinate(grown, advance=1)
    assert grown.slots["mid"].stage == S.SEED_STAGE_TRAINING
    with torch.no_grad():
        for p in grown.slots["mid"].seed.parameters():  # the last conv starts at zero: make f(x) != 0
            p.add_(torch.randn_like(p))
    x, y = torch.randn(8, 3, 16, 16).contiguous(memory_format=layout), torch.randint(0, 4, (8,))
    outputs, grads = [], []
    for model in (grown.to(memory_format=layout), twin.to(memory_format=layout)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = model(x)
            loss = cross_entropy(out, y)
        loss.backward()
        outputs.append(out)
        grads.append([p.grad for p in model.host.parameters()])
    assert outputs[0].dtype == dtype
    assert torch.equal(outputs[0], outputs[1])
    for g_grown, g_twin in zip(*grads, strict=True):
        assert torch.equal(g_grown, g_twin)
    assert any(p.grad.abs().sum() > 0 for p in grown.slots["mid"].seed.parameters())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
def test_cudnn_benchmark_mode_is_turned_on_by_a_cuda_trainer_that_asks_for_it(device, monkeypatch):
    """A process-wide switch: a trainer on CUDA with cudnn_benchmark turns it on (and trains); one on the
    CPU, where cuDNN plays no part, leaves it as it was."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # restored after the test
    data = load_task_data("synthetic", None).to(torch.device(device))
    t = Trainer(MorphogeneticModel(build_host("synthetic"), ["mid"]).to(device), data,
                TrainConfig(max_batches=2, cudnn_benchmark=True), torch.device(device),
                torch.Generator(device=device).manual_seed(0))
    assert torch.backends.cudnn.benchmark == (device == "cuda")
    loss, _ = t.train_epoch()
    assert torch.isfinite(torch.tensor(loss))  # and trains under it


def test_a_seed_takes_the_layout_of_the_model_it_joins():
    """A seed germinated mid-run gets channels_last weights before its first step, as the host has."""
    t = trainer(TrainConfig(max_batches=2, memory_format="channels_last"))
    germinate(t.model, advance=1)
    weight = t.model.slots["mid"].seed.get_parameter(next(n for n, p in t.model.slots["mid"].seed.named_parameters()
                                                          if p.dim() == 4))
    assert not weight.is_contiguous(memory_format=torch.channels_last)
    t.train_epoch()
    assert weight.is_contiguous(memory_format=torch.channels_last)  # the same Parameter, its layout changed


def test_bf16_trains_and_evaluates_like_fp32():
    """Same data, same start: after two epochs the losses agree to a few percent, and the weights and
    optimizer state stay fp32."""
    results = {}
    for precision in ("fp32", "bf16"):
        t = trainer(TrainConfig(max_batches=20, precision=precision))
        germinate(t.model, advance=2)  # BLENDING, so evaluation runs the counterfactual copy too
        losses = [t.train_epoch()[0] for _ in range(2)]
        results[precision] = losses, t.evaluate("val")
        assert all(p.dtype == torch.float32 for p in t.model.parameters())
    (fp32_losses, fp32_eval), (bf16_losses, bf16_eval) = results["fp32"], results["bf16"]
    assert bf16_losses != fp32_losses  # bf16 really ran
    assert bf16_losses[-1] == pytest.approx(fp32_losses[-1], rel=0.05)
    assert bf16_eval.loss == pytest.approx(fp32_eval.loss, rel=0.05)
    assert abs(bf16_eval.accuracy - fp32_eval.accuracy) < 5.0
    assert set(bf16_eval.contributions) == {"mid"}


@pytest.mark.skipif(not shutil.which(os.environ.get("CXX", "g++")),
                    reason="torch.compile on the CPU needs a C++ compiler (.ci/run installs g++)")
@torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)  # instead of falling back to eager, silently
def test_compiled_host_trains_like_eager_and_still_grows():
    # 2,048 images in batches of 96: a last batch of 32, a second shape for every compiled part, as in a
    # real epoch (45,000 / 128), so training and evaluation together need more than dynamo's default 8
    # compiled variants of the code all parts share.
    eager = trainer(TrainConfig(batch_size=96, max_batches=0))
    compiled = trainer(TrainConfig(batch_size=96, max_batches=0, compile=True))
    assert list(compiled.model.state_dict()) == list(eager.model.state_dict())  # checkpoints unchanged
    losses = {}
    for name, t in (("eager", eager), ("compiled", compiled)):
        counters.clear()
        t.train_epoch()
        germinate(t.model, advance=2)  # a lifecycle move between compiled blocks: BLENDING
        t.train_epoch()
        losses[name] = t.train_epoch()[0]
        graphs = counters["stats"]["unique_graphs"]
        # dynamo falls back to eager silently: the three conv blocks and the head must have been compiled
        assert graphs == 0 if t is eager else graphs >= 4
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-3)
    assert compiled.train_flops == eager.train_flops  # counted eagerly, whatever compiling makes of it
    # Three epochs amplify kernel rounding: validation losses measured 0.1-0.4% apart (1 or 2 threads,
    # either memory format); a compiled part that computed something else would be far off.
    assert compiled.evaluate("val", counterfactual=False).loss == pytest.approx(
        eager.evaluate("val", counterfactual=False).loss, rel=1e-2)
    val_e, val_c = eager.evaluate("val"), compiled.evaluate("val")
    assert val_c.loss == pytest.approx(val_e.loss, rel=1e-2)
    assert val_c.contributions["mid"][0] == pytest.approx(val_e.contributions["mid"][0], abs=0.5)
    weight = compiled.model.host.blocks[0][0].weight  # sharpness's double backward needs an eager graph
    grad, = torch.autograd.grad(compiled.fixed_batch_loss(), weight, create_graph=True)
    assert torch.autograd.grad(grad.square().sum(), weight)[0].abs().sum() > 0


@pytest.mark.skipif(not shutil.which(os.environ.get("CXX", "g++")),
                    reason="torch.compile on the CPU needs a C++ compiler (.ci/run installs g++)")
@torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)
def test_a_deep_compiled_host_trains_and_evaluates_without_falling_back():
    """cifar10_deep: five conv blocks and the head compiled, in training and in evaluation, are 12
    compiled variants of the one code their compiled calls share, past dynamo's default limit of 8
    (which the trainer raises). 32x32 images of noise: only the shapes matter here."""
    images = torch.randint(0, 256, (320, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 10, (320,), generator=torch.Generator().manual_seed(1))
    data = Dataset("noise", images[:256], labels[:256], images[256:288], labels[256:288], images[288:], labels[288:],
                   num_classes=10, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    torch.manual_seed(0)
    model = MorphogeneticModel(build_host("cifar10_deep"), ["mid"])
    t = Trainer(model, data, TrainConfig(batch_size=64, max_batches=0, compile=True), torch.device("cpu"),
                torch.Generator().manual_seed(0))
    counters.clear()
    t.train_epoch()
    t.evaluate("val")
    assert counters["stats"]["unique_graphs"] >= 12


def test_a_training_steps_flops_count_its_backward_pass():
    """A training step is the forward pass and a backward pass of about twice its FLOPs (a gradient for each
    layer's input and one for its weights; the first layer's input needs none): between 2x and 3x the
    forward's. Every other FLOP test compares two counts made the same way, which a count of the forward
    alone would pass."""
    from torch.utils.flop_counter import FlopCounterMode

    t = trainer(TrainConfig(batch_size=32))
    xb = torch.randn(32, *t.data.train_x.shape[1:])
    yb = torch.randint(t.data.num_classes, (32,))
    step = t.step_flops(xb, yb)
    with FlopCounterMode(display=False) as counter:
        t.model(xb)
    assert 2.0 * counter.get_total_flops() < step < 3.0 * counter.get_total_flops()
