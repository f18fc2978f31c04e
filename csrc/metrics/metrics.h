// Shared pieces of the metrics op family (CPU and CUDA): composite sort keys and the NRA formulas.
// Definitions live in fastcbm/metrics/reference.py; these helpers must reproduce it bit for bit in the ordering and
// to ~1e-15 in the AUCs (accumulated in double).
#pragma once

#include <cstdint>

#include "common.h"
#include <cstring>


namespace fastcbm {
namespace metrics {

// 64-bit key whose ASCENDING order is the metrics pixel order: value descending (order-preserving uint32 of the
// float, inverted) in the high 32 bits, then flat index descending ((n-1-i) << 1) in the low bits. Bit 0 carries the
// pixel's mask bit: indices are unique, so it never affects the order, and counting passes read the mask from the
// key instead of random lookups. Needs n <= 2^31. -0.0 is folded into +0.0 (they compare equal and must tie).
// NaN never reaches here (rejected in Python).
FASTCBM_HD uint32_t ordered_bits(float v) {
  if (v == 0.0f) v = 0.0f;
  uint32_t u;
#ifdef __CUDA_ARCH__
  u = __float_as_uint(v);
#else
  std::memcpy(&u, &v, sizeof(u));
#endif
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // ascending float -> ascending uint32
}

FASTCBM_HD uint64_t desc_key(float v, uint32_t i, uint32_t n, bool bit) {
  return (static_cast<uint64_t>(~ordered_bits(v)) << 32) | (static_cast<uint64_t>(n - 1u - i) << 1) |
         static_cast<uint64_t>(bit);
}

FASTCBM_HD uint32_t key_index(uint64_t key, uint32_t n) {
  return n - 1u - static_cast<uint32_t>((key & 0xffffffffu) >> 1);
}
FASTCBM_HD int key_bit(uint64_t key) { return static_cast<int>(key & 1u); }
FASTCBM_HD uint32_t key_high(uint64_t key) { return static_cast<uint32_t>(key >> 32); }

// One point of the authors' loop after adding the pixel at 0-based position idx (tp = TP_{idx+1}, m = |M| > 0):
// seg = TP / (FP + m) and the ideal curve idx/m (idx < m) or m/idx (note: idx, not idx+1, as in their code).
FASTCBM_HD double official_seg(double tp, double idx, double m) { return tp / (idx + 1.0 - tp + m); }
FASTCBM_HD double official_upper(double idx, double m) { return idx < m ? idx / m : m / idx; }

// NRA = max(AUC - rand, 0) / (AUC* - rand); 0.0 when the mask is empty or the denominator is not positive.
FASTCBM_HD double nra_finish(double auc, double ideal, double m, double n) {
  const double rand = m / n / 2.0;
  const double den = ideal - rand;
  if (m <= 0.0 || !(den > 0.0)) return 0.0;
  const double num = auc - rand;
  return (num > 0.0 ? num : 0.0) / den;
}

}  // namespace metrics
}  // namespace fastcbm
