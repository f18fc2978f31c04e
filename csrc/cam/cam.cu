// CUDA kernel for the cam op family: the fused epilogue (ReLU → bilinear resize → optional min-max) over [N, h, w]
// float32 maps produced by one batched cuBLAS GEMM in the launcher (fastcbm/cam/ops.py). One thread block per map:
// a strided pass writes the resized map and reduces its min/max, a second pass rescales it.
#include <cuda_runtime.h>

#include <cub/block/block_reduce.cuh>
#include <stdexcept>
#include <string>

#include "cam/cam.h"
#include "common.h"

namespace fastcbm {
namespace cam {
namespace {

constexpr int kThreads = 256;

__global__ void epilogue_kernel(const float* __restrict__ raw, float* __restrict__ out, int64_t h, int64_t w,
                                int64_t oh, int64_t ow, bool normalize) {
  using Reduce = cub::BlockReduce<float, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ float s_lo, s_span;
  const float* src = raw + int64_t(blockIdx.x) * h * w;
  float* dst = out + int64_t(blockIdx.x) * oh * ow;
  const int64_t n = oh * ow;
  float lo = INFINITY, hi = -INFINITY;
  for (int64_t k = threadIdx.x; k < n; k += kThreads) {
    const int64_t i = k / ow, j = k % ow;
    const float v = sample(src, w, bilinear_tap(i, h, oh), bilinear_tap(j, w, ow));
    dst[k] = v;
    lo = fminf(lo, v);
    hi = fmaxf(hi, v);
  }
  if (!normalize) return;
  lo = Reduce(tmp).Reduce(lo, MinOp());
  __syncthreads();
  hi = Reduce(tmp).Reduce(hi, MaxOp());
  if (threadIdx.x == 0) {
    s_lo = lo;
    s_span = hi - lo;
  }
  __syncthreads();
  const float base = s_lo, span = s_span;
  for (int64_t k = threadIdx.x; k < n; k += kThreads) dst[k] = span > 0.0f ? (dst[k] - base) / span : 0.0f;
}

void epilogue(dev_ptr raw, dev_ptr out, int64_t n_maps, int64_t h, int64_t w, int64_t oh, int64_t ow, bool normalize,
              dev_ptr stream) {
  if (n_maps <= 0) return;
  if (h < 1 || w < 1 || oh < 1 || ow < 1) throw internal_error("cam_epilogue: sizes must be >= 1");
  epilogue_kernel<<<static_cast<unsigned>(n_maps), kThreads, 0, as_stream(stream)>>>(
      reinterpret_cast<const float*>(raw), reinterpret_cast<float*>(out), h, w, oh, ow, normalize);
  check_launch("cam_epilogue");
}

}  // namespace
}  // namespace cam
}  // namespace fastcbm

void register_cam_cuda(pybind11::module_& m) {
  m.def("cam_epilogue", &fastcbm::cam::epilogue, pybind11::arg("raw"), pybind11::arg("out"), pybind11::arg("n_maps"),
        pybind11::arg("h"), pybind11::arg("w"), pybind11::arg("oh"), pybind11::arg("ow"), pybind11::arg("normalize"),
        pybind11::arg("stream"), "fused ReLU -> bilinear -> min-max epilogue on device float32 buffers");
}
