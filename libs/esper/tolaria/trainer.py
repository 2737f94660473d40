"""Training and evaluation loops for a MorphogeneticModel.

The host and every fossilized seed share one optimizer; each live seed has its own, so culling a
seed throws away its optimizer state with it. Optimizers are re-derived from the model's slots at the
start of each epoch (`sync_optimizers`) instead of being told about every lifecycle move.
Inside the batch loop there is no `.item()`: losses and hits accumulate on the device and cross to
the host once per epoch.

One loop serves classifiers and language models: the loss is cross-entropy over the logits' last
dimension ([B, classes] against [B] labels, or [B, T, vocab] against [B, T] next tokens), accuracy
counts targets (images, or tokens), and the counterfactual pairs per item (an image, or a sequence).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from esper.kasmina import MorphogeneticModel
from esper.kasmina.lifecycle import LIVE_STAGES
from esper.leyline import SeedStage
from esper.tolaria.augment import eval_batches, train_batches
from esper.tolaria.data import Dataset

S = SeedStage


# Training settings that differ from TrainConfig's (the CNN recipe), per task. The transformer trains
# with AdamW (SGD leaves it far behind at these budgets) on 16 windows of 128 tokens a step (about
# 0.2 s on one CPU core) and evaluates 64 windows at a time ([64, 128, 2048] logits: 67 MB, and as much
# again per seed the counterfactual probes in the same pass). lr 1e-3: after 10 epochs of 50 batches,
# validation loss 3.79 against 4.02 at 5e-4 and 4.40 at 2e-3 (no warmup, so a larger step overshoots early).
TASK_RECIPES: dict[str, dict] = {
    "tinystories": dict(batch_size=16, optimizer="adamw", lr=1e-3, seed_lr=1e-3, weight_decay=0.01,
                        augment=False, eval_batch_size=64),
}


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
    """Learning rate of each live seed's own optimizer (same settings as the host's)."""
    optimizer: str = "sgd"
    """sgd (with `momentum`: the CNN recipe) | adamw (betas 0.9, 0.99: the transformer's, which SGD
    trains far more slowly)."""
    augment: bool = True
    """Random crop (pad 4) and horizontal flip, as batched tensor ops (images only: token windows are
    never augmented)."""
    eval_batch_size: int = 1000
    precision: str = "fp32"
    """fp32 | bf16: bf16 runs the forward passes (training and evaluation) under autocast, matmuls and
    convolutions in bfloat16; weights, gradients, optimizer state and the losses stay fp32. Isolation
    is exact in both (a TRAINING seed's output passes through kasmina.slot.straight_through, whose value is
    the host's own in any precision)."""
    compile: bool = False
    """torch.compile the host's stem, blocks and head: the parts that never change shape. The slots
    and seeds between them stay eager, because a compiled whole model would recompile at every
    lifecycle move and every alpha step of a blend."""
    memory_format: str = "auto"
    """auto | channels_last | contiguous: how image batches and convolution weights lie in memory.
    channels_last trained the cifar10 host 1.63x faster on a 2-core CPU (1.52x with a seed blending), in
    fp32, with nothing else changed (bench/results/cpu_fast_path.txt); auto takes it on the CPU and stays
    contiguous on CUDA, where on an H100 channels_last trained the host at 0.90x and a blending model at
    1.02x. Token windows have no channels: a language model ignores this."""
    cudnn_benchmark: bool = False
    """cuDNN's benchmark mode on CUDA: each convolution shape times cuDNN's algorithms once and keeps the
    fastest, instead of cuDNN's guess. A process-wide switch (torch.backends.cudnn.benchmark), turned on by
    the process's first Trainer on CUDA that asks for it; nothing on a CPU. It may choose a different
    algorithm in another process, so runs agree only to floating-point order. Off by default: on an H100
    (bench/concurrency.py --cudnn-benchmark, grouped runs) it made no difference that outlasted the noise:
    eight grouped static runs at 197,000 to 252,000 images/s with it, 202,000 to 211,000 without."""
    cuda_graph: bool = True
    """Grouped runs on CUDA (tolaria.grouped): each epoch's training step is captured as a CUDA graph and
    replayed (CapturedStep), so the CPU's kernel launches no longer pace a small host's step. On an H200 a
    group of one trained 3.4x as fast so, eight grouped runs 1.13x and 1.07x (two invocations of
    bench/concurrency.py --cuda-graph off on, the second capturing in cuDNN's benchmark mode); its kernels may
    differ from the eager step's, so results agree to float order. Nothing on a CPU, nor for tolaria's plain
    Trainer: on CUDA `esper train` trains even one run as a group of one for it (cli.episodes_grouped)."""

    @classmethod
    def for_task(cls, task: str, **fields) -> "TrainConfig":
        """The task's recipe (TASK_RECIPES, or the defaults), with `fields` set over it."""
        return cls(**{**TASK_RECIPES.get(task, {}), **fields})

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, not {self.precision!r}")
        if self.memory_format not in ("auto", "channels_last", "contiguous"):
            raise ValueError(f"memory_format must be auto, channels_last or contiguous, not {self.memory_format!r}")


def make_optimizer(params, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """The optimizer TrainConfig names, at `lr` (the host's, or a live seed's seed_lr)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":  # beta2 0.99: nanoGPT's choice for few tokens per step
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be sgd or adamw, not {cfg.optimizer!r}")


def layout(memory_format: str, device: torch.device) -> torch.memory_format:
    """TrainConfig.memory_format on `device`, for image batches and convolution weights."""
    if memory_format == "channels_last" or (memory_format == "auto" and device.type == "cpu"):
        return torch.channels_last
    return torch.contiguous_format


def cross_entropy(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Over the last dim: [B, classes] logits for [B] labels, or [B, T, vocab] for [B, T] next tokens."""
    if logits.dim() > 2:  # a row per token; images' logits go as they are (flattening them costs two operators)
        logits, y = logits.flatten(0, -2), y.flatten()
    return F.cross_entropy(logits, y, reduction=reduction)


def item_accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[B] fraction of each item's targets predicted right: 0 or 1 per image, a sequence's next-token
    accuracy. Counterfactuals pair and take standard errors per item, because the tokens of one
    sequence are not independent: a per-token standard error would be too small."""
    return (logits.argmax(-1) == y).view(len(y), -1).float().mean(1)


@dataclass
class EvalResult:
    loss: float  # mean cross-entropy per target (image, or token)
    accuracy: float  # percent of targets
    contributions: dict[str, tuple[float, float]]  # slot -> (mean, standard error), accuracy points
    loss_contributions: dict[str, float] = field(default_factory=dict)
    """slot -> validation loss without the seed minus with it (positive: the seed helps)."""


class Trainer:
    def __init__(self, model: MorphogeneticModel, data: Dataset, cfg: TrainConfig,
                 device: torch.device, generator: torch.Generator):
        self.model = model
        self.data = data
        self.cfg = cfg
        self.device = device
        self.generator = generator
        # Images are normalized per batch; token windows go to the model as they are (mean None).
        images = data.kind == "images"
        self.mean, self.std = data.channel_stats(device) if images else (None, None)
        self.layout = layout(cfg.memory_format, device) if images else torch.contiguous_format
        """Of every batch the model sees, and of its weights: the host's now, each seed's as it joins."""
        model.to(memory_format=self.layout)  # in place: the parameters stay the same objects
        if cfg.cudnn_benchmark and device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.host_opt = make_optimizer(model.host_parameters(), cfg, cfg.lr)
        self.seed_opts: dict[int, torch.optim.Optimizer] = {}
        self.train_flops = 0
        """Forward + backward FLOPs of every training step so far (counted by torch's FlopCounterMode)."""
        self._step_flops: dict[tuple, int] = {}  # architecture signature -> FLOPs of one step
        self.after_backward = None
        """Called with no arguments after each batch's backward pass, before the optimizers step (DEBUG
        telemetry's gradient monitor); it must not synchronize with the device."""
        if cfg.compile:
            # In place, so parameter names (and checkpoints) are unchanged. Parts without parameters
            # (the CNN's Identity stem) are left out: dynamo skips for good a frame that yields no
            # graph, every module's compiled call shares that frame's code, and an Identity compiled
            # first left every block eager. Sharing that code, the parts share its recompile limit
            # too: cifar10_deep's 6 parts x training and evaluation overran the default 8, past which
            # dynamo falls back to eager, silently.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            for part in (model.host.stem, *model.host.blocks, model.host.head):
                if any(True for _ in part.parameters()):
                    part.compile()

    def autocast(self) -> torch.autocast:
        """The precision the forward passes run in (TrainConfig.precision)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16")

    def sync_optimizers(self) -> None:
        """Give new live seeds an optimizer (and the model's layout); hand fossilized seeds to the host's,
        with their momentum; drop culled. A seed fossilized without training live (grafted after this
        Trainer was built) joins the host's optimizer too."""
        self.model.to(memory_format=self.layout)  # new seeds' weights; a no-op for the rest
        slots_by_id = {s.seed_id: s for s in self.model.slots.values() if s.seed is not None}
        for seed_id, opt in list(self.seed_opts.items()):
            slot = slots_by_id.get(seed_id)
            if slot is not None and slot.stage in LIVE_STAGES:
                continue
            if slot is not None and slot.stage == S.SEED_STAGE_FOSSILIZED:
                for p in slot.seed.parameters():
                    if p in opt.state:
                        self.host_opt.state[p] = opt.state[p]
            del self.seed_opts[seed_id]
        in_host_opt = {id(p) for group in self.host_opt.param_groups for p in group["params"]}
        for seed_id, slot in slots_by_id.items():
            if slot.stage in LIVE_STAGES and seed_id not in self.seed_opts:
                self.seed_opts[seed_id] = make_optimizer(slot.seed.parameters(), self.cfg, self.cfg.seed_lr)
            elif slot.stage == S.SEED_STAGE_FOSSILIZED and id(next(slot.seed.parameters())) not in in_host_opt:
                self.host_opt.add_param_group({"params": list(slot.seed.parameters())})

    def state_dict(self) -> dict:
        """Optimizers, the data-order and augmentation generator and the FLOP counts, as tensors and plain
        values. The host optimizer's parameter groups are saved by parameter name, because fossilized
        seeds join it one group at a time and a fresh Trainer would put them all in its first group."""
        names = {p: name for name, p in self.model.named_parameters()}
        return {
            "host_opt": self.host_opt.state_dict(),
            "host_groups": [[names[p] for p in group["params"]] for group in self.host_opt.param_groups],
            "seed_opts": {seed_id: opt.state_dict() for seed_id, opt in self.seed_opts.items()},
            "generator": self.generator.get_state(),
            "train_flops": self.train_flops,
            "step_flops": list(self._step_flops.items()),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()` of a trainer whose model had the seeds this one's model has now
        (MorphogeneticModel.restore_lifecycle first). An optimizer of a seed culled since its last epoch
        is left out: the next `sync_optimizers` would drop it anyway."""
        self.model.to(memory_format=self.layout)  # the seeds restored since __init__
        params = dict(self.model.named_parameters())
        groups = [{"params": [params[n] for n in group]} for group in state["host_groups"]]
        self.host_opt = make_optimizer(groups, self.cfg, self.cfg.lr)
        self.host_opt.load_state_dict(state["host_opt"])
        live = {slot.seed_id: slot for slot in self.model.live_seeds().values()}
        self.seed_opts = {}
        for seed_id, opt_state in state["seed_opts"].items():
            if seed_id in live:
                self.seed_opts[seed_id] = make_optimizer(live[seed_id].seed.parameters(), self.cfg, self.cfg.seed_lr)
                self.seed_opts[seed_id].load_state_dict(opt_state)
        for opt in (self.host_opt, *self.seed_opts.values()):  # torch takes buffers of any shape, to fail mid-epoch
            for param, buffers in opt.state.items():
                if shapes := {k: tuple(v.shape) for k, v in buffers.items() if torch.is_tensor(v) and v.dim()
                              and v.shape != param.shape}:
                    raise ValueError(f"optimizer state {shapes} for a parameter of shape {tuple(param.shape)}")
        self.generator.set_state(state["generator"])
        self.train_flops = state["train_flops"]
        self._step_flops = dict(state["step_flops"])

    def reset_momentum(self) -> None:
        """After a rollback the momentum buffers describe weights that no longer exist."""
        self.host_opt.state.clear()

    def train_epoch(self) -> tuple[float, float]:
        """One epoch; returns (mean loss, accuracy %) with a single device->host transfer."""
        self.sync_optimizers()
        model, data = self.model, self.data
        optimizers = [self.host_opt, *self.seed_opts.values()]
        model.train()
        loss_sum = torch.zeros((), device=self.device)  # of the batches' mean losses
        hits = torch.zeros((), device=self.device, dtype=torch.long)
        seen = targets = 0
        for xb, yb in train_batches(
            data.train_x, data.train_y, batch_size=self.cfg.batch_size, max_batches=self.cfg.max_batches,
            generator=self.generator, device=self.device, mean=self.mean, std=self.std,
            augment=self.cfg.augment, memory_format=self.layout,
        ):
            if seen == 0:
                step_flops = self.step_flops(xb, yb)
            with self.autocast():
                logits = model(xb)  # [B, classes] | [B, T, vocab]
                loss = cross_entropy(logits, yb)  # autocast computes it in fp32
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.after_backward is not None:
                self.after_backward()
            for opt in optimizers:
                opt.step()
            with torch.no_grad():  # in place on the device, and in the fewest operators: a step dispatches them
                loss_sum += loss
                hits += (logits.argmax(-1) == yb).sum()
            seen += yb.shape[0]
            targets += yb.numel()
        steps = seen // self.cfg.batch_size
        self.train_flops += step_flops * steps
        # Every batch is full, so the mean of the batches' means is the epoch's mean loss.
        loss_mean, accuracy = torch.stack([loss_sum / steps, hits * 100.0 / targets]).tolist()
        return loss_mean, accuracy

    def step_flops(self, xb: torch.Tensor, yb: torch.Tensor) -> int:
        """FLOPs of one training step of the current architecture, counted once per architecture on a
        copy (so BatchNorm statistics and gradients of the real model are untouched), eagerly: the
        count is of the model's operations, whatever compiling makes of them. Attention is counted as
        its matrix products (the math kernel): torch has no FLOP formula for the CPU's fused kernel,
        which counted 0 (11% of a tinystories step), and the flash kernels' count their recomputation."""
        signature = tuple((s.stage, s.blueprint) for s in self.model.slots.values())
        if signature not in self._step_flops:
            probe = copy.deepcopy(self.model).train()
            with torch.compiler.set_stance("force_eager"), sdpa_kernel(SDPBackend.MATH), \
                    FlopCounterMode(display=False) as counter:
                cross_entropy(probe(xb), yb).backward()
            self._step_flops[signature] = counter.get_total_flops()
        return self._step_flops[signature]

    def fixed_batch_loss(self) -> torch.Tensor:
        """Mean loss of the model in eval mode (no batch-norm statistics move) on the first training
        batch, unaugmented: the same batch every call, so diagnostics on it (sharpness) compare across
        epochs. The graph is kept for higher derivatives: in fp32 and eager, since compiled graphs
        have no double backward."""
        self.model.eval()
        xb, yb = next(eval_batches(self.data.train_x, self.data.train_y, batch_size=self.cfg.batch_size,
                                   device=self.device, mean=self.mean, std=self.std, memory_format=self.layout))
        # The math attention kernel: the fused ones (flash on the CPU) have no double backward.
        with torch.compiler.set_stance("force_eager"), sdpa_kernel(SDPBackend.MATH):
            return cross_entropy(self.model(xb), yb)

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
        contribution: accuracy with the seed minus without it, paired per item, and its standard error,
        and the loss without the seed minus with it."""
        model = self.model
        model.eval()
        x, y = (self.data.val_x, self.data.val_y) if split == "val" else (self.data.test_x, self.data.test_y)
        probes = {name: slot for name, slot in model.live_seeds().items()
                  if counterfactual and slot.stage in (S.SEED_STAGE_TRAINING, S.SEED_STAGE_BLENDING)}
        # TRAINING: "with" is alpha forced to 1; BLENDING: "without" is alpha forced to 0.
        variants = tuple((name, 1.0 if slot.stage == S.SEED_STAGE_TRAINING else 0.0) for name, slot in probes.items())
        loss_sum = torch.zeros((), device=self.device)
        probe_loss = {name: torch.zeros((), device=self.device) for name in probes}
        targets = 0
        hits, probe_hits = [], {name: [] for name in probes}
        for xb, yb in eval_batches(x, y, batch_size=self.cfg.eval_batch_size, device=self.device,
                                   mean=self.mean, std=self.std, memory_format=self.layout):
            with self.autocast():
                logits, *probe_logits = model(xb, variants).chunk(1 + len(probes))  # one pass, 1 + P copies
                loss_sum += cross_entropy(logits, yb, reduction="sum")
                targets += yb.numel()
                hits.append(item_accuracy(logits, yb))
                for name, other in zip(probes, probe_logits):
                    probe_hits[name].append(item_accuracy(other, yb))
                    probe_loss[name] += cross_entropy(other, yb, reduction="sum")
        base = torch.cat(hits)  # [N]
        n = base.numel()
        stats = [loss_sum / targets, base.mean() * 100]
        for name, slot in probes.items():
            other = torch.cat(probe_hits[name])
            training = slot.stage == S.SEED_STAGE_TRAINING
            diff = other - base if training else base - other  # with - without
            loss_drop = (loss_sum - probe_loss[name] if training else probe_loss[name] - loss_sum) / targets
            stats += [diff.mean() * 100, diff.std() * 100 / math.sqrt(n), loss_drop]
        values = torch.stack(stats).tolist()
        contributions = {name: (values[2 + 3 * i], values[3 + 3 * i]) for i, name in enumerate(probes)}
        loss_contributions = {name: values[4 + 3 * i] for i, name in enumerate(probes)}
        return EvalResult(loss=values[0], accuracy=values[1], contributions=contributions,
                          loss_contributions=loss_contributions)
