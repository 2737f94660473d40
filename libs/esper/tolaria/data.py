"""Task data as whole tensors: CIFAR-10, a procedural offline task, and (in `text`) TinyStories.

Each split is one [N, C, H, W] uint8 tensor so a training run can move it to the device once and
batch, augment and normalize it there (airbench style; see `esper.tolaria.augment`). uint8 keeps
CIFAR-10's 60,000 images at 184 MB.

CIFAR-10 is read from a local folder when one is given (torchvision's `cifar-10-batches-py/` or
the `cifar10-jpeg.tar.gz` JPEG copy), else downloaded by torchvision. Missing data is an error that
names the options, never a silent fallback to random data: a run on the wrong data would report
numbers that mean nothing. Decoding the JPEG copy takes seconds, so the decoded tensors are cached
under the cache dir (never in the data dir, which may be read-only).

The validation split is carved from the training set with a seeded permutation, so model selection
never looks at the test set.

Language-model data (`esper.tolaria.text`) uses the same Dataset with kind "tokens": x holds windows
of token ids and y the same windows shifted by one token.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tarfile
import tempfile
import warnings
from dataclasses import dataclass
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from esper.tolaria.tokenizer import BPETokenizer

log = logging.getLogger(__name__)

CIFAR10_JPEG_TARBALL = "cifar10-jpeg.tar.gz"
CIFAR10_BATCHES_DIR = "cifar-10-batches-py"
_CACHE_KEYS = ("train_x", "train_y", "test_x", "test_y")


class DataError(RuntimeError):
    """Data could not be found or read; the message names the options."""


@dataclass(frozen=True)
class Dataset:
    """Train/val/test splits of a task, resident as whole tensors: labelled images (kind "images")
    or next-token windows (kind "tokens": x [N, T] int64 ids, y [N, T] int64 the ids one step on)."""

    name: str
    train_x: torch.Tensor  # [N_train, C, H, W] uint8 | [N_train, T] int64
    train_y: torch.Tensor  # [N_train] int64 | [N_train, T] int64
    val_x: torch.Tensor  # [N_val, C, H, W] uint8, carved from the training set | [N_val, T]
    val_y: torch.Tensor  # [N_val] int64 | [N_val, T]
    test_x: torch.Tensor  # [N_test, C, H, W] uint8 | [N_test, T]
    test_y: torch.Tensor  # [N_test] int64 | [N_test, T]
    num_classes: int  # classes | vocabulary size
    mean: tuple[float, ...]  # per-channel mean of train_x / 255; () for tokens
    std: tuple[float, ...]  # per-channel std of train_x / 255; () for tokens
    kind: str = "images"
    tokenizer: BPETokenizer | None = None  # tokens: what turns ids back into text

    def channel_stats(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """`mean` and `std` as [1, C, 1, 1] tensors on `device`: what a batch of images is normalized by."""
        mean, std = (torch.tensor(v, device=device).view(1, -1, 1, 1) for v in (self.mean, self.std))
        return mean, std

    def to(self, device: torch.device | str) -> Dataset:
        """The same dataset with every tensor on `device`."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)


def default_cache_dir() -> Path:
    """$ESPER_CACHE_DIR, else ~/.cache/esper."""
    return Path(os.environ.get("ESPER_CACHE_DIR") or Path.home() / ".cache" / "esper")


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """The explicit argument, else $ESPER_DATA_DIR, else None (meaning: download)."""
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get("ESPER_DATA_DIR")
    return Path(env) if env else None


def load_task_data(
    task: str, data_dir: str | Path | None, *, cache_dir: Path | None = None, batch_size: int = 1
) -> Dataset:
    """The dataset a training task runs on; both CIFAR-10 hosts share the same data. DataError when its
    training split holds less than one `batch_size` batch (a small text folder): found here, before a run
    directory is made, not at the first step."""
    data = read_task_data(task, data_dir, cache_dir)
    if len(data.train_x) < batch_size:
        raise DataError(f"{data_dir or task}: its training split holds {len(data.train_x)} items, fewer than one "
                        f"batch of {batch_size}")
    return data


