#!/usr/bin/env bash
# Everything the fused kernels need a GPU for, in one command on a CUDA machine (repo root):
#
#   bash scripts/gpu_check.sh [STAGE...]     stages: build tests sanitize bench suite (default: all)
#
# build     the extension in place with the CUDA kernels required (STEPDROP_CUDA=1)
# tests     the GPU tests: every `cuda`-marked kernel case, CUDA graphs, CLI sampling on the GPU
# sanitize  compute-sanitizer memcheck over the CUDA and Triton kernel tests, racecheck and
#           synccheck over the CUDA kernels (the fused step's and grad_probe's shared memory)
# bench     the GPU benchmarks (fused step vs torch vs a copy; DDIM-25 images/s, CUDA graph vs
#           eager vs the diffusers loop), JSON beside the log
# suite     the whole test suite (xdist), for anything the GPU or this torch version changes
#
# Logs and JSON go to $OUT (the device tool's folder) or ./gpu-check. Python packages missing on
# the machine (diffusers, torch-fidelity) are installed from ./.whl when that folder exists.
# A stage's failure is reported and the next stage still runs; the exit status is the first
# failure's.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 STEPDROP_CUDA=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export PATH="$CUDA_HOME/bin:$PATH" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
STAGES=${*:-build tests sanitize bench suite}
status=0
summary=()

stage() {  # stage NAME SECONDS CMD...: run with a time limit (none for a shell function), log to $OUT/NAME.log
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    echo "=== $name: $*" | tee "$OUT/$name.log"
    if [ "$(type -t "$1")" = function ]; then "$@"; else timeout "$limit" "$@"; fi >>"$OUT/$name.log" 2>&1
    local rc=$?
    summary+=("$name rc=$rc $((SECONDS - start))s")
    echo "=== $name rc=$rc in $((SECONDS - start)) s" | tee -a "$OUT/$name.log"
    tail -n 25 "$OUT/$name.log"
    [ $rc -ne 0 ] && [ $status -eq 0 ] && status=$rc
    return 0
}

build() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    nvcc --version | tail -n 2
    $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
    # setup.py needs setuptools >= 77 (pyproject's SPDX licence); else the same build through torch's JIT loader
    $PY setup.py -q build_ext --inplace || $PY - <<'PYEOF' || return
import glob, os, shutil, sysconfig
from torch.utils.cpp_extension import load
os.makedirs("build/jit", exist_ok=True)
m = load(name="_C", sources=sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("kernels/*.cu")),
         extra_cflags=["-O3", "-fopenmp", "-DSTEPDROP_WITH_CUDA"], extra_cuda_cflags=["-O3"],
         extra_ldflags=["-fopenmp"], extra_include_paths=[os.path.abspath("csrc"), os.path.abspath("kernels")],
         build_directory="build/jit")
shutil.copy(m.__file__, "stepdrop/_C" + sysconfig.get_config_var("EXT_SUFFIX"))
PYEOF
    $PY -c "from stepdrop import _C; from stepdrop.ops import available_backends as a; assert _C.has_cuda(); print('backends on cuda:', a('cuda'))"
}

PYTEST=($PY -m pytest -p no:cacheprovider -q -rs)
for s in $STAGES; do
    case $s in
        build) stage build 0 build ;;
        tests)
            stage kernels 300 "${PYTEST[@]}" -m cuda tests/test_native.py tests/test_plan_step.py tests/test_grad_probe.py \
                tests/test_triton.py
            stage graphs 300 "${PYTEST[@]}" tests/test_cuda_graph.py tests/test_cost.py tests/test_diffusers_scheduler.py \
                tests/test_ops_validation.py
            stage cli 200 $PY -m stepdrop.cli sample --policies ddim-25,stepdrop-25 --num-samples 64 --device cuda \
                --cuda-graph --seed 0 --out "$OUT/sample" ;;
        sanitize)
            stage memcheck 200 compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 \
                "${PYTEST[@]}" -m cuda tests/test_native.py tests/test_plan_step.py tests/test_grad_probe.py tests/test_triton.py
            stage racecheck 420 compute-sanitizer --tool racecheck --error-exitcode 9 --print-limit 20 \
                "${PYTEST[@]}" -m cuda tests/test_native.py tests/test_plan_step.py tests/test_grad_probe.py -k "not triton"
            stage synccheck 90 compute-sanitizer --tool synccheck --error-exitcode 9 --print-limit 20 \
                "${PYTEST[@]}" -m cuda tests/test_native.py tests/test_plan_step.py tests/test_grad_probe.py -k "not triton" ;;
        bench) stage bench 500 "${PYTEST[@]}" -s benchmarks/bench_fused_step.py benchmarks/bench_gpu_throughput.py \
                   -k "gpu" --benchmark-only --benchmark-json "$OUT/bench_gpu.json" ;;
        suite) stage suite 500 "${PYTEST[@]}" -n 8 tests ;;
        *) echo "unknown stage $s (stages: build tests sanitize bench suite)"; exit 2 ;;
    esac
done
printf '%s\n' "${summary[@]}"
exit $status
