"""stepdrop.data: Fashion-MNIST idx and CIFAR-10 pickle loading, padding, scaling, flips, errors.

The small files are written here in the real formats (gzip idx with big-endian headers,
python-pickle batches with channel-planar rows); expected values come from the arrays the
tests wrote, never from the loader.
"""

from __future__ import annotations

import gzip
import pickle
import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from stepdrop.data import DATASETS, ImageData, load_images

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


# ----------------------------------------------------------------------------- writers
def write_idx(path: Path, array: np.ndarray, magic: int | None = None, gz: bool = True) -> Path:
    """idx file: big-endian magic (0x08 = uint8, then ndim), one uint32 per dim, raw bytes."""
    array = np.ascontiguousarray(array, np.uint8)
    magic = (0x08 << 8 | array.ndim) if magic is None else magic
    raw = struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def fashion_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(1, 256, size=(n, 28, 28), dtype=np.uint8)  # never 0: border visible
    images[0, 0, 0], images[0, 27, 27] = 0, 255  # the scaling end points
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    return images, labels


def make_fashion(root: Path, n_train: int = 5, n_test: int = 3, gz: bool = True):
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, prefix, n, seed in (("train", "train", n_train, 0), ("test", "t10k", n_test, 1)):
        images, labels = fashion_arrays(n, seed)
        write_idx(root / f"{prefix}-images-idx3-ubyte", images, gz=gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, gz=gz)
        out[split] = images, labels
    return out


def cifar_batch(n: int, first_label: int) -> tuple[np.ndarray, list[int]]:
    """n images in HWC, each with per-channel values (10+i, 20+i, 30+i) and a marker pixel."""
    hwc = np.zeros((n, 32, 32, 3), np.uint8)
    for i in range(n):
        hwc[i] = (10 + i, 20 + i, 30 + i)
        hwc[i, 3, 7] = (200, 150, 100)  # row 3, column 7: asymmetric, so flips are visible
    return hwc, [(first_label + i) % 10 for i in range(n)]


def write_cifar_batch(path: Path, hwc: np.ndarray, labels: list[int]) -> None:
    # The real files: each row is the red plane, then green, then blue, each 32×32 row-major.
    data = np.ascontiguousarray(hwc.transpose(0, 3, 1, 2)).reshape(len(hwc), 3072)
    with path.open("wb") as f:
        pickle.dump({b"batch_label": b"x", b"labels": labels, b"data": data, b"filenames": []}, f)


