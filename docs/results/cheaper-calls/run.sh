#!/bin/bash
# Cheaper calls on the embedded v-prediction model (issue 16), from the repository root:
#   bash docs/results/cheaper-calls/run.sh [OUT] [PLAIN]
# The same settings as docs/results/study-2k (2,000 samples per cell, unclipped, FID against
# 5,000 test images, seed 0), so the plain cells of that study are reused when its cells
# folder is given as PLAIN (they are copied, never recomputed: a cell file is keyed by its
# settings). About 1 h 30 min on 2 CPU cores for the new cells; resumable like every compare run.
# PostDiff's question at 50 % and 25 % of DDIM-50's GFLOPs/sample (24.8): fewer steps
# (DDIM-25, DDIM-12, UniPC-12/25) or cheaper steps (DDIM-50 with a deep-feature cache or
# mixed resolution), and the same cheaper calls on the best few-step solver (UniPC).
set -euo pipefail
OUT=${1:-cheaper-calls}
PLAIN=${2:-}
PY=${PY:-python}
mkdir -p "$OUT/cells"
if [ -n "$PLAIN" ]; then
  for cell in ddim_uniform-10 ddim_uniform-25 ddim_uniform-50 ddim-100 unipc_logsnr-10 unipc_logsnr-25 \
              dpmpp_2m_logsnr-10 dpmpp_2m_logsnr-25; do
    [ -f "$PLAIN/$cell.pt" ] && [ ! -f "$OUT/cells/$cell.pt" ] && cp "$PLAIN/$cell.pt" "$OUT/cells/"
  done
fi
# in priority order (the report is rewritten after each cell); GFLOPs/sample in brackets
# (DDIM-50: 24.8). The first cell is kept as the measured failure of a late switch (its
# low-resolution phase reaches t = 110 on log-SNR spacing).
CELLS="unipc:logsnr-25+mixres(0.5,0.6)"                # 6.8
CELLS="$CELLS,ddim:uniform-50+cache(2,0)"              # 14.0: DDIM-50 at 56 %
CELLS="$CELLS,ddim:uniform-50+cache(3,0)"              # 10.5: at 42 %
CELLS="$CELLS,ddim:uniform-50+mixres(0.5,0.3)"         # 19.2: at 78 %
CELLS="$CELLS,unipc:logsnr-25+mixres(0.5,0.2)"         # 10.5
CELLS="$CELLS,unipc:logsnr-12,ddim:uniform-12"         # 6.0: fewer steps at 24 % of DDIM-50
CELLS="$CELLS,ddim:uniform-50+mixres(0.5,0.3)+cache(3,0)"  # 8.2: cheaper steps at 33 %
CELLS="$CELLS,ddim:uniform-100+cache(5,0)"             # 14.9: PostDiff's pixel recipe, our branch
CELLS="$CELLS,unipc:logsnr-25+cache(2,0)"              # 7.2
CELLS="$CELLS,unipc:logsnr-10,unipc:logsnr-25,dpmpp_2m:logsnr-10,dpmpp_2m:logsnr-25"
$PY -m stepdrop.cli compare --num-samples 2000 --ref-samples 5000 --bootstrap 50 --batch-size 100 --threads 2 \
  --clip 0 --policies uniform --budgets 10,25,50 --cells "$CELLS" --references ddim-100 --film "unipc:logsnr-25+mixres(0.5,0.6)" \
  --out "$OUT"
