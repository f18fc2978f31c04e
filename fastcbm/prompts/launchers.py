"""Typed launchers for the ring-prompt kernels: check dtype/device/contiguity, allocate the output, enter the images'
device, call in; and the Triton launch table (:data:`TRITON_KERNELS`).

All take a contiguous uint8 ``images`` ``[B, 3, S, S]`` and a :class:`~fastcbm.prompts.reference.RingPlan` and return
``[B, Gt, 3, S, S]`` in ``out_dtype``: written into ``out`` when given (the encoder's input buffer), else allocated.
"""

from __future__ import annotations

import torch

from fastcbm import _ext
from fastcbm.backends import triton_interpreted
from fastcbm.errors import InternalError
from fastcbm.prompts.reference import OUT_DTYPES, RingPlan
from fastcbm.triton_launch import TYPE_NAMES, TritonKernel, signatures

_OUT_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_RENDER_PARAMS = ("img_ptr", "dy2_ptr", "dx2_ptr", "bounds_ptr", "table_ptr", "out_ptr", "Gt", "S")
#: One program per (image·prompt row, block of pixels); large blocks on a GPU, small ones in the interpreter.
RENDER_KERNEL = TritonKernel(
    family="prompts", name="_render_rings_kernel", params=_RENDER_PARAMS,
    signatures=signatures(_RENDER_PARAMS, *({"out_ptr": "*" + TYPE_NAMES[d]} for d in OUT_DTYPES),
                          img_ptr="*u8", dy2_ptr="*fp64", dx2_ptr="*fp64", bounds_ptr="*fp64", table_ptr="*fp32",
                          Gt="i32", S="i32"),
    gpu=({"BLOCK": 1024},), interpreter=({"BLOCK": 256},),
)
TRITON_KERNELS = (RENDER_KERNEL,)


def _check(images: torch.Tensor, plan: RingPlan, out_dtype: torch.dtype, device_type: str) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4 or not images.is_contiguous():
        raise InternalError(f"launcher: expected contiguous uint8 images [B, 3, S, S], got {images.dtype} "
                            f"{tuple(images.shape)}")
    _ext.expect_device("images", images, device_type)
    if out_dtype not in OUT_DTYPES:
        raise InternalError(f"launcher: out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    S = images.shape[2]
    if plan.dy2.shape[1] != S or plan.dx2.shape != plan.dy2.shape:
        raise InternalError(f"launcher: plan was made for size {plan.dy2.shape[1]}, images have size {S}")


def _empty_out(images: torch.Tensor, plan: RingPlan, out_dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    """``out`` (the caller's buffer, checked by the dispatcher) or a new ``[B, Gt, 3, S, S]`` tensor."""
    B, _, S, _ = images.shape
    shape = (B, plan.dy2.shape[0], 3, S, S)
    if out is None:
        return torch.empty(shape, dtype=out_dtype, device=images.device)
    if tuple(out.shape) != shape or out.dtype != out_dtype or out.device != images.device or not out.is_contiguous():
        raise InternalError(f"launcher: out must be contiguous {out_dtype} {list(shape)}, got {out.dtype} "
                            f"{list(out.shape)}")
    return out


def render_rings_cpu(images: torch.Tensor, plan: RingPlan, out_dtype: torch.dtype,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """C++ (OpenMP) kernel on CPU tensors; half types are written through a uint16 view of the output."""
    _check(images, plan, out_dtype, "cpu")
    ext = _ext.cpu_module()
    out = _empty_out(images, plan, out_dtype, out)
    args = (images.numpy(), plan.dy2.numpy(), plan.dx2.numpy(), plan.lo2, plan.hi2, plan.table.numpy())
    if out_dtype == torch.float32:
        ext.prompts_render_f32(*args, out.numpy())
    else:
        ext.prompts_render_u16(*args, out.view(torch.uint16).numpy(), out_dtype == torch.bfloat16)
    return out


def _device_plan(plan: RingPlan, device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(device, non_blocking=True) for t in (plan.dy2, plan.dx2, plan.bounds, plan.table))


def render_rings_triton(images: torch.Tensor, plan: RingPlan, out_dtype: torch.dtype,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton kernel: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``."""
    _check(images, plan, out_dtype, images.device.type)
    interpreted = triton_interpreted()
    with _ext.on_device(images.device):
        dy2, dx2, bounds, table = _device_plan(plan, images.device)
        out = _empty_out(images, plan, out_dtype, out)
        B, _, S, _ = images.shape
        Gt = dy2.shape[0]
        if B * Gt == 0:
            return out
        constexprs = RENDER_KERNEL.constexpr_sets(interpreted)[0]
        grid = (B * Gt, -(-S * S // constexprs["BLOCK"]))
        RENDER_KERNEL.launch(grid, (images, dy2, dx2, bounds, table, out, Gt, S), constexprs, interpreted)
    return out


def render_rings_cuda(images: torch.Tensor, plan: RingPlan, out_dtype: torch.dtype,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """CUDA kernel on the images' device and its current stream."""
    _check(images, plan, out_dtype, "cuda")
    ext = _ext.cuda_module()
    with _ext.on_device(images.device) as stream:
        dy2, dx2, _, table = _device_plan(plan, images.device)
        out = _empty_out(images, plan, out_dtype, out)
        B, _, S, _ = images.shape
        ext.prompts_render(
            images.data_ptr(), dy2.data_ptr(), dx2.data_ptr(), table.data_ptr(), out.data_ptr(),
            plan.lo2, plan.hi2, B, plan.dy2.shape[0], S, _OUT_KIND[out_dtype], stream,
        )
    return out
