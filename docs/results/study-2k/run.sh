#!/bin/bash
# The 2k study on the embedded v-prediction model, from the repository root:
#   bash docs/results/study-2k/run.sh [OUT]
# Unclipped sampling (--clip 0) for every cell, then a clipped column at 25 calls in OUT-clipped.
# Resumable: finished cells in OUT/cells are kept, a cell in progress resumes from its last
# batch, so re-running continues an interrupted run. Hours on a 2-core CPU (DDPM-1000 about 2 h
# of it); on a GPU add --device cuda --cuda-graph.
set -euo pipefail
OUT=${1:-study-2k}
COMMON=(--num-samples 2000 --ref-samples 5000 --bootstrap 50 --batch-size 100 --threads 2)
CELLS=""
for k in 10 20 25 50; do
  CELLS=$CELLS,ddim:logsnr-$k,ddim:stepdrop_exact-$k,ddim:stepdrop_per_sample-$k,dpmpp_2m:quadratic-$k,dpmpp_2m:logsnr-$k
done
python -m stepdrop.cli compare "${COMMON[@]}" --clip 0 \
  --policies uniform,quadratic,stepdrop,importance,noise_aware --budgets 10,20,25,50 --cells "${CELLS#,}" \
  --references ddim-100,ddpm-1000 --out "$OUT"
# the same cells at 25 calls with x̂0 clipped to [-1, 1], for comparison
python -m stepdrop.cli compare "${COMMON[@]}" --clip 1 \
  --policies uniform,quadratic,logsnr,stepdrop --budgets 25 --cells dpmpp_2m:quadratic-25,dpmpp_2m:logsnr-25 \
  --references "" --out "$OUT-clipped"
