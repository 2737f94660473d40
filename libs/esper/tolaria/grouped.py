"""K runs of one CNN host architecture trained as one network: batching the identical parts.

A small host leaves a GPU idle between kernel launches, and K runs in K processes only time-slice it
(bench/concurrency.py: 2.12x at K = 8 on an H200, against a target of 0.7 K). Here run k's layers are
group k of grouped layers: one Conv2d(K c_in, K c_out, groups=K) per conv, one BatchNorm2d(K c) (its
per-channel statistics are each run's own), and a grouped 1x1 convolution as the K linear heads. Run
k's batch is channels [k c_in, (k+1) c_in) of the input, so K runs cost the kernel launches of one.
Their batches are gathered, augmented and normalized at once too (augment.stacked_train_batches), and
every run's random draws for a pass are made when it starts (augment.pass_crops), so a step of K runs
dispatches as many operators at any K: 152 against one Esper run's 139 (bench/launches.py, on the CPU).
Augmenting each run's batch on its own had cost 356 at K = 8; drawing each run's crops per batch, 203.

Growing runs' seeds batch the same way. At a slot, the runs whose seeds share a blueprint and a
learning rate are one SeedGroup: their seeds as the groups of one grouped copy of the blueprint
(`grouped_seed`), each run at its own alpha, each routed as its stage routes it (TRAINING, BLENDING and
FOSSILIZED in one group, by per-channel masks). Seeds move, appear and go between epochs only, so a
group forms its SeedGroups at the start of each epoch from the runs' own seeds (weights, BatchNorm
statistics, momentum) and hands everything back at its end. With a blending conv_heavy seed in every
run, a grouped step dispatches 198 operators at any K, against one growing run's 185 (run by run, the
seeds had cost 582 at K = 8). Eight runs, six seeds blending and two fossilized, dispatch 204 (267
with live and fossilized seeds as two SeedGroups); eight in four states (no seed, and a conv_heavy seed
in TRAINING, BLENDING, FOSSILIZED) 230 (was 271) against one run's 173 on average, a ceiling of 6.02x:
what is left is gathering the seeded runs' channels (bench/launches.py). A comparison's heuristic runs
mostly move in step (every run's slots in the same stages in 40 of 40 epochs for 5 seeds on the H100,
36 of 40 and 39 of 40 on the CPU); a greedy PPO policy's 5 runs (H200) were alike in 12 of 20 epochs,
one run two epochs ahead of the others: the mixed live and fossilized groups that masks merge.

On CUDA each epoch's step is captured as a CUDA graph and replayed (CapturedStep; TrainConfig.cuda_graph):
a group's launches then cost the CPU one per step, and one small run no longer leaves the GPU waiting on
Python. On an H200 a group of one trained at 133,000 images/s so, against 39,000 eager, and eight runs at
243,000 to 247,000 against 216,000 to 230,000: 4.1 ms a step, now the kernels' own time.

The loss is the sum of the runs' mean losses, so each group gets exactly its own run's gradient, and
SGD (momentum, weight decay) is element-wise: every group follows the run it stands for, up to the
order of floating-point sums (tests/unit/test_grouped.py trains both ways and compares).

TrainerGroup puts whole runs on it: `esper train MODE --grouped` (experiment.run_grouped), `esper
compare --grouped` and `esper train ppo --grouped` (simic.step_together) train their runs this way,
each still a run of its own (GrowthEnv, decisions, run directory, telemetry, evaluation), only its
training steps shared.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from esper.kasmina.blueprints import SqueezeExcite
from esper.kasmina.hosts import CNNHost, HostSpec
from esper.kasmina.lifecycle import LIVE_STAGES
from esper.kasmina.slot import SeedSlot, straight_through, through_seed
from esper.leyline import SeedStage
from esper.tolaria.augment import eval_batches, stacked_train_batches
from esper.tolaria.data import Dataset
from esper.tolaria.trainer import Trainer, make_optimizer

S = SeedStage

MAX_GROUP = 8
"""The most runs one TrainerGroup trains. Eight is the largest group measured (bench/concurrency.py
--mechanism grouped: on an H200 eight graphed runs trained 1.15x as many images/s as four); more runs on a
device train as several groups of up to eight, as even as can be (simic.step_together), and a grouped
experiment holds eight episodes at a time (experiment.GROUP_EPISODES)."""


def grouped_block(c_in: int, c_out: int, k: int) -> nn.Sequential:
    """K copies of hosts.conv_block side by side: conv3x3-BN-ReLU-maxpool, one group per run."""
    return nn.Sequential(
        nn.Conv2d(k * c_in, k * c_out, 3, padding=1, bias=False, groups=k),
        nn.BatchNorm2d(k * c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


def unfilled(build: Callable[[], nn.Module], device: torch.device) -> nn.Module:
    """`build()`'s module with its tensors allocated on `device` but not initialized, for load_groups to fill
    every one: a group is formed every epoch, and a plain build would run a K-wide random initialization on
    the CPU, then copy it over."""
    with torch.device("meta"):
        module = build()
    return module.to_empty(device=device)


@torch.no_grad()
def load_groups(grouped: nn.Module, tensor_of: Callable[[int, str], torch.Tensor], k: int) -> None:
    """Group j of every grouped tensor from run j's (`tensor_of(j, name)`). A count (BatchNorm's batches
    tracked) starts at 0, for `store_group` to add what the group counted to each run's own."""
    for name, tensor in grouped.state_dict().items():
        if tensor.dim() == 0:
            tensor.zero_()
        else:
            tensor.copy_(torch.cat([tensor_of(j, name) for j in range(k)]).view_as(tensor))


