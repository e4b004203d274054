#!/usr/bin/env bash
# One device call for issue 19 on an H100: build _C_sm90, the self-check's GPU tests and its cost per kernel, then
# `calibrate` end to end on a Flux-1024 transformer slice (real shapes, random weights, 2 double + 4 single
# blocks, no download) with its predicted attention speed-up checked against the measured one.
# usage (GPU machine, repo root, diffusers wheel in .whl/): OUT=/some/dir bash bench/calibrate_slice_gpu.sh
set -o pipefail
. bench/gpu_prelude.sh
PYTHONUNBUFFERED=1 timeout 120 python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_selfcheck_gpu.py 2>&1 | \
  grep -E "passed|FAILED|failed|skipped|Error" | tail -20
PYTHONUNBUFFERED=1 timeout 120 python3 bench/selfcheck_cost.py --json $OUT/selfcheck_cost.json
python3 -m sage3_diffusers env 2>&1 | sed -n '/self-check/,$p'
t0=$(date +%s)
PYTHONUNBUFFERED=1 timeout 180 python3 -m sage3_diffusers calibrate --model flux --slice 2,4 --steps 4 --buckets 2 \
  --budget cos=0.99 --measure-speed --out $OUT/flux_h100_policy.yaml --plot $OUT/flux_h100_heat.png \
  --json $OUT/flux_h100_calibrate.json 2>&1 | grep -v "kept in float32"
echo "calibrate: $(( $(date +%s) - t0 )) s (must be <= 180)"
cat $OUT/flux_h100_policy.yaml
