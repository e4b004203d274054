#!/bin/bash
# One device call: build _C_sm90, GPU tests, compute-sanitizer on a small shape, benchmark.
# usage: bash bench/run_sm90_gpu.sh [smoke|tests|testsall|sanitize|bench|quick|ncu|ncustall|trace|profile|diag]...
#        (default: smoke testsall sanitize quick). trace: the standalone kernel harness tools/sm90_attn_trace.cu,
#        kernel-alone TFLOPS and the per-tile phase timeline (no torch needed).
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv | tee $OUT/gpu.txt
date -u | tee -a $OUT/gpu.txt
t0=$(date +%s)
SAGE3_EXTENSIONS=sm90 TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 setup.py build_ext --inplace > $OUT/build.log 2>&1 || { tail -60 $OUT/build.log; exit 1; }
grep -E "spill|registers|error|warning" $OUT/build.log | sort | uniq -c | sort -rn | head -12
echo "build: $(( $(date +%s) - t0 )) s"
steps=${@:-smoke testsall sanitize quick}
for step in $steps; do
  case $step in
    smoke) timeout 150 python3 -c "
import torch; from sage3_diffusers import _C_sm90 as ext
from sage3_diffusers.numerics.sage2pp_reference import sage2pp_attention_reference as ref
from sage3_diffusers.numerics import accuracy_metrics as M
for d in (64, 128):
    for c in (False, True):
        q,k,v=(torch.randn(2,2,700,d,device='cuda',dtype=torch.bfloat16) for i in range(3))
        res=ext.forward(q,k,v,False,c,d**-0.5,True); torch.cuda.synchronize(); assert not isinstance(res, str), res
        o,l=res; r,rl=ref(q.float(),k.float(),v.float(),is_causal=c,return_lse=True); m=M(o.float(),r)
        print('smoke d',d,'causal',int(c),'cos %.6f rel_l1 %.5f lse_err %.2e' % (m['cos_sim'], m['rel_l1'], (l-rl).abs().max().item()), 'OK' if m['cos_sim']>0.9999 and m['rel_l1']<0.01 else 'FAIL')
" 2>&1 | tail -26 ;;
    diag) for c in "torch.ones(2).view(3)" "ext.forward(torch.randn(1,3,64,128,device='cuda',dtype=torch.bfloat16), torch.randn(1,2,64,128,device='cuda',dtype=torch.bfloat16), torch.randn(1,2,64,128,device='cuda',dtype=torch.bfloat16), False, False, 0.1, False)" "ext.forward(torch.randn(1,2,64,128), torch.randn(1,2,64,128), torch.randn(1,2,64,128), False, False, 0.1, False)"; do
        timeout 60 python3 -c "
import torch; from sage3_diffusers import _C_sm90 as ext
try:
    $c
except Exception as e: print('raised', type(e).__name__, str(e)[:120])" > $OUT/diag.txt 2>&1; echo "diag rc=$? $(head -c 300 $OUT/diag.txt | tr '\n' ' ')"; done ;;
    tests) PYTHONUNBUFFERED=1 timeout 300 python3 -m pytest -q -x tests/gpu/test_cuda_sm90.py -rs 2>&1 | tee $OUT/tests.txt | tail -40 ;;
    testsall) PYTHONUNBUFFERED=1 timeout 300 python3 -m pytest -q tests/gpu/test_cuda_sm90.py -rs 2>&1 | tee $OUT/tests.txt | tail -25 ;;
    sanitize) timeout 150 compute-sanitizer --tool memcheck python3 -c "
import torch; from sage3_diffusers import _C_sm90 as ext
lens=torch.tensor([300, 0], dtype=torch.int32, device='cuda')
for d in (64, 128):
    q,k,v=(torch.randn(2,3,77 if i==0 else 300,d,device='cuda',dtype=torch.bfloat16) for i in range(3))
    for r in (ext.forward(q,k,v,False,True,d**-0.5,True), ext.forward(q,k,v,False,False,d**-0.5,False),
              ext.forward(q,k,v,False,True,d**-0.5,True,kv_lens=lens-171), ext.forward(q,k,v,False,False,d**-0.5,False,kv_lens=lens)): assert not isinstance(r, str), r
