# Sourced by the one-call GPU scripts in bench/ (repo root, on the GPU machine): installs the wheels in .whl/
# (the machine has no network), sets OUT (default /tmp/out), records the card and the time in $OUT/gpu.txt, and
# builds _C_sm90 for sm_90a unless it is already built (the build log goes to $OUT/build.log; a failed build
# ends the calling script).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
date -u | tee -a "$OUT/gpu.txt"
t0=$(date +%s)
python3 -c "import sage3_diffusers._C_sm90" 2>/dev/null || \
  SAGE3_EXTENSIONS=sm90 TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 timeout 400 python3 setup.py build_ext --inplace \
    > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
