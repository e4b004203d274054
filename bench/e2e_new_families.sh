#!/usr/bin/env bash
# End to end on one GPU for the families of issue 13, at each pipeline's real default size (random weights, real
# configs, fewer blocks so each row fits the time budget): diffusers' default attention vs our int8_fp8 kernel
# through the dispatcher route. One JSON per family in $OUT, to copy into docs/results/.
# Usage (GPU machine, repo root, diffusers wheel in .whl/): OUT=/some/dir bash bench/e2e_new_families.sh [family ...]
#   default families: wan wan22_ti2v qwenimage ltx ltx2 flux2 hunyuan_video15
set -uo pipefail
. bench/gpu_prelude.sh
log() { echo "== $* ($(date +%H:%M:%S))" | tee -a "$OUT/e2e_new_families.txt"; }
python3 -m sage3_diffusers env 2>&1 | grep -E "GPU 0|_C_|kernel='" | tee -a "$OUT/e2e_new_families.txt"

# family: blocks per kind (--layers), what the default size is (the pipeline's default, see the family module)
declare -A LAYERS=(
  [wan]=4                # Wan 2.1 14B, 1280x720x81: 75,600 video tokens, 40 heads x 128, 512 text tokens
  [wan22_ti2v]=4         # Wan 2.2 TI2V 5B, 1280x704x121: 27,280 tokens, one timestep per token
  [qwenimage]=8          # Qwen-Image, 1328x1328: 6,889 image + 256 text tokens
  [ltx]=8                # LTX-Video, 704x512x161, CFG batch 2: 7,392 video tokens, 128 text tokens (100 valid)
  [ltx2]=4               # LTX-2, 768x512x121, CFG batch 2: 6,144 video + 126 audio tokens, 1024 text tokens
  [flux2]=2,8            # FLUX.2 dev, 1024x1024: 4,096 image + 512 text tokens (2 double + 8 single blocks)
  [hunyuan_video15]=4    # HunyuanVideo 1.5 480p, 848x480x121: 49,290 video + 1,985 text tokens (200 valid)
)
families=("$@")
[ ${#families[@]} -eq 0 ] && families=(wan wan22_ti2v qwenimage ltx ltx2 flux2 hunyuan_video15)
for fam in "${families[@]}"; do
  log "end-to-end: $fam (--layers ${LAYERS[$fam]})"
  PYTHONUNBUFFERED=1 timeout 420 python3 -m sage3_diffusers bench e2e --model "$fam" --layers "${LAYERS[$fam]}" \
    --iters 3 --warmup 1 --variants sdpa_default,int8_fp8 --json "$OUT/e2e_$fam.json" 2>&1 \
    | tee "$OUT/e2e_$fam.txt" | tail -6
done
log "done"
