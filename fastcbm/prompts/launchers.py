"""Typed launchers for the ring-prompt kernels: check dtype/device/contiguity, allocate the output, call in.

All take a contiguous uint8 ``images`` ``[B, 3, S, S]`` and a :class:`~fastcbm.prompts.reference.RingPlan` and return
``[B, Gt, 3, S, S]`` in ``out_dtype``.
"""

from __future__ import annotations

import torch

from fastcbm import _ext
from fastcbm.prompts.reference import OUT_DTYPES, RingPlan
from fastcbm.errors import InvalidArgument

_OUT_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _check(images: torch.Tensor, plan: RingPlan, out_dtype: torch.dtype, device_type: str) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4 or not images.is_contiguous():
        raise InvalidArgument(f"images must be contiguous uint8 [B, 3, S, S], got {images.dtype} {tuple(images.shape)}")
    if images.device.type != device_type:
        raise InvalidArgument(f"images must be on {device_type}, got {images.device}")
    if out_dtype not in OUT_DTYPES:
        raise InvalidArgument(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    S = images.shape[2]
    if plan.dy2.shape[1] != S or plan.dx2.shape != plan.dy2.shape:
        raise InvalidArgument(f"plan was made for size {plan.dy2.shape[1]}, images have size {S}")


def _empty_out(images: torch.Tensor, plan: RingPlan, out_dtype: torch.dtype) -> torch.Tensor:
    B, _, S, _ = images.shape
    return torch.empty((B, plan.dy2.shape[0], 3, S, S), dtype=out_dtype, device=images.device)


def render_rings_cpu(images: torch.Tensor, plan: RingPlan, out_dtype: torch.dtype) -> torch.Tensor:
    """C++ (OpenMP) kernel on CPU tensors; half types are written through a uint16 view of the output."""
    _check(images, plan, out_dtype, "cpu")
    ext = _ext.cpu_ext()
    if ext is None:
        raise RuntimeError(f"the C++ extension is not available: {_ext.cpu_ext_error()}")
    out = _empty_out(images, plan, out_dtype)
    args = (images.numpy(), plan.dy2.numpy(), plan.dx2.numpy(), plan.lo2, plan.hi2, plan.table.numpy())
    if out_dtype == torch.float32:
        ext.prompts_render_f32(*args, out.numpy())
    else:
        ext.prompts_render_u16(*args, out.view(torch.uint16).numpy(), out_dtype == torch.bfloat16)
    return out


def _device_plan(plan: RingPlan, device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(device, non_blocking=True) for t in (plan.dy2, plan.dx2, plan.bounds, plan.table))


def render_rings_triton(images: torch.Tensor, plan: RingPlan, out_dtype: torch.dtype) -> torch.Tensor:
    """Triton kernel: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``."""
    _check(images, plan, out_dtype, images.device.type)
    from fastcbm.kernels.prompts import render_rings_triton as kernel  # lazy: importing triton is slow

    dy2, dx2, bounds, table = _device_plan(plan, images.device)
    out = _empty_out(images, plan, out_dtype)
    # Small blocks in the interpreter (it runs every program in numpy); large ones on a GPU.
    block = 256 if images.device.type == "cpu" else 1024
    return kernel(images, dy2, dx2, bounds, table, out, block=block)


def render_rings_cuda(images: torch.Tensor, plan: RingPlan, out_dtype: torch.dtype) -> torch.Tensor:
    """CUDA kernel on the current stream."""
    _check(images, plan, out_dtype, "cuda")
    ext = _ext.cuda_ext()
    if ext is None:
        raise RuntimeError(f"the CUDA extension is not available: {_ext.cuda_ext_error()}")
    with torch.cuda.device(images.device):
        dy2, dx2, _, table = _device_plan(plan, images.device)
        out = _empty_out(images, plan, out_dtype)
        B, _, S, _ = images.shape
        ext.prompts_render(
            images.data_ptr(), dy2.data_ptr(), dx2.data_ptr(), table.data_ptr(), out.data_ptr(),
            plan.lo2, plan.hi2, B, plan.dy2.shape[0], S, _OUT_KIND[out_dtype],
            torch.cuda.current_stream(images.device).cuda_stream,
        )
    return out
