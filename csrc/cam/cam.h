// Shared pieces of the cam op family (CPU and CUDA): the fused Grad-CAM epilogue on one map — ReLU, bilinear resize
// (align_corners=False, PyTorch's source-index rule) and optional per-map min-max normalisation. The channel sum
// Σ_c w·A before it is a batched GEMM done by torch (BLAS / cuBLAS). Definition: fastcbm/cam/reference.py.
#pragma once

#include <cstdint>

#include "common.h"


namespace fastcbm {
namespace cam {

// One output coordinate's two source taps and weights along an axis, as ATen's upsample_bilinear2d computes them
// for align_corners=False without an explicit scale: src = (in/out)·(dst + 0.5) − 0.5, clamped at 0.
struct Tap {
  int64_t i0, i1;
  float l0, l1;
};

FASTCBM_HD Tap bilinear_tap(int64_t dst, int64_t in, int64_t out) {
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  float src = scale * (static_cast<float>(dst) + 0.5f) - 0.5f;
  if (src < 0.0f) src = 0.0f;
  int64_t i0 = static_cast<int64_t>(src);
  if (i0 > in - 1) i0 = in - 1;
  const int64_t i1 = i0 < in - 1 ? i0 + 1 : i0;
  const float l1 = src - static_cast<float>(i0);
  return {i0, i1, 1.0f - l1, l1};
}

FASTCBM_HD float relu(float v) { return v > 0.0f ? v : 0.0f; }

// Value of the resized, ReLU'd map at output pixel (y, x); `src` is the raw (pre-ReLU) [h, w] map.
FASTCBM_HD float sample(const float* src, int64_t w, const Tap& ty, const Tap& tx) {
  const float a = relu(src[ty.i0 * w + tx.i0]), b = relu(src[ty.i0 * w + tx.i1]);
  const float c = relu(src[ty.i1 * w + tx.i0]), d = relu(src[ty.i1 * w + tx.i1]);
  return ty.l0 * (tx.l0 * a + tx.l1 * b) + ty.l1 * (tx.l0 * c + tx.l1 * d);
}

}  // namespace cam
}  // namespace fastcbm
