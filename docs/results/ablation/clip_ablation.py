"""Run from the repository root: ``python docs/results/ablation/clip_ablation.py 20`` (the budget;
set STEPDROP_FEATURE_CACHE to a folder that already holds the 5k reference features to skip
them). Writes clip_ablation_quadratic<K>.json beside this file. It patches the sampler's
DPM-Solver++(2M) hook of that time, so run it on a checkout of commit d51f5db: the solver
registry (stepdrop/solvers/) later replaced stepdrop.multistep.

Why was DPM-Solver++(2M) worse than DDIM at quadratic-20 on the earlier ε model (fashion-mnist-eps) (2k study, with
x̂0 clipped before the extrapolation: 69.4 vs 52.9)? Candidates: the second-order extrapolation,
or where the clip acts. DDIM clips x̂0 and keeps ε, so the clipped-away part is dropped; clipping
x̂0 before the data-prediction update (diffusers' thresholding) keeps it in (σ_s/σ_t)·x_t.
Arms at quadratic-20, 400 samples, seed 1 (not the study's seed), FID against the study's 5k
reference features (biased at n=400: compare arms only with each other):

  ddim clip                          stepdrop's DDIM
  dpmpp_2m clip                      stepdrop's dpmpp_2m: DDIM's clip on D, ε' kept
  dpmpp_2m thresholding clip         x̂0 clipped before the extrapolation, no clip after
  dpmpp_2m-first-order thresholding  the same with w = 0 (no extrapolation)
  ddim / dpmpp_2m no clip
"""
import json, os, sys
import torch
import stepdrop.multistep as ms
import stepdrop.sampler as sm
from stepdrop import FusedSampler, metrics
from stepdrop.checkpoint import load_pretrained
from stepdrop.ops.reference import predict_x0

N, B, POLICY = 400, 100, "quadratic"
HERE = os.path.dirname(os.path.abspath(__file__))
original_eps, original_kwargs = ms.dpmpp_2m_eps, sm.FusedSampler._step_kwargs


def setup():
    """(model, schedule, the 5k reference features), on one CPU thread."""
    torch.set_num_threads(1)
    loaded = load_pretrained("fashion-mnist-eps")  # the ε model the ablation was run on
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


def thresholding(clip, first_order=False):
    """dpmpp_2m_eps on the ε of the clipped x̂0_t, so that the extrapolation and the x_t term see
    clip(x̂0); with ``first_order`` the history is dropped (w = 0)."""
    def eps_fn(x, eps, table, t_prev, t, s, x0_prev):
        tc = t.clamp(0, table.numel() - 1)
        a = table[tc].view((-1,) + (1,) * (x.ndim - 1))
        x0 = predict_x0(x, eps, table, tc, clip)
        eps_clipped = ((x.double() - a.sqrt() * x0.double()) / (1 - a).sqrt()).to(x.dtype)
        return original_eps(x, eps_clipped, table, torch.full_like(t_prev, -1) if first_order else t_prev, t, s,
                            x0_prev)
    return eps_fn


def main(K):
    model, schedule, ref = setup()
    no_clip_after = lambda self: dict(solver="ddim", eta=0.0, clip=None)  # noqa: E731
    arms = {"ddim clip=1.0": ("ddim", 1.0, None),
            "dpmpp_2m clip=1.0": ("dpmpp_2m", 1.0, None),
            "dpmpp_2m thresholding clip=1.0": ("dpmpp_2m", 1.0, thresholding(1.0)),
            "dpmpp_2m-first-order thresholding clip=1.0": ("dpmpp_2m", 1.0, thresholding(1.0, first_order=True)),
            "ddim clip=None": ("ddim", None, None),
            "dpmpp_2m clip=None": ("dpmpp_2m", None, None)}
    out = {}
    for name, (solver, clip, patch) in arms.items():
        sm.dpmpp_2m_eps = patch or original_eps
        sm.FusedSampler._step_kwargs = no_clip_after if patch else original_kwargs
        out[name] = measure(FusedSampler(model, schedule, solver=solver, clip=clip), K, ref)
        print(f"{name:44} FID {out[name]['fid']:7.2f}", flush=True)
    sm.dpmpp_2m_eps, sm.FusedSampler._step_kwargs = original_eps, original_kwargs
    json.dump(out, open(os.path.join(HERE, f"clip_ablation_{POLICY}{K}.json"), "w"), indent=1)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
