// Ring-prompt kernels (fastcbm.prompts.render_rings): shared declarations and float -> half/bfloat16 rounding.
//
// Every backend evaluates ring membership the same way (see fastcbm/prompts/reference.py): one float64 addition
// d2 = dy2[g][y] + dx2[g][x] of host-tabulated squared offsets, then lo2 <= d2 <= hi2. Output values come from a
// float32 table [3][257] (pixel values 0..255, ring colour at kRingIndex), so all backends write identical bits.
#pragma once

#include <cstdint>
#include <cstring>

namespace fastcbm {
namespace prompts {

constexpr int kTableWidth = 257;  // 256 pixel values + the ring colour
constexpr int kRingIndex = 256;

// float32 -> IEEE binary16 bits, round to nearest even; overflow -> inf, NaN stays NaN (quiet), subnormals exact.
inline uint16_t float_to_half_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof(x));
  const uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7FFFFFFFu;
  if (ax >= 0x7F800000u) return static_cast<uint16_t>(sign | (ax > 0x7F800000u ? 0x7E00u : 0x7C00u));
  if (ax >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520 rounds up to inf
  if (ax < 0x38800000u) {
    // Below the smallest normal half (2^-14): adding 0.5f makes the FPU round at the half subnormal step (2^-24),
    // which is exactly round-to-nearest-even on the result's mantissa.
    float a;
    std::memcpy(&a, &ax, sizeof(a));
    a += 0.5f;
    uint32_t r;
    std::memcpy(&r, &a, sizeof(r));
    return static_cast<uint16_t>(sign | (r - 0x3F000000u));
  }
  const uint32_t odd = (ax >> 13) & 1u;
  ax += 0xC8000FFFu + odd;  // rebias exponent (127 -> 15) and add the rounding bias (ties to even)
  return static_cast<uint16_t>(sign | (ax >> 13));
}

// float32 -> bfloat16 bits, round to nearest even; NaN stays a quiet NaN (rounding could turn it into inf).
inline uint16_t float_to_bf16_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof(x));
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((x >> 16) | 0x0040u);
  x += 0x7FFFu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(x >> 16);
}

}  // namespace prompts
}  // namespace fastcbm
