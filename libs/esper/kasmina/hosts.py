"""Host networks. A host is a stem, a list of blocks and a head; slots sit at block boundaries.

The slot names come from the host's own block count (`slot_positions`), so a deeper host gets its
slots spread over its depth without a hand-written table.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class HostSpec:
    """What a host is made of; `kind` tells which blueprints fit its activations."""

    name: str
    kind: str  # "cnn": activations [B, C, H, W]
    in_channels: int
    channels: tuple[int, ...]  # one conv block per entry
    num_classes: int


HOSTS: dict[str, HostSpec] = {
    # 94,762 parameters: the host behind the original results table.
    "cifar10": HostSpec("cifar10", "cnn", 3, (32, 64, 128), 10),
    # Five blocks; 32x32 inputs are pooled down to 1x1 by the last block.
    "cifar10_deep": HostSpec("cifar10_deep", "cnn", 3, (32, 64, 64, 128, 128), 10),
    # Small enough that a unit test trains it for tens of epochs in seconds (16x16 inputs).
    "synthetic": HostSpec("synthetic", "cnn", 3, (8, 16, 32), 4),
}


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """conv3x3-BN-ReLU-maxpool; no conv bias because BN follows."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class CNNHost(nn.Module):
    """Plain conv blocks, global average pool, linear classifier."""

    def __init__(self, spec: HostSpec):
        super().__init__()
        self.spec = spec
        widths = (spec.in_channels, *spec.channels)
        self.stem = nn.Identity()
        self.blocks = nn.ModuleList(conv_block(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(spec.channels[-1], spec.num_classes)
        )

    def slot_positions(self) -> dict[str, int]:
        """Slot name -> index of the block it follows: first, middle and last boundary."""
        n = len(self.blocks)
        return {"early": 0, "mid": (n - 1) // 2, "late": n - 1}

    def slot_channels(self) -> dict[str, int]:
        return {name: self.spec.channels[i] for name, i in self.slot_positions().items()}


def build_host(name: str) -> CNNHost:
    if name not in HOSTS:
        raise ValueError(f"unknown host {name!r} (choices: {', '.join(HOSTS)})")
    return CNNHost(HOSTS[name])
