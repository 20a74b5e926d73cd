#!/bin/bash
# The 2k study on the embedded v-prediction model, from the repository root:
#   bash docs/results/study-2k/run.sh [OUT] [STAGE]
# Unclipped sampling (--clip 0) in every cell, FID against 5,000 test images.
# Resumable: finished cells in OUT/cells are kept (by label and settings), a cell in progress
# resumes from its last batch, so re-running continues an interrupted run; each stage reuses
# the cells of the stages before it and writes the report of everything it names.
#   STAGE 1 (default, about 2 h 30 min on 2 CPU cores): what the README reports: uniform DDIM and
#     StepDrop at 10/25/50 calls, DDIM-100, DPM-Solver++(2M) and UniPC at 10 and 25 calls on
#     log-SNR spacing, and at 10 calls on the fixed spacing each optimized search starts from
#     (cosine, quadratic) and on optimized timesteps; then uniform DDIM-25 with x̂0 clipped, in
#     OUT-clipped. `stepdrop optimize` runs first (its result is cached; about 10 min each).
#   STAGE 2 (about 5 h more): the rest of the grid (quadratic, importance, noise-aware, exact and
#     per-sample StepDrop, 20 calls) and the stochastic DDPM-1000 reference.
# On a GPU add --device cuda --cuda-graph to COMMON (and to the optimize calls: --device cuda).
set -euo pipefail
OUT=${1:-study-2k}
STAGE=${2:-1}
PY=${PY:-python}
COMMON=(--num-samples 2000 --ref-samples 5000 --bootstrap 50 --batch-size 100 --threads 2 --clip 0)
CELLS=dpmpp_2m:logsnr-10,unipc:logsnr-10,dpmpp_2m:optimized-10,unipc:optimized-10,dpmpp_2m:cosine-10
CELLS=$CELLS,unipc:quadratic-10,dpmpp_2m:logsnr-25,unipc:logsnr-25
for solver in dpmpp_2m unipc; do  # the searched timesteps, cached for the optimized-10 cells
  $PY -m stepdrop.cli optimize --budget 10 --solver "$solver" --clip 0 --threads 2 --out "$OUT-optimized/$solver-10"
done
if [ "$STAGE" = 1 ]; then
  $PY -m stepdrop.cli compare "${COMMON[@]}" --policies uniform,stepdrop --budgets 10,25,50 --cells "$CELLS" \
    --references ddim-100 --out "$OUT"
  # uniform DDIM-25 with x̂0 clipped to [-1, 1], for the clipped-vs-unclipped comparison
  $PY -m stepdrop.cli compare "${COMMON[@]}" --clip 1 --policies uniform --budgets 25 --references "" \
    --out "$OUT-clipped"
else
  for k in 10 20 25 50; do
    CELLS=$CELLS,ddim:logsnr-$k,ddim:stepdrop_exact-$k,ddim:stepdrop_per_sample-$k,dpmpp_2m:quadratic-$k
  done
  $PY -m stepdrop.cli compare "${COMMON[@]}" --policies uniform,quadratic,stepdrop,importance,noise_aware \
    --budgets 10,20,25,50 --cells "$CELLS" --references ddim-100,ddpm-1000 --out "$OUT"
fi
