#!/usr/bin/env bash
# Compiles every pure-CUDA translation unit with nvcc alone (no torch headers, no GPU):
#   csrc/sm90/*.cu                          for sm_90a
#   csrc/fp4/*.cu, csrc/fp4/testing/*.cu    for sm_120a (hardware FP4 MMA) and sm_90a (emulated MMA test build)
#   tools/*.cu                              for sm_90a, with the kernel trace hooks on (developer harnesses,
#                                           outside the package build)
# and fails if a csrc/ .cu file includes torch; then syntax-checks the torch bindings (csrc/**/binding.cpp)
# against the installed torch's headers. Used by .ci/run wherever nvcc exists.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
JOBS=${JOBS:-2}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
inc=(-I csrc)
cutlass_inc=$(python3 -c 'import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include"))' 2>/dev/null || true)
[ -n "$cutlass_inc" ] && [ -d "$cutlass_inc" ] && inc+=(-I "$cutlass_inc")

if grep -lE '#include *[<"](torch|ATen|c10|pybind11)/' csrc/*/*.cu csrc/*/*.cuh csrc/*/*/*.cu 2>/dev/null; then
  echo "compile_check: the files above include torch/pybind headers; keep torch in binding.cpp only" >&2
  exit 1
fi

jobs_list=()
for f in csrc/sm90/*.cu; do [ -e "$f" ] && jobs_list+=("$f 90a"); done
for f in csrc/fp4/*.cu csrc/fp4/testing/*.cu; do [ -e "$f" ] && jobs_list+=("$f 120a" "$f 90a"); done
for f in tools/*.cu; do [ -e "$f" ] && jobs_list+=("$f 90a"); done
if [ ${#jobs_list[@]} -eq 0 ]; then echo "compile_check: no CUDA sources"; exit 0; fi

compile_one() {
  local f=$1 arch=$2
  local o="$out/$(echo "$f" | tr '/' '_').$arch.o" defs=()
  [[ $f == tools/* ]] && defs=(-I tools -DSAGE3_SM90_TRACE=1)
  if "$NVCC" -std=c++17 -O3 --expt-relaxed-constexpr -gencode "arch=compute_$arch,code=sm_$arch" \
      "${inc[@]}" "${defs[@]}" -Xptxas -v -c "$f" -o "$o" > "$o.log" 2>&1; then
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

# The torch bindings (the only files that include torch): syntax-checked against the installed torch's headers.
# A CPU torch wheel lacks one generated CUDA header (cuda_cmake_macros.h); a stand-in defines what it would.
torch_inc=$(python3 -c 'import torch.utils.cpp_extension as c; print(" ".join(c.include_paths()))' 2>/dev/null || true)
py_inc=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
if [ -n "$torch_inc" ]; then
  stub="$out/stub"
  mkdir -p "$stub/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$stub/c10/cuda/impl/cuda_cmake_macros.h"
  # nvcc may be a wrapper script: ask it where its headers are.
  cuda_inc=$("$NVCC" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/.*INCLUDES="-I\([^"]*\)".*/\1/p' | head -1)
  for f in csrc/*/binding.cpp csrc/*/*/binding.cpp; do
    ext="_C_$(dirname "${f#csrc/}" | tr '/' '_')"  # csrc/fp4/testing/binding.cpp -> _C_fp4_testing
    # shellcheck disable=SC2086
    if g++ -std=c++17 -w -fsyntax-only -DTORCH_EXTENSION_NAME="$ext" -I csrc -I "$stub" $(printf -- '-I %s ' $torch_inc) \
        -I "$cuda_inc" -I "$py_inc" "$f" > "$out/binding.log" 2>&1; then
      echo "ok   torch binding $f"
    else
      echo "FAIL torch binding $f"; head -40 "$out/binding.log"; status=1
    fi
  done
else
  echo "compile_check: torch not importable; bindings not checked"
fi
exit $status
