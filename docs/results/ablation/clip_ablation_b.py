"""Run from the repository root: ``python docs/results/ablation/clip_ablation_b.py 20``.

Follow-up arm of clip_ablation.py (same model, seed 1, 400 samples, quadratic-20): DPM-Solver++(2M)
with DDIM's clipping instead of the data-prediction clip. The extrapolation uses the unclipped
x̂0s, and the fused DDIM step gets clip=1: it clips x̂0 = D and keeps ε' for the direction, so at
first order (w = 0, ε' = ε) this is exactly DDIM with clip. Not stepdrop's dpmpp_2m (which clips
like diffusers' DPMSolverMultistepScheduler thresholding); a candidate, measured."""
import json, os, sys
import torch
import stepdrop.multistep as ms
import stepdrop.sampler as sm
from stepdrop import FusedSampler, metrics
from stepdrop.checkpoint import load_pretrained

torch.set_num_threads(1)
loaded = load_pretrained("fashion-mnist")
model, schedule = loaded.model, loaded.schedule
ref = metrics.reference_features("fashion-mnist", "test", 5000, cache_dir=os.environ.get("STEPDROP_FEATURE_CACHE"))
N, B, K, POLICY = 400, 100, int(sys.argv[1]) if len(sys.argv) > 1 else 20, "quadratic"
original = ms.dpmpp_2m_eps
sm.dpmpp_2m_eps = lambda x, eps, table, t_prev, t, s, x0_prev, clip=None: original(x, eps, table, t_prev, t, s, x0_prev, None)
sm.FusedSampler._step_kwargs = lambda self: dict(solver="ddim", eta=0.0, clip=self.clip)
sampler = FusedSampler(model, schedule, solver="dpmpp_2m", clip=1.0)
images = []
for i in range(N // B):
    x, _ = sampler.sample(B, POLICY, budget=K, generator=torch.Generator().manual_seed(1000 + i))
    images.append(x.clamp(-1, 1))
images = torch.cat(images)
fid = metrics.fid(metrics.extract_features(images), ref)
print(f"dpmpp_2m ddim-style clip=1.0  FID {fid:7.2f}", flush=True)
json.dump({"dpmpp_2m ddim-style clip=1.0": dict(fid=fid)}, open(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"clip_ablation_b_{POLICY}{K}.json"), "w"))
