#!/usr/bin/env bash
# One device call for issue 20 on an H100: build _C_sm90, then a Flux-1024 transformer slice (real shapes, random
# weights, 2 double + 4 single blocks) and a HunyuanVideo 720p slice (1 double + 2 single), eager and under
# torch.compile(fullgraph=True), diffusers' default processors
# vs ours with int8_fp8, plus the CPU host-overhead table of bench/host_overhead.py on the GPU machine's CPU.
# usage (GPU machine, repo root, diffusers wheel in .whl/): OUT=/some/dir bash bench/compile_e2e_gpu.sh
set -o pipefail
. bench/gpu_prelude.sh
PYTHONUNBUFFERED=1 timeout 60 python3 bench/host_overhead.py | tee $OUT/host_overhead.txt
t0=$(date +%s)
PYTHONUNBUFFERED=1 timeout 420 python3 -m sage3_diffusers bench e2e --model flux --layers 2,4 \
  --variants sdpa_default,int8_fp8 --compile --fullgraph --iters 10 --warmup 3 --json $OUT/e2e_flux_compile.json \
  2>&1 | grep -v "kept in float32" | tail -30
echo "e2e: $(( $(date +%s) - t0 )) s"
# HunyuanVideo 720p (right-padded text: the kernel reads per-sample key lengths, kv_lens, inside the compiled graph)
t0=$(date +%s)
PYTHONUNBUFFERED=1 timeout 480 python3 -m sage3_diffusers bench e2e --model hunyuan_video --layers 1,2 \
  --variants sdpa_default,int8_fp8 --compile --fullgraph --iters 3 --warmup 2 --json $OUT/e2e_hunyuan_compile.json \
  2>&1 | grep -v "kept in float32" | tail -30
echo "e2e hunyuan: $(( $(date +%s) - t0 )) s"