def make_cifar(root: Path, n: int = 2, nested: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    folder = root / "cifar-10-batches-py" if nested else root
    folder.mkdir(parents=True, exist_ok=True)
    train_hwc, train_labels = [], []
    for b in range(1, 6):
        hwc, labels = cifar_batch(n, first_label=b)
        hwc[:, 0, 0] = b  # which batch an image came from, to check the order
        write_cifar_batch(folder / f"data_batch_{b}", hwc, labels)
        train_hwc.append(hwc)
        train_labels += labels
    test_hwc, test_labels = cifar_batch(n + 1, first_label=0)
    write_cifar_batch(folder / "test_batch", test_hwc, test_labels)
    return {
        "train": (np.concatenate(train_hwc), np.array(train_labels)),
        "test": (test_hwc, np.array(test_labels)),
    }


@pytest.fixture
def fashion(tmp_path):
    root = tmp_path / "fm"
    return root, make_fashion(root)


@pytest.fixture
def cifar(tmp_path):
    root = tmp_path / "c10"
    return root, make_cifar(root)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch, tmp_path):
    """Defaults must not see the developer's own folders."""
    monkeypatch.delenv("STEPDROP_FASHION_MNIST_DIR", raising=False)
    monkeypatch.delenv("STEPDROP_CIFAR10_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


# ----------------------------------------------------------------------------- Fashion-MNIST
@pytest.mark.parametrize("split", ["train", "test"])
def test_fashion_shapes_labels_padding(fashion, split):
    root, arrays = fashion
    images, labels = arrays[split]
    data = load_images("fashion-mnist", split, root=root)
    n = len(images)
    assert (data.name, data.split, data.hflip) == ("fashion-mnist", split, False)
    assert len(data) == n and data.num_channels == 1
    assert data.images.dtype == torch.uint8 and data.images.shape == (n, 1, 32, 32)
    assert data.labels.dtype == torch.int64 and data.labels.tolist() == labels.tolist()
    assert torch.equal(data.images[:, 0, 2:30, 2:30], torch.from_numpy(images))
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert border.sum() == 32 * 32 - 28 * 28
    assert (data.images[:, :, border] == 0).all()
    assert (data.images[:, 0, 2:30, 2:30] > 0).any(-1).any(-1).all()  # content really is inside


def test_fashion_three_channels_replicate(fashion):
    root, _ = fashion
    grey = load_images("fashion-mnist", root=root)
    rgb = load_images("fashion-mnist", root=root, channels=3)
    assert rgb.images.shape == (5, 3, 32, 32) and rgb.num_channels == 3
    for c in range(3):
        assert torch.equal(rgb.images[:, c], grey.images[:, 0])
    assert torch.equal(rgb.labels, grey.labels)
    assert torch.equal(load_images("fashion-mnist", root=root, channels=1).images, grey.images)


def test_batch_scaling_exact(fashion):
    root, arrays = fashion
    data = load_images("fashion-mnist", root=root)
    idx = torch.tensor([0, 3, 0])
    x = data.batch(idx)
    assert x.dtype == torch.float32 and x.shape == (3, 1, 32, 32)
    assert x[0, 0, 2, 2].item() == -1.0  # source pixel (0, 0) = 0
    assert x[0, 0, 29, 29].item() == 1.0  # source pixel (27, 27) = 255
    assert x[0, 0, 0, 0].item() == -1.0  # padding
    assert x.min() >= -1 and x.max() <= 1
    expected = torch.from_numpy(arrays["train"][0][[0, 3, 0]].astype(np.float64) / 127.5 - 1)
    torch.testing.assert_close(x[:, 0, 2:30, 2:30].double(), expected, rtol=0, atol=1e-6)


def test_fashion_no_flips(fashion):
    root, _ = fashion
    data = load_images("fashion-mnist", root=root)
    state = torch.get_rng_state()
    idx = torch.arange(5).repeat(10)
    plain = data.images[idx].float() / 127.5 - 1
    for seed in range(3):
        assert torch.equal(data.batch(idx, torch.Generator().manual_seed(seed)), plain)
    assert torch.equal(data.batch(idx), plain)
    assert torch.equal(torch.get_rng_state(), state)


def test_fashion_plain_idx_and_env_default(tmp_path, monkeypatch):
    root = tmp_path / "plain"
    arrays = make_fashion(root, gz=False)
    monkeypatch.setenv("STEPDROP_FASHION_MNIST_DIR", str(root))
    data = load_images("fashion-mnist", "test")
    assert data.labels.tolist() == arrays["test"][1].tolist()
    # mixed: gzip images, plain labels
    (root / "t10k-images-idx3-ubyte").unlink()
    write_idx(root / "t10k-images-idx3-ubyte", arrays["test"][0], gz=True)
    assert torch.equal(load_images("fashion-mnist", "test").images, data.images)


def test_fashion_missing_files_message(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(FileNotFoundError) as info:
        load_images("fashion-mnist", "test", root=root)
    msg = str(info.value)
    for part in (str(root), "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
                 "apt-get install dataset-fashion-mnist", "STEPDROP_FASHION_MNIST_DIR"):
        assert part in msg
    # only the labels missing: the message names just them
    images, _ = fashion_arrays(2, 0)
    write_idx(root / "t10k-images-idx3-ubyte", images)
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte") as info:
        load_images("fashion-mnist", "test", root=root)
    assert "t10k-images" not in str(info.value)


def test_fashion_default_root_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("STEPDROP_FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_images("fashion-mnist")


def _corrupt_cases():
    images, labels = fashion_arrays(4, 0)

    def bad_image_magic(root):
        return write_idx(root / "train-images-idx3-ubyte", images, magic=2049)

    def bad_label_magic(root):
        return write_idx(root / "train-labels-idx1-ubyte", labels, magic=2051)

    def truncated_images(root):
        p = write_idx(root / "train-images-idx3-ubyte", images, gz=False)
        p.write_bytes(p.read_bytes()[:-10])
        return p

    def extra_bytes_labels(root):
        p = write_idx(root / "train-labels-idx1-ubyte", labels, gz=False)
        p.write_bytes(p.read_bytes() + b"\0")
        return p

    def short_header(root):
        p = root / "train-labels-idx1-ubyte.gz"
        p.write_bytes(gzip.compress(b"\0\0\x08"))
        return p

    def wrong_dims(root):
        return write_idx(root / "train-images-idx3-ubyte", images[:, :27, :27])

    def not_gzip(root):
        p = root / "train-images-idx3-ubyte.gz"
        p.write_bytes(b"this is not gzip data at all")
        return p

    def truncated_gzip(root):
        p = write_idx(root / "train-images-idx3-ubyte", images)
        p.write_bytes(p.read_bytes()[:-20])
        return p

    def label_out_of_range(root):
        return write_idx(root / "train-labels-idx1-ubyte", np.full(4, 10, np.uint8))

    return [bad_image_magic, bad_label_magic, truncated_images, extra_bytes_labels, short_header,
            wrong_dims, not_gzip, truncated_gzip, label_out_of_range]


@pytest.mark.parametrize("corrupt", _corrupt_cases(), ids=lambda f: f.__name__)
def test_fashion_corrupt_files_name_the_file(tmp_path, corrupt):
    root = tmp_path / "bad"
    root.mkdir()
    images, labels = fashion_arrays(4, 0)
    bad = corrupt(root)  # one bad file; the other one good
    other = "train-labels-idx1-ubyte" if "images" in bad.name else "train-images-idx3-ubyte"
    write_idx(root / other, labels if "labels" in other else images)
    with pytest.raises(ValueError) as info:
        load_images("fashion-mnist", root=root)
    assert str(bad) in str(info.value)


def test_fashion_count_mismatch(tmp_path):
    images, labels = fashion_arrays(4, 0)
    write_idx(tmp_path / "train-images-idx3-ubyte", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels[:3])
    with pytest.raises(ValueError, match="4 images.*3 labels"):
        load_images("fashion-mnist", root=tmp_path)


# ----------------------------------------------------------------------------- argument errors
def test_unknown_name_split_channels(fashion, cifar):
    fm_root, _ = fashion
    c_root, _ = cifar
    with pytest.raises(ValueError) as info:
        load_images("mnist", root=fm_root)
    assert all(n in str(info.value) for n in DATASETS) and "'mnist'" in str(info.value)
    with pytest.raises(ValueError) as info:
        load_images("fashion-mnist", "val", root=fm_root)
    assert "'train', 'test'" in str(info.value) and "'val'" in str(info.value)
    for bad in (2, 0, 4, True):
        with pytest.raises(ValueError, match="channels"):
            load_images("fashion-mnist", root=fm_root, channels=bad)
    with pytest.raises(ValueError, match="channels must be 3"):
        load_images("cifar10", root=c_root, channels=1)
    with pytest.raises(TypeError, match="download"):
        load_images("cifar10", root=c_root, download="yes")


# ----------------------------------------------------------------------------- CIFAR-10
@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar_layout_and_labels(cifar, split):
    root, arrays = cifar
    hwc, labels = arrays[split]
    data = load_images("cifar10", split, root=root)
    n = len(hwc)
    assert (data.name, data.split, data.hflip) == ("cifar10", split, split == "train")
    assert data.images.shape == (n, 3, 32, 32) and data.images.dtype == torch.uint8
    assert data.num_channels == 3 and len(data) == n
    assert data.labels.dtype == torch.int64 and data.labels.tolist() == labels.tolist()
    # CHW, and the same image as the HWC source
    assert torch.equal(data.images, torch.from_numpy(hwc).permute(0, 3, 1, 2))
    # explicit pixels: plane values, and the marker at row 3, column 7 per channel
    k = 1
    assert data.images[k, :, 10, 20].tolist() == [10 + k, 20 + k, 30 + k]
    assert data.images[k, :, 3, 7].tolist() == [200, 150, 100]
    assert data.images[k, :, 7, 3].tolist() == [10 + k, 20 + k, 30 + k]  # not transposed
    if split == "train":  # batches 1..5 in order, 2 images each
        assert data.images[:, 0, 0, 0].tolist() == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert load_images("cifar10", split, root=root, channels=3).images.shape == data.images.shape


def test_cifar_root_is_the_batches_folder(tmp_path):
    arrays = make_cifar(tmp_path / "flat", nested=False)
    data = load_images("cifar10", "test", root=tmp_path / "flat")
    assert data.labels.tolist() == arrays["test"][1].tolist()
    with pytest.raises(FileNotFoundError):  # the parent holds "flat", not cifar-10-batches-py
        load_images("cifar10", "test", root=tmp_path)


def test_cifar_env_and_home_defaults(tmp_path, monkeypatch):
    make_cifar(tmp_path / "home" / ".cache" / "stepdrop" / "cifar10")
    assert len(load_images("cifar10", "test")) == 3
    make_cifar(tmp_path / "env", n=4)
    monkeypatch.setenv("STEPDROP_CIFAR10_DIR", str(tmp_path / "env"))
    assert len(load_images("cifar10", "test")) == 5


def test_cifar_missing_message_names_both_ways(tmp_path):
    root = tmp_path / "none"
    with pytest.raises(FileNotFoundError) as info:
        load_images("cifar10", root=root)
    msg = str(info.value)
    for part in ("download=True", "--download", "internet", "cifar-10-batches-py",
                 "STEPDROP_CIFAR10_DIR", str(root)):
        assert part in msg, part
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "home" / ".cache" / "stepdrop" / "cifar10")):
        load_images("cifar10")


def test_cifar_missing_one_batch(cifar):
    root, _ = cifar
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_images("cifar10", "train", root=root)
    assert len(load_images("cifar10", "test", root=root)) == 3


@pytest.mark.parametrize(
    "content",
    [
        b"garbage, not a pickle",
        pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})[:-30],
        pickle.dumps([1, 2, 3]),
        pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}),
        pickle.dumps({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}),
        pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}),
        pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1, 2]}),
        pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}),
    ],
    ids=["garbage", "truncated", "not-dict", "no-labels", "wrong-size", "wrong-dtype", "label-count", "label-range"],
)
def test_cifar_corrupt_batch_names_the_file(cifar, content):
    root, _ = cifar
    path = root / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        load_images("cifar10", "test", root=root)
    assert str(path) in str(info.value)


