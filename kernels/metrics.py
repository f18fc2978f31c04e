"""Triton kernels for the metrics op family (GPU path; runs in the interpreter under TRITON_INTERPRET=1).

Design: composite int64 keys (kernel a) + a segmented ``torch.sort`` on device give the exact pixel order; the AUC
epilogues (kernel b: official NRA from sorted mask bits, kernel c: paper NRA from 100 thresholds) and EPG (kernel d)
are one program per map, looping over the map in blocks and accumulating in float64.
Launched by ``fastcbm.metrics.launchers`` (grids, block sizes and signatures: its launch tables) on the prepared
buffers of ``fastcbm.metrics._common.prepare`` (float32 ``[N, n]``, contiguous).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _normalized_area(auc, ideal, m, nf):
    """NRA from the curve's area, the ideal curve's area and the mask size: max(AUC − rand, 0) / (ideal − rand), with
    rand = (m / n) / 2; 0 for an empty mask or a non-positive denominator (the documented degenerate cases)."""
    rand = m / nf / 2.0
    den = ideal - rand
    ok = (m > 0) & (den > 0)
    return tl.where(ok, tl.maximum(auc - rand, 0.0) / tl.where(ok, den, 1.0), 0.0)


@triton.jit(do_not_specialize=["n"])
def _keys_kernel(x_ptr, keys_ptr, n, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = col < n
    base = row.to(tl.int64) * n
    x = tl.load(x_ptr + base + col, mask=valid, other=0.0)
    x = tl.where(x == 0.0, 0.0, x)  # fold -0.0 into +0.0: they compare equal, so they must tie
    b = x.to(tl.int32, bitcast=True).to(tl.int64)
    ordered = tl.where(b < 0, b ^ 0x7FFFFFFF, b)  # order-preserving signed int of the float
    hi = -ordered - 1  # descending value
    key = hi * 4294967296 + (n - 1 - col).to(tl.int64)  # then descending flat index
    tl.store(keys_ptr + base + col, key, mask=valid)


@triton.jit(do_not_specialize=["n", "step"])
def _official_kernel(bits_ptr, out_ptr, n, step, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = row.to(tl.int64) * n
    m_acc = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, n, BLOCK):
        col = start + tl.arange(0, BLOCK)
        m_acc += tl.load(bits_ptr + base + col, mask=col < n, other=0).to(tl.int32)
    m = tl.sum(m_acc, axis=0).to(tl.float64)
    nf = n.to(tl.float64)
    vea = tl.zeros([BLOCK], dtype=tl.float64)
    upp = tl.zeros([BLOCK], dtype=tl.float64)
    carry = tl.sum(tl.zeros([BLOCK], dtype=tl.int32), axis=0)
    for start in range(0, n, BLOCK):
        col = start + tl.arange(0, BLOCK)
        valid = col < n
        bits = tl.load(bits_ptr + base + col, mask=valid, other=0).to(tl.int32)
        tp = (tl.cumsum(bits, axis=0) + carry).to(tl.float64)  # TP_{idx+1}
        carry += tl.sum(bits, axis=0)
        idx = col.to(tl.float64)
        # the authors' loop samples idx < step (weight 1/n) and idx = j*step, j >= 1 (weight 1/100)
        # explicit float64 tiles: mixing 0-d values with float literals in tl.where can demote to float32
        unit = tl.where(col < step, tl.full([BLOCK], 0.0, tl.float64) + nf, tl.full([BLOCK], 100.0, tl.float64))
        w = tl.where(valid & ((col < step) | (col % step == 0)), 1.0 / unit, tl.zeros([BLOCK], dtype=tl.float64))
        seg = tp / tl.maximum(idx + 1.0 - tp + m, 1.0)
        upper = tl.where(idx < m, idx / tl.maximum(m, 1.0), m / tl.maximum(idx, 1.0))
        vea += seg * w
        upp += upper * w
    auc = tl.sum(vea, axis=0)
    ideal = tl.sum(upp, axis=0)
    tl.store(out_ptr + row, _normalized_area(auc, ideal, m, nf))


@triton.jit(do_not_specialize=["n"])
def _paper_kernel(x_ptr, mask_ptr, thr_ptr, out_ptr, n, BLOCK: tl.constexpr, PB: tl.constexpr):
    row = tl.program_id(0)
    base = row.to(tl.int64) * n
    p = tl.arange(0, PB)
    pvalid = p < 100
    thr = tl.load(thr_ptr + row * 100 + p, mask=pvalid, other=float("inf"))
    region = tl.zeros([PB], dtype=tl.int32)
    inter = tl.zeros([PB], dtype=tl.int32)
    m_acc = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, n, BLOCK):
        col = start + tl.arange(0, BLOCK)
        valid = col < n
        v = tl.load(x_ptr + base + col, mask=valid, other=float("-inf"))
        bits = tl.load(mask_ptr + base + col, mask=valid, other=0).to(tl.int32)
        ge = ((v[:, None] >= thr[None, :]) & valid[:, None]).to(tl.int32)  # pixel in R_p (ties included)
        region += tl.sum(ge, axis=0)
        inter += tl.sum(ge * bits[:, None], axis=0)
        m_acc += bits
    m = tl.sum(m_acc, axis=0).to(tl.float64)
    nf = n.to(tl.float64)
    rf = region.to(tl.float64)
    tf = inter.to(tl.float64)
    iou = tl.where(pvalid, tf / tl.maximum(rf + m - tf, 1.0), 0.0)
    k = ((p.to(tl.int64) + 1) * n + 99) // 100
    kf = k.to(tl.float64)
    ideal_iou = tl.where(pvalid, tl.minimum(kf, m) / tl.maximum(tl.maximum(kf, m), 1.0), 0.0)
    last = p == 99
    # trapezoid with IoU_0 = 0 over 100 equal steps: (Σ_p IoU_p - IoU_100 / 2) / 100
    auc = (tl.sum(iou, axis=0) - 0.5 * tl.sum(tl.where(last, iou, 0.0), axis=0)) / 100.0
    ideal = (tl.sum(ideal_iou, axis=0) - 0.5 * tl.sum(tl.where(last, ideal_iou, 0.0), axis=0)) / 100.0
    tl.store(out_ptr + row, _normalized_area(auc, ideal, m, nf))


@triton.jit(do_not_specialize=["n"])
def _epg_kernel(x_ptr, mask_ptr, out_ptr, n, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = row.to(tl.int64) * n
    mn = tl.full([BLOCK], float("inf"), dtype=tl.float32)
    for start in range(0, n, BLOCK):
        col = start + tl.arange(0, BLOCK)
        mn = tl.minimum(mn, tl.load(x_ptr + base + col, mask=col < n, other=float("inf")))
    lo = tl.min(mn, axis=0).to(tl.float64)
    num = tl.zeros([BLOCK], dtype=tl.float64)
    den = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, n, BLOCK):
        col = start + tl.arange(0, BLOCK)
        valid = col < n
        v = tl.load(x_ptr + base + col, mask=valid, other=0.0).to(tl.float64)
        bits = tl.load(mask_ptr + base + col, mask=valid, other=0)
        d = tl.where(valid, v - lo, 0.0)  # (max - min) of the min-max normalisation cancels in the ratio
        den += d
        num += tl.where(bits != 0, d, 0.0)
    tot = tl.sum(den, axis=0)
    res = tl.where(tot > 0, tl.sum(num, axis=0) / tl.where(tot > 0, tot, 1.0), 0.0)
    tl.store(out_ptr + row, res)

