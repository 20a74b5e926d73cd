"""stepdrop.classifier: the shipped Fashion-MNIST classifier, the classifier score, model files.

Expected score values are worked out by hand from the formula exp(mean KL(p(y|x) || p(y)));
the accuracy check uses the real Fashion-MNIST test split (skipped when it is absent).
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stepdrop.checkpoint import CheckpointError, atomic_save
from stepdrop.classifier import (
    CLASSIFIER_FORMAT,
    FashionClassifier,
    _augment,
    classifier_score,
    default_classifier_path,
    load_classifier,
    predict_probs,
    train_classifier,
)
from stepdrop.data import ImageData, load_images

ROOT = Path(__file__).resolve().parents[1]
TINY = {"channels": [4, 8], "hidden": 16, "dropout": 0.1}


@pytest.fixture(scope="module")
def real_test():
    try:
        data = load_images("fashion-mnist", "test", channels=1)
    except FileNotFoundError as e:
        pytest.skip(f"Fashion-MNIST absent: {e}")
    return data


@pytest.fixture(scope="module")
def shipped():
    return load_classifier()


def synthetic(n: int, seed: int) -> ImageData:
    """Two easy classes: a bright left half (0) or a bright right half (1), with noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    img = torch.randint(0, 60, (n, 1, 32, 32), generator=g)
    img[labels == 0, :, :, :16] += 180
    img[labels == 1, :, :, 16:] += 180
    return ImageData(img.to(torch.uint8), labels, "fashion-mnist", "train")


# ----------------------------------------------------------------------------- shipped model
def test_shipped_file_is_small_and_described(shipped):
    path = default_classifier_path()
    assert path.name == "fashion_mnist_classifier.pth" and path.is_file()
    assert path.stat().st_size < 2 * 1024 * 1024
    assert Path(str(path) + ".json").is_file()
    assert not shipped.training
    assert shipped.meta["test_accuracy"] >= 0.90 and shipped.meta["test_images"] == 10_000
    assert shipped.meta["params"] == sum(p.numel() for p in shipped.parameters())
    assert all(p.dtype == torch.float32 for p in shipped.parameters())


def test_shipped_accuracy_on_real_test_images(shipped, real_test):
    idx = torch.arange(2000)
    probs = predict_probs(shipped, real_test.batch(idx))
    acc = (probs.argmax(1) == real_test.labels[idx]).double().mean().item()
    assert acc >= 0.90, acc


def test_real_images_score_well_above_noise(shipped, real_test):
    real = classifier_score(predict_probs(shipped, real_test.batch(torch.arange(2000))))
    g = torch.Generator().manual_seed(0)
    noise = classifier_score(predict_probs(shipped, torch.rand(2000, 1, 32, 32, generator=g) * 2 - 1))
    assert real > 6.0, real
    assert real > 2 * noise, (real, noise)


# ----------------------------------------------------------------------------- classifier score
def test_score_one_confident_class_is_one():
    probs = torch.zeros(50, 10)
    probs[:, 3] = 1.0
    assert classifier_score(probs) == pytest.approx(1.0, abs=1e-12)
    assert classifier_score(torch.full((7, 10), 0.1)) == pytest.approx(1.0, abs=1e-12)  # identical rows


def test_score_confident_and_balanced_is_number_of_classes():
    probs = torch.eye(10).repeat(3, 1)  # 30 one-hot rows, 3 per class
    assert classifier_score(probs) == pytest.approx(10.0, rel=1e-12)
    assert classifier_score(torch.eye(4)) == pytest.approx(4.0, rel=1e-12)


def test_score_matches_hand_computation():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    # p(y) = (0.75, 0.25); KL_1 = log(1/0.75); KL_2 = 0.5 log(0.5/0.75) + 0.5 log(0.5/0.25)
    kl1 = math.log(1 / 0.75)
    kl2 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert classifier_score(probs) == pytest.approx(math.exp((kl1 + kl2) / 2), rel=1e-12)


@pytest.mark.parametrize("bad, err", [
    (torch.ones(10), ValueError),                       # not 2-D
    (torch.zeros(0, 10), ValueError),                   # empty
    (torch.full((3, 10), 0.2), ValueError),             # rows sum to 2
    (torch.tensor([[1.5, -0.5]]), ValueError),          # negative
    (torch.tensor([[float("nan"), 1.0]]), ValueError),  # not finite
    (torch.ones(2, 1, dtype=torch.int64), TypeError),   # not floating point
    ([[1.0, 0.0]], TypeError),                          # not a tensor
])
def test_score_rejects_bad_probs(bad, err):
    with pytest.raises(err):
        classifier_score(bad)


# ----------------------------------------------------------------------------- model, probs
def test_config_round_trip():
    m = FashionClassifier(channels=(8, 12), hidden=24, dropout=0.1)
    cfg = m.config
    assert cfg == {"channels": [8, 12], "hidden": 24, "dropout": 0.1, "in_channels": 1, "num_classes": 10}
    m2 = FashionClassifier.from_config(cfg)
    assert m2.config == cfg
    m2.load_state_dict(m.state_dict())  # same architecture, same shapes
    assert m2(torch.zeros(3, 1, 32, 32)).shape == (3, 10)
    with pytest.raises(ValueError, match="unknown classifier config"):
        FashionClassifier.from_config({**cfg, "width": 3})
    with pytest.raises(ValueError, match=r"input must be \[B, 1, 32, 32\]"):
        m(torch.zeros(2, 1, 28, 28))


