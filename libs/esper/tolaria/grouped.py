"""K runs of one CNN host architecture trained as one network: batching the identical parts.

A small host leaves a GPU idle between kernel launches, and K runs in K processes only time-slice it
(bench/concurrency.py: 2.12x at K = 8 on an H200, against a target of 0.7 K). Here run k's layers are
group k of grouped layers: one Conv2d(K c_in, K c_out, groups=K) per conv, one BatchNorm2d(K c) (its
per-channel statistics are each run's own), and a grouped 1x1 convolution as the K linear heads. Run
k's batch is channels [k c_in, (k+1) c_in) of the input, so K runs cost the kernel launches of one.
Their batches are gathered, augmented and normalized at once too (augment.stacked_train_batches). With
each run augmenting its own batch, 8 grouped runs dispatched 356 operators a step against one run's 143,
most of the difference augmentation; stacked, 189 (bench/launches.py). With each run's loss and hits
summed on the device, as the Trainer does, and channels_last on the CPU: 203 against one Esper run's 162.

The loss is the sum of the runs' mean losses, so each group gets exactly its own run's gradient, and
SGD (momentum, weight decay) is element-wise: every group follows the run it stands for, up to the
order of floating-point sums (tests/unit/test_grouped.py trains both ways and compares).
Only identical architectures batch: the static host of every seed, or every arm before it grows.

TrainerGroup puts whole runs on it: `esper train static --grouped` (experiment.run_grouped) and
`esper compare --group-static` train every seed of a static arm this way, each seed still a run of
its own (GrowthEnv, run directory, telemetry, evaluation), only its training steps shared.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from esper.kasmina.hosts import CNNHost, HostSpec
from esper.tolaria.augment import eval_batches, stacked_train_batches
from esper.tolaria.data import Dataset
from esper.tolaria.trainer import Trainer, TrainConfig


def grouped_block(c_in: int, c_out: int, k: int) -> nn.Sequential:
    """K copies of hosts.conv_block side by side: conv3x3-BN-ReLU-maxpool, one group per run."""
    return nn.Sequential(
        nn.Conv2d(k * c_in, k * c_out, 3, padding=1, bias=False, groups=k),
        nn.BatchNorm2d(k * c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.pool(self.blocks(x)).flatten(2)  # [B, K C, 1]
        return self.head(features).view(len(x), self.k, self.spec.num_classes)

    @classmethod
    def from_hosts(cls, hosts: list[CNNHost]) -> GroupedCNN:
        """The K hosts' weights and BatchNorm statistics, each as its group (each run keeps its own init)."""
        grouped = cls(hosts[0].spec, len(hosts))
        grouped.load_hosts(hosts)
        return grouped

    @torch.no_grad()
    def load_hosts(self, hosts: list[CNNHost]) -> None:
        """Host k's weights and BatchNorm statistics into group k, in place."""
        for name, tensor in self.state_dict().items():
            parts = [host_tensor(h, name) for h in hosts]
            tensor.copy_(parts[0] if tensor.dim() == 0 else torch.cat(parts).view_as(tensor))

    @torch.no_grad()
    def store_host(self, k: int, host: CNNHost) -> None:
        """Group k's weights and BatchNorm statistics into `host`, in place."""
        for name, tensor in self.state_dict().items():
            target = host_tensor(host, name)
            target.copy_(tensor if tensor.dim() == 0 else tensor.chunk(self.k)[k].view_as(target))

    def host(self, k: int) -> CNNHost:
        """Run k as a plain CNNHost (to evaluate or export it like any other run)."""
        host = CNNHost(self.spec)
        self.store_host(k, host)
        return host


def host_tensor(host: CNNHost, grouped_name: str) -> torch.Tensor:
    """The host's tensor that a grouped tensor's group stands for ("blocks.0.0.weight" -> the first
    block's conv weight, "head.weight" -> the linear head's, as a [classes, C, 1] view for the 1x1 conv)."""
    if grouped_name.startswith("head."):
        tensor = host.head[2].state_dict(keep_vars=True)[grouped_name.removeprefix("head.")]
        return tensor.unsqueeze(-1) if tensor.dim() == 2 else tensor
    return host.state_dict(keep_vars=True)[grouped_name]


