#!/usr/bin/env bash
# Run HERE (not on the GPU machine) before a GPU lease: fetch the wheels that bench/gpu_check.sh installs there
# (the GPU image has torch, timm, onnx, onnxruntime, h5py, hypothesis, pytest... but not open_clip). They land in
# .whl/ (git-ignored locally through .git/info/exclude) and travel with `carry: [".whl"]`.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
for spec in open_clip_torch ftfy wcwidth; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$spec"
done
ls -la .whl
