"""x̂0 MSE of the embedded model per timestep on 128 test images at 32, 24 and 16 px (downsampled,
antialiased): python docs/results/cheaper-calls/probe_resolution.py"""
import torch, torch.nn.functional as F
from stepdrop.checkpoint import load_pretrained
from stepdrop.data import load_images
from stepdrop.prediction import to_eps
from stepdrop.ops.reference import predict_x0, q_sample
torch.set_num_threads(1)
L=load_pretrained('fashion-mnist'); m=L.model.eval()
d=load_images('fashion-mnist','test')
x0=(d.images[:128].float()/127.5-1)
if x0.shape[-1]!=32: x0=F.pad(x0,(2,2,2,2),value=-1)
table=L.schedule.alphas_cumprod.double()
g=torch.Generator().manual_seed(0)
for size in (32,24,16):
    xs = x0 if size==32 else F.interpolate(x0,size=(size,size),mode='bilinear',align_corners=False,antialias=True)
    row=[]
    for t in (999,700,400,200,100,20):
        tt=torch.full((128,),t)
        e=torch.randn(xs.shape,generator=g)
        xt=q_sample(xs,e,table,tt)
        with torch.no_grad(): out=m(xt,tt)
        eps=to_eps(out.double(),xt.double(),table,tt,"v_prediction")
        x0h=predict_x0(xt.double(),eps,table,tt)
        row.append(f"t{t}:{float(((x0h-xs)**2).mean()):.4f}")
    print(size, " ".join(row), flush=True)
