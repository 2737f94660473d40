"""Batching, augmentation and normalization as tensor ops on the batch's device.

Following airbench, the dataset stays one uint8 tensor (ideally already on the GPU), a pass's random
draws (its order, a `randperm`, and every image's crop and flip) are made on the generator's device
when the pass starts, and a batch is cropped, flipped and normalized in a handful of kernels: no
per-image Python loop, no DataLoader workers, no `.item()` or `.cpu()`, and from host memory only
pinned, non-blocking copies, so the training step never waits on the device. Crop and flip run on the
uint8 batch (a quarter of the bytes of float32) and pad with zeros, i.e. black, as torchvision's
`RandomCrop(padding=4)` does in the standard CIFAR-10 recipe.

Token windows (a language model's data) share the batching: with `mean` None a batch goes to the
model as it is, never normalized or augmented.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

PAD = 4
"""Pixels of zero padding a training crop may shift by: CIFAR-10's standard RandomCrop(32, padding=4)."""


def draw_crop_flip(
    b: int, *, pad: int, generator: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random crops and flips for b images: row and column offsets in [0, 2 pad] and flips, [B, 1] each on
    `device`, drawn from `generator` on its own device and moved to `device` without waiting for it."""
    offsets = torch.randint(0, 2 * pad + 1, (2, b, 1), generator=generator, device=generator.device)
    flip = torch.randint(0, 2, (b, 1), generator=generator, device=generator.device).bool()  # [B, 1]
    dy, dx = _to_device(offsets, device)  # [B, 1] each
    return dy, dx, _to_device(flip, device)


def crop_flip(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, *, pad: int) -> torch.Tensor:
    """x [B, C, H, W] zero-padded by `pad`, image i cropped at (dy[i], dx[i]) and flipped where flip[i]."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))  # [B, C, H + 2p, W + 2p]
    row = torch.arange(h, device=x.device)  # [H]
    col = torch.arange(w, device=x.device)  # [W]
    rows = dy + row  # [B, H]
    # A flipped crop reads its window right to left, so crop and flip are one gather.
    cols = dx + torch.where(flip, w - 1 - col, col)  # [B, W]
    # One gather over flattened pixels with the index shared by all channels: 7x faster on the
    # CPU than 4-way advanced indexing (10.7 -> 1.5 ms for 512x3x32x32 uint8).
    index = (rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]).view(b, 1, h * w)  # [B, 1, HW]
    return padded.flatten(2).gather(2, index.expand(b, c, h * w)).view(b, c, h, w)


def normalize(x_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
              memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """float32 (x / 255 - mean) / std in `memory_format`; mean and std are [1, C, 1, 1] on x's device.

    In place on a fresh float copy (never the input): one allocation, which also lays the batch out
    as the model wants it (TrainConfig.memory_format), and float32 even for float64 mean/std.
    """
    return x_uint8.to(torch.float32, copy=True, memory_format=memory_format).div_(255).sub_(mean).div_(std)


def train_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int,
    max_batches: int,
    generator: torch.Generator,
    device: torch.device | str,
    mean: torch.Tensor | None,
    std: torch.Tensor | None,
    augment: bool = True,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One shuffled pass: normalized (and augmented) float32 images [B, C, H, W] in `memory_format`
    and labels [B], or with `mean` None token windows [B, T] and their next tokens [B, T], as they are.

    x: [N, C, H, W] uint8, y: [N] int64, on any device. Only full batches are yielded, so every
    step sees `batch_size` images (BatchNorm statistics and step sizes stay comparable);
    `max_batches` > 0 stops early, 0 means the whole pass.
    """
    n_batches = batch_count(len(x), batch_size, max_batches)
    perm = shuffled(len(x), generator, x.device)
    device = torch.device(device)
    crops = pass_crops(n_batches, batch_size, [generator], device) if mean is not None and augment else None
    for i in range(n_batches):
        idx = perm[i * batch_size : (i + 1) * batch_size]  # [B]
        xb, yb = _to_device(x[idx], device), _to_device(y[idx], device)
        if mean is not None:
            if crops is not None:
                xb = crop_flip(xb, *(c[i] for c in crops), pad=PAD)
            xb = normalize(xb, mean, std, memory_format)
        yield xb, yb


def stacked_train_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int,
    max_batches: int,
    generators: list[torch.Generator],
    device: torch.device | str,
    mean: torch.Tensor,
    std: torch.Tensor,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """K runs' `train_batches` at once: images [K, B, C, H, W] and labels [K, B], run k's exactly
    those `train_batches` yields with `generators[k]` (the same draws from it, in the same order).

    Only the draws are per run; gathering, cropping, flipping and normalizing happen once for all K
    runs, so a step of K runs costs the kernel launches of one (esper.tolaria.grouped).
    """
    k = len(generators)
    n_batches = batch_count(len(x), batch_size, max_batches)
    perms = torch.stack([shuffled(len(x), g, x.device) for g in generators])  # [K, N]
    device = torch.device(device)
    crops = pass_crops(n_batches, batch_size, generators, device)
    for i in range(n_batches):
        idx = perms[:, i * batch_size : (i + 1) * batch_size].reshape(-1)  # [K B], run by run
        xb, yb = _to_device(x[idx], device), _to_device(y[idx], device)
        xb = normalize(crop_flip(xb, *(c[i] for c in crops), pad=PAD), mean, std)
        yield xb.view(k, batch_size, *xb.shape[1:]), yb.view(k, batch_size)


def pass_crops(n_batches: int, batch_size: int, generators: list[torch.Generator],
               device: torch.device) -> list[torch.Tensor]:
    """Every batch's crops and flips for a pass of K runs (one generator each), drawn when the pass
    starts: dy, dx and flip, each [n_batches, K B, 1], batch i's K B rows run by run.

    Drawn per pass rather than per batch, a step dispatches no random-number operators at all, whatever
    K is: drawn per batch, they took a step of 8 grouped runs from 155 operators to 203 (bench/launches.py)."""
    draws = [draw_crop_flip(n_batches * batch_size, pad=PAD, generator=g, device=device) for g in generators]
    return [torch.stack(parts).view(len(generators), n_batches, batch_size, 1).transpose(0, 1)
            .reshape(n_batches, len(generators) * batch_size, 1) for parts in zip(*draws)]


def batch_count(n: int, batch_size: int, max_batches: int) -> int:
    """Full batches of one pass over n items: all of them, or at most max_batches when it is > 0."""
    if not 0 < batch_size <= n:
        raise ValueError(f"batch_size {batch_size} gives no full batch of {n} items")
    if max_batches < 0:
        raise ValueError(f"max_batches must be >= 0, got {max_batches}")
    n_full = n // batch_size
    return min(max_batches, n_full) if max_batches else n_full


def shuffled(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """A pass's order: randperm(n) on the generator's device, moved to `device` (one transfer per pass
    when the two differ)."""
    return torch.randperm(n, generator=generator, device=generator.device).to(device)


def eval_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int,
    device: torch.device | str,
    mean: torch.Tensor | None,
    std: torch.Tensor | None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every item once, in order, last partial batch included; normalized in `memory_format` (unless
    `mean` is None), not augmented."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = torch.device(device)
    for start in range(0, len(x), batch_size):
        xb = _to_device(x[start : start + batch_size], device)  # [B, C, H, W]
        yb = _to_device(y[start : start + batch_size], device)  # [B]
        yield (xb if mean is None else normalize(xb, mean, std, memory_format)), yb


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host-to-GPU copies go through pinned memory so they overlap with compute: a plain copy from pageable
    memory waits for the GPU to finish all it was given (a host sync)."""
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