def test_cifar_download_failure_is_wrapped(tmp_path, monkeypatch):
    datasets = pytest.importorskip("torchvision.datasets")
    calls = []

    def offline(root, train=True, download=False, **kw):
        calls.append((root, train, download))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(datasets, "CIFAR10", offline)
    root = tmp_path / "dl"
    with pytest.raises(RuntimeError) as info:
        load_images("cifar10", "test", root=root, download=True)
    assert calls == [(str(root), False, True)]
    msg = str(info.value)
    for part in ("Downloading CIFAR-10", str(root), "name resolution", "internet", "cifar-10-batches-py",
                 "STEPDROP_CIFAR10_DIR"):
        assert part in msg, part
    assert isinstance(info.value.__cause__, urllib.error.URLError)


def test_cifar_download_success_and_skip_when_present(tmp_path, monkeypatch):
    datasets = pytest.importorskip("torchvision.datasets")

    def fake_download(root, train=True, download=False, **kw):
        assert download
        make_cifar(Path(root))  # what torchvision leaves: root/cifar-10-batches-py

    monkeypatch.setattr(datasets, "CIFAR10", fake_download)
    root = tmp_path / "dl"
    assert len(load_images("cifar10", "train", root=root, download=True)) == 10

    def must_not_run(*a, **k):
        raise AssertionError("download attempted although the batches are present")

    monkeypatch.setattr(datasets, "CIFAR10", must_not_run)
    assert len(load_images("cifar10", "test", root=root, download=True)) == 3


