// Helpers shared by every op family's C++ and CUDA kernels (the one place for them). Kernels take raw buffers (see
// CMakeLists.txt for why no libtorch): numpy views of CPU tensors, device pointers plus a stream for CUDA tensors.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#ifdef FASTCBM_WITH_OPENMP
#include <omp.h>
#endif

#ifdef __CUDACC__
#include <cuda_runtime.h>
#endif

// Functions shared by host (C++) and device (CUDA) code: inline on the host, forced-inline on both in nvcc.
#ifdef __CUDACC__
#define FASTCBM_HD __host__ __device__ __forceinline__
#else
#define FASTCBM_HD inline
#endif

namespace fastcbm {
namespace py = pybind11;

// An invariant the Python launcher guarantees was broken: a bug, never the user's input. bindings.cpp translates it
// to fastcbm.errors.InternalError (pybind11 would turn std::invalid_argument into a ValueError, i.e. a user error).
struct internal_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// C-contiguous numpy view of a CPU tensor's memory; the Python launcher guarantees contiguity and dtype, this
// re-checks so a misuse from Python fails loudly instead of reading garbage.
template <typename T>
using carray = py::array_t<T, py::array::c_style>;

template <typename T>
inline const T* checked_data(const carray<T>& a, const char* name, py::ssize_t ndim) {
  if (a.ndim() != ndim) {
    throw internal_error(std::string(name) + ": expected " + std::to_string(ndim) + " dims, got " +
                                std::to_string(a.ndim()));
  }
  return a.data();
}

inline int max_threads() {
#ifdef FASTCBM_WITH_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Device pointers and streams cross the Python boundary as integers (torch's data_ptr() and cuda_stream).
using dev_ptr = std::uintptr_t;

#ifdef __CUDACC__
inline cudaStream_t as_stream(dev_ptr stream) { return reinterpret_cast<cudaStream_t>(stream); }

// After a launch: a launch error (bad configuration, no device) becomes a RuntimeError naming the kernel.
inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

// Reduction operators for cub::BlockReduce.
struct MinOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a < b ? a : b; }
};
struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a > b ? a : b; }
};
#endif

}  // namespace fastcbm
