#!/usr/bin/env bash
# Run HERE (not on the GPU machine) before a GPU lease: fetch the wheels bench/gpu_check.sh installs there. The GPU
# image (Python 3.12, torch 2.11, triton 3.6, timm, onnx, onnxruntime, h5py, pytest, regex, huggingface_hub...) lacks
# open_clip and its ftfy -> wcwidth dependency; the versions are the ones the CPU machines run. They land in .whl/
# (git-ignored) and travel with the working tree when the device call names it: `carry: [".whl"]`.
# Idempotent: wheels already in .whl/ are not fetched again. Prints the total size (the tree that travels, wheels
# included, must stay under 64 MiB; bench/gpu_check.sh checks it again).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.7.0)
mkdir -p .whl
for spec in "${WHEELS[@]}"; do
  name=${spec%%==*}; version=${spec##*==}
  if ls .whl/"${name}"-"${version}"-*.whl >/dev/null 2>&1; then continue; fi
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$spec"
done
ls -la .whl
echo "carried wheels: $(du -cb .whl/*.whl | tail -1 | cut -f1) bytes"
