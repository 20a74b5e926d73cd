"""The embedded Fashion-MNIST model: it loads from the package and its samples look like
clothing to the shipped classifier (a measured check, not a label)."""

import pytest
import torch

from stepdrop import FusedSampler
from stepdrop.checkpoint import load_pretrained, pretrained_names
from stepdrop.classifier import classifier_score, load_classifier, predict_probs


def test_embedded_model_is_shipped_and_describes_itself():
    assert "fashion-mnist" in pretrained_names()
    loaded = load_pretrained("fashion-mnist")
    assert loaded.model.sample_shape == (1, 32, 32)
    assert loaded.schedule.num_timesteps == 1000
    for key in ("steps", "train_wall_time_s", "command", "parameters", "gflops_per_call"):
        assert key in loaded.meta, key
    assert loaded.meta["parameters"] == sum(p.numel() for p in loaded.model.parameters())


def test_embedded_model_samples_look_like_clothing():
    """DDIM-25 samples, scored by the shipped classifier. Pure noise scores ~1.1 and real test
    images ~8.2 (stepdrop/weights/fashion_mnist_classifier.pth.json); samples of a model that
    learned the data land far above noise and are classified with confidence."""
    torch.manual_seed(0)
    loaded = load_pretrained("fashion-mnist")
    sampler = FusedSampler(loaded.model, loaded.schedule, solver="ddim", clip=1.0)
    images, stats = sampler.sample(48, "uniform", budget=25, generator=torch.Generator().manual_seed(0))
    assert stats.nfe.tolist() == [25] * 48
    probs = predict_probs(load_classifier(), images)
    score = classifier_score(probs)
    confident = float((probs.max(dim=1).values > 0.5).double().mean())
    noise_score = classifier_score(predict_probs(load_classifier(), torch.rand(48, 1, 32, 32) * 2 - 1))
    assert score > max(3.0, 2 * noise_score), (score, noise_score)
    assert confident > 0.6, confident