def read_task_data(task: str, data_dir: str | Path | None, cache_dir: Path | None) -> Dataset:
    if task in ("cifar10", "cifar10_deep"):
        return load_cifar10(data_dir, cache_dir=cache_dir)
    if task == "synthetic":
        return make_synthetic()
    if task == "tinystories":
        from esper.kasmina import HOSTS
        from esper.tolaria.text import load_tinystories  # text imports this module: import on use

        spec = HOSTS[task]  # the tokenizer's vocabulary and the windows fit the host
        return load_tinystories(data_dir, cache_dir=cache_dir, vocab_size=spec.num_classes, context=spec.context)
    raise ValueError(f"unknown task {task!r} (choices: cifar10, cifar10_deep, synthetic, tinystories)")


def load_cifar10(
    data_dir: str | Path | None,
    *,
    cache_dir: Path | None = None,
    val_size: int = 5000,
    split_seed: int = 0,
) -> Dataset:
    """CIFAR-10 with `val_size` training images held out for validation (45k/5k/10k by default).

    Sources, in order: `data_dir/cifar-10-batches-py/`, `data_dir/cifar10-jpeg.tar.gz`, and when
    no data dir is given (argument or $ESPER_DATA_DIR) torchvision's download into
    `cache_dir/torchvision`.
    """
    cache_dir = cache_dir or default_cache_dir()
    data_dir = resolve_data_dir(data_dir)
    if data_dir is None:
        tensors = _download_cifar10(cache_dir / "torchvision")
    elif (data_dir / CIFAR10_BATCHES_DIR).is_dir():
        tensors = _read_cifar10_batches(data_dir)
    elif (data_dir / CIFAR10_JPEG_TARBALL).is_file():
        tensors = _cached_cifar10_jpeg(data_dir / CIFAR10_JPEG_TARBALL, cache_dir)
    else:
        raise DataError(_options(f"no CIFAR-10 data in {data_dir}"))
    train_x, train_y, test_x, test_y = tensors

    n = len(train_x)
    if not 0 <= val_size < n:
        raise DataError(_options(f"{data_dir or 'the download'} holds {n} training images, too few to hold out "
                                 f"{val_size} for validation (CIFAR-10 has 50,000)"))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))  # [N]
    train_idx, val_idx = perm[: n - val_size], perm[n - val_size :]
    return _dataset(
        "cifar10",
        train_x[train_idx],
        train_y[train_idx],
        train_x[val_idx],
        train_y[val_idx],
        test_x,
        test_y,
        num_classes=10,
    )


def _options(problem: str) -> str:
    return (
        f"{problem}. Point --data-dir (or ESPER_DATA_DIR) at a folder holding "
        f"{CIFAR10_BATCHES_DIR}/ (torchvision's format) or {CIFAR10_JPEG_TARBALL}, "
        "or run with internet access so torchvision can download CIFAR-10."
    )


def _from_torchvision(root: Path, *, download: bool) -> tuple[torch.Tensor, ...]:
    """(train_x, train_y, test_x, test_y) from torchvision's pickled batches under `root`."""
    import torchvision  # here, not at the top: it costs every process ~1.4 s to start, and most never decode

    out = []
    for train in (True, False):
        split = torchvision.datasets.CIFAR10(root=root, train=train, download=download)
        out.append(torch.from_numpy(split.data).permute(0, 3, 1, 2).contiguous())  # NHWC -> NCHW
        out.append(torch.tensor(split.targets, dtype=torch.int64))
    return tuple(out)


def _download_cifar10(root: Path) -> tuple[torch.Tensor, ...]:
    try:
        return _from_torchvision(root, download=True)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a bad checksum a RuntimeError
        problem = f"torchvision could not download CIFAR-10 into {root} ({e})"
        raise DataError(_options(problem)) from e


def _read_cifar10_batches(data_dir: Path) -> tuple[torch.Tensor, ...]:
    try:
        return _from_torchvision(data_dir, download=False)
    except (OSError, RuntimeError) as e:  # torchvision raises RuntimeError on missing/corrupt files
        raise DataError(_options(f"could not read {data_dir / CIFAR10_BATCHES_DIR} ({e})")) from e


