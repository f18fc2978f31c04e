"""Triton kernel for ring prompts (``fastcbm.prompts.render_rings(..., backend="triton")``); launched by
``fastcbm.prompts.launchers`` (grid, block sizes and signatures: its ``RENDER_KERNEL`` table).

One program per (row = b·Gt + g, block of pixels): ring membership from one float64 addition of host-tabulated squared
offsets compared against float64 bounds (the same arithmetic as every backend, see fastcbm/prompts/reference.py),
then a gather from the float32 ``[3, 257]`` value table, cast to the output dtype on store.
"""

from __future__ import annotations

import triton
import triton.language as tl

# constexpr globals: compiled (non-interpreted) kernels may only read globals created with tl.constexpr.
TABLE_WIDTH = tl.constexpr(257)  # 256 pixel values + the ring colour
RING_INDEX = tl.constexpr(256)


@triton.jit
def _render_rings_kernel(
    img_ptr,  # uint8 [B, 3, S, S]
    dy2_ptr,  # float64 [Gt, S]
    dx2_ptr,  # float64 [Gt, S]
    bounds_ptr,  # float64 [2]: lo2, hi2 (a tensor: Python float arguments would be rounded to float32)
    table_ptr,  # float32 [3, 257]
    out_ptr,  # [B, Gt, 3, S, S] in the output dtype
    Gt,
    S,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    SS = S * S
    b = row // Gt
    g = row % Gt
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < SS
    y = offs // S
    x = offs % S
    # Masked loads everywhere: the interpreter does not bounds-check.
    d2 = tl.load(dy2_ptr + g * S + y, mask=m, other=0.0) + tl.load(dx2_ptr + g * S + x, mask=m, other=0.0)
    lo2 = tl.load(bounds_ptr)
    hi2 = tl.load(bounds_ptr + 1)
    on = (d2 >= lo2) & (d2 <= hi2)
    for c in tl.static_range(3):
        pix = tl.load(img_ptr + (b * 3 + c) * SS + offs, mask=m, other=0).to(tl.int32)
        idx = tl.where(on, RING_INDEX, pix)
        v = tl.load(table_ptr + c * TABLE_WIDTH + idx, mask=m, other=0.0)
        tl.store(out_ptr + (row * 3 + c) * SS + offs, v.to(out_ptr.dtype.element_ty), mask=m)

