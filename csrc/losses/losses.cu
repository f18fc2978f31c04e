// CUDA kernels of the fused cubic-cosine loss: the elementwise accumulate (forward) and gradient (backward) steps on
// one batch tile — the CUDA twins of losses_cpu.cpp, with the same per-element maths (losses.h). As on the CPU, the
// tile's q = F·Wᵀ and p = E·Tᵀ [rows, K] come from torch GEMMs (cuBLAS) in the launcher (fastcbm/losses/launchers.py),
// which also keeps the batch tiling, so nothing of size [B, K] exists; these kernels fuse the ~15 elementwise ops per
// element into one pass over the tile with fp64 accumulation.
//
// accumulate: one thread per column (a warp reads 32 adjacent columns of a row: coalesced) walks a chunk of rows and
//   keeps the five sums in registers. With few columns the rows are split into `chunks` (grid.y): each chunk writes
//   its partial sums to a workspace [chunks, 5, K] and a second kernel adds them into sums in chunk order, so the
//   result is deterministic (no atomics). With chunks == 1 the first kernel adds straight into sums.
// gradient: one thread per element, grid-stride; `out` may be `q` (each element is read before it is written).
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "common.h"
#include "losses/losses.h"

namespace fastcbm {
namespace losses {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void accumulate_kernel(const T* __restrict__ q, const T* __restrict__ p, const double* __restrict__ mu_q,
                                  const double* __restrict__ mu_p, double* __restrict__ out, int64_t rows,
                                  int64_t cols, int64_t rows_per_chunk, bool add_into) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= cols) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
  const double mq = mu_q[k], mp = mu_p[k];
  double s_ab = 0.0, s_aa = 0.0, s_bb = 0.0, s_a2b3 = 0.0, s_a5 = 0.0;
  for (int64_t r = r0; r < r1; ++r) {
    accumulate_one(static_cast<double>(q[r * cols + k]) - mq, static_cast<double>(p[r * cols + k]) - mp, s_ab, s_aa,
                   s_bb, s_a2b3, s_a5);
  }
  const double sums[kNumSums] = {s_ab, s_aa, s_bb, s_a2b3, s_a5};
  double* dst = out + static_cast<int64_t>(blockIdx.y) * kNumSums * cols;  // add_into: blockIdx.y == 0
#pragma unroll
  for (int s = 0; s < kNumSums; ++s) {
    if (add_into) {
      dst[s * cols + k] += sums[s];
    } else {
      dst[s * cols + k] = sums[s];
    }
  }
}

// sums[i] += Σ_c partial[c][i] over i in [0, 5·K), chunks in order.
__global__ void fold_kernel(const double* __restrict__ partial, double* __restrict__ sums, int64_t chunks,
                            int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double acc = sums[i];
    for (int64_t c = 0; c < chunks; ++c) acc += partial[c * n + i];
    sums[i] = acc;
  }
}

template <typename T>
__global__ void gradient_kernel(const T* q, const T* __restrict__ p, const double* __restrict__ mu_q,
                                const double* __restrict__ mu_p, const double* __restrict__ coefs, T* out,
                                int64_t rows, int64_t cols) {
  const int64_t n = rows * cols;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t k = i % cols;
    out[i] = static_cast<T>(gradient_one(static_cast<double>(q[i]) - mu_q[k], static_cast<double>(p[i]) - mu_p[k],
                                         coefs[k], coefs[cols + k], coefs[2 * cols + k]));
  }
}

unsigned grid_1d(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535));
}

template <typename T>
void accumulate_typed(dev_ptr q, dev_ptr p, dev_ptr mu_q, dev_ptr mu_p, dev_ptr sums, dev_ptr workspace,
                      int64_t rows, int64_t cols, int64_t chunks, cudaStream_t stream) {
  const int64_t per = (rows + chunks - 1) / chunks;
  const dim3 grid(static_cast<unsigned>((cols + kThreads - 1) / kThreads), static_cast<unsigned>(chunks));
  double* out = reinterpret_cast<double*>(chunks == 1 ? sums : workspace);
  accumulate_kernel<T><<<grid, kThreads, 0, stream>>>(
      reinterpret_cast<const T*>(q), reinterpret_cast<const T*>(p), reinterpret_cast<const double*>(mu_q),
      reinterpret_cast<const double*>(mu_p), out, rows, cols, per, chunks == 1);
  check_launch("losses_cubic_accumulate");
  if (chunks > 1) {
    fold_kernel<<<grid_1d(kNumSums * cols), kThreads, 0, stream>>>(out, reinterpret_cast<double*>(sums), chunks,
                                                                   kNumSums * cols);
    check_launch("losses_cubic_accumulate (fold)");
  }
}

