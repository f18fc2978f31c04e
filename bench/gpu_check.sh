#!/usr/bin/env bash
# Every GPU check of fastcbm in one short window (≤ 8 minutes on an H100/H200), for the scarce GPU leases:
#   1. build the CUDA extension (fastcbm._C_cuda, sm_90) in place;
#   2. run the `gpu`-marked tests and every op test's CUDA and compiled-Triton cases;
#   3. run every benchmark with --device cuda --quick (CSV rows tagged with the GPU), plus the cubic loss's
#      "largest batch in 16 GB" search;
#   4. build and time a TensorRT engine of an exported SALF-CBM where `import tensorrt` works;
#   5. write the log, a summary and the CSVs under $OUT (results.tar.gz): commit the CSVs, then regenerate the README
#      table with `python -m bench --table --write-readme`.
# Usage (from the repository root, on the GPU machine):   OUT=/some/dir bash bench/gpu_check.sh
# Python packages that the GPU machine lacks (open_clip_torch, ftfy, wcwidth) travel as wheels in .whl/ (made here by
# `bash bench/gpu_prep.sh`); each step has its own time limit so one hang cannot eat the window.
set -u
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
T0=$(date +%s)

step() {  # step NAME SECONDS CMD... : run with a time limit, record the outcome in the summary
  local name=$1 limit=$2; shift 2
  local t=$(date +%s)
  echo; echo "=== [$(($(date +%s) - T0)) s] $name (limit ${limit} s)"
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  local what=ok; [ $rc -ne 0 ] && what="FAILED (exit $rc)"; [ $rc -eq 124 ] && what="TIMED OUT"
  printf '%-44s %-18s %5d s\n' "$name" "$what" "$(($(date +%s) - t))" | tee -a "$SUMMARY"
  return 0
}

echo "== fastcbm GPU check $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

if ls .whl/*.whl >/dev/null 2>&1; then
  step "install carried wheels" 120 $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# the bench scripts and tests import fastcbm from this checkout
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

step "build fastcbm._C + _C_cuda (sm_90)" 240 env FASTCBM_CUDA=ON $PY -m pip install -q --no-build-isolation \
  --no-deps -e . -C cmake.define.CMAKE_CUDA_ARCHITECTURES=90
$PY -m fastcbm info || true

# 2. tests: the gpu-marked ones, then the CUDA / Triton cases of every op test (compiled Triton: no interpreter)
unset TRITON_INTERPRET
step "pytest -m gpu" 150 $PY -m pytest -q -x -m gpu -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml"
step "pytest op tests: cuda/triton cases" 150 $PY -m pytest -q -p no:cacheprovider -k "cuda or triton" \
  tests/test_metrics.py tests/test_prompts.py tests/test_losses.py $(ls tests/test_cam.py 2>/dev/null) \
  --junitxml="$OUT/op_tests.xml"

# 3. every benchmark, quick, on the GPU; then the 16 GB batch search of the cubic loss
step "python -m bench --device cuda --quick" 240 $PY -m bench --device cuda --quick --keep-going --note "gpu_check.sh"
step "cubic loss: largest B in 16 GB" 90 $PY bench/losses.py --device cuda --search-16gb --quick

# 4. TensorRT (not installable from the package index here: the check says so in one line where it is missing)
if $PY -c "import tensorrt" 2>/dev/null; then
  step "TensorRT engine: build + time" 150 $PY -m fastcbm.deploy.tensorrt_check --out "$OUT/trt"
else
  echo "TensorRT: 'import tensorrt' fails on this machine: engine build and timing skipped" | tee -a "$SUMMARY"
fi
# DALI's GPU decoder: its wheels (~820 MB) cannot travel in a lease; the check runs where DALI is installed
if $PY -c "import nvidia.dali" 2>/dev/null; then
  step "DALI mixed decode test" 60 $PY -m pytest -q -p no:cacheprovider tests/test_precompute.py -k dali
else
  echo "DALI: not installed on this machine: the 'mixed' (nvJPEG) decoder check skipped" | tee -a "$SUMMARY"
fi

tar czf "$OUT/results.tar.gz" bench/results/*.csv 2>/dev/null
$PY -m bench --table >"$OUT/table.md" 2>&1 || true
echo; echo "=== summary ($(($(date +%s) - T0)) s in all)"; cat "$SUMMARY"
