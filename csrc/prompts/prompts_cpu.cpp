// C++ CPU kernel for ring prompts: one uint8 image -> all G prompted copies, normalised, in the encoder's dtype.
// OpenMP over (image, prompt) rows; no allocation per prompt (the value table is converted once per call).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <array>
#include <cmath>
#include <stdexcept>
#include <string>

#include "common.h"
#include "prompts/prompts.h"

namespace py = pybind11;
using fastcbm::carray;
using fastcbm::internal_error;

namespace {

struct Geometry {
  const uint8_t* img;  // [B, 3, S, S]
  const double* dy2;   // [Gt, S]
  const double* dx2;   // [Gt, S]
  double lo2, hi2;
  int64_t B, Gt, S;
};

Geometry check_inputs(const carray<uint8_t>& images, const carray<double>& dy2, const carray<double>& dx2,
                      double lo2, double hi2, const carray<float>& table, const py::array& out) {
  Geometry g{};
  g.img = fastcbm::checked_data(images, "images", 4);
  g.dy2 = fastcbm::checked_data(dy2, "dy2", 2);
  g.dx2 = fastcbm::checked_data(dx2, "dx2", 2);
  fastcbm::checked_data(table, "table", 2);
  g.lo2 = lo2;
  g.hi2 = hi2;
  g.B = images.shape(0);
  g.S = images.shape(2);
  g.Gt = dy2.shape(0);
  if (images.shape(1) != 3 || images.shape(3) != g.S) throw internal_error("images: expected [B, 3, S, S]");
  if (dy2.shape(1) != g.S || dx2.shape(0) != g.Gt || dx2.shape(1) != g.S)
    throw internal_error("dy2/dx2: expected [Gt, S] each");
  if (table.shape(0) != 3 || table.shape(1) != fastcbm::prompts::kTableWidth)
    throw internal_error("table: expected [3, 257]");
  if (out.ndim() != 5 || out.shape(0) != g.B || out.shape(1) != g.Gt || out.shape(2) != 3 || out.shape(3) != g.S ||
      out.shape(4) != g.S)
    throw internal_error("out: expected [B, Gt, 3, S, S] matching images and dy2");
  return g;
}

template <typename OutT>
void render(const Geometry& geo, const OutT* table, OutT* out) {
  const int64_t S = geo.S, SS = S * S, rows = geo.B * geo.Gt;
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t b = row / geo.Gt, g = row % geo.Gt;
    const uint8_t* im = geo.img + b * 3 * SS;
    OutT* o = out + row * 3 * SS;
    const double* ry = geo.dy2 + g * S;
    const double* rx = geo.dx2 + g * S;
    for (int c = 0; c < 3; ++c) {
      const OutT* t = table + c * fastcbm::prompts::kTableWidth;
      const uint8_t* ic = im + c * SS;
      OutT* oc = o + c * SS;
      for (int64_t y = 0; y < S; ++y) {
        const double yy = ry[y];
        const uint8_t* ip = ic + y * S;
        OutT* op = oc + y * S;
        if (!(yy <= geo.hi2)) {  // no pixel of this row can be on the ring (also catches the +inf "plain" row)
          for (int64_t x = 0; x < S; ++x) op[x] = t[ip[x]];
          continue;
        }
        for (int64_t x = 0; x < S; ++x) {
          const double d2 = yy + rx[x];
          const bool on = d2 >= geo.lo2 && d2 <= geo.hi2;
          op[x] = t[on ? fastcbm::prompts::kRingIndex : ip[x]];
        }
      }
    }
  }
}

void render_f32(const carray<uint8_t>& images, const carray<double>& dy2, const carray<double>& dx2, double lo2,
                double hi2, const carray<float>& table, carray<float> out) {
  const Geometry geo = check_inputs(images, dy2, dx2, lo2, hi2, table, out);
  float* o = out.mutable_data();
  py::gil_scoped_release nogil;
  render<float>(geo, table.data(), o);
}

// Half types: the output arrives as a uint16 view (numpy has no bfloat16); the 771 table values are rounded once.
void render_u16(const carray<uint8_t>& images, const carray<double>& dy2, const carray<double>& dx2, double lo2,
                double hi2, const carray<float>& table, carray<uint16_t> out, bool bf16) {
  const Geometry geo = check_inputs(images, dy2, dx2, lo2, hi2, table, out);
  std::array<uint16_t, 3 * fastcbm::prompts::kTableWidth> t16{};
  const float* t = table.data();
  for (size_t i = 0; i < t16.size(); ++i)
    t16[i] = bf16 ? fastcbm::prompts::float_to_bf16_bits(t[i]) : fastcbm::prompts::float_to_half_bits(t[i]);
  uint16_t* o = out.mutable_data();
  py::gil_scoped_release nogil;
  render<uint16_t>(geo, t16.data(), o);
}

// Test hook: the rounding used above, on any float32 array.
carray<uint16_t> round_to_16(const carray<float>& x, bool bf16) {
  carray<uint16_t> out(x.size());
  const float* in = x.data();
  uint16_t* o = out.mutable_data();
  for (py::ssize_t i = 0; i < x.size(); ++i)
    o[i] = bf16 ? fastcbm::prompts::float_to_bf16_bits(in[i]) : fastcbm::prompts::float_to_half_bits(in[i]);
  return out;
}

}  // namespace

void register_prompts_cpu(py::module_& m) {
  m.def("prompts_render_f32", &render_f32, py::arg("images").noconvert(), py::arg("dy2").noconvert(),
        py::arg("dx2").noconvert(), py::arg("lo2"), py::arg("hi2"), py::arg("table").noconvert(),
        py::arg("out").noconvert(),
        "Ring prompts into a float32 [B, Gt, 3, S, S] buffer (see fastcbm/prompts/reference.py).");
  m.def("prompts_render_u16", &render_u16, py::arg("images").noconvert(), py::arg("dy2").noconvert(),
        py::arg("dx2").noconvert(), py::arg("lo2"), py::arg("hi2"), py::arg("table").noconvert(),
        py::arg("out").noconvert(), py::arg("bf16"),
        "Ring prompts into a float16 (bf16=False) or bfloat16 (bf16=True) buffer viewed as uint16.");
  m.def("prompts_round_to_16", &round_to_16, py::arg("x").noconvert(), py::arg("bf16"),
        "float32 -> float16/bfloat16 bits with round-to-nearest-even (test hook).");
}
