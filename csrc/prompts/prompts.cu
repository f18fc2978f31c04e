// CUDA kernel for ring prompts: one thread per pixel of one (image, prompt) row writes its 3 channels.
// Same arithmetic as every other backend (see prompts.h): one float64 add + two compares for ring membership,
// values from the float32 [3][257] table, rounded to the output type with round-to-nearest-even.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "common.h"
#include "prompts/prompts.h"

namespace py = pybind11;

namespace {

constexpr int kThreads = 256;
constexpr int kTableSize = 3 * fastcbm::prompts::kTableWidth;

template <typename OutT>
__device__ __forceinline__ OutT from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// grid.x = B·Gt rows (up to 2^31−1), grid.y = pixel blocks of the S·S plane.
template <typename OutT>
__global__ void render_rings_kernel(const uint8_t* __restrict__ img, const double* __restrict__ dy2,
                                    const double* __restrict__ dx2, const float* __restrict__ table,
                                    OutT* __restrict__ out, double lo2, double hi2, int64_t Gt, int64_t S) {
  __shared__ float t[kTableSize];
  for (int i = threadIdx.x; i < kTableSize; i += blockDim.x) t[i] = table[i];
  __syncthreads();
  const int64_t SS = S * S;
  const int64_t row = blockIdx.x;
  const int64_t b = row / Gt, g = row % Gt;
  // grid-stride over the plane: grid.y is capped at 65535 blocks, images may be larger than 4096 x 4096
  for (int64_t p = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; p < SS;
       p += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    const int64_t y = p / S, x = p - y * S;
    const double d2 = dy2[g * S + y] + dx2[g * S + x];  // the one float64 addition (no multiply: no FMA contraction)
    const bool on = d2 >= lo2 && d2 <= hi2;
    const uint8_t* im = img + b * 3 * SS + p;
    OutT* o = out + row * 3 * SS + p;
#pragma unroll
    for (int c = 0; c < 3; ++c) {
      const int idx = on ? fastcbm::prompts::kRingIndex : static_cast<int>(im[c * SS]);
      o[c * SS] = from_float<OutT>(t[c * fastcbm::prompts::kTableWidth + idx]);
    }
  }
}

template <typename OutT>
void launch(fastcbm::dev_ptr img, fastcbm::dev_ptr dy2, fastcbm::dev_ptr dx2, fastcbm::dev_ptr table,
            fastcbm::dev_ptr out, double lo2, double hi2, int64_t B, int64_t Gt, int64_t S, fastcbm::dev_ptr stream) {
  const int64_t rows = B * Gt, SS = S * S;
  if (rows == 0 || SS == 0) return;
  const int64_t blocks = std::min<int64_t>((SS + kThreads - 1) / kThreads, 65535);
  if (rows > 2147483647LL) throw fastcbm::internal_error("render_rings (cuda): B*G >= 2^31 rows in one launch");
  dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(blocks));
  render_rings_kernel<OutT><<<grid, kThreads, 0, fastcbm::as_stream(stream)>>>(
      reinterpret_cast<const uint8_t*>(img), reinterpret_cast<const double*>(dy2),
      reinterpret_cast<const double*>(dx2), reinterpret_cast<const float*>(table), reinterpret_cast<OutT*>(out),
      lo2, hi2, Gt, S);
  fastcbm::check_launch("render_rings (cuda)");
}

// out_kind: 0 float32, 1 float16, 2 bfloat16.
void render_cuda(fastcbm::dev_ptr img, fastcbm::dev_ptr dy2, fastcbm::dev_ptr dx2, fastcbm::dev_ptr table,
                 fastcbm::dev_ptr out, double lo2, double hi2, int64_t B, int64_t Gt, int64_t S, int out_kind,
                 fastcbm::dev_ptr stream) {
  switch (out_kind) {
    case 0: return launch<float>(img, dy2, dx2, table, out, lo2, hi2, B, Gt, S, stream);
    case 1: return launch<__half>(img, dy2, dx2, table, out, lo2, hi2, B, Gt, S, stream);
    case 2: return launch<__nv_bfloat16>(img, dy2, dx2, table, out, lo2, hi2, B, Gt, S, stream);
    default: throw fastcbm::internal_error("render_rings (cuda): out_kind must be 0, 1 or 2");
  }
}

}  // namespace

void register_prompts_cuda(py::module_& m) {
  m.def("prompts_render", &render_cuda, py::arg("images"), py::arg("dy2"), py::arg("dx2"), py::arg("table"),
        py::arg("out"), py::arg("lo2"), py::arg("hi2"), py::arg("B"), py::arg("Gt"), py::arg("S"),
        py::arg("out_kind"), py::arg("stream"),
        "Ring prompts on device pointers: uint8 [B,3,S,S], float64 [Gt,S] x2, float32 [3,257] -> [B,Gt,3,S,S].");
}
