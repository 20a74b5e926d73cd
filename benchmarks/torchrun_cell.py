"""One DDIM-25 cell of the embedded model, timed inside the processes (run by bench_torchrun.py):
``[torchrun --nproc-per-node N] python benchmarks/torchrun_cell.py SAMPLES BATCH`` prints, on
rank 0, the seconds between the barrier before sampling and the one after it (start-up, model
loading and the warm-up call are outside the timed region)."""

import sys
import time

import torch

from stepdrop.checkpoint import load_pretrained
from stepdrop.distributed import start
from stepdrop.runs import parse_spec, run_specs

torch.set_num_threads(1)
samples, batch = int(sys.argv[1]), int(sys.argv[2])
group, _ = start("cpu")
loaded = load_pretrained("fashion-mnist")
spec = [parse_spec("ddim-25")]
run_specs(loaded.model, loaded.schedule, spec, num_samples=batch, seed=1, clip=None, progress=False,
          batch_size=batch, group=group)  # warm-up: one batch per rank... and rank 0 gathers
group.barrier("start")
begin = time.perf_counter()
run_specs(loaded.model, loaded.schedule, spec, num_samples=samples, seed=0, clip=None, progress=False,
          batch_size=batch, group=group)
group.barrier("end")
if group.main:
    print(f"SECONDS {time.perf_counter() - begin:.4f}")
group.close()