def test_cifar_download_that_leaves_nothing(tmp_path, monkeypatch):
    datasets = pytest.importorskip("torchvision.datasets")
    monkeypatch.setattr(datasets, "CIFAR10", lambda *a, **k: None)
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        load_images("cifar10", root=tmp_path / "x", download=True)


def test_fashion_ignores_download(fashion):
    root, _ = fashion
    assert len(load_images("fashion-mnist", root=root, download=True)) == 5


# ----------------------------------------------------------------------------- flips
def test_cifar_train_flips_deterministic_and_mixed(cifar):
    root, _ = cifar
    data = load_images("cifar10", "train", root=root)
    idx = torch.arange(len(data)).repeat(8)  # 80 samples
    plain = data.images[idx].float() / 127.5 - 1
    state = torch.get_rng_state()
    a = data.batch(idx, torch.Generator().manual_seed(123))
    b = data.batch(idx, torch.Generator().manual_seed(123))
    c = data.batch(idx, torch.Generator().manual_seed(124))
    assert torch.equal(torch.get_rng_state(), state)  # a given generator leaves the global RNG alone
    assert torch.equal(a, b) and not torch.equal(a, c)
    flipped = (a == plain.flip(-1)).flatten(1).all(1)
    unflipped = (a == plain).flatten(1).all(1)
    assert (flipped ^ unflipped).all()  # each sample exactly one of the two (images are asymmetric)
    assert 10 < int(flipped.sum()) < 70
    # a flipped sample mirrors columns: marker at (3, 7) moves to (3, 24)
    k = int(flipped.nonzero()[0])
    assert a[k, 0, 3, 24].item() == pytest.approx(200 / 127.5 - 1, abs=1e-6) and a[k, 0, 3, 7].item() != a[k, 0, 3, 24].item()


