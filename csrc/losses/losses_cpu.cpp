// C++ CPU kernels for the fused cubic-cosine loss: the elementwise accumulate (forward) and gradient (backward) steps
// on one batch tile. The GEMMs that produce the tile stay in torch (oneDNN/MKL beat any hand-written blocked GEMM
// here), so these kernels exist to fuse the ~15 elementwise ops per element into one pass with fp64 accumulation.
// See losses.h for the formulas (shared with the CUDA twin, losses.cu).
#include <algorithm>
#include <cmath>
#include <string>

#include "common.h"
#include "losses/losses.h"

namespace fastcbm {
namespace {

using losses::kNumCoefs;
using losses::kNumSums;

void check_tile(py::ssize_t rows, py::ssize_t cols, const char* name, py::ssize_t r, py::ssize_t c) {
  if (r != rows || c != cols) {
    throw internal_error(std::string(name) + ": expected [" + std::to_string(rows) + ", " +
                                std::to_string(cols) + "], got [" + std::to_string(r) + ", " + std::to_string(c) +
                                "]");
  }
}

// The centred-tile inputs both passes share: q, p [rows, K] and their column means mu_q, mu_p [K], checked.
template <typename T>
struct CentredTile {
  const T* q;
  const T* p;
  const double* mu_q;
  const double* mu_p;
  py::ssize_t rows, cols;
};

template <typename T>
CentredTile<T> centred_tile(const carray<T>& q, const carray<T>& p, const carray<double>& mu_q,
                            const carray<double>& mu_p) {
  CentredTile<T> t{checked_data(q, "q", 2), checked_data(p, "p", 2), nullptr, nullptr, q.shape(0), q.shape(1)};
  check_tile(t.rows, t.cols, "p", p.shape(0), p.shape(1));
  t.mu_q = checked_data(mu_q, "mu_q", 1);
  t.mu_p = checked_data(mu_p, "mu_p", 1);
  if (mu_q.shape(0) != t.cols || mu_p.shape(0) != t.cols) throw internal_error("mu_q/mu_p: expected [K]");
  return t;
}

// Columns are split into contiguous chunks, one per thread; each thread walks rows and, inside a row, its chunk of
// columns, so reads are contiguous and each accumulator has a single writer (no atomics, deterministic).
template <typename T>
void accumulate(const carray<T>& q, const carray<T>& p, const carray<double>& mu_q, const carray<double>& mu_p,
                carray<double>& sums) {
  const CentredTile<T> t = centred_tile(q, p, mu_q, mu_p);
  const py::ssize_t rows = t.rows, cols = t.cols;
  checked_data(sums, "sums", 2);
  check_tile(kNumSums, cols, "sums", sums.shape(0), sums.shape(1));
  double* s = sums.mutable_data();
  double* s_ab = s;
  double* s_aa = s + cols;
  double* s_bb = s + 2 * cols;
  double* s_a2b3 = s + 3 * cols;
  double* s_a5 = s + 4 * cols;
  {
    py::gil_scoped_release release;
#pragma omp parallel
    {
#ifdef FASTCBM_WITH_OPENMP
      const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
#else
      const int nt = 1, tid = 0;
#endif
      const py::ssize_t chunk = (cols + nt - 1) / nt;
      const py::ssize_t c0 = std::min<py::ssize_t>(cols, chunk * tid), c1 = std::min<py::ssize_t>(cols, c0 + chunk);
      for (py::ssize_t r = 0; r < rows; ++r) {
        const T* qr = t.q + r * cols;
        const T* pr = t.p + r * cols;
#pragma omp simd
        for (py::ssize_t k = c0; k < c1; ++k) {
          losses::accumulate_one(static_cast<double>(qr[k]) - t.mu_q[k], static_cast<double>(pr[k]) - t.mu_p[k],
                                 s_ab[k], s_aa[k], s_bb[k], s_a2b3[k], s_a5[k]);
        }
      }
    }
  }
}

// out may alias q (each element is read before it is written).
template <typename T>
void gradient(const carray<T>& q, const carray<T>& p, const carray<double>& mu_q, const carray<double>& mu_p,
              const carray<double>& coefs, carray<T>& out) {
  const CentredTile<T> t = centred_tile(q, p, mu_q, mu_p);
  const py::ssize_t rows = t.rows, cols = t.cols;
  const double* cf = checked_data(coefs, "coefs", 2);
  check_tile(kNumCoefs, cols, "coefs", coefs.shape(0), coefs.shape(1));
  checked_data(out, "out", 2);
  check_tile(rows, cols, "out", out.shape(0), out.shape(1));
  T* od = out.mutable_data();
  const double* alpha = cf;
  const double* beta = cf + cols;
  const double* gbar = cf + 2 * cols;
  {
    py::gil_scoped_release release;
#pragma omp parallel for schedule(static)
    for (py::ssize_t r = 0; r < rows; ++r) {
      const T* qr = t.q + r * cols;
      const T* pr = t.p + r * cols;
      T* orow = od + r * cols;
#pragma omp simd
      for (py::ssize_t k = 0; k < cols; ++k) {
        orow[k] = static_cast<T>(losses::gradient_one(static_cast<double>(qr[k]) - t.mu_q[k],
                                                      static_cast<double>(pr[k]) - t.mu_p[k], alpha[k], beta[k],
                                                      gbar[k]));
      }
    }
  }
}

}  // namespace
}  // namespace fastcbm

void register_losses_cpu(pybind11::module_& m) {
  using namespace fastcbm;
  const char* acc_doc =
      "losses_cubic_accumulate(q [R, K], p [R, K], mu_q [K] f64, mu_p [K] f64, sums [5, K] f64): add the tile's "
      "S_ab, S_aa, S_bb, S_a2b3, S_a5 into sums (in place)";
  const char* grad_doc =
      "losses_cubic_gradient(q [R, K], p [R, K], mu_q [K] f64, mu_p [K] f64, coefs [3, K] f64, out [R, K]): "
      "out = a^2 (alpha b^3 - beta a^3) - gbar; out may be q";
  m.def("losses_cubic_accumulate", &accumulate<float>, acc_doc, py::arg("q").noconvert(), py::arg("p").noconvert(),
        py::arg("mu_q"), py::arg("mu_p"), py::arg("sums").noconvert());
  m.def("losses_cubic_accumulate", &accumulate<double>, acc_doc, py::arg("q").noconvert(), py::arg("p").noconvert(),
        py::arg("mu_q"), py::arg("mu_p"), py::arg("sums").noconvert());
  m.def("losses_cubic_gradient", &gradient<float>, grad_doc, py::arg("q").noconvert(), py::arg("p").noconvert(),
        py::arg("mu_q"), py::arg("mu_p"), py::arg("coefs"), py::arg("out").noconvert());
  m.def("losses_cubic_gradient", &gradient<double>, grad_doc, py::arg("q").noconvert(), py::arg("p").noconvert(),
        py::arg("mu_q"), py::arg("mu_p"), py::arg("coefs"), py::arg("out").noconvert());
}
