"""Batched crop/flip, normalization and batch iteration, checked against per-image references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from esper.tolaria.augment import (
    crop_flip,
    draw_crop_flip,
    eval_batches,
    normalize,
    pass_crops,
    stacked_train_batches,
    train_batches,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_crop_flip(x: torch.Tensor, *, pad: int = 4, generator: torch.Generator) -> torch.Tensor:
    """x cropped and flipped at random, drawn from `generator`, as a training batch is."""
    return crop_flip(x, *draw_crop_flip(len(x), pad=pad, generator=generator, device=x.device), pad=pad)


def _reference_match(out: torch.Tensor, x: torch.Tensor, pad: int) -> tuple[int, int, bool]:
    """(dy, dx, flipped) of the one window of the zero-padded x that `out` equals, per image."""
    padded = F.pad(x, (pad, pad, pad, pad))
    h, w = x.shape[-2:]
    matches = [
        (dy, dx, flipped)
        for dy in range(2 * pad + 1)
        for dx in range(2 * pad + 1)
        for flipped in (False, True)
        if torch.equal(
            out,
            padded[:, dy : dy + h, dx : dx + w].flip(-1) if flipped
            else padded[:, dy : dy + h, dx : dx + w],
        )
    ]
    assert len(matches) == 1, f"expected exactly one matching window, got {matches}"
    return matches[0]


def test_crop_flip_is_a_shifted_window_of_the_padded_input_per_image():
    x = torch.randn(256, 3, 8, 8, generator=_gen(1))  # distinct values: every window is unique
    out = random_crop_flip(x, pad=2, generator=_gen())
    assert out.shape == x.shape and out.dtype == x.dtype

    found = [_reference_match(out[b], x[b], pad=2) for b in range(len(x))]
    dys, dxs, flips = zip(*found)
    assert set(dys) == set(dxs) == set(range(5)), "every offset, extremes included, occurs"
    assert 96 <= sum(flips) <= 160  # p=0.5 over 256 images: outside this is > 4 sigma


def test_crop_flip_keeps_uint8_and_pad_zero_only_flips():
    x = torch.randint(0, 256, (64, 3, 6, 6), generator=_gen(2), dtype=torch.uint8)
    out = random_crop_flip(x, pad=0, generator=_gen())
    assert out.dtype == torch.uint8
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, x)])
    assert bool((flipped ^ kept).all()), "each image is either itself or its exact mirror"
    assert 0 < int(flipped.sum()) < 64


def test_crop_flip_is_reproducible_with_the_same_generator():
    x = torch.randn(32, 3, 16, 16, generator=_gen(3))
    first, again = (random_crop_flip(x, generator=_gen(7)) for _ in range(2))
    assert torch.equal(first, again)
    assert not torch.equal(first, random_crop_flip(x, generator=_gen(8)))


def test_normalize_values_and_dtype():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    mean = torch.tensor([0.0, 0.2, 0.5], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.5, 0.1, 0.25], dtype=torch.float64).view(1, 3, 1, 1)
    out = normalize(x, mean, std)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 2, 2)
    expected = torch.tensor([0.0, 0.0, 2.0]).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    torch.testing.assert_close(out, expected)
    already_float = x.float()
    normalize(already_float, mean, std)
    assert torch.equal(already_float, x.float()), "the input is never normalized in place"


def _indexed_images(n: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is flat with value i, label i, so a batch shows which items it holds."""
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, size, size).contiguous()
    return x, torch.arange(n)


# mean 0, std 1/255 make normalize the identity on pixel values (up to float rounding).
IDENTITY = dict(mean=torch.zeros(1, 3, 1, 1), std=torch.full((1, 3, 1, 1), 1 / 255))


def _items(xb: torch.Tensor) -> list[int]:
    return xb[:, 0, 8, 8].round().long().tolist()  # the centre stays inside any 4-px crop


@pytest.mark.parametrize("augment", [False, True])
def test_train_batches_cover_a_permutation_in_full_batches(augment):
    x, y = _indexed_images(105)
    batches = list(train_batches(x, y, batch_size=10, max_batches=0, generator=_gen(),
                                 device="cpu", augment=augment, **IDENTITY))
    assert len(batches) == 10, "the last partial batch (5 items) is dropped"
    seen = []
    for xb, yb in batches:
        assert xb.shape == (10, 3, 16, 16) and xb.dtype == torch.float32
        assert _items(xb) == yb.tolist(), "images and labels stay paired"
        seen += yb.tolist()
    assert len(set(seen)) == 100 and seen != sorted(seen), "distinct items, shuffled"
    if not augment:
        for xb, yb in batches:
            torch.testing.assert_close(xb, x[yb].float())


def test_train_batches_respect_max_batches_and_the_generator():
    x, y = _indexed_images(100)

    def labels(max_batches: int, seed: int) -> list[list[int]]:
        return [yb.tolist() for _, yb in train_batches(
            x, y, batch_size=8, max_batches=max_batches, generator=_gen(seed), device="cpu",
            **IDENTITY)]

    assert len(labels(3, 0)) == 3
    assert len(labels(50, 0)) == 12, "capped at the full batches in one pass"
    assert labels(3, 0) == labels(0, 0)[:3], "early stop is a prefix of the same pass"
    assert labels(0, 0) != labels(0, 1)
    with pytest.raises(ValueError):
        next(train_batches(x, y, batch_size=101, max_batches=0, generator=_gen(), device="cpu",
                           **IDENTITY))


