"""An in-domain Fashion-MNIST classifier: a "classifier score" and class-conditional checks.

The Inception Score (Salimans et al., 2016) needs Inception-v3's ImageNet head, which says
little about 32×32 grey clothing. For Fashion-MNIST samples stepdrop instead applies the same
formula, ``exp(E_x[KL(p(y|x) || p(y))])``, to the softmax of this small CNN trained on
Fashion-MNIST. The result is reported as the **classifier score** — it is *not* the Inception
Score, is not comparable to published IS values, and is comparable only between runs scored
with the same classifier file (docs/DESIGN.md §6).

    >>> model = load_classifier()                                    # doctest: +SKIP
    >>> probs = predict_probs(model, samples)          # samples in [-1, 1], [N, 1, 32, 32]
    >>> classifier_score(probs)                        # 1.0 (one class) .. 10.0 (balanced, confident)

The shipped file ``stepdrop/weights/fashion_mnist_classifier.pth`` was written by
``scripts/train_classifier.py``; its test accuracy on the full 10k Fashion-MNIST test split
is stored in the file (``model.meta["test_accuracy"]``) and in the ``.pth.json`` beside it.
Model files are plain dicts (format ``"stepdrop-classifier"``) read with ``weights_only=True``.
"""

from __future__ import annotations

import math
import os
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stepdrop._validation import check_bool, check_float, check_int, check_tensor
from stepdrop.checkpoint import CheckpointError, atomic_save, load_torch_file
from stepdrop.data import ImageData, load_images

__all__ = [
    "CLASSES",
    "CLASSIFIER_FILE",
    "CLASSIFIER_FORMAT",
    "FashionClassifier",
    "classifier_score",
    "load_classifier",
    "predict_probs",
    "train_classifier",
]

CLASSIFIER_FORMAT = "stepdrop-classifier"
CLASSIFIER_VERSION = 1
CLASSIFIER_FILE = "fashion_mnist_classifier.pth"
_WEIGHTS_PACKAGE = "stepdrop.weights"
IMAGE_SIZE = 32
#: Fashion-MNIST label names, by class index.
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


