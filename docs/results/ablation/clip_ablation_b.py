"""Run from the repository root: ``python docs/results/ablation/clip_ablation_b.py 20``.

Follow-up arm of clip_ablation.py (same model, seed 1, 400 samples, quadratic-20): DPM-Solver++(2M)
with DDIM's clipping instead of the data-prediction clip. The extrapolation uses the unclipped
x̂0s, and the fused DDIM step gets clip=1: it clips x̂0 = D and keeps ε' for the direction, so at
first order (w = 0, ε' = ε) this is exactly DDIM with clip. Not stepdrop's dpmpp_2m (which clips
like diffusers' DPMSolverMultistepScheduler thresholding); a candidate, measured."""
import json, os, sys
import stepdrop.sampler as sm
from stepdrop import FusedSampler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from clip_ablation import HERE, POLICY, measure, original, setup  # noqa: E402


def main(K):
    model, schedule, ref = setup()
    sm.dpmpp_2m_eps = lambda x, eps, table, t_prev, t, s, x0_prev, clip=None: original(x, eps, table, t_prev, t, s,
                                                                                      x0_prev, None)
    sm.FusedSampler._step_kwargs = lambda self: dict(solver="ddim", eta=0.0, clip=self.clip)
    fid = measure(FusedSampler(model, schedule, solver="dpmpp_2m", clip=1.0), K, ref)["fid"]
    print(f"dpmpp_2m ddim-style clip=1.0  FID {fid:7.2f}", flush=True)
    json.dump({"dpmpp_2m ddim-style clip=1.0": dict(fid=fid)},
              open(os.path.join(HERE, f"clip_ablation_b_{POLICY}{K}.json"), "w"))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
