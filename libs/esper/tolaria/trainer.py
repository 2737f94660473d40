"""Training and evaluation loops for a MorphogeneticModel.

The host and every fossilized seed share one SGD optimizer; each live seed has its own, so culling a
seed throws away its optimizer state with it. Optimizers are re-derived from the model's slots at the
start of each epoch (`sync_optimizers`) instead of being told about every lifecycle move.
Inside the batch loop there is no `.item()`: losses and hits accumulate on the device and cross to
the host once per epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from esper.kasmina import MorphogeneticModel
from esper.kasmina.lifecycle import LIVE_STAGES
from esper.leyline import SeedStage
from esper.tolaria.augment import eval_batches, train_batches
from esper.tolaria.data import Dataset

S = SeedStage


@dataclass(frozen=True)
class TrainConfig:
    """Optimizer and batching; the defaults are the original tool's."""

    batch_size: int = 128
    max_batches: int = 50
    """Training batches per epoch; 0 = the whole training split."""
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed_lr: float = 0.01
    """Learning rate of each live seed's own SGD (same momentum and weight decay as the host)."""
    augment: bool = True
    """Random crop (pad 4) and horizontal flip, as batched tensor ops."""
    eval_batch_size: int = 1000


@dataclass
class EvalResult:
    loss: float
    accuracy: float  # percent
    contributions: dict[str, tuple[float, float]]  # slot -> (mean, standard error), accuracy points


class Trainer:
    def __init__(self, model: MorphogeneticModel, data: Dataset, cfg: TrainConfig,
                 device: torch.device, generator: torch.Generator):
        self.model = model
        self.data = data
        self.cfg = cfg
        self.device = device
        self.generator = generator
        self.mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
        self.host_opt = self._sgd(model.host_parameters(), cfg.lr)
        self.seed_opts: dict[int, torch.optim.SGD] = {}

    def _sgd(self, params, lr: float) -> torch.optim.SGD:
        return torch.optim.SGD(params, lr=lr, momentum=self.cfg.momentum, weight_decay=self.cfg.weight_decay)

    def sync_optimizers(self) -> None:
        """Give new live seeds an optimizer; hand fossilized seeds (with momentum) to the host's; drop culled."""
        slots_by_id = {s.seed_id: s for s in self.model.slots.values() if s.seed is not None}
        for seed_id, opt in list(self.seed_opts.items()):
            slot = slots_by_id.get(seed_id)
            if slot is not None and slot.stage in LIVE_STAGES:
                continue
            if slot is not None and slot.stage == S.SEED_STAGE_FOSSILIZED:
                params = list(slot.seed.parameters())
                self.host_opt.add_param_group({"params": params})
                for p in params:
                    if p in opt.state:
                        self.host_opt.state[p] = opt.state[p]
            del self.seed_opts[seed_id]
        for seed_id, slot in slots_by_id.items():
            if slot.stage in LIVE_STAGES and seed_id not in self.seed_opts:
                self.seed_opts[seed_id] = self._sgd(slot.seed.parameters(), self.cfg.seed_lr)

    def reset_momentum(self) -> None:
        """After a rollback the momentum buffers describe weights that no longer exist."""
        self.host_opt.state.clear()

    def train_epoch(self) -> tuple[float, float]:
        """One epoch; returns (mean loss, accuracy %) with a single device->host transfer."""
        self.sync_optimizers()
        model, data = self.model, self.data
        optimizers = [self.host_opt, *self.seed_opts.values()]
        model.train()
        loss_sum = torch.zeros((), device=self.device)
        hits = torch.zeros((), device=self.device, dtype=torch.long)
        seen = 0
        for xb, yb in train_batches(
            data.train_x, data.train_y, batch_size=self.cfg.batch_size, max_batches=self.cfg.max_batches,
            generator=self.generator, device=self.device, mean=self.mean, std=self.std,
            augment=self.cfg.augment,
        ):
            logits = model(xb)  # [B, classes]
            loss = F.cross_entropy(logits, yb)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in optimizers:
                opt.step()
            loss_sum += loss.detach() * yb.shape[0]
            hits += (logits.detach().argmax(1) == yb).sum()
            seen += yb.shape[0]
        loss_mean, accuracy = torch.stack([loss_sum / seen, hits * 100.0 / seen]).tolist()
        return loss_mean, accuracy

    def seed_grad_norms(self) -> dict[str, float]:
        """L2 norm of each live seed's gradient from the last batch (debug telemetry)."""
        norms = {}
        for name, slot in self.model.live_seeds().items():
            grads = [p.grad.flatten() for p in slot.seed.parameters() if p.grad is not None]
            norms[name] = float(torch.cat(grads).norm()) if grads else 0.0
        return norms

    @torch.no_grad()
    def evaluate(self, split: str = "val", counterfactual: bool = True) -> EvalResult:
        """Loss and accuracy on `split`; with `counterfactual`, each TRAINING/BLENDING slot's paired
        contribution: accuracy with the seed minus without it, per image, and its standard error."""
        model = self.model
        model.eval()
        x, y = (self.data.val_x, self.data.val_y) if split == "val" else (self.data.test_x, self.data.test_y)
        probes = {name: slot for name, slot in model.live_seeds().items()
                  if counterfactual and slot.stage in (S.SEED_STAGE_TRAINING, S.SEED_STAGE_BLENDING)}
        loss_sum = torch.zeros((), device=self.device)
        hits, probe_hits = [], {name: [] for name in probes}
        for xb, yb in eval_batches(x, y, batch_size=self.cfg.eval_batch_size, device=self.device,
                                   mean=self.mean, std=self.std):
            logits = model(xb)
            loss_sum += F.cross_entropy(logits, yb, reduction="sum")
            hits.append(logits.argmax(1) == yb)
            for name, slot in probes.items():
                # TRAINING: "with" is alpha forced to 1; BLENDING: "without" is alpha forced to 0.
                slot.alpha_override = 1.0 if slot.stage == S.SEED_STAGE_TRAINING else 0.0
                try:
                    probe_hits[name].append(model(xb).argmax(1) == yb)
                finally:
                    slot.alpha_override = None
        base = torch.cat(hits).float()  # [N]
        n = base.numel()
        stats = [loss_sum / n, base.mean() * 100]
        for name, slot in probes.items():
            other = torch.cat(probe_hits[name]).float()
            diff = other - base if slot.stage == S.SEED_STAGE_TRAINING else base - other  # with - without
            stats += [diff.mean() * 100, diff.std() * 100 / math.sqrt(n)]
        values = torch.stack(stats).tolist()
        contributions = {name: (values[2 + 2 * i], values[3 + 2 * i]) for i, name in enumerate(probes)}
        return EvalResult(loss=values[0], accuracy=values[1], contributions=contributions)