def test_stacked_batches_are_each_runs_own_train_batches():
    """Three runs' batches gathered, cropped, flipped and normalized at once are bit for bit the batches
    each run's generator gives train_batches alone: a grouped run sees the data its lone run would."""
    x, y = _indexed_images(100)
    seeds = (3, 4, 5)
    stacked = list(stacked_train_batches(x, y, batch_size=8, max_batches=4, device="cpu",
                                         generators=[_gen(s) for s in seeds], **IDENTITY))
    alone = [list(train_batches(x, y, batch_size=8, max_batches=4, generator=_gen(s), device="cpu", **IDENTITY))
             for s in seeds]
    assert len(stacked) == 4
    for step, (xb, yb) in enumerate(stacked):
        assert xb.shape == (3, 8, 3, 16, 16) and yb.shape == (3, 8)
        for k in range(len(seeds)):
            assert torch.equal(xb[k], alone[k][step][0]) and torch.equal(yb[k], alone[k][step][1])
    assert not torch.equal(stacked[0][1][0], stacked[0][1][1]), "each run has its own order"


def test_a_pass_draws_everything_when_it_starts():
    """Order, crops and flips are drawn before the first batch, so a training step dispatches no random
    operators: the generator stands where the whole pass leaves it once the first batch is out."""
    x, y = _indexed_images(100)
    for augment in (False, True):
        first, whole = _gen(), _gen()
        batches = train_batches(x, y, batch_size=8, max_batches=0, generator=first, device="cpu",
                                augment=augment, **IDENTITY)
        next(batches)
        list(train_batches(x, y, batch_size=8, max_batches=0, generator=whole, device="cpu", augment=augment,
                           **IDENTITY))
        assert torch.equal(first.get_state(), whole.get_state())
        assert not torch.equal(first.get_state(), _gen().get_state())


def test_pass_crops_lay_out_each_batch_run_by_run():
    together = pass_crops(5, 4, [_gen(1), _gen(2)], torch.device("cpu"))
    alone = [pass_crops(5, 4, [_gen(s)], torch.device("cpu")) for s in (1, 2)]
    for c in range(3):  # dy, dx, flip
        assert together[c].shape == (5, 8, 1)
        for i in range(5):
            assert torch.equal(together[c][i], torch.cat([alone[0][c][i], alone[1][c][i]]))
    assert together[0].max() <= 8 and together[2].dtype == torch.bool


def test_eval_batches_cover_everything_in_order_with_the_partial_batch():
    x, y = _indexed_images(23)
    batches = list(eval_batches(x, y, batch_size=10, device="cpu", **IDENTITY))
    assert [len(yb) for _, yb in batches] == [10, 10, 3]
    assert torch.equal(torch.cat([yb for _, yb in batches]), y)
    torch.testing.assert_close(torch.cat([xb for xb, _ in batches]), x.float())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_data_reaches_the_gpu_and_matches_the_cpu_pipeline():
    x, y = _indexed_images(64)
    cuda = torch.device("cuda")
    gpu_stats = {k: v.to(cuda) for k, v in IDENTITY.items()}
    kw = dict(batch_size=16, max_batches=0, augment=False)
    on_gpu = list(train_batches(x, y, generator=_gen(), device=cuda, **kw, **gpu_stats))
    on_cpu = list(train_batches(x, y, generator=_gen(), device="cpu", **kw, **IDENTITY))
    for (xg, yg), (xc, yc) in zip(on_gpu, on_cpu, strict=True):
        assert xg.is_cuda and yg.is_cuda
        torch.testing.assert_close(xg.cpu(), xc)
        assert torch.equal(yg.cpu(), yc)

    gen = torch.Generator(device=cuda).manual_seed(0)
    out = random_crop_flip(x.to(cuda), generator=gen)  # draws and gather all on the GPU
    assert out.is_cuda and _items(out.float()) == list(range(64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: a host sync only exists with a device")
def test_a_pass_of_host_data_never_waits_for_the_gpu():
    """CUDA's sync debug mode raises on any operation that waits for the device. With the dataset in host
    memory (no --gpu-preload), a pass's batches, draws and augmentation reach the GPU without one, one run's
    or K runs' at once, so the training step never stalls the host (a plain copy of the draws did, per batch)."""
    x, y = _indexed_images(256)
    cuda = torch.device("cuda")
    stats = {name: value.to(cuda) for name, value in IDENTITY.items()}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        alone = list(train_batches(x, y, batch_size=16, max_batches=0, generator=_gen(), device=cuda, **stats))
        stacked = list(stacked_train_batches(x, y, batch_size=16, max_batches=0, generators=[_gen(1), _gen(2)],
                                             device=cuda, **stats))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(alone) == len(stacked) == 16
    assert all(xb.is_cuda and yb.is_cuda for xb, yb in alone + stacked)
    assert _items(alone[0][0]) == alone[0][1].tolist()  # each image still with its label


def test_a_training_crop_shifts_by_up_to_the_recipes_4_pixels():
    """The standard CIFAR-10 recipe's RandomCrop(32, padding=4): over a pass of white images, the black border a
    crop brings in is 0 to 4 pixels on each side, every width drawn (a pad of 2 passed every other test)."""
    x = torch.full((512, 3, 32, 32), 255, dtype=torch.uint8)
    (xb, _), = train_batches(x, torch.zeros(512, dtype=torch.long), batch_size=512, max_batches=0, generator=_gen(),
                             device="cpu", augment=True, **IDENTITY)
    white = xb[:, 0] > 0  # [B, H, W]
    rows, cols = white.any(2).float(), white.any(1).float()  # [B, H], [B, W]: the rows and columns a crop kept
    top = 32 - rows.sum(1).long()  # black rows: at the top or bottom, by the crop's dy
    left = 32 - cols.sum(1).long()
    assert set(top.tolist()) == set(left.tolist()) == {0, 1, 2, 3, 4}
