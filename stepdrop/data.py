"""Training images: Fashion-MNIST and CIFAR-10, held whole in memory as uint8.

Datasets:
    * Fashion-MNIST — H. Xiao, K. Rasul, R. Vollgraf, "Fashion-MNIST: a Novel Image Dataset
      for Benchmarking Machine Learning Algorithms", arXiv:1708.07747, 2017. 60k train / 10k
      test grey 28×28 images in 10 classes, read from the idx files (Debian package
      ``dataset-fashion-mnist``) and padded to 32×32 with 2 pixels of background (0) on
      each side.
    * CIFAR-10 — A. Krizhevsky, "Learning Multiple Layers of Features from Tiny Images",
      technical report, University of Toronto, 2009. 50k train / 10k test RGB 32×32 images
      in 10 classes, read from the python-pickle batches of ``cifar-10-batches-py``.

Every dataset becomes one :class:`ImageData`: ``images`` uint8 ``[N, C, 32, 32]`` and
``labels`` int64 ``[N]``; :meth:`ImageData.batch` turns indices into float32 model input in
[−1, 1]. Nothing is cached on disk.

    >>> data = load_images("fashion-mnist", "train")            # doctest: +SKIP
    >>> x = data.batch(torch.randint(len(data), (64,)))          # doctest: +SKIP
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from stepdrop._validation import check_bool, check_choice

__all__ = ["DATASETS", "SPLITS", "ImageData", "load_images"]

DATASETS = ("fashion-mnist", "cifar10")
SPLITS = ("train", "test")
IMAGE_SIZE = 32
NUM_CLASSES = 10

FASHION_MNIST_ENV = "STEPDROP_FASHION_MNIST_DIR"
FASHION_MNIST_DEFAULT = Path("/usr/share/datasets/fashion-mnist")
CIFAR10_ENV = "STEPDROP_CIFAR10_DIR"
CIFAR10_FOLDER = "cifar-10-batches-py"

_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension
_MNIST_SIZE = 28
_PAD = (IMAGE_SIZE - _MNIST_SIZE) // 2
_FASHION_PREFIX = {"train": "train", "test": "t10k"}
_CIFAR_BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}


@dataclass
class ImageData:
    """A whole image dataset in memory.

    Attributes:
        images: uint8 ``[N, C, 32, 32]`` (C = 1 or 3), values 0..255.
        labels: int64 ``[N]``, class indices 0..9.
        name: one of :data:`DATASETS`.
        split: ``"train"`` or ``"test"``.
        hflip: draw a random horizontal flip per sample in :meth:`batch` (the CIFAR-10
            training augmentation; True for CIFAR-10 train only).
    """

    images: Tensor
    labels: Tensor
    name: str
    split: str
    hflip: bool = False

    def __post_init__(self) -> None:
        imgs, labels = self.images, self.labels
        if not isinstance(imgs, Tensor) or imgs.dtype != torch.uint8 or imgs.ndim != 4:
            raise ValueError(f"images must be a uint8 tensor [N, C, H, W], got {_describe(imgs)}")
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != imgs.shape[:1]:
            raise ValueError(f"labels must be an int64 tensor [{imgs.shape[0]}], got {_describe(labels)}")
        check_bool("hflip", self.hflip)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_channels(self) -> int:
        return self.images.shape[1]

    def __repr__(self) -> str:
        return (
            f"ImageData(name={self.name!r}, split={self.split!r}, images={list(self.images.shape)}, "
            f"hflip={self.hflip})"
        )

    def batch(self, indices: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images ``indices`` as float32 ``[b, C, H, W]`` in [−1, 1] (``x/127.5 − 1``, exact at 0 and 255).

        When :attr:`hflip` is set, each sample is mirrored left–right with probability 1/2,
        drawn from ``generator`` (deterministic for a seeded generator; None means torch's
        default generator). Without :attr:`hflip` no random numbers are drawn.
        """
        indices = torch.as_tensor(indices)
        if indices.dtype.is_floating_point or indices.dtype.is_complex:
            raise TypeError(f"indices must be an integer tensor, got dtype {str(indices.dtype).replace('torch.', '')}")
        x = self.images[indices.to(self.images.device)].to(torch.float32).div_(127.5).sub_(1.0)
        if self.hflip and x.shape[0] > 0:
            device = generator.device if generator is not None else torch.device("cpu")
            flip = torch.rand(x.shape[0], generator=generator, device=device).lt(0.5).to(x.device)
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return x


