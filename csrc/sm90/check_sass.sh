#!/usr/bin/env bash
# Compiles the sm90 attention for sm_90a (no GPU needed) and checks its SASS: INT8 wgmma (IGMMA) for QK^T,
# FP8 wgmma (QGMMA ... E4M3) for PV, TMA loads (UTMALDG), and no local-memory spills (LDL/STL) in the kernel.
# Needs nvcc (checked with 13.0) and cuobjdump (`pip install nvidia-cuda-cuobjdump` provides one).
# Usage: csrc/sm90/check_sass.sh [outdir]
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$(mktemp -d)}"
mkdir -p "$out"
cuobjdump="${CUOBJDUMP:-$(command -v cuobjdump || python3 -c 'import glob, os, nvidia
hits = [h for p in nvidia.__path__ for h in sorted(glob.glob(os.path.join(p, "*", "bin", "cuobjdump")))]
print(hits[0] if hits else "")' 2>/dev/null || true)}"
if [[ -z "$cuobjdump" || ! -x "$cuobjdump" ]]; then
  echo "cuobjdump not found (set CUOBJDUMP or pip install nvidia-cuda-cuobjdump)" >&2
  exit 2
fi
status=0
for d in 64 128; do
  nvcc -O3 -std=c++17 --expt-relaxed-constexpr -I"$here" -Xptxas -v -gencode=arch=compute_90a,code=sm_90a \
    -c "$here/sm90/attn_hd$d.cu" -o "$out/attn_hd$d.o" > "$out/attn_hd$d.ptxas.log" 2>&1
  "$cuobjdump" -sass "$out/attn_hd$d.o" > "$out/attn_hd$d.sass"
  ig=$(grep -cE 'IGMMA\.64x128x32\.S8\.S8' "$out/attn_hd$d.sass" || true)
  qg=$(grep -cE 'QGMMA\.64x(72|136)x32\.F32\.E4M3\.E4M3' "$out/attn_hd$d.sass" || true)
  tma=$(grep -cE 'UTMALDG' "$out/attn_hd$d.sass" || true)
  lmem=$(grep -cE '\b(LDL|STL)\b' "$out/attn_hd$d.sass" || true)
  spills=$(grep -cE '[1-9][0-9]* bytes spill' "$out/attn_hd$d.ptxas.log" || true)
  serial=$(grep -cE 'C751[13]' "$out/attn_hd$d.ptxas.log" || true)
  echo "hd$d: IGMMA $ig, QGMMA(E4M3) $qg, UTMALDG $tma, LDL/STL $lmem, ptxas spill lines $spills, wgmma-serialized warnings $serial"
  if [[ $ig -eq 0 || $qg -eq 0 || $tma -eq 0 || $lmem -ne 0 || $spills -ne 0 || $serial -ne 0 ]]; then status=1; fi
done
exit $status
