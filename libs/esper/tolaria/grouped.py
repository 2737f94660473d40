"""K runs of one CNN host architecture trained as one network: batching the identical parts.

A small host leaves a GPU idle between kernel launches, and K runs in K processes only time-slice it
(bench/concurrency.py: 2.12x at K = 8 on an H200, against a target of 0.7 K). Here run k's layers are
group k of grouped layers: one Conv2d(K c_in, K c_out, groups=K) per conv, one BatchNorm2d(K c) (its
per-channel statistics are each run's own), and a grouped 1x1 convolution as the K linear heads. Run
k's batch is channels [k c_in, (k+1) c_in) of the input, so K runs cost the kernel launches of one.
Their batches are gathered, augmented and normalized at once too (augment.stacked_train_batches). With
each run augmenting its own batch, 8 grouped runs dispatched 356 operators a step against one run's 143,
most of the difference augmentation; stacked, 189 (bench/launches.py).

The loss is the sum of the runs' mean losses, so each group gets exactly its own run's gradient, and
SGD (momentum, weight decay) is element-wise: every group follows the run it stands for, up to the
order of floating-point sums (tests/unit/test_grouped.py trains both ways and compares).
Only identical architectures batch: the static host of every seed, or every arm before it grows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from esper.kasmina.hosts import CNNHost, HostSpec
from esper.tolaria.augment import stacked_train_batches
from esper.tolaria.data import Dataset


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
        with torch.no_grad():
            for name, tensor in grouped.state_dict().items():
                parts = [host_tensor(h, name) for h in hosts]
                tensor.copy_(parts[0] if tensor.dim() == 0 else torch.cat(parts).view_as(tensor))
        return grouped

    def host(self, k: int) -> CNNHost:
        """Run k as a plain CNNHost (to evaluate or export it like any other run)."""
        host = CNNHost(self.spec)
        with torch.no_grad():
            for name, tensor in self.state_dict().items():
                target = host_tensor(host, name)
                target.copy_(tensor if tensor.dim() == 0 else tensor.chunk(self.k)[k].view_as(target))
        return host


def host_tensor(host: CNNHost, grouped_name: str) -> torch.Tensor:
    """The host's tensor that a grouped tensor's group stands for ("blocks.0.0.weight" -> the first
    block's conv weight, "head.weight" -> the linear head's, as a [classes, C, 1] view for the 1x1 conv)."""
    if grouped_name.startswith("head."):
        tensor = host.head[2].state_dict(keep_vars=True)[grouped_name.removeprefix("head.")]
        return tensor.unsqueeze(-1) if tensor.dim() == 2 else tensor
    return host.state_dict(keep_vars=True)[grouped_name]


def train_grouped(model: GroupedCNN, data: Dataset, generators: list[torch.Generator], steps: int, *,
                  lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4, batch_size: int = 128,
                  optimizer: torch.optim.Optimizer | None = None) -> torch.optim.Optimizer:
    """`steps` SGD steps of the K runs at once, run k drawing its batches (order and augmentation)
    from `generators[k]`, exactly as tolaria's Trainer would for that run alone. No host sync."""
    device = next(model.parameters()).device
    mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    model.train()
    for xb, yb in stacked_train_batches(data.train_x, data.train_y, batch_size=batch_size, max_batches=steps,
                                        generators=generators, device=device, mean=mean, std=std):
        x = xb.transpose(0, 1).flatten(1, 2)  # [B, K c_in, H, W]: run k's images in group k
        y = yb.T  # [B, K]
        logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten()) * model.k  # the sum of the runs' mean losses
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return optimizer
