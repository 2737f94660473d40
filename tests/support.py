"""Constants and helpers the tests share, importable as `support` (pytest puts tests/ on sys.path; a module named
`conftest` is not importable unambiguously once tests/integration/ has its own)."""

import contextlib
import os
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

from esper.kasmina.hosts import HostSpec
from esper.tolaria.augment import train_batches

# CI clones the repository next to a copy of shared/; so does every developer checkout.
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR_DIR = SHARED / "data" / "cifar10"
TINYSTORIES_DIR = SHARED / "data" / "tinystories"

# The tinystories host's shape at a size a test runs in milliseconds: 3 blocks (early, mid, late
# after blocks 0, 1, 2, as on the synthetic CNN), width 32, 2 heads, 64 tokens, 16 positions.
TINY_LM = HostSpec("tiny_lm", "transformer", 64, (32, 32, 32), 64, heads=2, context=16)


# The plainest PyTorch training loop for a host: what Esper's trainer and grouped runs are held to.
def plain(host) -> torch.nn.Sequential:
    """The host as one network (its modules shared): a host's forward is MorphogeneticModel's job."""
    return torch.nn.Sequential(host.stem, *host.blocks, host.head)


def train_alone(host, data, generator: torch.Generator, steps: int,
                memory_format: torch.memory_format = torch.contiguous_format) -> None:
    """`steps` batches of 128 from train_batches (normalized, augmented), cross-entropy, one SGD with
    the trainer's defaults (lr 0.01, momentum 0.9, weight decay 5e-4); weights and batches in
    `memory_format`."""
    net = plain(host).to(memory_format=memory_format)
    mean, std = data.channel_stats()
    opt = torch.optim.SGD(host.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    host.train()
    for xb, yb in train_batches(data.train_x, data.train_y, batch_size=128, max_batches=steps, generator=generator,
                                device="cpu", mean=mean, std=std, memory_format=memory_format):
        loss = F.cross_entropy(net(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


class Interrupted(Exception):
    pass


class StopsAt:
    """`policy` until `epoch`, then an exception: a run that dies mid-episode, in-process."""

    def __init__(self, epoch: int, policy):
        self.epoch, self.policy = epoch, policy

    def decide(self, obs):
        if obs.signals.epoch == self.epoch:
            raise Interrupted
        return self.policy.decide(obs)


@contextlib.contextmanager
def recorded_syncs():
    """The fsyncs (of the path each file descriptor names), os.replaces and unlinks done inside, in order, as
    ("fsync" | "replace" | "unlink", path): what makes a write durable is their order."""
    calls = []
    fsync, replace, unlink = os.fsync, os.replace, Path.unlink
    with (mock.patch("os.fsync", lambda fd: calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or fsync(fd)),
          mock.patch("os.replace", lambda a, b: calls.append(("replace", str(b))) or replace(a, b)),
          mock.patch.object(Path, "unlink", lambda p: calls.append(("unlink", str(p))) or unlink(p))):
        yield calls
