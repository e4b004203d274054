#!/bin/bash
# One device call: build _C_sm90, GPU tests, compute-sanitizer on a small shape, benchmark.
# usage: bash bench/run_sm90_gpu.sh [tests|sanitize|bench|quick|ncu]...   (default: tests sanitize quick)
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv | tee $OUT/gpu.txt
date -u | tee -a $OUT/gpu.txt
t0=$(date +%s)
SAGE3_EXTENSIONS=sm90 TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 setup.py build_ext --inplace > $OUT/build.log 2>&1 || { tail -60 $OUT/build.log; exit 1; }
grep -E "spill|registers|error|warning" $OUT/build.log | sort | uniq -c | sort -rn | head -12
echo "build: $(( $(date +%s) - t0 )) s"
steps=${@:-tests sanitize quick}
for step in $steps; do
  case $step in
    tests) PYTHONUNBUFFERED=1 timeout 300 python3 -m pytest -q -x tests/gpu/test_cuda_sm90.py -rs 2>&1 | tee $OUT/tests.txt | tail -40 ;;
    testsall) PYTHONUNBUFFERED=1 timeout 300 python3 -m pytest -q tests/gpu/test_cuda_sm90.py -rs 2>&1 | tee $OUT/tests.txt | tail -40 ;;
    sanitize) timeout 150 compute-sanitizer --tool memcheck python3 -c "
import torch; from sage3_diffusers import _C_sm90 as ext
for d in (64, 128):
    q,k,v=(torch.randn(2,3,77 if i==0 else 200,d,device='cuda',dtype=torch.bfloat16) for i in range(3))
    ext.forward(q,k,v,False,True,d**-0.5,True); ext.forward(q,k,v,False,False,d**-0.5,False)
torch.cuda.synchronize(); print('sanitizer run done')" 2>&1 | tail -8 | tee $OUT/sanitizer.txt ;;
    quick) PYTHONUNBUFFERED=1 timeout 200 python3 bench/bench_sm90.py --quick 2>&1 | tee $OUT/bench.txt | tail -20 ;;
    bench) PYTHONUNBUFFERED=1 timeout 300 python3 bench/bench_sm90.py 2>&1 | tee $OUT/bench.txt | tail -20 ;;
  esac
  echo "after $step: $(( $(date +%s) - t0 )) s"
done
