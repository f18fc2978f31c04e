// CUDA kernels for the metrics op family: EPG as a fused per-map reduction, and the official-NRA AUC epilogue over
// mask bits already in metrics order (the Python launcher builds composite keys and sorts them with torch.sort).
// One thread block per map; AUCs accumulate in double so the result matches the reference to ~1e-15.
#include <cuda_runtime.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <stdexcept>
#include <string>

#include "common.h"
#include "metrics/metrics.h"

namespace py = pybind11;

namespace fastcbm {
namespace metrics {
namespace {

constexpr int kThreads = 256;

__global__ void epg_kernel(const float* __restrict__ x, const uint8_t* __restrict__ mask, double* __restrict__ out,
                           int64_t n) {
  using FloatReduce = cub::BlockReduce<float, kThreads>;
  using DoubleReduce = cub::BlockReduce<double, kThreads>;
  __shared__ union {
    typename FloatReduce::TempStorage f;
    typename DoubleReduce::TempStorage d;
  } tmp;
  __shared__ float s_min;
  const int64_t base = int64_t(blockIdx.x) * n;
  float mn = INFINITY;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) mn = fminf(mn, x[base + i]);
  mn = FloatReduce(tmp.f).Reduce(mn, MinOp());
  if (threadIdx.x == 0) s_min = mn;
  __syncthreads();
  const double lo = s_min;
  double num = 0.0, den = 0.0;  // (max - min) of the min-max normalisation cancels: Σ(x-min)·mask / Σ(x-min)
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const double d = double(x[base + i]) - lo;
    den += d;
    num += mask[base + i] ? d : 0.0;
  }
  den = DoubleReduce(tmp.d).Sum(den);
  __syncthreads();
  num = DoubleReduce(tmp.d).Sum(num);
  if (threadIdx.x == 0) out[blockIdx.x] = den > 0.0 ? num / den : 0.0;
}

__global__ void official_kernel(const uint8_t* __restrict__ bits, double* __restrict__ out, int64_t n, int64_t step) {
  using IntReduce = cub::BlockReduce<int, kThreads>;
  using IntScan = cub::BlockScan<int, kThreads>;
  using DoubleReduce = cub::BlockReduce<double, kThreads>;
  __shared__ union {
    typename IntReduce::TempStorage r;
    typename IntScan::TempStorage s;
    typename DoubleReduce::TempStorage d;
  } tmp;
  __shared__ int s_m;
  const int64_t base = int64_t(blockIdx.x) * n;
  int cnt = 0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) cnt += bits[base + i];
  cnt = IntReduce(tmp.r).Sum(cnt);
  if (threadIdx.x == 0) s_m = cnt;
  __syncthreads();
  const int m = s_m;
  if (m == 0) {  // empty mask: NRA is defined as 0
    if (threadIdx.x == 0) out[blockIdx.x] = 0.0;
    return;
  }
  const double md = double(m), nd = double(n);
  double vea = 0.0, upper = 0.0;
  int carry = 0;  // TP before this chunk (same in every thread)
  for (int64_t start = 0; start < n; start += kThreads) {
    const int64_t i = start + threadIdx.x;
    const int bit = i < n ? bits[base + i] : 0;
    int tp, chunk_total;
    IntScan(tmp.s).InclusiveSum(bit, tp, chunk_total);
    __syncthreads();  // temp storage is reused next iteration
    tp += carry;
    carry += chunk_total;
    // the authors' loop samples idx < step (unit n) and idx = j*step, j >= 1 (unit 100)
    if (i < n && (i < step || i % step == 0)) {
      const double unit = i < step ? nd : 100.0;
      vea += official_seg(double(tp), double(i), md) / unit;
      upper += official_upper(double(i), md) / unit;
    }
  }
  vea = DoubleReduce(tmp.d).Sum(vea);
  __syncthreads();
  upper = DoubleReduce(tmp.d).Sum(upper);
  if (threadIdx.x == 0) out[blockIdx.x] = nra_finish(vea, upper, md, nd);
}

// x: float32 [N, n], mask: uint8 [N, n], out: float64 [N]; all device pointers, contiguous.
void epg_cuda(dev_ptr x, dev_ptr mask, dev_ptr out, int64_t n_maps, int64_t n, dev_ptr stream) {
  if (n_maps <= 0 || n <= 0) throw internal_error("metrics_epg: N and n must be positive");
  epg_kernel<<<unsigned(n_maps), kThreads, 0, as_stream(stream)>>>(
      reinterpret_cast<const float*>(x), reinterpret_cast<const uint8_t*>(mask), reinterpret_cast<double*>(out), n);
  check_launch("metrics_epg");
}

// bits: uint8 mask bits in metrics order [N, n], out: float64 [N].
void official_epilogue_cuda(dev_ptr bits, dev_ptr out, int64_t n_maps, int64_t n, int64_t step, dev_ptr stream) {
  if (n_maps <= 0 || n < 100 || step != n / 100) {
    throw internal_error("metrics_nra_official_epilogue: need N > 0, n >= 100 and step == n // 100");
  }
  official_kernel<<<unsigned(n_maps), kThreads, 0, as_stream(stream)>>>(
      reinterpret_cast<const uint8_t*>(bits), reinterpret_cast<double*>(out), n, step);
  check_launch("metrics_nra_official_epilogue");
}

}  // namespace
}  // namespace metrics
}  // namespace fastcbm

void register_metrics_cuda(pybind11::module_& m) {
  using namespace fastcbm::metrics;
  m.def("metrics_epg", &epg_cuda, py::arg("x"), py::arg("mask"), py::arg("out"), py::arg("n_maps"), py::arg("n"),
        py::arg("stream"), "EPG per map (device pointers): float32 x [N, n], uint8 mask [N, n] -> float64 out [N]");
  m.def("metrics_nra_official_epilogue", &official_epilogue_cuda, py::arg("bits"), py::arg("out"), py::arg("n_maps"),
        py::arg("n"), py::arg("step"), py::arg("stream"),
        "official NRA from uint8 mask bits in metrics order [N, n] (device pointers) -> float64 out [N]");
}