def sgd(model: nn.Module, cfg: TrainConfig | None = None) -> torch.optim.SGD:
    """The host optimizer tolaria's Trainer gives one run (TrainConfig's settings), over every group at
    once: SGD is element-wise, so each group steps as its run would alone."""
    cfg = cfg or TrainConfig()
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def train_grouped(model: GroupedCNN, data: Dataset, generators: list[torch.Generator], max_batches: int,
                  optimizer: torch.optim.Optimizer, batch_size: int = 128,
                  memory_format: torch.memory_format = torch.contiguous_format,
                  ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One epoch of `max_batches` SGD steps (0: the whole split) of the K runs at once, run k drawing its
    batches (order and augmentation) from `generators[k]`, exactly as tolaria's Trainer would for that
    run alone. Returns each run's summed loss and correct predictions ([K], left on the device: no host
    sync) and the images each run saw. Batches go to the model in `memory_format` (the model's own:
    TrainConfig.memory_format, channels_last on the CPU, where it trained 2 grouped runs 1.3x faster)."""
    device = next(model.parameters()).device
    mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
    loss_sums = torch.zeros(model.k, device=device)
    hits = torch.zeros(model.k, device=device, dtype=torch.long)
    seen = 0
    model.train()
    for xb, yb in stacked_train_batches(data.train_x, data.train_y, batch_size=batch_size, max_batches=max_batches,
                                        generators=generators, device=device, mean=mean, std=std):
        # [B, K c_in, H, W]: run k's images in group k, laid out as the model's weights are
        x = xb.transpose(0, 1).flatten(1, 2).contiguous(memory_format=memory_format)
        y = yb.T  # [B, K]
        logits = model(x)  # [B, K, classes]
        run_losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y).mean(0)  # [K]
        optimizer.zero_grad(set_to_none=True)
        run_losses.sum().backward()  # the sum of the runs' mean losses: each group gets its run's gradient
        optimizer.step()
        loss_sums += run_losses.detach() * batch_size
        hits += (logits.detach().argmax(-1) == y).sum(0)
        seen += batch_size
    return loss_sums, hits, seen


class GroupMember(Trainer):
    """One run's Trainer in a TrainerGroup. The group trains the run's epochs, with the other runs', and
    copies the run's weights back into its model; all else (evaluation, the counterfactual, FLOP counts,
    the test split) is the plain Trainer's, on the run's own model. Its own host optimizer is never
    stepped: the group's SGD holds every run's momentum."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.group: TrainerGroup | None = None
        self.trained: tuple[float, float] | None = None  # this epoch's (loss, accuracy), set by the group

    def train_epoch(self) -> tuple[float, float]:
        if self.trained is None:
            raise RuntimeError("a grouped run's epoch is trained by its group: call TrainerGroup.train_epoch first")
        if self.after_backward is not None:  # set by GrowthEnv at debug telemetry
            raise RuntimeError("gradient health (debug telemetry) reads a run's own backward pass: a grouped run "
                               "has none")
        trained, self.trained = self.trained, None
        return trained

    def reset_momentum(self) -> None:
        self.group.reset_momentum(self)

    def state_dict(self) -> dict:
        raise RuntimeError("a grouped run keeps no checkpoint: its optimizer state is its group's")


class TrainerGroup:
    """K runs of one CNN host, no seeds (esper train static --grouped), trained as the groups of one
    GroupedCNN. The runs' own models stay the truth between epochs: each epoch starts from them (so a
    governor's rollback of one run holds) and ends by copying every group back into its run's model."""

    def __init__(self, members: list[GroupMember]):
        first = members[0]
        cfg = first.cfg
        if cfg.optimizer != "sgd" or not cfg.augment or cfg.precision != "fp32" or cfg.compile:
            raise ValueError("grouped runs train with the plain recipe only: SGD, augmentation, fp32, no compile")
        if any(slot.seed is not None for m in members for slot in m.model.slots.values()):
            raise ValueError("only hosts without seeds train as a group (a static run's)")
        self.members = members
        self.hosts = [m.model.host for m in members]
        self.model = GroupedCNN.from_hosts(self.hosts).to(first.device, memory_format=first.layout)
        self.optimizer = sgd(self.model, cfg)
        for m in members:
            m.group = self
        xb, yb = next(eval_batches(first.data.train_x, first.data.train_y, batch_size=cfg.batch_size,
                                   device=first.device, mean=first.mean, std=first.std))
        self.step_flops = first.step_flops(xb, yb)
        """One run's training step, counted as its Trainer counts it: every run has this architecture for good."""

    def train_epoch(self) -> None:
        """One epoch of every run; each member's next train_epoch() returns its run's loss and accuracy."""
        first = self.members[0]
        cfg, data = first.cfg, first.data
        self.model.load_hosts(self.hosts)
        loss_sums, hits, seen = train_grouped(self.model, data, [m.generator for m in self.members], cfg.max_batches,
                                              self.optimizer, cfg.batch_size, first.layout)
        for k, host in enumerate(self.hosts):
            self.model.store_host(k, host)
        values = torch.cat([loss_sums / seen, hits * 100.0 / seen]).tolist()  # one device->host transfer
        for k, m in enumerate(self.members):
            m.trained = (values[k], values[len(self.members) + k])
            m.train_flops += self.step_flops * (seen // cfg.batch_size)

    def reset_momentum(self, member: GroupMember) -> None:
        """Forget one run's momentum (Trainer.reset_momentum after a rollback): its slice of every buffer."""
        k = self.members.index(member)
        for state in self.optimizer.state.values():
            if state.get("momentum_buffer") is not None:
                state["momentum_buffer"].chunk(len(self.members))[k].zero_()
