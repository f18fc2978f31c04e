#!/usr/bin/env bash
# The GPU machine's versions, checked on a CPU machine: a throwaway venv with the image's torch and triton (2.11.0 and
# 3.6.0 by default), fastcbm installed into it the way bench/gpu_check.sh's issue asks (pip install --no-deps
# --no-build-isolation -e .), imported, its Triton kernels compiled for sm_90 and sm_80 under that triton (the
# resource table of python -m bench.triton_resources) and the op tests run (Triton in its interpreter).
#
#   bash bench/gpu_versions_check.sh                       # torch 2.11.0, triton 3.6.0, venv in /tmp
#   TORCH=2.12.0 TRITON=3.7.0 VENV=/tmp/v bash bench/gpu_versions_check.sh
#
# The venv sees this machine's other packages (--system-site-packages: numpy, pytest, scikit-build-core, pybind11,
# cmake...) but its own torch and triton shadow them. PyPI has no CPU build of torch 2.11, so pip takes the CUDA build
# (torch 2.11.0+cu130, 531 MB) and the NVIDIA libraries it links (2.7 GB): about 3.3 GB and a minute at 80 MB/s here.
# This machine runs Python 3.11; the GPU image runs 3.12 (bench/gpu_check.sh repeats the op tests there).
set -uo pipefail
cd "$(dirname "$0")/.."
TORCH=${TORCH:-2.11.0}
TRITON=${TRITON:-3.6.0}
VENV=${VENV:-/tmp/fastcbm-gpu-versions}
OUT=${OUT:-build/gpu_versions}
unset PYTHONPATH TRITON_INTERPRET  # fastcbm must come from the editable install; the compile needs real @triton.jit
export TRITON_DEFAULT_FP_FUSION=1
mkdir -p "$OUT"
FAILED=0
run() {  # run NAME CMD... : time it, record the outcome
  local name=$1 t=$SECONDS; shift
  echo; echo "=== $name"
  "$@"; local rc=$?
  printf '%-52s %-16s %5d s\n' "$name" "$([ $rc -eq 0 ] && echo ok || echo "FAILED ($rc)")" $((SECONDS - t)) \
    | tee -a "$OUT/summary.txt"
  [ $rc -eq 0 ] || FAILED=1
}
: >"$OUT/summary.txt"
PY=$VENV/bin/python
run "venv ($VENV, system site packages)" bash -c "rm -rf '$VENV' && python3 -m venv --system-site-packages '$VENV'"
# the CPU machines cap torch through a pip constraints file; this venv is for another version on purpose
# numpy < 2.4: triton 3.6's interpreter turns a size-1 array into an int (loop bounds), which numpy 2.4 refuses
# ("only 0-dimensional arrays can be converted to Python scalars": every kernel with a runtime loop bound fails);
# triton 3.9 fixed it. Compiled kernels (the GPU image: triton 3.6, numpy 2.5) never run the interpreter.
NUMPY_PIN="numpy<2.4"
[ "$TRITON" = 3.6.0 ] || NUMPY_PIN=numpy
run "pip install torch==$TORCH triton==$TRITON $NUMPY_PIN" env PIP_CONSTRAINT= "$PY" -m pip install -q \
  "torch==$TORCH" "triton==$TRITON" "$NUMPY_PIN"
run "pip install --no-deps --no-build-isolation -e ." "$PY" -m pip install -q --no-deps --no-build-isolation -e .
run "import fastcbm (versions, backends, op matrix)" bash -c "cd /tmp && '$PY' -c '
import sys, torch, triton, fastcbm
print(\"python\", sys.version.split()[0], \"| torch\", torch.__version__, \"| triton\", triton.__version__)
print(\"fastcbm\", fastcbm.__version__, \"from\", fastcbm.__file__)
assert torch.__version__.split(\"+\")[0] == \"$TORCH\" and triton.__version__ == \"$TRITON\", \"wrong versions\"
' && '$PY' -m fastcbm info"
run "Triton kernels for sm_90 + sm_80 under triton $TRITON" "$PY" -m bench.triton_resources \
  --out "$OUT/triton_resources.txt" --json "$OUT/triton_resources.json"
run "op tests under torch $TORCH + triton $TRITON (interpreter)" "$PY" -m pytest -q -p no:cacheprovider -x \
  tests/test_prompts.py tests/test_losses.py tests/test_metrics.py tests/test_cam.py tests/test_backends.py \
  tests/test_device_guards.py tests/test_triton_compile.py
echo; echo "=== summary (torch $TORCH, triton $TRITON, $(python3 --version))"; cat "$OUT/summary.txt"
exit $FAILED
