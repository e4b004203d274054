#!/usr/bin/env bash
# Compile the NVFP4 attention kernel for sm_120a (no GPU needed) and show that its SASS contains the hardware
# block-scaled FP4 MMA (OMMA.SF.16864.F32.E2M1.E2M1.UE4M3.4X) and the FP4 pack (F2FP.SATFINITE.E2M1), and that
# the sm_90a test build contains neither (its MMA is the software emulation).
# Needs nvcc >= 12.8 (checked with 13.0) and cuobjdump (`pip install nvidia-cuda-cuobjdump` provides one).
# Usage: csrc/fp4/check_sass.sh [outdir]
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$(mktemp -d)}"
mkdir -p "$out"
find_pip_cuobjdump() {  # the nvidia-cuda-cuobjdump wheel puts it under site-packages/nvidia/<something>/bin
  python3 -c 'import glob, os, nvidia
hits = [h for p in nvidia.__path__ for h in sorted(glob.glob(os.path.join(p, "*", "bin", "cuobjdump")))]
print(hits[0] if hits else "")' 2>/dev/null || true
}
cuobjdump="${CUOBJDUMP:-$(command -v cuobjdump || find_pip_cuobjdump)}"
if [[ -z "$cuobjdump" || ! -x "$cuobjdump" ]]; then
  echo "cuobjdump not found (set CUOBJDUMP or pip install nvidia-cuda-cuobjdump)" >&2
  exit 2
fi
flags=(-O3 -std=c++17 --expt-relaxed-constexpr -I"$here" -c)
nvcc "${flags[@]}" -gencode=arch=compute_120a,code=sm_120a "$here/fp4/attn.cu" -o "$out/fp4_attn_sm120a.o"
nvcc "${flags[@]}" -gencode=arch=compute_90a,code=sm_90a "$here/fp4/attn.cu" -o "$out/fp4_attn_sm90a.o"
"$cuobjdump" -sass "$out/fp4_attn_sm120a.o" > "$out/fp4_attn_sm120a.sass"
"$cuobjdump" -sass "$out/fp4_attn_sm90a.o" > "$out/fp4_attn_sm90a.sass"

mma_re='OMMA\.SF\.16864\.F32\.E2M1\.E2M1\.UE4M3\.4X'
n120=$(grep -cE "$mma_re" "$out/fp4_attn_sm120a.sass" || true)
pack120=$(grep -cE 'F2FP\.SATFINITE\.E2M1' "$out/fp4_attn_sm120a.sass" || true)
n90=$(grep -cE 'OMMA|F2FP\.SATFINITE\.E2M1' "$out/fp4_attn_sm90a.sass" || true)
echo "sm_120a: $n120 block-scaled FP4 MMA instructions ($mma_re), $pack120 E2M1 pack instructions"
grep -m1 -oE "OMMA\.SF[^;]*" "$out/fp4_attn_sm120a.sass" || true
echo "sm_90a (emulated MMA test build): $n90 FP4 tensor-core/pack instructions"
if [[ "$n120" -gt 0 && "$pack120" -gt 0 && "$n90" -eq 0 ]]; then
  echo "OK"
else
  echo "FAIL" >&2
  exit 1
fi
