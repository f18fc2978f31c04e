"""Triton kernel for the cam op family: the fused Grad-CAM epilogue (ReLU → bilinear resize, align_corners=False →
optional per-map min-max) over float32 maps ``raw [N, h, w]`` that the launcher produced with one batched GEMM
(cuBLAS through ``torch.bmm``: the channel sum is a plain GEMM, which Triton would not beat).

One program per map, looping over the output in blocks: pass 1 writes the resized map and reduces its min/max;
pass 2 (only with ``normalize``) recomputes each value from the raw map — instead of reading back what other threads
of the program stored — and rescales it. Runs in the interpreter under TRITON_INTERPRET=1 (tests, CPU).
Launched by ``fastcbm.cam.launchers`` (grid, block size and signature: its ``EPILOGUE_KERNEL`` table).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tap(dst, n_in, scale):
    """ATen's bilinear source index (align_corners=False): src = scale·(dst + 0.5) − 0.5 clamped at 0."""
    src = tl.maximum(scale * (dst.to(tl.float32) + 0.5) - 0.5, 0.0)
    i0 = tl.minimum(src.to(tl.int32), n_in - 1)
    i1 = tl.where(i0 < n_in - 1, i0 + 1, i0)
    l1 = src - i0.to(tl.float32)
    return i0, i1, 1.0 - l1, l1


@triton.jit
def _value(raw_ptr, base, k, valid, h, w, ow, sy, sx):
    i = k // ow
    j = k % ow
    y0, y1, a0, a1 = _tap(i, h, sy)
    x0, x1, b0, b1 = _tap(j, w, sx)
    v00 = tl.maximum(tl.load(raw_ptr + base + y0 * w + x0, mask=valid, other=0.0), 0.0)
    v01 = tl.maximum(tl.load(raw_ptr + base + y0 * w + x1, mask=valid, other=0.0), 0.0)
    v10 = tl.maximum(tl.load(raw_ptr + base + y1 * w + x0, mask=valid, other=0.0), 0.0)
    v11 = tl.maximum(tl.load(raw_ptr + base + y1 * w + x1, mask=valid, other=0.0), 0.0)
    return a0 * (b0 * v00 + b1 * v01) + a1 * (b0 * v10 + b1 * v11)


@triton.jit(do_not_specialize=["h", "w", "oh", "ow"])
def _epilogue_kernel(raw_ptr, out_ptr, h, w, oh, ow, sy, sx, NORMALIZE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * h * w
    obase = row * oh * ow
    n = oh * ow
    lo = tl.full([BLOCK], float("inf"), tl.float32)
    hi = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in range(0, n, BLOCK):
        k = start + tl.arange(0, BLOCK)
        valid = k < n
        v = _value(raw_ptr, base, k, valid, h, w, ow, sy, sx)
        tl.store(out_ptr + obase + k, v, mask=valid)
        lo = tl.minimum(lo, tl.where(valid, v, float("inf")))
        hi = tl.maximum(hi, tl.where(valid, v, float("-inf")))
    if NORMALIZE:
        mn = tl.min(lo, axis=0)
        span = tl.max(hi, axis=0) - mn
        inv = tl.where(span > 0.0, 1.0 / tl.where(span > 0.0, span, 1.0), 0.0)
        for start in range(0, n, BLOCK):
            k = start + tl.arange(0, BLOCK)
            valid = k < n
            v = _value(raw_ptr, base, k, valid, h, w, ow, sy, sx)
            tl.store(out_ptr + obase + k, (v - mn) * inv, mask=valid)

