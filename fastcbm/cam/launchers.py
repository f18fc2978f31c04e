"""Typed launchers of the cam op family's compiled backends, and the Triton launch table.

Every compiled backend computes the channel sum ``Σ_c weights·acts`` as ONE batched GEMM in torch (BLAS on CPU,
cuBLAS on GPU: no hand-written kernel beats them) into float32 ``[B·T, h, w]``, then runs a fused epilogue — ReLU,
bilinear resize, min-max — that never materialises the un-normalised or un-resized maps a second time:

- ``cpu``: C++/OpenMP epilogue (``fastcbm._C.cam_epilogue``), CPU tensors;
- ``triton``: Triton epilogue (``fastcbm.kernels.cam``), CUDA tensors (CPU under ``TRITON_INTERPRET=1``);
- ``cuda``: CUDA epilogue (``fastcbm._C_cuda.cam_epilogue``), CUDA tensors.

All take validated ``weights [B, T, C]`` and ``acts [B, C, h, w]`` (fp16/bf16/fp32, no gradient) and return
``[B, T, H, W]`` in the inputs' dtype.
"""

from __future__ import annotations

import torch

from fastcbm import _ext
from fastcbm.backends import triton_interpreted
from fastcbm.errors import InternalError
from fastcbm.triton_launch import TritonKernel, signatures

COMPILED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_EPILOGUE_PARAMS = ("raw_ptr", "out_ptr", "h", "w", "oh", "ow", "sy", "sx")
#: One program per map, looping over the output in blocks of BLOCK pixels.
EPILOGUE_KERNEL = TritonKernel(
    family="cam", name="_epilogue_kernel", params=_EPILOGUE_PARAMS,
    signatures=signatures(_EPILOGUE_PARAMS, raw_ptr="*fp32", out_ptr="*fp32", h="i32", w="i32", oh="i32", ow="i32",
                          sy="fp32", sx="fp32"),
    gpu=({"NORMALIZE": False, "BLOCK": 256}, {"NORMALIZE": True, "BLOCK": 256}),
    interpreter=({"NORMALIZE": False, "BLOCK": 256}, {"NORMALIZE": True, "BLOCK": 256}),
)
TRITON_KERNELS = (EPILOGUE_KERNEL,)


def _raw(weights: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """float32 ``[B·T, h, w]`` pre-ReLU maps from one batched GEMM."""
    b, c, h, w = acts.shape
    raw = torch.bmm(weights.float(), acts.float().reshape(b, c, h * w))
    return raw.reshape(b * weights.shape[1], h, w).contiguous()


def _prologue(weights: torch.Tensor, acts: torch.Tensor, device_type: str) -> torch.Tensor:
    if weights.dtype not in COMPILED_DTYPES or acts.dtype != weights.dtype:
        raise InternalError(f"launcher: expected fp16/bf16/fp32 weights and acts, got {weights.dtype}, {acts.dtype}")
    _ext.expect_device("weights", weights, device_type)
    _ext.expect_device("acts", acts, device_type)
    return _raw(weights, acts)


def fuse_cpu(weights: torch.Tensor, acts: torch.Tensor, size: tuple[int, int], normalize: bool) -> torch.Tensor:
    raw = _prologue(weights, acts, "cpu")
    out = torch.empty((raw.shape[0], *size), dtype=torch.float32)
    _ext.cpu_module().cam_epilogue(raw.numpy(), out.numpy(), bool(normalize))
    return out.reshape(*weights.shape[:2], *size).to(weights.dtype)


def fuse_triton(weights: torch.Tensor, acts: torch.Tensor, size: tuple[int, int], normalize: bool) -> torch.Tensor:
    interpreted = triton_interpreted()
    with _ext.on_device(weights.device):
        raw = _prologue(weights, acts, weights.device.type)
        n, h, w = raw.shape
        oh, ow = size
        out = torch.empty((n, oh, ow), dtype=torch.float32, device=raw.device)
        cx = next(c for c in EPILOGUE_KERNEL.constexpr_sets(interpreted) if c["NORMALIZE"] == bool(normalize))
        # the same float32 scale ATen uses (in / out), passed as a float so the index arithmetic matches
        EPILOGUE_KERNEL.launch((n,), (raw, out, h, w, oh, ow, float(h) / float(oh), float(w) / float(ow)), cx,
                               interpreted)
    return out.reshape(*weights.shape[:2], oh, ow).to(weights.dtype)


def fuse_cuda(weights: torch.Tensor, acts: torch.Tensor, size: tuple[int, int], normalize: bool) -> torch.Tensor:
    ext = _ext.cuda_module()
    with _ext.on_device(weights.device) as stream:
        raw = _prologue(weights, acts, "cuda")
        n, h, w = raw.shape
        oh, ow = size
        out = torch.empty((n, oh, ow), dtype=torch.float32, device=raw.device)
        ext.cam_epilogue(raw.data_ptr(), out.data_ptr(), n, h, w, oh, ow, bool(normalize), stream)
    return out.reshape(*weights.shape[:2], oh, ow).to(weights.dtype)