def test_cifar_test_split_never_flips(cifar):
    root, _ = cifar
    data = load_images("cifar10", "test", root=root)
    idx = torch.arange(len(data)).repeat(20)
    plain = data.images[idx].float() / 127.5 - 1
    assert torch.equal(data.batch(idx, torch.Generator().manual_seed(0)), plain)


def test_batch_arguments(cifar):
    root, _ = cifar
    data = load_images("cifar10", "train", root=root)
    assert data.batch(torch.tensor([], dtype=torch.int64)).shape == (0, 3, 32, 32)
    with pytest.raises(TypeError, match="integer"):
        data.batch(torch.tensor([0.0, 1.0]))
    with pytest.raises(IndexError):
        data.batch(torch.tensor([len(data)]))
    assert "cifar10" in repr(data) and "[10, 3, 32, 32]" in repr(data)


def test_imagedata_validates():
    with pytest.raises(ValueError, match="uint8"):
        ImageData(torch.zeros(2, 1, 32, 32), torch.zeros(2, dtype=torch.int64), "x", "train")
    with pytest.raises(ValueError, match="int64"):
        ImageData(torch.zeros(2, 1, 32, 32, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64), "x", "train")


# ----------------------------------------------------------------------------- the real files
@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason=f"{REAL_FASHION} absent (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist():
    for split, n in (("train", 60000), ("test", 10000)):
        data = load_images("fashion-mnist", split, root=REAL_FASHION)
        assert data.images.shape == (n, 1, 32, 32)
        assert data.labels.min() >= 0 and data.labels.max() <= 9
        assert torch.equal(data.labels.bincount(), torch.full((10,), n // 10))  # balanced classes
        assert (data.images[:, :, :2].eq(0).all() and data.images[:, :, :, 30:].eq(0).all())
        mean = data.images.float().mean().item()  # ≈ 72.9 on the 28×28 content → ≈ 55.8 padded
        assert 45 < mean < 65, mean
        # default root is the installed folder when the variable is unset
    assert len(load_images("fashion-mnist", "test")) == 10000
