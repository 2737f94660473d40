"""Host networks. A host is a stem, a list of blocks and a head; slots sit at block boundaries.

The slot names come from the host's own block count (`slot_positions`), so a deeper host gets its
slots spread over its depth without a hand-written table. Two kinds: a CNN over images and a
decoder-only transformer over tokens (its blocks are in `esper.kasmina.transformer`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from esper.kasmina.transformer import Block, Embedding, LMHead, init_gpt_weights


@dataclass(frozen=True)
class HostSpec:
    """What a host is made of; `kind` tells which blueprints fit its activations."""

    name: str
    kind: str  # "cnn": activations [B, C, H, W]; "transformer": the residual stream [B, T, C]
    in_channels: int  # image channels | vocabulary size (token ids in)
    channels: tuple[int, ...]  # one block per entry: conv widths | the stream width, once per layer
    num_classes: int  # classes | vocabulary size (next-token logits out)
    heads: int = 0  # transformer: attention heads per block
    context: int = 0  # transformer: longest sequence, in tokens (learned positions)


HOSTS: dict[str, HostSpec] = {
    # 94,762 parameters: the host behind the original results table.
    "cifar10": HostSpec("cifar10", "cnn", 3, (32, 64, 128), 10),
    # Five blocks; 32x32 inputs are pooled down to 1x1 by the last block.
    "cifar10_deep": HostSpec("cifar10_deep", "cnn", 3, (32, 64, 64, 128, 128), 10),
    # Small enough that a unit test trains it for tens of epochs in seconds (16x16 inputs).
    "synthetic": HostSpec("synthetic", "cnn", 3, (8, 16, 32), 4),
    # 1,071,872 parameters (embedding tied to the LM head); vocabulary = the BPE tokenizer's 2,048
    # ids. Sized for the 2-core CPU: 16 windows of 128 tokens train at about 0.2 s a step.
    "tinystories": HostSpec("tinystories", "transformer", 2048, (128,) * 4, 2048, heads=4, context=128),
}


class Host(nn.Module):
    """What every host has: `spec`, `stem`, `blocks` (an nn.ModuleList) and `head`."""

    spec: HostSpec
    blocks: nn.ModuleList

    def slot_positions(self) -> dict[str, int]:
        """Slot name -> index of the block it follows: first, middle and last boundary."""
        n = len(self.blocks)
        return {"early": 0, "mid": (n - 1) // 2, "late": n - 1}

    def slot_channels(self) -> dict[str, int]:
        return {name: self.spec.channels[i] for name, i in self.slot_positions().items()}


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """conv3x3-BN-ReLU-maxpool; no conv bias because BN follows."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class CNNHost(Host):
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


class TransformerHost(Host):
    """Pre-norm decoder-only language model: [B, T] token ids -> [B, T, vocab] next-token logits.
    stem = token + position embedding, blocks = transformer blocks, head = final LayerNorm + LM head."""

    def __init__(self, spec: HostSpec):
        super().__init__()
        self.spec = spec
        width = spec.channels[0]
        if any(c != width for c in spec.channels) or spec.in_channels != spec.num_classes:
            raise ValueError(f"{spec.name}: a transformer has one width and one vocabulary")
        self.stem = Embedding(spec.in_channels, width, spec.context)
        self.blocks = nn.ModuleList(Block(width, spec.heads) for _ in spec.channels)
        self.head = LMHead(self.stem.tok)
        init_gpt_weights(self, len(spec.channels))


HOST_KINDS: dict[str, type[Host]] = {"cnn": CNNHost, "transformer": TransformerHost}


def build_host(name: str) -> Host:
    if name not in HOSTS:
        raise ValueError(f"unknown host {name!r} (choices: {', '.join(HOSTS)})")
    return HOST_KINDS[HOSTS[name].kind](HOSTS[name])