def load_images(
    name: str,
    split: str = "train",
    root: str | Path | None = None,
    channels: int | None = None,
    download: bool = False,
) -> ImageData:
    """Load a whole dataset split into memory.

    Args:
        name: one of :data:`DATASETS` (``"fashion-mnist"``, ``"cifar10"``).
        split: ``"train"`` or ``"test"``.
        root: folder holding the files. Default: fashion-mnist — env
            ``STEPDROP_FASHION_MNIST_DIR``, else ``/usr/share/datasets/fashion-mnist``
            (``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``); cifar10 — env
            ``STEPDROP_CIFAR10_DIR``, else ``~/.cache/stepdrop/cifar10`` (the
            ``cifar-10-batches-py`` folder itself, or a folder containing it).
        channels: 1 or 3; None means the dataset's own (fashion-mnist 1, cifar10 3).
            Fashion-MNIST with 3 replicates the grey channel; CIFAR-10 allows only 3.
        download: cifar10 only — when the batches are absent, fetch them with
            ``torchvision.datasets.CIFAR10(root, download=True)`` (needs internet).
            Ignored for fashion-mnist, which comes from the Debian package.

    Returns:
        :class:`ImageData` with ``hflip`` True for CIFAR-10 train only.

    Raises:
        ValueError: unknown name, split or channels; a corrupt or truncated file (named).
        FileNotFoundError: the files are absent; the message says how to get them.
        RuntimeError: ``download=True`` and the download failed.

    CIFAR-10 batches are pickles: load only files you trust.
    """
    check_choice("name", name, DATASETS)
    check_choice("split", split, SPLITS)
    if channels is not None and (isinstance(channels, bool) or channels not in (1, 3)):
        raise ValueError(f"channels must be one of (1, 3) or None, got {channels!r}")
    check_bool("download", download)
    if name == "fashion-mnist":
        return _load_fashion_mnist(split, _resolve_root(root, FASHION_MNIST_ENV, FASHION_MNIST_DEFAULT), channels or 1)
    if channels == 1:
        raise ValueError("channels must be 3 (or None) for cifar10, which is RGB; got 1")
    default = Path.home() / ".cache" / "stepdrop" / "cifar10"
    return _load_cifar10(split, _resolve_root(root, CIFAR10_ENV, default), download)


# ----------------------------------------------------------------------------- helpers
def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"{str(value.dtype).replace('torch.', '')} {list(value.shape)}"
    return type(value).__name__


def _resolve_root(root: str | Path | None, env: str, default: Path) -> Path:
    if root is None:
        root = os.environ.get(env) or default
    return Path(root).expanduser()


# ----------------------------------------------------------------------------- Fashion-MNIST
def _find_idx(root: Path, stem: str) -> Path | None:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    return None