torch.cuda.synchronize(); print('sanitizer run done')" 2>&1 | tail -8 | tee $OUT/sanitizer.txt ;;
    quick) PYTHONUNBUFFERED=1 timeout 200 python3 bench/bench_sm90.py --quick 2>&1 | tee $OUT/bench.txt | tail -20 ;;
    ncu) timeout 200 ncu --clock-control none --kernel-name regex:attn_int8 --launch-skip 3 --launch-count 1 \
           --section SpeedOfLight --section ComputeWorkloadAnalysis --print-details all --section MemoryWorkloadAnalysis \
           --section WarpStateStats --section SchedulerStats --section LaunchStats --section Occupancy \
           python3 bench/ncu_sm90.py 4 16 4096 128 > $OUT/ncu_attn.txt 2>&1; echo "ncu attn rc=$?"
         grep -E "Duration|Throughput|Pipe|Stall|Issue|Eligible|Active Warps|Registers|Shared Memory|Executed Ipc|L2|DRAM|Warp Cycles" $OUT/ncu_attn.txt | head -60
         timeout 120 ncu --clock-control none --kernel-name regex:"quantize_qkv|kv_stats" --launch-skip 6 --launch-count 2 \
           --section SpeedOfLight --section Occupancy python3 bench/ncu_sm90.py 4 16 4096 128 > $OUT/ncu_quant.txt 2>&1; echo "ncu quant rc=$?"
         grep -E "kv_stats|quantize_qkv|Duration|Throughput|Achieved Occupancy" $OUT/ncu_quant.txt | head -20 ;;
    ncustall) timeout 240 ncu --clock-control none --kernel-name regex:attn_int8 --launch-skip 3 --launch-count 1 \
           --section WarpStateStats --section SourceCounters --print-details all --page details \
           python3 bench/ncu_sm90.py 4 16 4096 128 > $OUT/ncu_stall.txt 2>&1; echo "ncu stall rc=$?"
         grep -iE "stall|warp cycles" $OUT/ncu_stall.txt | head -40
         timeout 240 ncu --clock-control none --kernel-name regex:attn_int8 --launch-skip 3 --launch-count 1 \
           --section SourceCounters --page source --print-source sass --csv \
           python3 bench/ncu_sm90.py 4 16 4096 128 > $OUT/ncu_source.csv 2>&1; echo "ncu source rc=$? $(wc -l < $OUT/ncu_source.csv) lines" ;;
    trace) nvcc -O3 -std=c++17 --expt-relaxed-constexpr -Icsrc -Itools -gencode=arch=compute_90a,code=sm_90a \
           tools/sm90_attn_trace.cu -o /tmp/sm90_attn && /tmp/sm90_attn 4 16 4096 128 | tee $OUT/trace.txt
         nvcc -O3 -std=c++17 --expt-relaxed-constexpr -Icsrc -Itools -gencode=arch=compute_90a,code=sm_90a -DSAGE3_SM90_TRACE=1 \
           tools/sm90_attn_trace.cu -o /tmp/sm90_attn_trace && /tmp/sm90_attn_trace 4 16 4096 128 | tee -a $OUT/trace.txt | tail -30 ;;
    profile) PYTHONUNBUFFERED=1 timeout 120 python3 bench/bench_sm90.py --profile 2>&1 | tee $OUT/profile.txt | grep -v Warning | tail -30 ;;
    bench) PYTHONUNBUFFERED=1 timeout 300 python3 bench/bench_sm90.py 2>&1 | tee $OUT/bench.txt | tail -20 ;;
  esac
  echo "after $step: $(( $(date +%s) - t0 )) s"
done
