// Cubic-cosine loss (label-free CBM "cos cubed"): the per-element steps shared by the C++ and CUDA kernels.
//
// The fused op never holds [B, K] outputs/targets: the Python driver computes q and p for one batch tile with a GEMM
// and these kernels do the elementwise work on that tile. Column k of a tile is one (cell, concept) pair; rows are
// samples. With a = q - mu_q, b = p - mu_p (mu = batch means, known up front because means are linear):
//   forward accumulates, per column, in fp64: S_ab = sum a^3 b^3, S_aa = sum a^6, S_bb = sum b^6,
//                                          S_a2b3 = sum a^2 b^3, S_a5 = sum a^5 (the last two give the batch mean of
//                                          the gradient, needed for the centring Jacobian in backward);
//   backward writes g_q = a^2 (alpha b^3 - beta a^3) - gbar (alpha, beta, gbar per column, from the sums).
#pragma once

#include "common.h"

namespace fastcbm {
namespace losses {

constexpr int kNumSums = 5;  // rows of the sums array: S_ab, S_aa, S_bb, S_a2b3, S_a5
constexpr int kNumCoefs = 3;  // rows of the coefficient array: alpha, beta, gbar

// One sample's contribution (a = q - mu_q, b = p - mu_p of one column) to that column's five sums.
FASTCBM_HD void accumulate_one(double a, double b, double& s_ab, double& s_aa, double& s_bb, double& s_a2b3,
                               double& s_a5) {
  const double a2 = a * a, b3 = b * b * b;
  const double a3 = a2 * a;
  s_ab += a3 * b3;
  s_aa += a3 * a3;
  s_bb += b3 * b3;
  s_a2b3 += a2 * b3;
  s_a5 += a3 * a2;
}

// dL/dq of one element from the column's coefficients: a^2 (alpha b^3 - beta a^3) - gbar.
FASTCBM_HD double gradient_one(double a, double b, double alpha, double beta, double gbar) {
  const double a2 = a * a;
  return a2 * (alpha * (b * b * b) - beta * (a2 * a)) - gbar;
}

}  // namespace losses
}  // namespace fastcbm
