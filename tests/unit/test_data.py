"""CIFAR-10 loading (folder formats, cache, errors, split) and the procedural synthetic task."""

from __future__ import annotations

import io
import tarfile
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchvision.io import encode_jpeg

from esper.tolaria import data
from esper.tolaria.augment import eval_batches, train_batches
from esper.tolaria.data import (
    DataError,
    Dataset,
    default_cache_dir,
    load_cifar10,
    load_task_data,
    make_synthetic,
    resolve_data_dir,
)

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TRAIN_PER_CLASS, TEST_PER_CLASS = 4, 2

# torchvision 0.29 deprecates encode_jpeg (used to build test data) in favour of torchcodec.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")



@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    """Tests must not pick up a developer's data or cache directory."""
    monkeypatch.delenv("ESPER_DATA_DIR", raising=False)
    monkeypatch.delenv("ESPER_CACHE_DIR", raising=False)


def _color(cls: int, j: int) -> tuple[int, int, int]:
    """A flat colour that encodes the class (red) and the image's index in its split (green)."""
    return (20 + 22 * cls, 6 * j, 128)


def _decoded_id(img: torch.Tensor) -> tuple[int, int]:
    """(class, index) back from a decoded flat image; JPEG moves flat colours by a level or two."""
    r, g, _ = img.double().mean(dim=(1, 2)).tolist()
    return round((r - 20) / 22), round(g / 6)


def _write_tiny_tarball(path: Path, prefix: str = "") -> None:
    """The shared tarball's layout, `[prefix]{train,test}/<class>/NNNN.jpg`, with flat images,
    written in reverse order: the loader must not rely on the order of tar members."""
    members = []
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for cls, name in enumerate(CLASSES):
            for k in range(per_class):
                img = torch.tensor(_color(cls, cls * per_class + k), dtype=torch.uint8)
                jpeg = encode_jpeg(img.view(3, 1, 1).expand(3, 32, 32).contiguous(), quality=95)
                members.append((f"{prefix}{split}/{name}/{k:04d}.jpg", jpeg.numpy().tobytes()))
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in reversed(members):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    _write_tiny_tarball(d / "cifar10-jpeg.tar.gz")
    return d


def _equal(a: Dataset, b: Dataset) -> bool:
    tensors = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")
    return all(torch.equal(getattr(a, k), getattr(b, k)) for k in tensors) and a.mean == b.mean


@pytest.mark.parametrize("prefix", ["", "CIFAR-10-images/"])
def test_tiny_tarball_loads_with_labels_from_class_folders(tmp_path, prefix):
    d = tmp_path / "data"
    d.mkdir()
    _write_tiny_tarball(d / "cifar10-jpeg.tar.gz", prefix)
    ds = load_cifar10(d, cache_dir=tmp_path / "cache", val_size=8)

    n_train = len(CLASSES) * TRAIN_PER_CLASS
    assert ds.name == "cifar10" and ds.num_classes == 10
    assert ds.train_x.shape == (n_train - 8, 3, 32, 32) and ds.train_x.dtype == torch.uint8
    assert ds.val_x.shape == (8, 3, 32, 32) and ds.val_y.dtype == torch.int64
    assert ds.test_x.shape == (len(CLASSES) * TEST_PER_CLASS, 3, 32, 32)
    for x, y in ((ds.train_x, ds.train_y), (ds.val_x, ds.val_y), (ds.test_x, ds.test_y)):
        assert [_decoded_id(img)[0] for img in x] == y.tolist()
    # The test split keeps the sorted (class, file) order.
    assert [_decoded_id(img)[1] for img in ds.test_x] == list(range(len(ds.test_x)))


def test_mean_and_std_are_per_channel_statistics_of_train_x(tiny_dir, tmp_path):
    ds = load_cifar10(tiny_dir, cache_dir=tmp_path / "cache", val_size=8)
    x = ds.train_x.double() / 255
    mean, std = (torch.tensor(v, dtype=torch.float64) for v in (ds.mean, ds.std))
    torch.testing.assert_close(mean, x.mean(dim=(0, 2, 3)), rtol=0, atol=1e-12)
    torch.testing.assert_close(std, x.std(dim=(0, 2, 3), correction=0), rtol=0, atol=1e-9)


