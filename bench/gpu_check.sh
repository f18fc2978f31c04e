#!/usr/bin/env bash
# Every GPU check of fastcbm in one window of at most 8 minutes, for the scarce GPU leases (an H100/H200 image with
# Python 3.12, torch 2.11, triton 3.6, nvcc, cmake, ninja, pybind11 and no open_clip; nothing can be installed there
# but the wheels that travel in .whl/).
#
#   on the GPU machine:   OUT=/some/dir bash bench/gpu_check.sh          (device call: carry [".whl"])
#   here, on CPU:         bash bench/gpu_check.sh --dry-run              (CI runs this)
#
# Steps, each with its own time limit and all under one deadline (STEP_BUDGET_S), so one hang cannot eat the window:
#   1. check the tree that travels (<= 64 MiB, the wheels included) and install the carried wheels (--target);
#   2. build fastcbm._C and fastcbm._C_cuda for sm_90 THERE, with cmake + nvcc: a module built here links this
#      machine's Python 3.11, the image runs 3.12 (and nvcc 13.0 is on the image);
#   3. fastcbm info (versions, backends, the op x backend matrix);
#   4. the gpu-marked tests (every CUDA and compiled-Triton op against its reference, the precompute tower's CUDA
#      graph / compile / fused attention), then cuda:1 when a second GPU exists;
#   5. the op benchmarks on the GPU (metrics, losses, the ViT-B/16 tower's share of the bf16 roofline per mode,
#      precompute end to end vs naive: CSV rows tagged with the GPU), then the op test files whole on the image's
#      torch / triton versions;
#   6. the Triton resource table compiled by the image's triton for sm_90;
#   7. collect what comes back into $OUT and check it against the device tool's limits (<= 8 files, <= 16 MiB each,
#      <= 2 folders deep, names of letters, digits, '.', '_', '-'): log.txt, summary.txt, table.md (the README
#      benchmark table with the new rows) and results.tar.gz (bench/results/*.csv with the new rows, junit XML, the
#      resource table, fastcbm info). Back here: `tar xzf results.tar.gz` in the repository root, commit the CSVs,
#      `python -m bench --table --write-readme`.
#
# --dry-run rehearses all of it here: it copies the tree the device tool would send (tracked and untracked-not-ignored
# files plus .whl/, fetched by bench/gpu_prep.sh when absent) to build/gpu_check_dry/tree and runs this same script
# there with the CPU as the device and tiny sizes: same commands, same limits, same collection and checks. Exit status:
# 0 when every step passed and the files back fit the limits.
set -u
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
MODE=real
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --rehearse) MODE=rehearse ;;  # internal: the dry run's second half, inside the staged copy
  "") ;;
  *) echo "usage: bash bench/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
TREE_LIMIT=$((64 * 1024 * 1024))