def _read_idx(path: Path, magic: int, dims: tuple[int | None, ...]) -> np.ndarray:
    """An idx file (optionally gzip) as a uint8 array; ``dims`` None entries are free."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: not a valid gzip file ({e})") from None
    header = 4 + 4 * len(dims)
    if len(raw) < header:
        raise ValueError(f"{path}: truncated idx file ({len(raw)} bytes, header needs {header})")
    found_magic, *shape = struct.unpack(f">{1 + len(dims)}I", raw[:header])
    if found_magic != magic:
        raise ValueError(f"{path}: bad idx magic number {found_magic}, expected {magic}")
    for got, want in zip(shape, dims):
        if want is not None and got != want:
            raise ValueError(f"{path}: idx dimensions {shape}, expected {[d if d else 'N' for d in dims]}")
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise ValueError(f"{path}: {len(raw)} bytes, expected {expected} for idx dimensions {shape}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _load_fashion_mnist(split: str, root: Path, channels: int) -> ImageData:
    prefix = _FASHION_PREFIX[split]
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    paths = [_find_idx(root, s) for s in stems]
    if None in paths:
        missing = ", ".join(f"{s}.gz (or {s})" for s, p in zip(stems, paths) if p is None)
        raise FileNotFoundError(
            f"Fashion-MNIST {split} files not found in {root}: looked for {missing}. "
            f"Install them with `apt-get install dataset-fashion-mnist` (into {FASHION_MNIST_DEFAULT}), "
            f"or set {FASHION_MNIST_ENV} (or pass root=) to a folder holding them."
        )
    img_path, lbl_path = paths
    images = _read_idx(img_path, _IDX_IMAGES_MAGIC, (None, _MNIST_SIZE, _MNIST_SIZE))
    labels = _read_idx(lbl_path, _IDX_LABELS_MAGIC, (None,))
    if len(images) != len(labels):
        raise ValueError(f"{img_path} holds {len(images)} images but {lbl_path} holds {len(labels)} labels")
    if labels.size and labels.max() >= NUM_CLASSES:
        raise ValueError(f"{lbl_path}: label {int(labels.max())} outside 0..{NUM_CLASSES - 1}")
    padded = np.zeros((len(images), 1, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    padded[:, 0, _PAD : _PAD + _MNIST_SIZE, _PAD : _PAD + _MNIST_SIZE] = images
    tensor = torch.from_numpy(padded)
    if channels == 3:
        tensor = tensor.repeat(1, 3, 1, 1)
    return ImageData(tensor, torch.from_numpy(labels.astype(np.int64)), "fashion-mnist", split, hflip=False)


# ----------------------------------------------------------------------------- CIFAR-10
def _find_cifar_folder(root: Path) -> Path | None:
    for folder in (root / CIFAR10_FOLDER, root):
        if (folder / "test_batch").is_file() or (folder / "data_batch_1").is_file():
            return folder
    return None


def _download_cifar10(root: Path, split: str) -> None:
    try:
        import torchvision.datasets

        torchvision.datasets.CIFAR10(str(root), train=split == "train", download=True)
    except Exception as e:
        raise RuntimeError(
            f"Downloading CIFAR-10 into {root} with torchvision failed ({type(e).__name__}: {e}). "
            f"It needs internet access; offline, copy an extracted {CIFAR10_FOLDER} folder into {root} "
            f"(or set {CIFAR10_ENV} to a folder holding it) and load without download."
        ) from e


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as f:
            entry = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as e:
        raise ValueError(f"{path}: not a readable CIFAR-10 pickle batch ({type(e).__name__}: {e})") from None
    if not isinstance(entry, dict) or b"data" not in entry or b"labels" not in entry:
        raise ValueError(f"{path}: expected a dict with keys b'data' and b'labels'")
    data, labels = np.asarray(entry[b"data"]), np.asarray(entry[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * IMAGE_SIZE * IMAGE_SIZE:
        raise ValueError(f"{path}: b'data' must be uint8 [N, 3072], got {data.dtype} {list(data.shape)}")
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: b'labels' must be {data.shape[0]} integers, got {labels.dtype} {list(labels.shape)}")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"{path}: labels outside 0..{NUM_CLASSES - 1}")
    return data, labels


def _load_cifar10(split: str, root: Path, download: bool) -> ImageData:
    folder = _find_cifar_folder(root)
    if folder is None and download:
        _download_cifar10(root, split)
        folder = _find_cifar_folder(root)
    if folder is None:
        raise FileNotFoundError(
            f"CIFAR-10 not found: no {CIFAR10_FOLDER} folder at {root} or {root / CIFAR10_FOLDER}. "
            f"Either pass download=True (`--download` on the command line; needs internet), "
            f"or put an extracted {CIFAR10_FOLDER} folder under {root} "
            f"(or set {CIFAR10_ENV} / pass root= to a folder holding it)."
        )
    paths = [folder / b for b in _CIFAR_BATCHES[split]]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 {split} batches missing in {folder}: {', '.join(missing)}. "
            f"Re-extract {CIFAR10_FOLDER} (or pass download=True / `--download`, needs internet)."
        )
    batches = [_read_cifar_batch(p) for p in paths]
    # Each row is channel-planar: 1024 red, 1024 green, 1024 blue, each row-major 32×32.
    images = np.concatenate([d for d, _ in batches]).reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE)
    labels = np.concatenate([lb for _, lb in batches]).astype(np.int64)
    return ImageData(torch.from_numpy(images), torch.from_numpy(labels), "cifar10", split, hflip=split == "train")
