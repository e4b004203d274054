#!/usr/bin/env bash
# Everything we verify on a GPU, in one device call: build the sm_90a extensions (INT8/FP8 kernel, and the
# FP4 kernel's emulated-MMA test build), run every GPU test, probe the extensions' error paths in a child
# process, host time per call, then the kernel benchmark (SM clock and power sampled beside it) and an end-to-end
# transformer benchmark.
# Usage (GPU machine, repo root): OUT=/some/dir bash bench/gpu_suite.sh [quick|full] [fp4]
#   fp4: also build the FP4 kernel's emulated-MMA sm_90a test build (+~2.5 min on 16 cores) and run its tests.
set -uo pipefail
OUT=${OUT:-/tmp/sage3_out}
mkdir -p "$OUT"
mode=${1:-quick}
with_fp4=${2:-}
log() { echo "== $* ($(date +%H:%M:%S))" | tee -a "$OUT/suite.txt"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/card.txt"

if [ "$with_fp4" = fp4 ]; then
  log "build: _C_sm90 (sm_90a) + _C_fp4 (emulated MMA, sm_90a)"
  SAGE3_FP4_EMULATED=1 TORCH_CUDA_ARCH_LIST="9.0a" MAX_JOBS=16 timeout 400 python3 setup.py build_ext --inplace \
    > "$OUT/build.txt" 2>&1 || { tail -40 "$OUT/build.txt"; log "BUILD FAILED"; }
else
  log "build: _C_sm90 (sm_90a)"
  SAGE3_EXTENSIONS=sm90 TORCH_CUDA_ARCH_LIST="9.0a" MAX_JOBS=16 timeout 400 python3 setup.py build_ext --inplace \
    > "$OUT/build.txt" 2>&1 || { tail -40 "$OUT/build.txt"; log "BUILD FAILED"; }
fi
grep -cE "[1-9][0-9]* bytes spill" "$OUT/build.txt" | sed 's/^/ptxas lines reporting spills: /' | tee -a "$OUT/suite.txt"
python3 -m sage3_diffusers env > "$OUT/env.txt" 2>&1; grep -E "GPU 0|_C_|kernel='" "$OUT/env.txt" | tee -a "$OUT/suite.txt"

log "GPU tests"
# every GPU test (the FP4 ones skip, with their reason, unless the fp4 build ran)
PYTHONUNBUFFERED=1 timeout 300 python3 -m pytest -q -rs tests/gpu 2>&1 | tee "$OUT/gpu_tests.txt" | tail -15

log "extension error paths (child processes; a crash shows as a signal)"
exts=_C_sm90; [ "$with_fp4" = fp4 ] && exts="_C_sm90 _C_fp4"
for ext in $exts; do
  timeout 60 python3 bench/probe_error_paths.py "$ext" > "$OUT/probe_$ext.txt" 2>&1
  echo "$ext: exit $? $(tail -1 "$OUT/probe_$ext.txt")" | tee -a "$OUT/suite.txt"
done

log "host µs per call (sm90, Triton direct and through Triton's launcher, SDPA)"
timeout 90 python3 bench/host_overhead.py --cuda --calls 200 --json "$OUT/host.json" 2>&1 | tee "$OUT/host.txt" | tail -12

log "kernel benchmark ($mode), with the card's SM clock and power sampled every 100 ms beside it"
# A sustained call can run at a lower clock than a short profiled one (power limit): clocks.csv says which.
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu --format=csv -lms 100 > "$OUT/clocks.csv" &
sampler=$!
q=--quick; [ "$mode" = full ] && q=
PYTHONUNBUFFERED=1 timeout 240 python3 -m sage3_diffusers bench kernels $q --json "$OUT/kernels.json" \
  --plot "$OUT/kernels.png" 2>&1 | tee "$OUT/kernels.txt" | tail -14
kill $sampler 2>/dev/null

log "end-to-end: Flux 1024x1024 (2 double + 4 single blocks, real shapes, random weights)"
PYTHONUNBUFFERED=1 timeout 150 python3 -m sage3_diffusers bench e2e --model flux --layers 2,4 \
  --variants sdpa_default,sdpa,int8_fp8,triton_int8_fp8,cuda_sm90_int8_fp8 --json "$OUT/e2e_flux.json" 2>&1 | tee "$OUT/e2e.txt" | tail -7
log "end-to-end: HunyuanVideo 720p x 129 frames (1 double + 1 single block, real shapes, random weights)"
PYTHONUNBUFFERED=1 timeout 200 python3 -m sage3_diffusers bench e2e --model hunyuan_video --layers 1,1 --iters 3 --warmup 1 \
  --variants sdpa,int8_fp8,triton_int8_fp8,cuda_sm90_int8_fp8 --json "$OUT/e2e_hunyuan.json" 2>&1 | tee "$OUT/e2e_hunyuan.txt" | tail -7
log "done"