def _cached_cifar10_jpeg(tarball: Path, cache_dir: Path) -> tuple[torch.Tensor, ...]:
    """The decoded tarball, from the cache when an entry for this exact file exists."""
    st = tarball.stat()
    stem = tarball.name.split(".")[0]
    cache_path = cache_dir / f"{stem}-{st.st_size}-{st.st_mtime_ns}.pt"
    cached = read_tensor_cache(cache_path, _CACHE_KEYS)
    if cached is not None:
        return cached
    tensors = _decode_cifar10_jpeg(tarball)
    blob = dict(zip(_CACHE_KEYS, tensors))
    write_cache(cache_path, lambda f: torch.save(blob, f))
    return tensors


def read_tensor_cache(path: Path, keys: tuple[str, ...]) -> tuple[torch.Tensor, ...] | None:
    """The cached tensors under `keys`, or None when there is no usable entry (a bad one is deleted)."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, weights_only=True)
        tensors = tuple(blob[k] for k in keys)
        if not all(isinstance(t, torch.Tensor) for t in tensors):
            raise TypeError("not a tensor")
        return tensors
    except Exception as e:  # any unreadable cache is rebuilt: it only ever costs a decode
        log.warning("discarding unreadable cache %s (%s)", path, e)
        path.unlink(missing_ok=True)
        return None


def write_cache(path: Path, save: Callable[[IO[bytes]], None]) -> None:
    """Write a cache entry with `save(file)` atomically (temp file + rename): a crash or a concurrent
    run never sees half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                save(f)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    except (OSError, RuntimeError) as e:  # a read-only or full disk only costs the next run another decode
        log.warning("could not write cache %s (%s)", path, e)  # (torch.save's zip writer raises RuntimeError)


def _decode_cifar10_jpeg(tarball: Path) -> tuple[torch.Tensor, ...]:
    """Decode `[<top>/]{train,test}/<class>/<file>.jpg`; labels are the sorted class folders."""
    jpegs: dict[str, dict[tuple[str, str], torch.Tensor]] = {"train": {}, "test": {}}
    try:
        with tarfile.open(tarball, "r:*") as tar:
            for member in tar:
                parts = PurePosixPath(member.name).parts  # [top/]split/class/file
                if not (member.isfile() and len(parts) >= 3 and member.name.endswith(".jpg")):
                    continue
                split, cls, fname = parts[-3:]
                if split in jpegs:
                    raw = bytearray(tar.extractfile(member).read())
                    jpegs[split][cls, fname] = torch.frombuffer(raw, dtype=torch.uint8)
    except (OSError, EOFError, tarfile.TarError) as e:  # EOFError: a truncated download
        first = (str(e).splitlines() or [type(e).__name__])[0].rstrip(":")  # tarfile's errors run to lines
        raise DataError(_options(f"could not read {tarball} ({first})")) from e

    classes = sorted({cls for cls, _ in jpegs["train"]})
    if not classes or sorted({cls for cls, _ in jpegs["test"]}) != classes:
        raise DataError(_options(f"{tarball} lacks matching train/<class>/ and test/<class>/"))
    if len(classes) != 10:  # the host's head has 10 outputs: other data would train without a word
        raise DataError(_options(f"{tarball} holds {len(classes)} classes, not CIFAR-10's 10"))
    label = {cls: i for i, cls in enumerate(classes)}
    from torchvision.io import ImageReadMode, decode_jpeg  # here: see _from_torchvision

    out = []
    for split in ("train", "test"):
        keys = sorted(jpegs[split])  # (class, file): a fixed order whatever the tar order
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its codecs in favour of torchcodec, one warning per
            # call; pyproject pins torchvision < 0.30, where they still work.
            warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)
            try:
                images = decode_jpeg([jpegs[split][k] for k in keys], mode=ImageReadMode.RGB)
            except RuntimeError as e:
                raise DataError(_options(f"{tarball} holds an unreadable JPEG ({e})")) from e
        out.append(torch.stack(images))  # [N, 3, 32, 32] uint8
        out.append(torch.tensor([label[cls] for cls, _ in keys], dtype=torch.int64))  # [N]
    return tuple(out)