def test_predict_probs_batches_and_restores_mode():
    torch.manual_seed(0)
    m = FashionClassifier.from_config(TINY).train()
    x = torch.rand(37, 1, 32, 32) * 2 - 1
    p_small, p_big = predict_probs(m, x, batch_size=5), predict_probs(m, x, batch_size=256)
    assert m.training
    assert p_small.shape == (37, 10) and p_small.dtype == torch.float32
    torch.testing.assert_close(p_small.sum(1), torch.ones(37))
    torch.testing.assert_close(p_small, p_big)
    with pytest.raises(TypeError):
        predict_probs(m, torch.zeros(2, 1, 32, 32, dtype=torch.uint8))


def test_augment_shifts_fill_background_and_flip():
    x = torch.arange(2 * 16, dtype=torch.float32).view(2, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    out = _augment(x, 1, False, g)
    for b in range(2):  # each sample is a translate of its input by (dy, dx) in [-1, 1]², background -1
        found = False
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                ref = torch.full((4, 4), -1.0)
                src = x[b, 0]
                ys, xs = slice(max(0, -dy), 4 - max(0, dy)), slice(max(0, -dx), 4 - max(0, dx))
                yd, xd = slice(max(0, dy), 4 - max(0, -dy)), slice(max(0, dx), 4 - max(0, -dx))
                ref[ys, xs] = src[yd, xd]
                found |= torch.equal(out[b, 0], ref)
        assert found
    flipped = _augment(x, 0, True, torch.Generator().manual_seed(1))
    for b in range(2):
        assert torch.equal(flipped[b], x[b]) or torch.equal(flipped[b], x[b].flip(-1))


# ----------------------------------------------------------------------------- files
def test_training_smoke_writes_a_loadable_deterministic_file(tmp_path):
    data, test = synthetic(256, 0), synthetic(128, 1)
    state = torch.get_rng_state()
    kw = dict(epochs=1, batch_size=32, lr=3e-3, seed=3, progress=False, data=data, test_data=test, config=TINY)
    metrics = train_classifier(tmp_path / "a.pth", **kw)
    assert torch.equal(torch.get_rng_state(), state)  # caller's RNG untouched
    train_classifier(tmp_path / "b.pth", **kw)
    a, b = load_classifier(tmp_path / "a.pth"), load_classifier(tmp_path / "b.pth")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert a.config == {**TINY, "in_channels": 1, "num_classes": 10}
    for key in ("test_accuracy", "epochs", "train_time_s", "params", "torch"):
        assert key in metrics and key in a.meta
    assert a.meta["test_images"] == 128 and a.meta["epochs"] == 1
    probs = predict_probs(a, test.batch(torch.arange(len(test))))
    acc = (probs.argmax(1) == test.labels).double().mean().item()
    assert acc == pytest.approx(metrics["test_accuracy"])  # the file holds the evaluated weights
    raw = torch.load(tmp_path / "a.pth", weights_only=True)
    assert raw["format"] == CLASSIFIER_FORMAT and raw["version"] == 1
    assert raw["state_dict"]["head.5.weight"].dtype == torch.float16


class _Foreign:
    pass


def _write_bad(tmp_path: Path, shipped_path: Path) -> dict[str, Path]:
    good = torch.load(shipped_path, weights_only=True)
    files = {
        "garbage": b"not a torch file at all",
        "truncated": shipped_path.read_bytes()[:2000],
    }
    out = {}
    for name, raw in files.items():
        (tmp_path / name).write_bytes(raw)
        out[name] = tmp_path / name
    payloads = {
        "foreign": {"weights": torch.zeros(3)},
        "list": [1, 2, 3],
        "model_format": {**good, "format": "stepdrop-model"},
        "version": {**good, "version": 99},
        "no_state": {k: v for k, v in good.items() if k != "state_dict"},
        "mismatch": {**good, "config": {**good["config"], "hidden": 7}},
    }
    for name, payload in payloads.items():
        out[name] = atomic_save(payload, tmp_path / name)
    with open(tmp_path / "pickled", "wb") as f:  # a pickle weights_only must refuse
        torch.save({"format": CLASSIFIER_FORMAT, "obj": _Foreign()}, f)
    out["pickled"] = tmp_path / "pickled"
    return out


def test_corrupt_and_foreign_files_raise_checkpoint_error(tmp_path):
    bad = _write_bad(tmp_path, default_classifier_path())
    for name, path in bad.items():
        with pytest.raises(CheckpointError):
            load_classifier(path)
    with pytest.raises(FileNotFoundError):
        load_classifier(tmp_path / "missing.pth")


def test_script_help():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_classifier.py"), "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for flag in ("--seed", "--epochs", "--out"):
        assert flag in r.stdout