// q, p: [rows, K] float32 (is_f64 false) or float64; mu_q, mu_p: [K] f64; sums: [5, K] f64 (added to);
// workspace: [chunks, 5, K] f64 (unused when chunks == 1). All device pointers, contiguous.
void accumulate(dev_ptr q, dev_ptr p, dev_ptr mu_q, dev_ptr mu_p, dev_ptr sums, dev_ptr workspace, int64_t rows,
                int64_t cols, int64_t chunks, bool is_f64, dev_ptr stream) {
  if (rows < 1 || cols < 1 || chunks < 1 || chunks > rows || chunks > 65535 || (chunks > 1 && workspace == 0)) {
    throw internal_error("losses_cubic_accumulate: need rows, cols >= 1, 1 <= chunks <= min(rows, 65535) and a "
                         "workspace when chunks > 1");
  }
  if (is_f64) {
    accumulate_typed<double>(q, p, mu_q, mu_p, sums, workspace, rows, cols, chunks, as_stream(stream));
  } else {
    accumulate_typed<float>(q, p, mu_q, mu_p, sums, workspace, rows, cols, chunks, as_stream(stream));
  }
}

// out = a^2 (alpha b^3 - beta a^3) - gbar per element; coefs: [3, K] f64; out may be q.
void gradient(dev_ptr q, dev_ptr p, dev_ptr mu_q, dev_ptr mu_p, dev_ptr coefs, dev_ptr out, int64_t rows,
              int64_t cols, bool is_f64, dev_ptr stream) {
  if (rows < 1 || cols < 1) throw internal_error("losses_cubic_gradient: need rows, cols >= 1");
  const auto* mq = reinterpret_cast<const double*>(mu_q);
  const auto* mp = reinterpret_cast<const double*>(mu_p);
  const auto* cf = reinterpret_cast<const double*>(coefs);
  if (is_f64) {
    gradient_kernel<double><<<grid_1d(rows * cols), kThreads, 0, as_stream(stream)>>>(
        reinterpret_cast<const double*>(q), reinterpret_cast<const double*>(p), mq, mp, cf,
        reinterpret_cast<double*>(out), rows, cols);
  } else {
    gradient_kernel<float><<<grid_1d(rows * cols), kThreads, 0, as_stream(stream)>>>(
        reinterpret_cast<const float*>(q), reinterpret_cast<const float*>(p), mq, mp, cf,
        reinterpret_cast<float*>(out), rows, cols);
  }
  check_launch("losses_cubic_gradient");
}

}  // namespace
}  // namespace losses
}  // namespace fastcbm

void register_losses_cuda(pybind11::module_& m) {
  namespace py = pybind11;
  using namespace fastcbm::losses;
  m.def("losses_cubic_accumulate", &accumulate, py::arg("q"), py::arg("p"), py::arg("mu_q"), py::arg("mu_p"),
        py::arg("sums"), py::arg("workspace"), py::arg("rows"), py::arg("cols"), py::arg("chunks"), py::arg("is_f64"),
        py::arg("stream"),
        "add one tile's S_ab, S_aa, S_bb, S_a2b3, S_a5 ([rows, K] q, p; device pointers) into sums [5, K] f64");
  m.def("losses_cubic_gradient", &gradient, py::arg("q"), py::arg("p"), py::arg("mu_q"), py::arg("mu_p"),
        py::arg("coefs"), py::arg("out"), py::arg("rows"), py::arg("cols"), py::arg("is_f64"), py::arg("stream"),
        "out = a^2 (alpha b^3 - beta a^3) - gbar per element of a [rows, K] tile (device pointers; out may be q)");
}
