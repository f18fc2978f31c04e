"""Triton kernels of the fused cubic-cosine loss (the maths: ``fastcbm.losses.ops``; the drivers:
``fastcbm.losses.launchers``).

Column k of the loss is a (cell l, concept m) pair. Layout conventions (all kernels take strides, so inputs may be any
strided view): weight W [M, C], features F [B, C, L], prompt embeddings E [B, L, D], text embeddings T [M, D];
batch means mu_q, mu_p and per-column sums/coefficients are contiguous [L, M] (fp64).

- ``forward_sums``: grid (L, M-blocks); each program streams the whole batch in BLOCK_B tiles, forms q and p tiles with
  ``tl.dot`` and accumulates S_ab, S_aa, S_bb, S_a2b3, S_a5 in fp64 registers: one writer per column, no atomics.
- ``grad_tile``: for one batch tile, recomputes q and p and writes g_q = a²(α b³ − β a³) − ḡ into a [tb, L, M] buffer
  (the only [tile, M·L] memory of the backward pass).
- ``accumulate_dweight``: dW[M, C] += Σ_{b,l} G[b, l, m]·F[b, c, l] (grid over dW blocks: one writer each).
- ``features_grad``: dF[b, c, l] = Σ_m G[b, l, m]·W[m, c] for the tile's rows.

fp32 inputs use IEEE-precision dots (no TF32): the loss cubes its inputs, which triples relative errors. Dots accumulate
in the inputs' dtype (float32 or float64). Offsets are int64: B·C·L exceeds 2^31 at ImageNet scale.
Launched by ``fastcbm.losses.launchers`` (grids, block sizes and signatures: its launch tables).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _qp_tile(W, F, E, T, offs_b, mask_b, l, offs_m, mask_m, C, D,
             s_wm, s_wc, s_fb, s_fc, s_fl, s_eb, s_el, s_ed, s_tm, s_td,
             BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """q[b, m] = Σ_c F[b, c, l]·W[m, c], p[b, m] = Σ_d E[b, l, d]·T[m, d] for one (batch tile, cell, concept block)."""
    ACC = W.dtype.element_ty  # the dots accumulate in the inputs' dtype
    rows_f = offs_b.to(tl.int64)[:, None] * s_fb + l * s_fl
    rows_e = offs_b.to(tl.int64)[:, None] * s_eb + l * s_el
    q = tl.zeros((BLOCK_B, BLOCK_M), dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        f = tl.load(F + rows_f + offs_c[None, :] * s_fc,
                    mask=mask_b[:, None] & mask_c[None, :], other=0.0)
        w = tl.load(W + offs_c[:, None] * s_wc + offs_m[None, :] * s_wm,
                    mask=mask_c[:, None] & mask_m[None, :], other=0.0)
        q += tl.dot(f, w, input_precision="ieee", out_dtype=ACC)
    p = tl.zeros((BLOCK_B, BLOCK_M), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        e = tl.load(E + rows_e + offs_d[None, :] * s_ed,
                    mask=mask_b[:, None] & mask_d[None, :], other=0.0)
        t = tl.load(T + offs_d[:, None] * s_td + offs_m[None, :] * s_tm,
                    mask=mask_d[:, None] & mask_m[None, :], other=0.0)
        p += tl.dot(e, t, input_precision="ieee", out_dtype=ACC)
    return q, p


@triton.jit
def _forward_sums_kernel(W, F, E, T, MU_Q, MU_P, SUMS, B, C, L, D, M,
                         s_wm, s_wc, s_fb, s_fc, s_fl, s_eb, s_el, s_ed, s_tm, s_td,
                         BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    l = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    K = L * M
    col = l * M + offs_m
    mu_q = tl.load(MU_Q + col, mask=mask_m, other=0.0)
    mu_p = tl.load(MU_P + col, mask=mask_m, other=0.0)
    s_ab = tl.zeros((BLOCK_M,), dtype=tl.float64)
    s_aa = tl.zeros((BLOCK_M,), dtype=tl.float64)
    s_bb = tl.zeros((BLOCK_M,), dtype=tl.float64)
    s_a2b3 = tl.zeros((BLOCK_M,), dtype=tl.float64)
    s_a5 = tl.zeros((BLOCK_M,), dtype=tl.float64)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask_b = offs_b < B
        q, p = _qp_tile(W, F, E, T, offs_b, mask_b, l, offs_m, mask_m, C, D,
                        s_wm, s_wc, s_fb, s_fc, s_fl, s_eb, s_el, s_ed, s_tm, s_td,
                        BLOCK_B, BLOCK_M, BLOCK_C, BLOCK_D)
        # Centre in fp64: a is a small difference of O(1) numbers and gets cubed.
        valid = mask_b[:, None] & mask_m[None, :]
        a = tl.where(valid, q.to(tl.float64) - mu_q[None, :], 0.0)
        b = tl.where(valid, p.to(tl.float64) - mu_p[None, :], 0.0)
        a2 = a * a
        a3 = a2 * a
        b3 = b * b * b
        s_ab += tl.sum(a3 * b3, axis=0)
        s_aa += tl.sum(a3 * a3, axis=0)
        s_bb += tl.sum(b3 * b3, axis=0)
        s_a2b3 += tl.sum(a2 * b3, axis=0)
        s_a5 += tl.sum(a3 * a2, axis=0)
    tl.store(SUMS + col, s_ab, mask=mask_m)
    tl.store(SUMS + K + col, s_aa, mask=mask_m)
    tl.store(SUMS + 2 * K + col, s_bb, mask=mask_m)
    tl.store(SUMS + 3 * K + col, s_a2b3, mask=mask_m)
    tl.store(SUMS + 4 * K + col, s_a5, mask=mask_m)


@triton.jit
def _grad_tile_kernel(W, F, E, T, MU_Q, MU_P, COEFS, G, TB, C, L, D, M,
                      s_wm, s_wc, s_fb, s_fc, s_fl, s_eb, s_el, s_ed, s_tm, s_td,
                      BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    # F and E point at the tile's first sample; G is a contiguous [TB, L, M] buffer.
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    l = tl.program_id(1)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_b = offs_b < TB
    mask_m = offs_m < M
    K = L * M
    col = l * M + offs_m
    q, p = _qp_tile(W, F, E, T, offs_b, mask_b, l, offs_m, mask_m, C, D,
                    s_wm, s_wc, s_fb, s_fc, s_fl, s_eb, s_el, s_ed, s_tm, s_td,
                    BLOCK_B, BLOCK_M, BLOCK_C, BLOCK_D)
    mu_q = tl.load(MU_Q + col, mask=mask_m, other=0.0)
    mu_p = tl.load(MU_P + col, mask=mask_m, other=0.0)
    alpha = tl.load(COEFS + col, mask=mask_m, other=0.0)
    beta = tl.load(COEFS + K + col, mask=mask_m, other=0.0)
    gbar = tl.load(COEFS + 2 * K + col, mask=mask_m, other=0.0)
    a = q.to(tl.float64) - mu_q[None, :]
    b = p.to(tl.float64) - mu_p[None, :]
    a2 = a * a
    g = a2 * (alpha[None, :] * (b * b * b) - beta[None, :] * (a2 * a)) - gbar[None, :]
    tl.store(G + offs_b.to(tl.int64)[:, None] * K + col[None, :], g.to(G.dtype.element_ty),
             mask=mask_b[:, None] & mask_m[None, :])


@triton.jit
def _dweight_kernel(G, F, DW, TB, C, L, M, s_fb, s_fc, s_fl,
                    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    # dW[m, c] += Σ_r G[r, m]·F[b(r), c, l(r)] over the tile's rows r = b·L + l; each program owns one dW block.
    ACC = F.dtype.element_ty  # the dots accumulate in the inputs' dtype
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_m = offs_m < M
    mask_c = offs_c < C
    R = TB * L
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        r64 = offs_r.to(tl.int64)
        gt = tl.load(G + r64[None, :] * M + offs_m[:, None], mask=mask_r[None, :] & mask_m[:, None], other=0.0)
        f = tl.load(F + (r64 // L)[:, None] * s_fb + (r64 % L)[:, None] * s_fl + offs_c[None, :] * s_fc,
                    mask=mask_r[:, None] & mask_c[None, :], other=0.0)
        acc += tl.dot(gt, f, input_precision="ieee", out_dtype=ACC)
    ptrs = DW + offs_m[:, None] * C + offs_c[None, :]
    mask = mask_m[:, None] & mask_c[None, :]
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + acc.to(DW.dtype.element_ty), mask=mask)


@triton.jit
def _dfeatures_kernel(G, W, DF, TB, C, L, M, s_wm, s_wc, s_db, s_dc, s_dl,
                      BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    # dF[b, c, l] = Σ_m G[r, m]·W[m, c] with r = b·L + l (DF points at the tile's first sample).
    ACC = W.dtype.element_ty  # the dots accumulate in the inputs' dtype
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    R = TB * L
    mask_r = offs_r < R
    mask_c = offs_c < C
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        g = tl.load(G + offs_r.to(tl.int64)[:, None] * M + offs_m[None, :], mask=mask_r[:, None] & mask_m[None, :],
                    other=0.0)
        w = tl.load(W + offs_m[:, None] * s_wm + offs_c[None, :] * s_wc,
                    mask=mask_m[:, None] & mask_c[None, :], other=0.0)
        acc += tl.dot(g, w, input_precision="ieee", out_dtype=ACC)
    r64 = offs_r.to(tl.int64)
    ptrs = DF + (r64 // L)[:, None] * s_db + (r64 % L)[:, None] * s_dl + offs_c[None, :] * s_dc
    tl.store(ptrs, acc.to(DF.dtype.element_ty), mask=mask_r[:, None] & mask_c[None, :])

