// Shared helpers for the fastcbm C++ kernels. Kernels take raw buffers (see CMakeLists.txt for why no libtorch).
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#ifdef FASTCBM_WITH_OPENMP
#include <omp.h>
#endif

namespace fastcbm {
namespace py = pybind11;

// C-contiguous numpy view of a CPU tensor's memory; the Python launcher guarantees contiguity and dtype, this
// re-checks so a misuse from Python fails loudly instead of reading garbage.
template <typename T>
using carray = py::array_t<T, py::array::c_style>;

template <typename T>
inline const T* checked_data(const carray<T>& a, const char* name, py::ssize_t ndim) {
  if (a.ndim() != ndim) {
    throw std::invalid_argument(std::string(name) + ": expected " + std::to_string(ndim) + " dims, got " +
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

}  // namespace fastcbm