tree_bytes() {  # what the device tool sends: tracked + untracked-not-ignored files, plus the carried .whl/
  local files wheels=0
  if [ "$(cd "$1" && git rev-parse --show-toplevel 2>/dev/null)" = "$(cd "$1" && pwd -P)" ]; then
    files=$(cd "$1" && git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- | tail -1 | cut -f1)
    ls "$1"/.whl/*.whl >/dev/null 2>&1 && wheels=$(du -cb "$1"/.whl/*.whl | tail -1 | cut -f1)
    echo $((files + wheels))
  else  # a copy without git (the GPU machine): everything that is there, wheels included
    du -sb "$1" | cut -f1
  fi
}

if [ "$MODE" = dry ]; then  # ---- stage the tree as the device tool would, then rehearse inside it ------------------
  DRY=${DRY_DIR:-$HERE/build/gpu_check_dry}
  rm -rf "$DRY"; mkdir -p "$DRY/tree" "$DRY/out"
  cd "$HERE"
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "== no .whl/ here: fetching the carried wheels with bench/gpu_prep.sh"
    bash bench/gpu_prep.sh || { echo "gpu_prep.sh failed: the GPU run would lack open_clip"; exit 1; }
  fi
  bytes=$(tree_bytes "$HERE")
  echo "== the tree that travels: $bytes bytes (limit $TREE_LIMIT), wheels: $(du -cb .whl/*.whl | tail -1 | cut -f1)"
  [ "$bytes" -le "$TREE_LIMIT" ] || { echo "FAIL: the tree that travels is over 64 MiB"; exit 1; }
  git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$DRY/tree"
  cp -r .whl "$DRY/tree/.whl"
  echo "== rehearsing in $DRY/tree (device: cpu, tiny sizes); files back in $DRY/out"
  (cd "$DRY/tree" && OUT="$DRY/out" bash bench/gpu_check.sh --rehearse)
  exit $?
fi

# ---- the run itself (real: on the GPU machine; rehearse: the dry run's copy, on CPU) -----------------------------------
cd "$HERE"
if [ "$MODE" = real ]; then
  DEV=cuda
  if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "no CUDA device visible to torch here: run 'bash bench/gpu_check.sh --dry-run' to rehearse on CPU" >&2
    exit 2
  fi
else
  DEV=cpu
fi
OUT=${OUT:-$HERE/gpu_check_out}
WORK=${WORK:-/tmp/fastcbm_gpu_check}
RES=$WORK/results  # collected into results.tar.gz
rm -rf "$WORK"; mkdir -p "$OUT" "$RES"
LOG="$OUT/log.txt"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
T0=$(date +%s)
STEP_BUDGET_S=450  # all steps together; the machine start and the transfers come on top, within the 8 minutes
FAILED=0

step() {  # step NAME SECONDS CMD... : run with min(SECONDS, what is left of the budget); record the outcome
  local name=$1 limit=$2; shift 2
  local t left rc what
  t=$(date +%s); left=$((STEP_BUDGET_S - (t - T0)))
  [ "$left" -lt "$limit" ] && limit=$left
  echo; echo "=== [$((t - T0)) s] $name (limit ${limit} s)"
  if [ "$limit" -lt 5 ]; then
    printf '%-46s %-22s %5d s\n' "$name" "SKIPPED (out of time)" 0 | tee -a "$SUMMARY"; FAILED=1; return 0
  fi
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  what=ok; [ $rc -ne 0 ] && what="FAILED (exit $rc)" && FAILED=1; [ $rc -eq 124 ] && what="TIMED OUT"
  printf '%-46s %-22s %5d s\n' "$name" "$what" "$(($(date +%s) - t))" | tee -a "$SUMMARY"
  return 0
}

# per-mode sizes: the real run measures; the rehearsal only proves every command runs
if [ "$DEV" = cuda ]; then
  METRICS_ARGS=(--n 2000 --naive-n 5 --repeats 5)
  LOSSES_ARGS=(--batch 4096 --concepts 1000 --repeats 3)
  PIPELINE_ARGS=(--quick --vit-images 64 --tower none)  # end-to-end (PIL decode) vs the naive pipeline
  TOWER_ARGS=(--no-pipelines --tower-images 256 --repeats 3)  # ViT-B/16 alone: the roofline
  JOBS=$(nproc)
else
  METRICS_ARGS=(--quick --n 4 --size 32 --naive-n 2 --repeats 1)
  LOSSES_ARGS=(--quick --batch 64 --concepts 8 --cells 4 --channels 16 --dim 16 --repeats 1)
  PIPELINE_ARGS=(--quick --skip-vit --tiny-images 2 --repeats 1 --tower none)
  TOWER_ARGS=(--no-pipelines --skip-vit --tower-images 2 --repeats 1)
  JOBS=2
fi
TOWER_FAST=(eager graph); TOWER_SLOW=(compile)  # compile: ~a minute of inductor before the first timing
[ "$DEV" = cuda ] || { TOWER_FAST=(eager); TOWER_SLOW=(); }  # a CUDA graph needs a GPU; compile takes long on CPU

echo "== fastcbm GPU check ($MODE, device $DEV) $(date -u +%FT%TZ) in $HERE"
if [ "$DEV" = cuda ]; then
  nvidia-smi --query-gpu=index,name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true
fi
$PY -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', \
torch.version.cuda, '| GPUs', torch.cuda.device_count())"
$PY -c "import triton; print('triton', triton.__version__)" || true
command -v nvcc >/dev/null 2>&1 || export PATH=/usr/local/cuda/bin:$PATH
command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -1

# 1. the tree that travelled, and the carried wheels
bytes=$(tree_bytes "$HERE")
echo "tree: $bytes bytes (limit $TREE_LIMIT)"
[ "$bytes" -le "$TREE_LIMIT" ] || { echo "the tree is over 64 MiB" | tee -a "$SUMMARY"; FAILED=1; }
if ls .whl/*.whl >/dev/null 2>&1; then
  step "install carried wheels" 30 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target "$WORK/site" .whl/*.whl
  export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
else
  echo "no carried wheels (.whl/): tests and benchmarks that need open_clip will skip or fail" | tee -a "$SUMMARY"
fi
export PYTHONPATH=$HERE${PYTHONPATH:+:$PYTHONPATH}  # fastcbm from this checkout (source-tree mode)
# pip maps kernels/ to fastcbm.kernels (pyproject wheel.packages); a plain checkout needs the link, which git ignores
[ -e fastcbm/kernels ] || ln -s ../kernels fastcbm/kernels

# 2. the compiled modules, built here, placed in the source tree
CUDA_MODULE=OFF; command -v nvcc >/dev/null 2>&1 && CUDA_MODULE=ON
step "build fastcbm._C + _C_cuda (sm_90, CUDA=$CUDA_MODULE)" 180 bash -c "
  cmake -S . -B '$WORK/build' -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE=\$(command -v $PY) \
    -Dpybind11_DIR=\$($PY -m pybind11 --cmakedir) -DFASTCBM_CUDA=$CUDA_MODULE -DCMAKE_CUDA_ARCHITECTURES=90 >/dev/null &&
  cmake --build '$WORK/build' -j $JOBS && cp '$WORK'/build/_C*.so fastcbm/"
step "fastcbm info" 20 bash -c "$PY -m fastcbm info | tee '$RES/fastcbm_info.txt'"
$PY -c "import fastcbm; print('fastcbm imported from', fastcbm.__file__)"

# 4. tests (the suite's conftest turns the Triton interpreter on only where there is no GPU), then 5. the op
# benchmarks (rows appended to bench/results/*.csv of this copy); in order of value, as the deadline cuts the tail
step "pytest -m gpu (CUDA / compiled Triton vs reference)" 120 $PY -m pytest -q -m gpu -p no:cacheprovider -rs \
  --junitxml="$RES/gpu_tests.xml" tests
step "second GPU: every op on cuda:1" 40 $PY -m pytest -q -p no:cacheprovider -rs --junitxml="$RES/multi_gpu.xml" \
  tests/test_multi_gpu.py
step "bench/metrics.py" 45 $PY bench/metrics.py --device "$DEV" "${METRICS_ARGS[@]}"
step "bench/losses.py" 60 $PY bench/losses.py --device "$DEV" "${LOSSES_ARGS[@]}"
step "bench/precompute.py tower: ${TOWER_FAST[*]}" 45 $PY bench/precompute.py --device "$DEV" "${TOWER_ARGS[@]}" \
  --tower "${TOWER_FAST[@]}"
step "bench/precompute.py end to end vs naive" 60 $PY bench/precompute.py --device "$DEV" "${PIPELINE_ARGS[@]}"
if [ ${#TOWER_SLOW[@]} -gt 0 ]; then
  step "bench/precompute.py tower: ${TOWER_SLOW[*]}" 120 $PY bench/precompute.py --device "$DEV" \
    "${TOWER_ARGS[@]}" --tower "${TOWER_SLOW[@]}"
fi
step "op tests on this torch / triton" 90 $PY -m pytest -q -p no:cacheprovider -m "not slow" \
  --junitxml="$RES/op_tests.xml" tests/test_prompts.py tests/test_losses.py tests/test_metrics.py tests/test_cam.py \
  tests/test_backends.py tests/test_triton_compile.py tests/test_device_guards.py tests/test_precompute_tower.py

# 6. the Triton kernels as this triton compiles them for sm_90
step "Triton resources for sm_90" 40 $PY -m bench.triton_resources --arch 90 --jobs "$JOBS" \
  --out "$RES/triton_resources.txt"

# 7. what comes back
$PY -m bench --table >"$OUT/table.md" 2>&1 || echo "python -m bench --table failed" | tee -a "$SUMMARY"
tar czf "$OUT/results.tar.gz" bench/results/*.csv -C "$WORK" results 2>/dev/null ||
  { echo "could not pack results.tar.gz" | tee -a "$SUMMARY"; FAILED=1; }
$PY - "$OUT" <<'EOF' | tee -a "$SUMMARY"
import re, sys
from pathlib import Path
out = Path(sys.argv[1])
files = [p for p in out.rglob("*") if p.is_file()]
bad = [f"{p.relative_to(out)} ({p.stat().st_size} B > 16 MiB)" for p in files if p.stat().st_size > 16 * 2**20]
bad += [f"{p.relative_to(out)} (more than 2 folders deep)" for p in files if len(p.relative_to(out).parts) > 3]
bad += [f"{p.relative_to(out)} (name)" for p in out.rglob("*") if not re.fullmatch(r"[A-Za-z0-9._-]+", p.name)]
total = sum(p.stat().st_size for p in files)
if len(files) > 8:
    bad.append(f"{len(files)} files > 8")
if total > 64 * 2**20:
    bad.append(f"{total} B in all > 64 MiB")
names = ", ".join(sorted(str(p.relative_to(out)) for p in files))
print(f"files back: {len(files)} ({total} B): {names}; " + ("fit the limits" if not bad else "OVER: " + "; ".join(bad)))
sys.exit(1 if bad else 0)
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || FAILED=1
echo; echo "=== summary ($MODE, device $DEV, $(($(date +%s) - T0)) s in all; step budget ${STEP_BUDGET_S} s)"
cat "$SUMMARY"
[ $FAILED -eq 0 ] && echo "ALL OK" || echo "SOME STEPS FAILED"
exit $FAILED
