// C++ CPU kernel for the cam op family: the fused epilogue (ReLU → bilinear resize → optional min-max) over the
// [N, h, w] float32 maps the launcher computed with one batched GEMM. OpenMP over maps; one pass writes the map and
// tracks its min/max, a second rescales it in place (the map is hot in cache).
#include <algorithm>
#include <string>
#include <vector>

#include "cam/cam.h"
#include "common.h"

namespace fastcbm {
namespace {

void cam_epilogue(const carray<float>& raw, carray<float>& out, bool normalize) {
  const float* x = checked_data(raw, "raw", 3);
  checked_data(out, "out", 3);
  const py::ssize_t n = raw.shape(0), h = raw.shape(1), w = raw.shape(2);
  const py::ssize_t oh = out.shape(1), ow = out.shape(2);
  if (out.shape(0) != n || h < 1 || w < 1 || oh < 1 || ow < 1) {
    throw internal_error("cam_epilogue: expected raw [N, h, w] and out [N, H, W] with the same N, sizes >= 1");
  }
  float* y = out.mutable_data();
  std::vector<cam::Tap> ty(oh), tx(ow);
  for (py::ssize_t i = 0; i < oh; ++i) ty[i] = cam::bilinear_tap(i, h, oh);
  for (py::ssize_t j = 0; j < ow; ++j) tx[j] = cam::bilinear_tap(j, w, ow);
  const bool same = (oh == h && ow == w);  // no resize: a plain ReLU copy (bilinear at scale 1 is the identity)
  py::gil_scoped_release release;
#pragma omp parallel for schedule(static)
  for (py::ssize_t m = 0; m < n; ++m) {
    const float* src = x + m * h * w;
    float* dst = y + m * oh * ow;
    float lo = 0.0f, hi = 0.0f;
    if (same) {
      for (py::ssize_t k = 0; k < h * w; ++k) dst[k] = cam::relu(src[k]);
    } else {
      for (py::ssize_t i = 0; i < oh; ++i) {
        for (py::ssize_t j = 0; j < ow; ++j) dst[i * ow + j] = cam::sample(src, w, ty[i], tx[j]);
      }
    }
    if (!normalize) continue;
    lo = hi = dst[0];
    for (py::ssize_t k = 1; k < oh * ow; ++k) {
      lo = std::min(lo, dst[k]);
      hi = std::max(hi, dst[k]);
    }
    const float span = hi - lo;
    if (span > 0.0f) {
      for (py::ssize_t k = 0; k < oh * ow; ++k) dst[k] = (dst[k] - lo) / span;
    } else {
      std::fill(dst, dst + oh * ow, 0.0f);  // constant map (e.g. all zero after the ReLU) stays 0
    }
  }
}

}  // namespace
}  // namespace fastcbm

void register_cam_cpu(pybind11::module_& m) {
  m.def("cam_epilogue", &fastcbm::cam_epilogue, pybind11::arg("raw"), pybind11::arg("out").noconvert(),
        pybind11::arg("normalize"), "ReLU -> bilinear resize -> optional min-max over [N, h, w] float32 maps");
}
