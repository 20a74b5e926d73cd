#!/usr/bin/env bash
# Train the embedded v-prediction Fashion-MNIST model on a CUDA machine in one command, within a
# time budget (repo root; docs/MODEL_CARD.md records the run):
#
#   BUDGET_S=420 bash scripts/gpu_train.sh
#
# 1. times 300 steps of the real configuration (a throw-away run),
# 2. trains for as many steps as fit in BUDGET_S seconds (or STEPS), so that the cosine learning
#    rate reaches 0 at the end, warm-started from the earlier ε model (--init, re-read as v),
# 3. diagnoses the result per timestep against the linear-Gaussian reference (stepdrop diagnose),
#    and samples DDIM-10/25/100 without clipping to count pixels beyond ±1.05,
# 4. leaves in $OUT (default ./gpu-train): the training checkpoint split in 15 MB parts
#    (rejoin with `cat checkpoint.pt.part-* > checkpoint.pt`), and results.tar.gz (log.jsonl,
#    the console log, diagnosis, sample grids, range counts).
#
# Data: Fashion-MNIST from $STEPDROP_FASHION_MNIST_DIR (default ./data/fashion-mnist, a copy of
# Debian's dataset-fashion-mnist files: GPU machines have no network).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-train}
BUDGET_S=${BUDGET_S:-420}
PY=${PYTHON:-python3}
RUN=${RUN:-runs/gpu-v}
INIT=${INIT:-stepdrop/weights/fashion-mnist-eps.pt}
DEVICE=${DEVICE:-cuda}
BATCH=${BATCH:-256}
PROBE_STEPS=${PROBE_STEPS:-300}
N_RANGE=${N_RANGE:-2000}
SAMPLE_SPECS=${SAMPLE_SPECS:-ddim-10,ddim-25,ddim-100,dpmpp_2m-10,ddpm-1000}
mkdir -p "$OUT" "$OUT/res"
export PYTHONUNBUFFERED=1 STEPDROP_FASHION_MNIST_DIR=${STEPDROP_FASHION_MNIST_DIR:-$PWD/data/fashion-mnist}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec > >(tee "$OUT/res/console.log") 2>&1

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv || true
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"

# The architecture of the shipped model (so --init fits), v-prediction, no dropout.
ARGS=(--base-channels 32 --channel-mults 1,2,2,2 --num-res-blocks 1 --attention-resolutions 8 --dropout 0
      --prediction-type v_prediction --init "$INIT" --batch-size "$BATCH" --lr 4e-4 --warmup 500
      --ema-decay 0.9995 --grad-clip 1 --seed 0 --device "$DEVICE" --no-progress)

rm -rf /tmp/probe
# The rate of the steps after the first 100 (CUDA start-up and cuDNN's algorithm search are
# slow: timing the first 300 steps whole gave 11.2 steps/s where the run then made 18).
$PY -m stepdrop.cli train "${ARGS[@]}" --steps 100 --checkpoint-every 100 --out /tmp/probe
WARM=$($PY -c "import torch; print(torch.load('/tmp/probe/checkpoint.pt', weights_only=True)['wall_time_s'])")
$PY -m stepdrop.cli train "${ARGS[@]}" --steps $((100 + PROBE_STEPS)) --checkpoint-every 1000 --out /tmp/probe --resume
STEPS=${STEPS:-$($PY - "$BUDGET_S" "$WARM" "$PROBE_STEPS" <<'EOF'
import sys, torch
ck = torch.load("/tmp/probe/checkpoint.pt", weights_only=True)
rate = int(sys.argv[3]) / (ck["wall_time_s"] - float(sys.argv[2]))
print(max(500, int(rate * float(sys.argv[1]) // 500 * 500)), file=sys.stdout)
print(f"probe: {rate:.1f} steps/s", file=sys.stderr)
EOF
)}
echo "training $STEPS steps (budget ${BUDGET_S} s)"
rm -rf "$RUN"
START=$SECONDS
$PY -m stepdrop.cli train "${ARGS[@]}" --steps "$STEPS" --checkpoint-every 2000 --log-every 100 --out "$RUN"
echo "trained in $((SECONDS - START)) s"
cp "$RUN/log.jsonl" "$OUT/res/" || true
split -b 15M "$RUN/checkpoint.pt" "$OUT/checkpoint.pt.part-"

$PY -m stepdrop.cli diagnose "$INIT" "$RUN/checkpoint.pt" --device "$DEVICE" --num-images 1024 --no-progress \
    --out "$OUT/res/diagnosis" || true
$PY -m stepdrop.cli sample --checkpoint "$RUN/checkpoint.pt" --device "$DEVICE" --clip 0 --num-samples 64 \
    --policies "$SAMPLE_SPECS" --no-progress --out "$OUT/res/samples" || true
$PY - "$RUN/checkpoint.pt" "$DEVICE" "$N_RANGE" <<'EOF' | tee "$OUT/res/range.txt" || true
# Unclipped DDIM at 10/25/100 calls: the share of output pixels beyond ±1.05 (data: 0 %).
import sys, torch
from stepdrop import FusedSampler
from stepdrop.checkpoint import load_checkpoint
m = load_checkpoint(sys.argv[1], map_location=sys.argv[2])
for k in (10, 25, 100):
    x, _ = FusedSampler(m.model, m.schedule, clip=None).sample(int(sys.argv[3]), "uniform", budget=k,
                                                               generator=torch.Generator(sys.argv[2]).manual_seed(0))
    print(f"ddim-{k}: beyond ±1.05 {float((x.abs() > 1.05).float().mean()) * 100:.3f} %, max |x| {float(x.abs().max()):.3f}")
EOF
tar czf "$OUT/results.tar.gz" -C "$OUT" res && rm -rf "$OUT/res"
ls -la "$OUT"