# ----------------------------------------------------------------------------- model
class FashionClassifier(nn.Module):
    """A small CNN on ``[B, in_channels, 32, 32]`` images in [−1, 1], returning logits ``[B, num_classes]``.

    conv c0 – conv c0 – maxpool – conv c1 – conv c1 – maxpool (each conv 3×3 + BatchNorm + ReLU),
    then dropout – linear ``hidden`` – ReLU – dropout – linear ``num_classes``.
    The default (16, 32, 128) has 280k parameters.
    """

    def __init__(self, channels: tuple[int, int] | list[int] = (16, 32), hidden: int = 128, dropout: float = 0.25,
                 in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        if not isinstance(channels, (tuple, list)) or len(channels) != 2:
            raise ValueError(f"channels must be two ints, got {channels!r}")
        c0, c1 = (check_int("channels[i]", c, low=1) for c in channels)
        hidden = check_int("hidden", hidden, low=1)
        dropout = check_float("dropout", dropout, low=0.0, high=1.0, high_open=True)
        in_channels = check_int("in_channels", in_channels, low=1)
        num_classes = check_int("num_classes", num_classes, low=2)
        self._config = {"channels": [c0, c1], "hidden": hidden, "dropout": dropout,
                        "in_channels": in_channels, "num_classes": num_classes}

        def conv(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *conv(in_channels, c0), *conv(c0, c0), nn.MaxPool2d(2),
            *conv(c0, c1), *conv(c1, c1), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout),
            nn.Linear(c1 * (IMAGE_SIZE // 4) ** 2, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        self.meta: dict[str, Any] = {}

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments as a JSON-like dict (``from_config(m.config)`` rebuilds the architecture)."""
        return {k: list(v) if isinstance(v, list) else v for k, v in self._config.items()}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "FashionClassifier":
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        known = {"channels", "hidden", "dropout", "in_channels", "num_classes"}
        unknown = set(config) - known
        if unknown:
            raise ValueError(f"unknown classifier config keys {sorted(unknown)}; known: {sorted(known)}")
        cfg = dict(config)
        if "channels" in cfg and isinstance(cfg["channels"], list):
            cfg["channels"] = tuple(cfg["channels"])
        return cls(**cfg)

    def forward(self, x: Tensor) -> Tensor:
        expected = (self._config["in_channels"], IMAGE_SIZE, IMAGE_SIZE)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"input must be [B, {', '.join(map(str, expected))}], got shape {tuple(x.shape)}")
        return self.head(self.features(x))


# ----------------------------------------------------------------------------- scoring
@torch.no_grad()
def predict_probs(model: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """Softmax class probabilities ``[N, num_classes]`` (float32, CPU) for float ``images`` in [−1, 1].

    ``images`` is ``[N, 1, 32, 32]`` — e.g. :meth:`ImageData.batch` output or diffusion samples
    (clamp those to [−1, 1] first). Runs in eval mode on the model's device, ``batch_size``
    images at a time; the model's train/eval mode is restored afterwards.
    """
    check_tensor("images", images, dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64), ndim=4)
    batch_size = check_int("batch_size", batch_size, low=1)
    try:
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    was_training = model.training
    model.eval()
    try:
        out = [F.softmax(model(images[i:i + batch_size].to(device=device, dtype=dtype)).float(), dim=1).cpu()
               for i in range(0, images.shape[0], batch_size)]
    finally:
        model.train(was_training)
    if not out:
        return torch.empty(0, getattr(model, "config", {}).get("num_classes", 10))
    return torch.cat(out)


def classifier_score(probs: Tensor) -> float:
    """``exp(mean_i KL(p(y|x_i) || p(y)))`` with ``p(y) = mean_i p(y|x_i)`` — the Inception-Score
    formula over one split, applied to *this* classifier's probabilities.

    This is **not** the Inception Score: report it as "classifier score" (docs/DESIGN.md §6). It
    ranges from 1 (every image gets the same distribution, e.g. all confidently one class) to
    the number of classes (each image confidently one class, classes equally frequent).
    Computed in float64; ``0 · log 0 = 0``.

    Args:
        probs: ``[N, C]`` rows of probabilities (non-negative, each summing to 1 within 1e-3), N ≥ 1.
    """
    check_tensor("probs", probs, ndim=2)
    if not probs.dtype.is_floating_point:
        raise TypeError(f"probs must be a floating-point tensor, got {str(probs.dtype).replace('torch.', '')}")
    if probs.shape[0] == 0 or probs.shape[1] == 0:
        raise ValueError(f"probs must be non-empty [N, C], got shape {tuple(probs.shape)}")
    p = probs.detach().to("cpu", torch.float64)
    if not torch.isfinite(p).all() or (p < 0).any():
        raise ValueError("probs must be finite and non-negative")
    row_sums = p.sum(dim=1)
    if (row_sums - 1).abs().max() > 1e-3:
        raise ValueError(f"each row of probs must sum to 1 (softmax output); found a row summing to "
                         f"{row_sums[(row_sums - 1).abs().argmax()].item():.6g}")
    p = p / row_sums[:, None]
    p_y = p.mean(dim=0, keepdim=True)
    kl = (torch.xlogy(p, p) - torch.xlogy(p, p_y.expand_as(p))).sum(dim=1)
    return float(torch.exp(kl.mean()))


# ----------------------------------------------------------------------------- files
def default_classifier_path() -> Path:
    """Where the shipped classifier lives inside the package."""
    return Path(str(resources.files(_WEIGHTS_PACKAGE) / CLASSIFIER_FILE))


def load_classifier(path: str | os.PathLike | None = None, map_location: str | torch.device = "cpu") -> FashionClassifier:
    """A classifier rebuilt from a ``stepdrop-classifier`` file (default: the shipped one), float32, eval mode.

    The file is read with ``weights_only=True``; its card is in ``model.meta``.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is corrupt, not a torch file, another kind of stepdrop file,
            an unsupported version, or its weights do not fit its config.
    """
    path = default_classifier_path() if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier file not found: {path}")
    payload = load_torch_file(path, map_location, "classifier")
    fmt = payload.get("format") if isinstance(payload, dict) else None
    if fmt != CLASSIFIER_FORMAT:
        raise CheckpointError(f"{path} is not a stepdrop classifier (format {fmt!r}; expected {CLASSIFIER_FORMAT!r})")
    if payload.get("version") != CLASSIFIER_VERSION:
        raise CheckpointError(f"{path} has classifier format version {payload.get('version')!r}; "
                              f"this stepdrop reads {CLASSIFIER_VERSION}")
    for key in ("config", "state_dict"):
        if key not in payload:
            raise CheckpointError(f"{path} lacks {key!r}: the file is incomplete")
    try:
        model = FashionClassifier.from_config(payload["config"])
        state = {k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
        model.load_state_dict(state)
    except (TypeError, ValueError, RuntimeError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{path}: weights do not fit the stored classifier config: {exc}") from exc
    model = model.to(map_location).eval()
    model.meta = dict(payload.get("meta", {}))
    return model


# ----------------------------------------------------------------------------- training
def _augment(x: Tensor, shift: int, flip: bool, generator: torch.Generator) -> Tensor:
    """Per-sample random translation by up to ``shift`` px (background −1 fills in) and
    left–right flips with probability 1/2, drawn from ``generator``."""
    b, c, h, w = x.shape
    if shift > 0:
        d = torch.randint(-shift, shift + 1, (2, b), generator=generator)
        padded = F.pad(x, (shift, shift, shift, shift), value=-1.0)
        rows = (torch.arange(h) + shift)[None, :] + d[0][:, None]            # [b, h]
        cols = (torch.arange(w) + shift)[None, :] + d[1][:, None]            # [b, w]
        x = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * shift))
        x = x.gather(3, cols[:, None, None, :].expand(b, c, h, w))
    if flip:
        m = torch.rand(b, generator=generator) < 0.5
        x = torch.where(m[:, None, None, None], x.flip(-1), x)
    return x


def _warmup_cosine(total: int, warmup_frac: float = 0.15):
    """LR factor per step: linear warm-up over the first ``warmup_frac`` of the steps, then cosine to 0."""
    warm = max(1, int(warmup_frac * total))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return factor


@torch.no_grad()
def _evaluate(model: nn.Module, data: ImageData, batch_size: int = 500) -> tuple[float, float]:
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(data), batch_size):
        idx = torch.arange(i, min(i + batch_size, len(data)))
        logits = model(data.batch(idx))
        y = data.labels[idx]
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(1) == y).sum())
    n = max(len(data), 1)
    return correct / n, loss / n


def _check_data(name: str, data: ImageData) -> ImageData:
    if not isinstance(data, ImageData):
        raise TypeError(f"{name} must be an ImageData, got {type(data).__name__}")
    if tuple(data.images.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"{name} must hold [N, 1, 32, 32] images, got {list(data.images.shape)}")
    if len(data) == 0:
        raise ValueError(f"{name} is empty")
    return data


def train_classifier(
    out_path: str | os.PathLike,
    epochs: int = 5,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
    *,
    data: ImageData | None = None,
    test_data: ImageData | None = None,
    config: dict[str, Any] | None = None,
    weight_decay: float = 5e-4,
    shift: int = 2,
    flip: bool = True,
    half: bool = True,
) -> dict[str, Any]:
    """Train a :class:`FashionClassifier`, evaluate it on the test split and write it to ``out_path``.

    AdamW, learning rate warmed up linearly to ``lr`` over 15 % of the steps then cosine-decayed,, cross-entropy, random shifts of up to
    ``shift`` px and left–right flips. Every random draw (init, dropout, order, augmentation)
    comes from ``seed``; the caller's global RNG state is left as it was. On the CPU, set
    the thread count (``torch.set_num_threads``) before calling.

    Args:
        out_path: model file to write (atomically), format ``"stepdrop-classifier"``.
        data / test_data: training / evaluation images (1×32×32); None loads Fashion-MNIST
            ``train`` / ``test``.
        config: :class:`FashionClassifier` arguments (default architecture when None).
        half: store floating-point weights as fp16 (the file is then ~half the size). The
            reported test accuracy is measured with the weights exactly as stored.

    Returns:
        The metrics written into the file's ``meta``: ``test_accuracy``, ``test_loss``,
        ``train_accuracy`` (running, last epoch, augmented), ``epochs``, ``train_time_s``,
        ``params``, ``torch``, ``seed`` and the hyper-parameters, plus ``path``.
    """
    epochs = check_int("epochs", epochs, low=1)
    batch_size = check_int("batch_size", batch_size, low=1)
    lr = check_float("lr", lr, low=0.0, low_open=True)
    seed = check_int("seed", seed, low=0)
    weight_decay = check_float("weight_decay", weight_decay, low=0.0)
    shift = check_int("shift", shift, low=0, high=8)
    check_bool("progress", progress)
    check_bool("flip", flip)
    check_bool("half", half)
    train_set = _check_data("data", data if data is not None else load_images("fashion-mnist", "train", channels=1))
    test_set = _check_data("test_data", test_data if test_data is not None else load_images("fashion-mnist", "test", channels=1))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FashionClassifier.from_config(config or {})
        order_gen = torch.Generator().manual_seed(seed + 1)
        aug_gen = torch.Generator().manual_seed(seed + 2)
        steps_per_epoch = -(-len(train_set) // batch_size)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(epochs * steps_per_epoch))
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=epochs * steps_per_epoch, desc="classifier", unit="step", dynamic_ncols=True)
        start = time.perf_counter()
        train_acc = 0.0
        try:
            for epoch in range(epochs):
                model.train()
                perm = torch.randperm(len(train_set), generator=order_gen)
                correct, seen = 0, 0
                for i in range(0, len(train_set), batch_size):
                    idx = perm[i:i + batch_size]
                    x = _augment(train_set.batch(idx), shift, flip, aug_gen)
                    y = train_set.labels[idx]
                    logits = model(x)
                    loss = F.cross_entropy(logits, y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    correct += int((logits.detach().argmax(1) == y).sum())
                    seen += len(idx)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", acc=f"{correct / seen:.3f}")
                train_acc = correct / seen
        finally:
            if bar is not None:
                bar.close()
        train_time = time.perf_counter() - start

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    test_acc, test_loss = _evaluate(model, test_set)
    meta = {
        "test_accuracy": test_acc,
        "test_loss": test_loss,
        "test_images": len(test_set),
        "test_data": f"{test_set.name}/{test_set.split}",
        "train_accuracy": train_acc,
        "train_images": len(train_set),
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "shift": shift,
        "flip": flip,
        "seed": seed,
        "train_time_s": round(train_time, 2),
        "threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in model.parameters()),
        "weights_dtype": "float16" if half else "float32",
        "torch": str(torch.__version__),
        "note": "classifier score = exp(E[KL(p(y|x) || p(y))]) with this classifier; not the Inception Score",
    }
    payload = {"format": CLASSIFIER_FORMAT, "version": CLASSIFIER_VERSION, "config": model.config,
               "state_dict": state, "meta": meta}
    path = atomic_save(payload, out_path)
    return {**meta, "path": str(path)}
