#!/bin/bash
# The 2k study of the earlier ε model (shipped as fashion-mnist-eps), from the repository root:
#   bash docs/results/study-2k-eps/run.sh [OUT]
# Resumable: finished cells in OUT/cells are kept, a cell in progress resumes from its last
# batch, so re-running continues an interrupted run. About 5 h on a quiet 2-core CPU
# (DDPM-1000 about 1 h 35 min of it, the 29 other cells 5 to 12 min each); on a GPU add
# --device cuda --cuda-graph (and --backend triton or cuda).
set -euo pipefail
OUT=${1:-study-2k-eps}
CELLS=ddim:logsnr-10,ddim:logsnr-20,ddim:logsnr-25,ddim:logsnr-50
for c in stepdrop_exact-10 stepdrop_exact-20 stepdrop_exact-25 stepdrop_exact-50; do
  CELLS=$CELLS,ddim:$c
done
for c in logsnr-10 quadratic-20 logsnr-20 quadratic-25 quadratic-10 logsnr-25 quadratic-50 logsnr-50; do
  CELLS=$CELLS,dpmpp_2m:$c
done
python -m stepdrop.cli compare --num-samples 2000 --ref-samples 5000 --bootstrap 50 --batch-size 100 \
  --policies uniform,quadratic,stepdrop --budgets 10,20,25,50 --cells "$CELLS" \
  --references ddim-100,ddpm-1000 --threads 2 --model fashion-mnist-eps --out "$OUT"