def make_synthetic(
    *,
    seed: int = 0,
    n_train: int = 2048,
    n_val: int = 512,
    n_test: int = 512,
    num_classes: int = 4,
    size: int = 16,
) -> Dataset:
    """A procedural image task for tests and offline runs, deterministic by `seed`.

    Each class is a mixture of six smooth colour templates. A template is a weak class component
    plus a stronger template-specific one, so a class is several unrelated-looking modes and a
    network needs capacity to cover them all. A sample is one template of its class rolled by up
    to 2 px, flipped with p=0.5, contrast- and brightness-jittered, plus a smooth random distractor
    field of the same scale as the templates and pixel noise. Measured over seeds 0-3 (conv-BN-
    ReLU-pool CNN, SGD lr 0.05 momentum 0.9, batch 128, no augmentation, 10 epochs, about 0.1 s an
    epoch on 2 CPU cores): channels (8, 16, 32) reach 62-72% validation accuracy (chance 25%) and
    channels (32, 64, 128) 77-80%, so added capacity has room to help.
    """
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_val + n_test
    templates_per_class = 6

    class_part = 0.5 * torch.randn(num_classes, 1, 3, 4, 4, generator=g)
    template_part = 0.7 * torch.randn(num_classes, templates_per_class, 3, 4, 4, generator=g)
    templates = _smooth_field((class_part + template_part).flatten(0, 1), size)  # [K*T, 3, S, S]

    y = torch.randint(num_classes, (n,), generator=g)  # [N]
    which = torch.randint(templates_per_class, (n,), generator=g)  # [N]
    images = templates[y * templates_per_class + which]  # [N, 3, S, S]

    # Per-sample roll by (dy, dx) in [-2, 2] and horizontal flip, as one gather.
    dy, dx = torch.randint(-2, 3, (2, n, 1), generator=g)  # [N, 1] each
    flip = torch.rand(n, 1, generator=g) < 0.5  # [N, 1]
    pos = torch.arange(size)  # [S]
    rows = (pos - dy) % size  # [N, S]
    cols = (torch.where(flip, size - 1 - pos, pos) - dx) % size  # [N, S]
    images = images[
        torch.arange(n)[:, None, None, None],
        torch.arange(3)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]  # [N, 3, S, S]

    contrast = torch.empty(n, 1, 1, 1).uniform_(0.5, 1.5, generator=g)
    brightness = 0.3 * torch.randn(n, 1, 1, 1, generator=g)
    distractor = _smooth_field(torch.randn(n, 3, 4, 4, generator=g), size)  # [N, 3, S, S]
    noise = 0.8 * torch.randn(n, 3, size, size, generator=g)
    images = contrast * images + brightness + distractor + noise  # std about 1.3
    x = (128 + 40 * images).round().clamp(0, 255).to(torch.uint8)  # [N, 3, S, S], 2% clipped

    a, b = n_train, n_train + n_val
    return _dataset(
        "synthetic", x[:a], y[:a], x[a:b], y[a:b], x[b:], y[b:], num_classes=num_classes
    )


def _smooth_field(coarse: torch.Tensor, size: int) -> torch.Tensor:
    """[N, C, 4, 4] -> [N, C, size, size] by bilinear upsampling: low-frequency structure only."""
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def _dataset(
    name: str,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    num_classes: int,
) -> Dataset:
    mean, std = _channel_stats(train_x)
    return Dataset(
        name, train_x, train_y, val_x, val_y, test_x, test_y, num_classes, mean, std
    )


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of x / 255, exact, from a 256-bin histogram per channel.

    A histogram avoids a float copy of the training set (1.1 GB in float64 for CIFAR-10).
    """
    values = torch.arange(256, dtype=torch.float64) / 255  # [256]
    counts = torch.stack(
        [torch.bincount(x[:, c].flatten(), minlength=256) for c in range(x.shape[1])]
    ).to(torch.float64)  # [C, 256]
    total = counts.sum(dim=1)  # [C]
    mean = (counts * values).sum(dim=1) / total  # [C]
    var = (counts * values**2).sum(dim=1) / total - mean**2  # [C]
    return tuple(mean.tolist()), tuple(var.clamp_min(0).sqrt().tolist())
