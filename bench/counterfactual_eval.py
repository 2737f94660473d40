"""Counterfactual evaluation: one batched pass against one pass per variant.

`Trainer.evaluate` scores the model and, for a seed in TRAINING or BLENDING, the model with that seed's
alpha forced, in a single forward pass: the host blocks before the slot run once and the batch splits
into copies there (MorphogeneticModel.forward's `variants`). The baseline is what that replaced: a
full validation pass for the model as it is, then another for the variant (here: a copy of the model
with the alpha changed by hand). Both score the same 5,000 validation images in this process,
alternately, best of `--repeats`, with a conv_heavy seed in the cifar10 host's `mid` slot.

    python bench/counterfactual_eval.py --device cuda
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from esper.leyline import SeedStage
from esper.tolaria.augment import eval_batches
from esper.tolaria.trainer import Trainer, TrainConfig

from growth_overhead import cifar10_on_device, grown_model, sync


def batched_s(trainer: Trainer) -> float:
    sync(trainer.device)
    start = time.perf_counter()
    trainer.evaluate("val")  # ends in one device->host transfer
    return time.perf_counter() - start


def separate_s(trainer: Trainer) -> float:
    """The model's pass, then the variant's (alpha forced by editing a copy), each a whole pass."""
    variant = copy.deepcopy(trainer.model)
    slot = variant.slots["mid"]
    slot.alpha = 1.0 if slot.stage == SeedStage.SEED_STAGE_TRAINING else 0.0
    slot.stage = SeedStage.SEED_STAGE_BLENDING
    sync(trainer.device)
    start = time.perf_counter()
    hits = []
    with torch.no_grad():
        for net in (trainer.model.eval(), variant.eval()):
            for xb, yb in eval_batches(trainer.data.val_x, trainer.data.val_y, batch_size=1000,
                                       device=trainer.device, mean=trainer.mean, std=trainer.std,
                                       memory_format=trainer.layout):  # as Trainer.evaluate lays them out
                hits.append((net(xb).argmax(-1) == yb).sum())
    torch.stack(hits).tolist()
    return time.perf_counter() - start


def main() -> None:
    args, device, data, name = cifar10_on_device(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    print(f"# counterfactual evaluation on {name}, torch {torch.__version__}, 5,000 validation images, "
          f"best of {args.repeats}")
    print(f"{'stage':<11}{'batched s':>11}{'separate s':>12}{'speed-up':>10}")
    for stage in ("TRAINING", "BLENDING"):
        torch.manual_seed(0)
        trainer = Trainer(grown_model(stage, device), data, TrainConfig(), device, torch.Generator(device=device))
        batched_s(trainer), separate_s(trainer)  # warm-up
        batched, separate = [], []
        for _ in range(args.repeats):  # alternate, so drift hits both alike
            batched.append(batched_s(trainer))
            separate.append(separate_s(trainer))
        print(f"{stage:<11}{min(batched):>11.3f}{min(separate):>12.3f}{min(separate) / min(batched):>10.2f}")


if __name__ == "__main__":
    main()
