#!/usr/bin/env bash
# Everything we verify on a GPU, in one device call (see bench/RESULTS.md for how results are recorded):
# build both extensions (sm_90a INT8/FP8 kernel; FP4 kernel for sm_120a + the emulated sm_90a test build),
# run the GPU tests, the kernel benchmark, and an end-to-end transformer benchmark.
# Usage (on the GPU machine, repo root): bash bench/gpu_suite.sh [quick]
set -uo pipefail
OUT=${OUT:-/tmp/sage3_out}
mkdir -p "$OUT"
mode=${1:-full}
log() { echo "== $*" | tee -a "$OUT/suite.txt"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/card.txt"

log "build (sm90 + fp4 sm_120a + fp4 emulated sm_90a)"
t0=$(date +%s)
SAGE3_FP4_EMULATED=1 TORCH_CUDA_ARCH_LIST="9.0a;12.0a" MAX_JOBS=16 python3 setup.py build_ext --inplace \
  > "$OUT/build.txt" 2>&1 || { tail -60 "$OUT/build.txt"; log "BUILD FAILED"; }
log "build took $(( $(date +%s) - t0 )) s"
grep -E "spill|registers" "$OUT/build.txt" | sort | uniq -c | sort -rn | head -20 | tee -a "$OUT/suite.txt"
python3 -m sage3_diffusers env 2>&1 | tee "$OUT/env.txt" | head -40

log "GPU tests"
python3 -m pytest -q -rs tests/gpu 2>&1 | tee "$OUT/gpu_tests.txt" | tail -30

log "CPU suite on the GPU machine (sanity)"
python3 -m pytest -q -x tests --ignore=tests/gpu 2>&1 | tail -3 | tee -a "$OUT/suite.txt"

if [ "$mode" = full ]; then
  log "kernel benchmark"
  python3 -m sage3_diffusers bench kernels --json "$OUT/kernels.json" --plot "$OUT/kernels.png" 2>&1 \
    | tee "$OUT/kernels.txt" | tail -40
  log "end-to-end: Flux 1024x1024, 2 double + 4 single blocks"
  python3 -m sage3_diffusers bench e2e --model flux --layers 2,4 --variants sdpa_default,sdpa,int8_fp8 \
    --json "$OUT/e2e_flux.json" 2>&1 | tee "$OUT/e2e.txt" | tail -8
fi
log "done"
