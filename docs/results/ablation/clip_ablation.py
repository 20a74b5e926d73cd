"""Run from the repository root: ``python docs/results/ablation/clip_ablation.py 20`` (the budget;
set STEPDROP_FEATURE_CACHE to a folder that already holds the 5k reference features to skip
them). Writes clip_ablation_quadratic<K>.json beside this file.

Why is DPM-Solver++(2M) worse than DDIM at quadratic-20 on the embedded model (2k study:
69.4 vs 52.9)? Candidates: the second-order extrapolation, or x̂0 clipping, which DDIM applies to
x̂0 only (the clipped-away part is dropped) while the data-prediction update keeps x_t, so the
out-of-range part of x̂0 survives in (σ_s/σ_t)·x_t. Arms at quadratic-20, 400 samples, seed 1
(not the study's seed), FID against the study's 5k reference features (biased at n=400:
compare arms only with each other):
  ddim clip | dpmpp_2m clip | dpmpp first-order (w = 0) clip | ddim no clip | dpmpp_2m no clip."""
import json, os, sys
import torch
import stepdrop.multistep as ms
import stepdrop.sampler as sm
from stepdrop import FusedSampler, metrics
from stepdrop.checkpoint import load_pretrained

N, B, POLICY = 400, 100, "quadratic"
HERE = os.path.dirname(os.path.abspath(__file__))
original = ms.dpmpp_2m_eps


def setup():
    """(model, schedule, the 5k reference features), on one CPU thread."""
    torch.set_num_threads(1)
    loaded = load_pretrained("fashion-mnist")
    cache = os.environ.get("STEPDROP_FEATURE_CACHE")
    return loaded.model, loaded.schedule, metrics.reference_features("fashion-mnist", "test", 5000, cache_dir=cache)


def measure(sampler, K, ref):
    """N samples (batches seeded 1000, 1001, …) at POLICY-K: FID against ``ref`` and the fraction of
    output pixels at ±1."""
    images = []
    for i in range(N // B):
        x, _ = sampler.sample(B, POLICY, budget=K, generator=torch.Generator().manual_seed(1000 + i))
        images.append(x.clamp(-1, 1))
    images = torch.cat(images)
    feats = metrics.extract_features(images)
    return dict(fid=metrics.fid(feats, ref), frac_outside=float((images.abs() >= 0.999).float().mean()))


def first_order(x, eps, table, t_prev, t, s, x0_prev, clip=None):
    return original(x, eps, table, torch.full_like(t_prev, -1), t, s, x0_prev, clip)


def main(K):
    model, schedule, ref = setup()
    arms = [("ddim", 1.0, None), ("dpmpp_2m", 1.0, None), ("dpmpp_2m", 1.0, first_order), ("ddim", None, None),
            ("dpmpp_2m", None, None)]
    out = {}
    for solver, clip, patch in arms:
        name = f"{solver}{'-first-order' if patch else ''} clip={clip}"
        sm.dpmpp_2m_eps = patch or original
        out[name] = measure(FusedSampler(model, schedule, solver=solver, clip=clip), K, ref)
        print(f"{name:28} FID {out[name]['fid']:7.2f}", flush=True)
    sm.dpmpp_2m_eps = original
    json.dump(out, open(os.path.join(HERE, f"clip_ablation_{POLICY}{K}.json"), "w"), indent=1)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
