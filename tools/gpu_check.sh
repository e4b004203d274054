#!/usr/bin/env bash
# Builds every extension for sm_90a in place (_C_sm90, the emulated-MMA _C_fp4 and the test-only
# _C_fp4_testing), then runs the GPU kernel tests, compute-sanitizer memcheck on small sm90 calls (with and
# without kv_lens) and the sm90 kernel benchmark. Run from the repository root on an H100/H200 with a CUDA torch,
# triton and nvcc:   bash tools/gpu_check.sh [build|tests|sanitize|bench]...   (default: all four)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
status=0
for step in ${@:-build tests sanitize bench}; do
  case $step in
    build) TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=${MAX_JOBS:-16} SAGE3_FP4_EMULATED=1 SAGE3_BUILD_TEST_EXT=1 \
             python3 setup.py build_ext --inplace > /tmp/sage3_build.log 2>&1 || { tail -60 /tmp/sage3_build.log; exit 1; }
           grep -E "spill|error" /tmp/sage3_build.log | sort | uniq -c | sort -rn | head -12 ;;
    tests) python3 -m pytest -q -rs tests/gpu || status=1 ;;
    sanitize) compute-sanitizer --tool memcheck python3 -c "
import torch; from sage3_diffusers import _C_sm90 as ext
lens = torch.tensor([300, 0], dtype=torch.int32, device='cuda')
for d in (64, 128):
    q, k, v = (torch.randn(2, 3, 77 if i == 0 else 300, d, device='cuda', dtype=torch.bfloat16) for i in range(3))
    for c in (False, True):
        for kl in (None, lens, lens - 171):
            r = ext.forward(q, k, v, False, c, d ** -0.5, True, kv_lens=kl); assert not isinstance(r, str), r
torch.cuda.synchronize(); print('sanitizer run done')" 2>&1 | tail -6 || status=1 ;;
    bench) python3 bench/bench_sm90.py || status=1 ;;
  esac
done
exit $status