def test_second_load_comes_from_the_cache_not_the_data_dir(tiny_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    before = sorted(tiny_dir.iterdir())
    first = load_cifar10(tiny_dir, cache_dir=cache, val_size=8)
    assert sorted(tiny_dir.iterdir()) == before, "the data dir may be read-only: never write there"
    assert len(list(cache.glob("cifar10-jpeg-*.pt"))) == 1
    assert not list(cache.glob("*.tmp")), "the atomic write leaves no temp file behind"

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    import torchvision.io

    monkeypatch.setattr(torchvision.io, "decode_jpeg", no_decoding)  # data.py imports it when it decodes
    assert _equal(load_cifar10(tiny_dir, cache_dir=cache, val_size=8), first)


def test_corrupt_cache_is_rebuilt(tiny_dir, tmp_path):
    cache = tmp_path / "cache"
    first = load_cifar10(tiny_dir, cache_dir=cache, val_size=8)
    (cache_file,) = cache.glob("cifar10-jpeg-*.pt")
    cache_file.write_bytes(b"not a torch file")

    again = load_cifar10(tiny_dir, cache_dir=cache, val_size=8)
    assert _equal(again, first)
    rebuilt = torch.load(cache_file, weights_only=True)
    assert set(rebuilt) == {"train_x", "train_y", "test_x", "test_y"}


def test_a_cache_that_cannot_be_written_costs_only_the_next_decode(tiny_dir, tmp_path, monkeypatch, caplog):
    """A full disk makes torch.save's zip writer raise RuntimeError, not OSError: the data still loads (it
    had ended the run after the data was decoded), with a warning, and no partial cache is left."""
    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", full_disk)
    cache = tmp_path / "cache"
    assert len(load_cifar10(tiny_dir, cache_dir=cache, val_size=8).train_x) > 0
    assert "could not write cache" in caplog.text and list(cache.iterdir()) == []


def test_batches_folder_is_read_through_torchvision_and_preferred(tiny_dir, tmp_path, monkeypatch):
    (tiny_dir / "cifar-10-batches-py").mkdir()
    calls = []
    gen = torch.Generator().manual_seed(0)
    nhwc = {  # train flag -> NHWC images, as torchvision's .data holds them
        True: torch.randint(0, 256, (20, 32, 32, 3), generator=gen, dtype=torch.uint8),
        False: torch.randint(0, 256, (6, 32, 32, 3), generator=gen, dtype=torch.uint8),
    }

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            calls.append((Path(root), train, download))
            self.data = nhwc[train].numpy()
            self.targets = [i % 10 for i in range(len(self.data))]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    ds = load_cifar10(tiny_dir, cache_dir=tmp_path / "cache", val_size=5)

    assert calls == [(tiny_dir, True, False), (tiny_dir, False, False)]
    assert torch.equal(ds.test_x, nhwc[False].permute(0, 3, 1, 2))  # NHWC -> NCHW
    assert ds.test_y.tolist() == [i % 10 for i in range(6)]
    assert len(ds.train_x) + len(ds.val_x) == 20
    assert not (tmp_path / "cache").exists(), "nothing to cache for the pickled batches"


def test_empty_data_dir_is_an_error_naming_the_options(tmp_path):
    with pytest.raises(DataError) as info:
        load_cifar10(tmp_path, cache_dir=tmp_path / "cache")
    message = str(info.value)
    for option in ("--data-dir", "ESPER_DATA_DIR", "cifar-10-batches-py", "cifar10-jpeg.tar.gz"):
        assert option in message


def test_truncated_tarball_is_a_data_error(tiny_dir, tmp_path):
    tarball = tiny_dir / "cifar10-jpeg.tar.gz"
    tarball.write_bytes(tarball.read_bytes()[: tarball.stat().st_size // 2])
    with pytest.raises(DataError, match="ESPER_DATA_DIR"):
        load_cifar10(tiny_dir, cache_dir=tmp_path / "cache")
    assert not list(tmp_path.glob("cache/*")), "nothing cached from a failed read"


def test_a_tarball_that_is_not_cifar10_is_one_data_error(tiny_dir, tmp_path):
    """Garbage had given tarfile's five-line message; two classes, or too few images for the validation
    split, a traceback (ValueError) or, with enough images, training against a 10-class head without a word."""
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "cifar10-jpeg.tar.gz").write_bytes(bytes(range(256)) * 400)
    with pytest.raises(DataError) as info:
        load_cifar10(garbage, cache_dir=tmp_path / "cache")
    assert str(info.value).startswith(f"could not read {garbage / 'cifar10-jpeg.tar.gz'} (") and \
        "\n" not in str(info.value).split(". Point")[0]
    two = tmp_path / "two"
    two.mkdir()
    with tarfile.open(tiny_dir / "cifar10-jpeg.tar.gz") as tar, \
            tarfile.open(two / "cifar10-jpeg.tar.gz", "w:gz") as out:
        for member in tar:
            if member.name.split("/")[1] in CLASSES[:2]:
                out.addfile(member, tar.extractfile(member))
    with pytest.raises(DataError, match="holds 2 classes, not CIFAR-10's 10"):
        load_cifar10(two, cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match="holds 40 training images, too few to hold out 5000 for validation"):
        load_cifar10(tiny_dir, cache_dir=tmp_path / "cache")


def test_failed_download_is_an_error_not_random_data(tmp_path, monkeypatch):
    roots = []

    class OfflineCIFAR10:
        def __init__(self, root, train, download):
            roots.append((Path(root), download))
            raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", OfflineCIFAR10)
    with pytest.raises(DataError, match="--data-dir") as info:
        load_cifar10(None, cache_dir=tmp_path / "cache")
    assert "ESPER_DATA_DIR" in str(info.value) and "internet" in str(info.value)
    assert roots == [(tmp_path / "cache" / "torchvision", True)]


def test_data_dir_comes_from_the_argument_then_the_environment(tiny_dir, tmp_path, monkeypatch):
    assert resolve_data_dir(None) is None
    monkeypatch.setenv("ESPER_DATA_DIR", str(tiny_dir))
    assert resolve_data_dir(None) == tiny_dir
    assert resolve_data_dir(tmp_path / "explicit") == tmp_path / "explicit"
    ds = load_cifar10(None, cache_dir=tmp_path / "cache", val_size=8)
    assert len(ds.train_x) + len(ds.val_x) == len(CLASSES) * TRAIN_PER_CLASS


def test_cache_dir_defaults(monkeypatch, tmp_path):
    assert default_cache_dir() == Path.home() / ".cache" / "esper"
    monkeypatch.setenv("ESPER_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path


def test_validation_split_is_seeded_and_disjoint_from_train(tiny_dir, tmp_path):
    cache = tmp_path / "cache"
    a = load_cifar10(tiny_dir, cache_dir=cache, val_size=10, split_seed=1)
    b = load_cifar10(tiny_dir, cache_dir=cache, val_size=10, split_seed=1)
    c = load_cifar10(tiny_dir, cache_dir=cache, val_size=10, split_seed=2)
    assert _equal(a, b)
    assert not torch.equal(a.val_x, c.val_x)

    train_ids = {_decoded_id(img) for img in a.train_x}
    val_ids = {_decoded_id(img) for img in a.val_x}
    assert len(train_ids) == 30 and len(val_ids) == 10 and not train_ids & val_ids
    with pytest.raises(DataError, match="holds 40 training images, too few to hold out 40"):
        load_cifar10(tiny_dir, cache_dir=cache, val_size=40)


def test_load_task_data_dispatches_and_rejects_unknown_tasks(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(data, "load_cifar10", lambda d, cache_dir: calls.append((d, cache_dir)) or make_synthetic())
    for task in ("cifar10", "cifar10_deep"):
        load_task_data(task, "some/dir", cache_dir=tmp_path)
    assert calls == [("some/dir", tmp_path)] * 2
    assert load_task_data("synthetic", None).name == "synthetic"
    with pytest.raises(ValueError, match="unknown task"):
        load_task_data("imagenet", None)


def test_dataset_to_moves_every_tensor():
    ds = make_synthetic(n_train=16, n_val=8, n_test=8).to("meta")
    tensors = (ds.train_x, ds.train_y, ds.val_x, ds.val_y, ds.test_x, ds.test_y)
    assert all(t.device.type == "meta" for t in tensors)
    assert ds.num_classes == 4 and len(ds.mean) == 3


@pytest.fixture(scope="module")
def shared_cifar10(shared_cifar_dir, tmp_path_factory) -> Dataset:
    return load_cifar10(shared_cifar_dir, cache_dir=tmp_path_factory.mktemp("cache"))


def test_shared_cifar10_has_the_standard_split_and_statistics(shared_cifar10):
    ds = shared_cifar10
    assert (len(ds.train_x), len(ds.val_x), len(ds.test_x)) == (45000, 5000, 10000)
    assert ds.train_x.shape[1:] == (3, 32, 32) and ds.train_x.dtype == torch.uint8
    train_val = torch.cat([ds.train_y, ds.val_y])
    assert torch.bincount(train_val, minlength=10).tolist() == [5000] * 10
    assert torch.bincount(ds.test_y, minlength=10).tolist() == [1000] * 10
    # SOURCE.md: (0.4913, 0.4821, 0.4465) over all 50k training images of this JPEG copy.
    for got, want in zip(ds.mean, (0.4913, 0.4821, 0.4465)):
        assert abs(got - want) < 2e-3
    for got, want in zip(ds.std, (0.2452, 0.2428, 0.2606)):
        assert abs(got - want) < 2e-3


def test_synthetic_is_deterministic_by_seed():
    a, b, c = make_synthetic(seed=3), make_synthetic(seed=3), make_synthetic(seed=4)
    assert _equal(a, b)
    assert not torch.equal(a.train_x, c.train_x)


def test_synthetic_shapes_and_balance():
    ds = make_synthetic(n_train=400, n_val=100, n_test=60, num_classes=5, size=12)
    assert ds.name == "synthetic" and ds.num_classes == 5
    assert ds.train_x.shape == (400, 3, 12, 12) and ds.train_x.dtype == torch.uint8
    assert ds.val_x.shape == (100, 3, 12, 12) and ds.test_y.shape == (60,)
    assert ds.train_y.dtype == torch.int64
    counts = torch.bincount(ds.train_y, minlength=5)
    assert counts.min() >= 50 and counts.max() <= 110  # 80 expected per class
    assert 0.05 < min(ds.std) and max(ds.std) < 0.35  # real contrast, little clipping


@pytest.mark.slow
def test_synthetic_is_learnable_but_not_trivial():
    """The contract make_synthetic documents: a (8, 16, 32) CNN beats chance (25%) clearly but
    stays short of 100%."""
    torch.manual_seed(0)
    ds = make_synthetic(seed=0)

    def block(c_in, c_out):
        return nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )

    net = nn.Sequential(
        block(3, 8), block(8, 16), block(16, 32),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, ds.num_classes),
    )
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    mean, std = ds.channel_stats()
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        for xb, yb in train_batches(
            ds.train_x, ds.train_y, batch_size=128, max_batches=0, generator=gen, device="cpu",
            mean=mean, std=std, augment=False,
        ):
            loss = nn.functional.cross_entropy(net(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        batches = eval_batches(ds.val_x, ds.val_y, batch_size=256, device="cpu", mean=mean, std=std)
        correct = sum(int((net(xb).argmax(1) == yb).sum()) for xb, yb in batches)
    accuracy = correct / len(ds.val_y)
    assert 0.45 < accuracy < 0.95
