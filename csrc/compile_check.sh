#!/usr/bin/env bash
# Compiles every pure-CUDA translation unit under csrc/ with nvcc alone (no torch headers, no GPU):
#   csrc/sm90/*.cu  for sm_90a
#   csrc/sm120/*.cu for sm_120a (hardware FP4 MMA) and sm_90a (emulated MMA test build)
# and fails if a .cu file includes torch. Used by .ci/run wherever nvcc exists.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
JOBS=${JOBS:-2}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
inc=(-I csrc)
cutlass_inc=$(python3 -c 'import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include"))' 2>/dev/null || true)
[ -n "$cutlass_inc" ] && [ -d "$cutlass_inc" ] && inc+=(-I "$cutlass_inc")

if grep -lE '#include *[<"](torch|ATen|c10|pybind11)/' csrc/*/*.cu csrc/*/*.cuh csrc/*.cuh 2>/dev/null; then
  echo "compile_check: the files above include torch/pybind headers; keep torch in binding.cpp only" >&2
  exit 1
fi

jobs_list=()
for f in csrc/sm90/*.cu; do [ -e "$f" ] && jobs_list+=("$f 90a"); done
for f in csrc/sm120/*.cu; do [ -e "$f" ] && jobs_list+=("$f 120a" "$f 90a"); done
if [ ${#jobs_list[@]} -eq 0 ]; then echo "compile_check: no CUDA sources"; exit 0; fi

compile_one() {
  local f=$1 arch=$2
  local o="$out/$(echo "$f" | tr '/' '_').$arch.o"
  if "$NVCC" -std=c++17 -O3 --expt-relaxed-constexpr -gencode "arch=compute_$arch,code=sm_$arch" \
      "${inc[@]}" -Xptxas -v -c "$f" -o "$o" > "$o.log" 2>&1; then
    local spills
    spills=$(grep -E "[1-9][0-9]* bytes spill (stores|loads)" "$o.log" | head -3 || true)
    echo "ok   sm_$arch $f${spills:+  (SPILLS: $spills)}"
  else
    echo "FAIL sm_$arch $f"; cat "$o.log"; return 1
  fi
}
export -f compile_one
export NVCC out
export inc_str="${inc[*]}"
status=0
printf '%s\n' "${jobs_list[@]}" | xargs -P "$JOBS" -I{} bash -c 'inc=($inc_str); compile_one {}' || status=1
exit $status
