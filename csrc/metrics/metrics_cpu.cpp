// C++ CPU kernels for the metrics op family: official / paper NRA, IoU curve and EPG, OpenMP over maps.
// Inputs are the prepared buffers of fastcbm/metrics/_common.py: float32 values [N, n] and bool masks [N, n].
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"
#include "metrics/metrics.h"

namespace py = pybind11;

namespace fastcbm {
namespace metrics {
namespace {

struct Inputs {
  const float* x;
  const bool* mask;
  py::ssize_t n_maps;
  py::ssize_t n;
};

Inputs check_inputs(const carray<float>& x, const carray<bool>& mask) {
  const float* xp = checked_data(x, "x", 2);
  const bool* mp = checked_data(mask, "mask", 2);
  if (x.shape(0) != mask.shape(0) || x.shape(1) != mask.shape(1)) {
    throw internal_error("x and mask must have the same [N, n] shape");
  }
  if (x.shape(1) <= 0 || x.shape(1) > (py::ssize_t(1) << 31)) {
    throw internal_error("n (pixels per map) must be in [1, 2^31]");
  }
  return {xp, mp, x.shape(0), x.shape(1)};
}

// Builds the packed keys (mask bit in bit 0) and returns |M|.
int64_t build_keys(const float* x, const bool* mask, uint32_t n, std::vector<uint64_t>& keys) {
  keys.resize(n);
  int64_t m = 0;
  for (uint32_t i = 0; i < n; ++i) {
    keys[i] = desc_key(x[i], i, n, mask[i]);
    m += mask[i];
  }
  return m;
}

// Multi-rank selection: afterwards, for every p in [b_lo, b_hi), keys[0:p] holds exactly the p smallest keys
// (here element p is also in its sorted place, but callers rely only on the prefix property that bucket_select
// shares). Recursing on the middle rank keeps the total
// work O(n log #ranks) instead of O(n * #ranks) for successive nth_element calls.
void multi_select(uint64_t* keys, int64_t lo, int64_t hi, const int64_t* b_lo, const int64_t* b_hi) {
  while (b_lo < b_hi && *b_lo <= lo) ++b_lo;      // a prefix ending at lo is already fixed
  while (b_lo < b_hi && *(b_hi - 1) >= hi) --b_hi;  // so is one ending at hi
  if (b_lo >= b_hi) return;
  const int64_t* mid = b_lo + (b_hi - b_lo) / 2;
  const int64_t p = *mid;
  std::nth_element(keys + lo, keys + p, keys + hi);
  multi_select(keys, lo, p, b_lo, mid);
  multi_select(keys, p + 1, hi, mid + 1, b_hi);
}

// Bucketed multi-rank selection with the prefix post-condition of multi_select (keys[0:p] = the p smallest). One counting-sort pass by the top
// 12 significant bits of (key - min) puts the keys in bucket order (buckets are ranges of keys, so bucket order is
// key order); only buckets that contain a needed rank are refined, recursively, ending in multi_select. On spread
// data each bucket holds ~n/4096 keys, so this costs ~3 linear passes instead of log2(#ranks) nth_element passes.
// Skewed data (a few distinct values) is split further at the next level (the index bits spread ties); the depth
// limit bounds adversarial cases at multi_select's cost.
void bucket_select(uint64_t* keys, uint64_t* scratch, int64_t lo, int64_t hi, const int64_t* b_lo,
                   const int64_t* b_hi, int depth = 0) {
  constexpr int kBits = 12;
  while (b_lo < b_hi && *b_lo <= lo) ++b_lo;
  while (b_lo < b_hi && *(b_hi - 1) >= hi) --b_hi;
  if (b_lo >= b_hi) return;
  if (hi - lo <= 4096 || b_hi - b_lo <= 2 || depth >= 4) {
    multi_select(keys, lo, hi, b_lo, b_hi);
    return;
  }
  uint64_t kmin = keys[lo], kmax = keys[lo];
  for (int64_t i = lo + 1; i < hi; ++i) {
    kmin = std::min(kmin, keys[i]);
    kmax = std::max(kmax, keys[i]);
  }
  const uint64_t range = kmax - kmin;  // > 0: keys are unique
  int bitlen = 0;
  while (bitlen < 64 && (range >> bitlen) != 0) ++bitlen;
  const int shift = bitlen > kBits ? bitlen - kBits : 0;
  const int64_t nb = int64_t(range >> shift) + 1;
  std::vector<int64_t> start(nb + 1, 0);
  for (int64_t i = lo; i < hi; ++i) ++start[((keys[i] - kmin) >> shift) + 1];
  for (int64_t b = 0; b < nb; ++b) start[b + 1] += start[b];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t i = lo; i < hi; ++i) scratch[lo + fill[(keys[i] - kmin) >> shift]++] = keys[i];
  }
  std::copy(scratch + lo, scratch + hi, keys + lo);
  // refine every bucket holding a rank strictly inside it (a rank at a bucket edge is already exact)
  const int64_t* b = b_lo;
  while (b < b_hi) {
    const int64_t bucket = int64_t(std::upper_bound(start.begin(), start.end(), *b - lo) - start.begin()) - 1;
    const int64_t s0 = lo + start[bucket], s1 = lo + start[bucket + 1];
    const int64_t* e = b;
    while (e < b_hi && *e < s1) ++e;
    bucket_select(keys, scratch, s0, s1, b, e, depth + 1);
    b = e;
  }
}

double nra_official_one(const float* x, const bool* mask, uint32_t n, std::vector<uint64_t>& keys,
                        std::vector<uint64_t>& scratch, std::vector<int64_t>& ranks) {
  const int64_t m = build_keys(x, mask, n, keys);
  if (m == 0) return 0.0;
  const int64_t step = n / 100;
  // needed prefixes: the top `step` (fine part, sorted below) and every j*step+1 (coarse points at idx = j*step)
  ranks.clear();
  ranks.push_back(step);
  for (int64_t p = step + 1; p < n; p += step) ranks.push_back(p);
  scratch.resize(n);
  bucket_select(keys.data(), scratch.data(), 0, n, ranks.data(), ranks.data() + ranks.size());
  std::sort(keys.begin(), keys.begin() + step);

  const double md = static_cast<double>(m);
  double vea = 0.0, upper = 0.0;
  int64_t tp = 0;
  for (int64_t i = 0; i < step; ++i) {  // fine part: every pixel, unit n
    tp += key_bit(keys[i]);
    vea += official_seg(double(tp), double(i), md) / n;
    upper += official_upper(double(i), md) / n;
  }
  // coarse part: keys between consecutive ranks are unordered but complete, so running counts are exact at idx=j*step
  int64_t i = step;
  for (int64_t next = step; next < n; next += step) {
    for (; i <= next; ++i) tp += key_bit(keys[i]);  // now tp = TP_{next+1}
    vea += official_seg(double(tp), double(next), md) / 100.0;
    upper += official_upper(double(next), md) / 100.0;
  }
  return nra_finish(vea, upper, md, n);
}

double nra_paper_one(const float* x, const bool* mask, uint32_t n, std::vector<uint64_t>& keys,
                     std::vector<uint64_t>& scratch, std::vector<int64_t>& ranks) {
  const int64_t m = build_keys(x, mask, n, keys);
  if (m == 0) return 0.0;
  int64_t kp[100];
  ranks.clear();
  for (int p = 0; p < 100; ++p) {
    kp[p] = ((p + 1) * int64_t(n) + 99) / 100;  // 1-based rank ceil(p% * n)
    // prefixes k_p - 1 and k_p both exact <=> the key at position k_p - 1 is in its sorted place
    for (int64_t r = kp[p] - 1; r <= kp[p]; ++r) {
      if (ranks.empty() || ranks.back() < r) ranks.push_back(r);
    }
  }
  scratch.resize(n);
  bucket_select(keys.data(), scratch.data(), 0, n, ranks.data(), ranks.data() + ranks.size());
  uint32_t hi_thr[100];  // key_high at rank k_p: non-decreasing in p (value non-increasing)
  for (int p = 0; p < 100; ++p) hi_thr[p] = key_high(keys[kp[p] - 1]);
  // pixel q belongs to R_p iff its value >= T_p, i.e. key_high(q) <= hi_thr[p]: a suffix of p starting at p0(q).
  // Position q lies in the segment (k_{j-1}-1, k_j-1], so p0 = j unless q ties with earlier thresholds: walk back.
  int64_t region[100] = {0}, inter[100] = {0};
  int j = 0;
  for (int64_t q = 0; q < int64_t(n); ++q) {
    while (q > kp[j] - 1) ++j;
    const uint32_t h = key_high(keys[q]);
    int p0 = j;
    while (p0 > 0 && hi_thr[p0 - 1] >= h) --p0;
    region[p0] += 1;
    inter[p0] += key_bit(keys[q]);
  }
  const double md = double(m);
  double auc = 0.0, ideal = 0.0, prev = 0.0, prev_ideal = 0.0;
  int64_t r = 0, t = 0;
  for (int p = 0; p < 100; ++p) {
    r += region[p];
    t += inter[p];
    const double iou = double(t) / (double(r) + md - double(t));
    const double k = double(kp[p]);
    const double iou_ideal = std::min(k, md) / std::max(k, md);
    auc += (prev + iou) * 0.5 / 100.0;
    ideal += (prev_ideal + iou_ideal) * 0.5 / 100.0;
    prev = iou;
    prev_ideal = iou_ideal;
  }
  return nra_finish(auc, ideal, md, n);
}

template <typename Fn>
py::array_t<double> per_map(const carray<float>& x, const carray<bool>& mask, Fn fn) {
  const Inputs in = check_inputs(x, mask);
  py::array_t<double> out(in.n_maps);
  double* o = out.mutable_data();
  {
    py::gil_scoped_release release;
#pragma omp parallel
    {
      std::vector<uint64_t> keys, scratch;  // per-thread buffers, reused across maps
      std::vector<int64_t> ranks;
#pragma omp for schedule(dynamic, 1)
      for (py::ssize_t b = 0; b < in.n_maps; ++b) {
        o[b] = fn(in.x + b * in.n, in.mask + b * in.n, uint32_t(in.n), keys, scratch, ranks);
      }
    }
  }
  return out;
}

py::array_t<double> nra_official_cpu(const carray<float>& x, const carray<bool>& mask) {
  if (mask.ndim() == 2 && mask.shape(1) < 100) throw internal_error("official NRA needs n >= 100 pixels");
  return per_map(x, mask, nra_official_one);
}

py::array_t<double> nra_paper_cpu(const carray<float>& x, const carray<bool>& mask) {
  return per_map(x, mask, nra_paper_one);
}

py::array_t<double> epg_cpu(const carray<float>& x, const carray<bool>& mask) {
  return per_map(x, mask, [](const float* xp, const bool* mp, uint32_t n, std::vector<uint64_t>&,
                             std::vector<uint64_t>&, std::vector<int64_t>&) {
    float mn = xp[0];
    for (uint32_t i = 1; i < n; ++i) mn = std::min(mn, xp[i]);
    const double dmn = mn;
    double num = 0.0, den = 0.0;  // min-max normalisation's (max - min) cancels: Σ(x-min)·mask / Σ(x-min)
    for (uint32_t i = 0; i < n; ++i) {
      const double d = double(xp[i]) - dmn;
      den += d;
      num += mp[i] ? d : 0.0;
    }
    return den > 0.0 ? num / den : 0.0;
  });
}

py::array_t<float> iou_curve_cpu(const carray<float>& x, const carray<bool>& mask) {
  const Inputs in = check_inputs(x, mask);
  py::array_t<float> out({in.n_maps, in.n});
  float* o = out.mutable_data();
  {
    py::gil_scoped_release release;
#pragma omp parallel
    {
      std::vector<uint64_t> keys;
#pragma omp for schedule(dynamic, 1)
      for (py::ssize_t b = 0; b < in.n_maps; ++b) {
        const uint32_t n = uint32_t(in.n);
        const bool* mp = in.mask + b * in.n;
        float* ob = o + b * in.n;
        const double m = double(build_keys(in.x + b * in.n, mp, n, keys));
        std::sort(keys.begin(), keys.end());
        double tp = 0.0;
        for (uint32_t i = 0; i < n; ++i) {
          tp += key_bit(keys[i]);
          ob[i] = float(tp / (double(i) + 1.0 + m - tp));
        }
      }
    }
  }
  return out;
}

}  // namespace
}  // namespace metrics
}  // namespace fastcbm

void register_metrics_cpu(pybind11::module_& m) {
  using namespace fastcbm::metrics;
  m.def("metrics_nra_official", &nra_official_cpu, py::arg("x"), py::arg("mask"),
        "official (CE-FAM authors') NRA per map: float32 x [N, n], bool mask [N, n] -> float64 [N]");
  m.def("metrics_nra_paper", &nra_paper_cpu, py::arg("x"), py::arg("mask"),
        "paper-variant NRA per map: float32 x [N, n], bool mask [N, n] -> float64 [N]");
  m.def("metrics_epg", &epg_cpu, py::arg("x"), py::arg("mask"),
        "energy-based pointing game per map: float32 x [N, n], bool mask [N, n] -> float64 [N]");
  m.def("metrics_iou_curve", &iou_curve_cpu, py::arg("x"), py::arg("mask"),
        "IoU after the k highest pixels, k = 1..n: float32 x [N, n], bool mask [N, n] -> float32 [N, n]");
}
