"""Final-image RMSE against a 100-call DPM-Solver++(2M) log-SNR run from the same 32 noises, for
plain and cached plans: python docs/results/cheaper-calls/probe_cache.py"""
import torch, time
from stepdrop import FusedSampler
from stepdrop.checkpoint import load_pretrained
torch.set_num_threads(1)
L=load_pretrained('fashion-mnist'); m=L.model.eval()
x=torch.randn(32,1,32,32,generator=torch.Generator().manual_seed(0))
ref,_=FusedSampler(m,L.schedule,solver="dpmpp_2m").sample(x,"logsnr",budget=100)
for solver,pol,K,calls in [("ddim","uniform",50,""),("ddim","uniform",25,""),("ddim","uniform",50,"+cache(2,0)"),("ddim","uniform",50,"+cache(3,0)"),("ddim","uniform",50,"+cache(4,1)"),("ddim","uniform",50,"+cache(8,0)"),("ddim","uniform",50,"+cache(5,0,quadratic)"),
    ("unipc","logsnr",10,""),("unipc","logsnr",10,"+cache(2,0)"),("unipc","logsnr",25,"+cache(3,0)"),("unipc","logsnr",12,""),("unipc","logsnr",25,"")]:
    t=time.time()
    out,_=FusedSampler(m,L.schedule,solver=solver,calls=calls).sample(x,pol,budget=K)
    print(f"{solver}:{pol}-{K}{calls}: rmse {((out-ref)**2).mean().sqrt():.4f}  {time.time()-t:.1f}s", flush=True)