@torch.no_grad()
def store_group(grouped: nn.Module, j: int, target_of: Callable[[str], torch.Tensor], k: int) -> None:
    """Group j of every grouped tensor into run j's (`target_of(name)`), in place."""
    for name, tensor in grouped.state_dict().items():
        target = target_of(name)
        if tensor.dim() == 0:
            target.add_(tensor)
        else:
            target.copy_(tensor.chunk(k)[j].view_as(target))


def load_momentum(optimizer: torch.optim.Optimizer, grouped: nn.Module, tensor_of: Callable[[int, str], torch.Tensor],
                  run_optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """Group j of each grouped parameter's momentum from run j's own optimizer (its buffer of `tensor_of(j,
    name)`), zeros for a run that has none yet: SGD's first step from a zero buffer is its first step."""
    for name, p in grouped.named_parameters():
        momenta = [opt.state.get(tensor_of(j, name), {}).get("momentum_buffer") for j, opt in enumerate(run_optimizers)]
        if any(m is not None for m in momenta):
            parts = [torch.zeros_like(tensor_of(j, name)) if m is None else m for j, m in enumerate(momenta)]
            optimizer.state[p]["momentum_buffer"] = torch.cat(parts).view_as(p)


@torch.no_grad()
def store_momentum(optimizer: torch.optim.Optimizer, grouped: nn.Module, tensor_of: Callable[[int, str], torch.Tensor],
                   run_optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """Group j of each grouped parameter's momentum into run j's own optimizer, for `tensor_of(j, name)`."""
    k = len(run_optimizers)
    for name, p in grouped.named_parameters():
        buffer = optimizer.state.get(p, {}).get("momentum_buffer")
        if buffer is not None:
            for j, opt in enumerate(run_optimizers):
                target = tensor_of(j, name)
                opt.state[target]["momentum_buffer"] = buffer.chunk(k)[j].view_as(target).clone()


class GroupedCNN(nn.Module):
    """K CNNHosts of one spec as one module: [B, K c_in, H, W] images in, [B, K, classes] logits out."""

    def __init__(self, spec: HostSpec, k: int):
        super().__init__()
        if spec.kind != "cnn":
            raise ValueError(f"only CNN hosts batch as groups, not {spec.kind}")
        self.spec, self.k = spec, k
        widths = (spec.in_channels, *spec.channels)
        self.blocks = nn.Sequential(*(grouped_block(a, b, k) for a, b in zip(widths[:-1], widths[1:])))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Conv1d(k * spec.channels[-1], k * spec.num_classes, 1, groups=k)

    def forward(self, x: torch.Tensor, seed_groups: dict[int, list[SeedGroup]] | None = None) -> torch.Tensor:
        """`seed_groups`: after block i, the SeedGroups of the slot there (TrainerGroup.seed_groups)."""
        for i, block in enumerate(self.blocks):
            x = block(x)
            if seed_groups and seed_groups.get(i):
                x = through_seed_groups(x, seed_groups[i], self.k)
        features = self.pool(x).flatten(2)  # [B, K C, 1]
        return self.head(features).view(len(x), self.k, self.spec.num_classes)

    def load_hosts(self, hosts: list[CNNHost]) -> None:
        """Host k's weights and BatchNorm statistics into group k, in place."""
        load_groups(self, lambda j, name: host_tensor(hosts[j], name), self.k)

    def store_host(self, k: int, host: CNNHost) -> None:
        """Group k's weights and BatchNorm statistics into `host`, in place."""
        store_group(self, k, lambda name: host_tensor(host, name), self.k)


def host_tensor(host: CNNHost, grouped_name: str) -> torch.Tensor:
    """The host's tensor that a grouped tensor's group stands for ("blocks.0.0.weight" -> the first
    block's conv weight, "head.weight" -> the linear head's)."""
    if grouped_name.startswith("head."):
        return host.head[2].state_dict(keep_vars=True)[grouped_name.removeprefix("head.")]
    return host.state_dict(keep_vars=True)[grouped_name]


class GroupedSqueezeExcite(nn.Module):
    """K SqueezeExcite seeds side by side: their linear layers as grouped 1x1 convolutions (named as
    SqueezeExcite's, so each run's weights load by name)."""

    def __init__(self, channels: int, hidden: int, k: int):
        super().__init__()
        self.squeeze = nn.Conv1d(k * channels, k * hidden, 1, groups=k)
        self.excite = nn.Conv1d(k * hidden, k * channels, 1, groups=k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3)).unsqueeze(-1)  # [B, K C, 1]
        gate = torch.tanh(self.excite(torch.relu(self.squeeze(s))))  # [B, K C, 1]
        return x * gate.unsqueeze(-1)


def grouped_seed(seed: nn.Module, k: int) -> nn.Module:
    """K copies of a CNN seed's architecture side by side, copy j in group j, with the seed's parameter
    and buffer names (the layers the CNN blueprints are made of)."""
    if isinstance(seed, nn.Sequential):
        return nn.Sequential(*(grouped_seed(layer, k) for layer in seed))
    if isinstance(seed, nn.Conv2d):
        return nn.Conv2d(k * seed.in_channels, k * seed.out_channels, seed.kernel_size, seed.stride, seed.padding,
                         bias=seed.bias is not None, groups=k * seed.groups)
    if isinstance(seed, nn.BatchNorm2d):
        return nn.BatchNorm2d(k * seed.num_features)
    if isinstance(seed, nn.ReLU):
        return nn.ReLU(inplace=seed.inplace)
    if isinstance(seed, SqueezeExcite):
        return GroupedSqueezeExcite(seed.squeeze.in_features, seed.squeeze.out_features, k)
    raise ValueError(f"no grouped form of {type(seed).__name__}")


class SeedGroup:
    """For one epoch, the seeds of one blueprint at one slot that train at one learning rate, in the runs
    `members` (TRAINING, BLENDING and FOSSILIZED together while seed_lr is the host's lr, the default), as
    the groups of one grouped seed: loaded from the runs' seeds and optimizers, stepped by one SGD (the
    runs' own settings), stored back by `store()`: weights, BatchNorm statistics, momentum, and the last
    batch's gradients (PPO's gradient-norm features read them)."""

    def __init__(self, members: list[int], trainers: list[GroupMember], slot_name: str, layout: torch.memory_format):
        self.members = members
        self.every_run = members == list(range(len(trainers)))
        """Every run of the group is a member (in order): the slot's activations need no gathering."""
        self.slots = [trainers[k].model.slots[slot_name] for k in members]
        self.optimizers = [trainers[k].optimizer_of(slot) for k, slot in zip(members, self.slots)]
        first, n = self.slots[0], len(members)
        stages = {slot.stage for slot in self.slots}
        self.stage = next(iter(stages)) if len(stages) == 1 else None  # None: seeds in different stages together
        device = next(first.seed.parameters()).device
        self.module = unfilled(lambda: grouped_seed(first.seed, n), device)
        self.own = [slot.seed.state_dict(keep_vars=True) for slot in self.slots]
        load_groups(self.module, self.own_tensor, n)
        self.module.to(memory_format=layout).train()

        def per_channel(values: list[float]) -> torch.Tensor:  # a value per run over its channels: [1, n C, 1, 1]
            return torch.tensor(values).repeat_interleave(first.channels).view(1, -1, 1, 1).to(device)

        def of_stage(stage: int) -> list[float]:  # 1 for the members in `stage`, 0 for the others
            return [float(slot.stage == stage) for slot in self.slots]

        mixed = self.stage is None
        # How much of its seed's output each member adds: BLENDING its alpha, FOSSILIZED all, TRAINING none.
        added = [slot.alpha if slot.stage == S.SEED_STAGE_BLENDING else float(slot.stage == S.SEED_STAGE_FOSSILIZED)
                 for slot in self.slots]
        self.alpha = per_channel(added) if mixed or self.stage == S.SEED_STAGE_BLENDING else None
        self.straight = per_channel(of_stage(S.SEED_STAGE_TRAINING)).bool() \
            if mixed and S.SEED_STAGE_TRAINING in stages else None
        """Members whose seed's gradient passes straight through (TRAINING)."""
        self.through = per_channel(of_stage(S.SEED_STAGE_FOSSILIZED)).bool() \
            if mixed and S.SEED_STAGE_FOSSILIZED in stages else None
        """Members whose seed's input keeps its gradient (FOSSILIZED: part of the host; live seeds' is detached)."""
        trainer = trainers[members[0]]
        # The runs' own SGD over every group at once: element-wise, so each group steps as its run would alone.
        self.optimizer = make_optimizer(self.module.parameters(), trainer.cfg, trainer.lr_of(first))
        load_momentum(self.optimizer, self.module, self.own_tensor, self.optimizers)

    def own_tensor(self, j: int, name: str) -> torch.Tensor:
        """Member j's seed's own tensor that the grouped seed's `name` stands for."""
        return self.own[j][name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The members' activations ([B, n C, H, W]) through their seeds."""
        if self.stage is not None:
            return through_seed(x, self.module, self.stage, self.alpha)
        # Stages together, each member's channels routed as through_seed routes its stage, in value and in
        # gradient: a TRAINING member (alpha 0, straight 1) is straight_through(x, delta), value x whatever
        # its seed computes (a masked fill: 0 * inf is NaN) and the seed's full gradient; a BLENDING one
        # (straight 0) x + alpha delta; a FOSSILIZED one (alpha 1, through 1) x + seed(x), its input not
        # detached. One grouped seed, at a few operators per mask.
        # where, not a product: a diverged live seed's inf gradient times 0 would be NaN in the host's
        seed_input = x.detach() if self.through is None else torch.where(self.through, x, x.detach())
        delta = self.module(seed_input)
        if self.straight is None:
            return x + self.alpha * delta
        return straight_through(x + (self.alpha * delta).masked_fill(self.straight, 0.0), delta, self.straight)

    @torch.no_grad()
    def store(self) -> None:
        n = len(self.members)
        for j, own in enumerate(self.own):
            store_group(self.module, j, own.__getitem__, n)
            for name, p in self.module.named_parameters():
                own[name].grad = None if p.grad is None else p.grad.chunk(n)[j].view_as(own[name]).clone()
        store_momentum(self.optimizer, self.module, self.own_tensor, self.optimizers)


def through_seed_groups(x: torch.Tensor, seed_groups: list[SeedGroup], k: int) -> torch.Tensor:
    """[B, K C, H, W] activations through a slot's SeedGroups, each on its members' channel groups."""
    if len(seed_groups) == 1 and seed_groups[0].every_run:
        return seed_groups[0].forward(x)
    groups = list(x.chunk(k, dim=1))
    for seed_group in seed_groups:
        members = seed_group.members
        out = seed_group.forward(torch.cat([groups[j] for j in members], dim=1))
        for j, part in zip(members, out.chunk(len(members), dim=1)):
            groups[j] = part
    return torch.cat(groups, dim=1)


def zero_grads(optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """Every gradient set to None: the backward after it writes each afresh (a captured one at every replay)."""
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)


class CapturedStep:
    """A training step replayed as one CUDA graph: the step's few hundred kernel launches cost the CPU one,
    so the CPU no longer paces the GPU (TrainConfig.cuda_graph says what it bought). The first `WARMUP`
    calls run eagerly on a side stream (cuDNN and cuBLAS set up their handles and SGD creates its momentum
    buffers there, as capture requires); the next is captured with its batch in static input tensors, then
    replayed; every later call copies its batch into them and replays. Gradients are set to None before
    the capture, so the captured backward writes them afresh at every replay, exactly as the eager step's
    backward does after its zero_grad. Each call is a real step on its own batch, the eager step's operators
    in their order; their kernels may differ (cuDNN chooses at each call: on an H200 a captured epoch's
    costliest kernels included an fp32 SIMT GEMM that the eager epoch's 15 costliest did not), so a captured
    run follows an eager one to float order only (tests/unit/test_grouped.py, on a GPU)."""

    WARMUP = 3

    def __init__(self, step: Callable[[torch.Tensor, torch.Tensor], None],
                 optimizers: Sequence[torch.optim.Optimizer]):
        self.step, self.optimizers = step, optimizers
        self.calls = 0
        self.side: torch.cuda.Stream | None = None
        """The warm-up's and the capture's stream, on the batches' GPU (made by the first call)."""
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        # On the batch's GPU: torch.cuda.graph would otherwise capture on a stream of the current device,
        # cuda:0, and a group on cuda:1 would record an empty graph and replay nothing (pytorch#87894).
        with torch.cuda.device(x.device):
            self.calls += 1
            if self.graph is not None:
                self.static[0].copy_(x)
                self.static[1].copy_(y)
                self.graph.replay()
                return
            if self.side is None:
                self.side = torch.cuda.Stream(x.device)
            if self.calls <= self.WARMUP:
                self.warm_up(x, y)
            else:
                self.capture(x, y)

    def warm_up(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(self.side):
            zero_grads(self.optimizers)
            self.step(x, y)
        torch.cuda.current_stream(x.device).wait_stream(self.side)

    def capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.static = (x.clone(), y.clone())
        zero_grads(self.optimizers)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.side):
                self.step(*self.static)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as error:  # an operator that waits on the host, or one a graph cannot hold
            cause = error.__context__ or error  # the capture's end, failing, reports over the operator's own
            raise RuntimeError(f"the grouped step could not be captured as a CUDA graph ({cause}); "
                               "--no-cuda-graph trains it eagerly") from error
        graph.replay()  # a capture records the work without doing it
        self.graph = graph


def train_grouped(model: GroupedCNN, data: Dataset, generators: list[torch.Generator], max_batches: int,
                  optimizers: Sequence[torch.optim.Optimizer], batch_size: int = 128,
                  memory_format: torch.memory_format = torch.contiguous_format,
                  seed_groups: dict[int, list[SeedGroup]] | None = None,
                  capture: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One epoch of `max_batches` SGD steps (0: the whole split) of the K runs at once, run k drawing its
    batches (order and augmentation) from `generators[k]`, exactly as tolaria's Trainer would for that
    run alone. `seed_groups`: the runs' seeds (GroupedCNN.forward); `optimizers` step the grouped weights
    and the seeds'. Returns each run's mean loss and correct predictions ([K], left on the device: no
    host sync) and the images each run saw. Batches go to the model in `memory_format` (the model's own:
    TrainConfig.memory_format, channels_last on the CPU, where it trained 2 grouped runs 1.3x faster).
    `capture` (CUDA only): the step as a CUDA graph (CapturedStep); the batches are drawn and augmented
    eagerly, as they are without it."""
    device = next(model.parameters()).device
    mean, std = data.channel_stats(device)
    loss_sums = torch.zeros(model.k, device=device)
    hits = torch.zeros(model.k, device=device, dtype=torch.long)
    model.train()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        """One SGD step of every run on its batch (x [B, K c_in, H, W], y [B, K]), its loss and hits counted."""
        logits = model(x, seed_groups)  # [B, K, classes]
        run_losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y).mean(0)  # [K]
        run_losses.sum().backward()  # the sum of the runs' mean losses: each group gets its run's gradient
        for optimizer in optimizers:
            optimizer.step()
        with torch.no_grad():
            loss_sums.add_(run_losses)
            hits.add_((logits.argmax(-1) == y).sum(0))

    def eager_step(x: torch.Tensor, y: torch.Tensor) -> None:
        zero_grads(optimizers)
        step(x, y)

    if capture and device.type != "cuda":
        raise ValueError(f"a captured step is a CUDA graph: the model is on {device}")
    take_step = CapturedStep(step, optimizers) if capture else eager_step
    batches = 0
    for xb, yb in stacked_train_batches(data.train_x, data.train_y, batch_size=batch_size, max_batches=max_batches,
                                        generators=generators, device=device, mean=mean, std=std):
        # [B, K c_in, H, W]: run k's images in group k, laid out as the model's weights are
        take_step(xb.transpose(0, 1).flatten(1, 2).contiguous(memory_format=memory_format), yb.T)
        batches += 1
    return loss_sums / batches, hits, batches * batch_size  # full batches: the mean of their means


class GroupMember(Trainer):
    """One run's Trainer in a TrainerGroup. The group trains the run's epochs, with the other runs', and
    copies the run's weights back into its model; all else (evaluation, the counterfactual, FLOP counts,
    the test split) is the plain Trainer's, on the run's own model. Its optimizers are never stepped: they
    hold the run's momentum between epochs (host and seeds), which the group loads and stores, so between
    epochs a member is exactly a lone run's Trainer: its checkpoint, a rollback's reset_momentum and a
    resume are the Trainer's own."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trained: tuple[float, float] | None = None  # this epoch's (loss, accuracy), set by the group

    def train_epoch(self) -> tuple[float, float]:
        if self.trained is None:
            raise RuntimeError("a grouped run's epoch is trained by its group: call TrainerGroup.train_epoch first")
        if self.after_backward is not None:  # set by GrowthEnv at debug telemetry
            raise RuntimeError("gradient health (debug telemetry) reads a run's own backward pass: a grouped run "
                               "has none")
        trained, self.trained = self.trained, None
        return trained

    def optimizer_of(self, slot: SeedSlot) -> torch.optim.Optimizer:
        """The optimizer that holds a seed's momentum: its own while live, the host's once fossilized."""
        return self.seed_opts[slot.seed_id] if slot.stage in LIVE_STAGES else self.host_opt

    def lr_of(self, slot: SeedSlot) -> float:
        """The learning rate a seed trains at: seed_lr while live, the host's once fossilized."""
        return self.cfg.seed_lr if slot.stage in LIVE_STAGES else self.cfg.lr


class TrainerGroup:
    """K runs of one CNN host and one set of slots trained as the groups of one GroupedCNN, their seeds
    as SeedGroups (esper train --grouped, and PPO's environments under --grouped). The runs' own models
    and optimizers stay the truth between epochs: each epoch loads weights, BatchNorm statistics and
    momentum from them (so a governor's rollback of one run holds) and ends by handing every group's back
    to its run. A group holds nothing across epochs, so simic.step_together forms one for every epoch
    from whichever runs step."""

    def __init__(self, members: list[GroupMember]):
        first = members[0]
        cfg = first.cfg
        if cfg.optimizer != "sgd" or not cfg.augment or cfg.precision != "fp32" or cfg.compile:
            raise ValueError("grouped runs train with the plain recipe only: SGD, augmentation, fp32, no compile")
        if any(m.model.slot_after != first.model.slot_after or m.device != first.device for m in members):
            raise ValueError("grouped runs have the same slots on the same device")
        if any(m.cfg != cfg for m in members):  # the group steps every run with the first one's settings
            raise ValueError("grouped runs train with one TrainConfig")
        self.members = members
        self.capture = cfg.cuda_graph and first.device.type == "cuda"
        """Each epoch's step as a CUDA graph (train_grouped)."""
        self.hosts = [m.model.host for m in members]
        # filled from the runs' hosts by every train_epoch
        self.model = unfilled(lambda: GroupedCNN(first.model.host.spec, len(members)), first.device) \
            .to(memory_format=first.layout)
        self.flops_batch = next(eval_batches(first.data.train_x, first.data.train_y, batch_size=cfg.batch_size,
                                             device=first.device, mean=first.mean, std=first.std,
                                             memory_format=first.layout))
        """A batch to count a run's training step on (Trainer.step_flops, once per architecture)."""

    def host_tensor(self, k: int, name: str) -> torch.Tensor:
        """Run k's host tensor that the grouped model's `name` stands for."""
        return host_tensor(self.hosts[k], name)

    def seed_groups(self) -> dict[int, list[SeedGroup]]:
        """Block index -> the SeedGroups of the slot after it: the runs' acting seeds, by blueprint and
        learning rate (live and fossilized seeds apart only where seed_lr is not the host's lr)."""
        out: dict[int, list[SeedGroup]] = {}
        for block, name in self.members[0].model.slot_after.items():
            by_kind: dict[tuple[int, float], list[int]] = {}
            for k, m in enumerate(self.members):
                slot = m.model.slots[name]
                if slot.runs_seed:
                    by_kind.setdefault((slot.blueprint, m.lr_of(slot)), []).append(k)
            out[block] = [SeedGroup(ks, self.members, name, self.members[0].layout) for ks in by_kind.values()]
        return out

    def train_epoch(self) -> None:
        """One epoch of every run; each member's next train_epoch() returns its run's loss and accuracy."""
        first = self.members[0]
        cfg, data = first.cfg, first.data
        for m in self.members:
            m.sync_optimizers()  # the seeds germinated, fossilized or culled since the last epoch
        self.model.load_hosts(self.hosts)
        host_optimizers = [m.host_opt for m in self.members]
        optimizer = make_optimizer(self.model.parameters(), cfg, cfg.lr)  # element-wise: each group its run's
        load_momentum(optimizer, self.model, self.host_tensor, host_optimizers)
        seed_groups = self.seed_groups()
        optimizers = [optimizer, *(g.optimizer for groups in seed_groups.values() for g in groups)]
        losses, hits, seen = train_grouped(self.model, data, [m.generator for m in self.members], cfg.max_batches,
                                           optimizers, cfg.batch_size, first.layout, seed_groups, self.capture)
        for k, host in enumerate(self.hosts):
            self.model.store_host(k, host)
        store_momentum(optimizer, self.model, self.host_tensor, host_optimizers)
        for groups in seed_groups.values():
            for group in groups:
                group.store()
        values = torch.cat([losses, hits * 100.0 / seen]).tolist()  # one device->host transfer
        for k, m in enumerate(self.members):
            m.trained = (values[k], values[len(self.members) + k])
            m.train_flops += m.step_flops(*self.flops_batch) * (seen // cfg.batch_size)
