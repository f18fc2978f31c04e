"""The Grad-CAM fusion op with backend dispatch.

Every backend computes the channel sum ``Σ_c weights·acts`` as ONE batched GEMM in torch (BLAS on CPU, cuBLAS on GPU:
no hand-written kernel beats them) into float32 ``[B·T, h, w]``, then runs a fused epilogue — ReLU, bilinear resize,
min-max — that never materialises the un-normalised or un-resized maps a second time:

- ``reference``: pure torch (``reference.py``, the definition, differentiable), any device and float dtype;
- ``cpu``: C++/OpenMP epilogue (``fastcbm._C.cam_epilogue``), CPU tensors;
- ``triton``: Triton epilogue (``fastcbm.kernels.cam``), CUDA tensors (CPU under ``TRITON_INTERPRET=1``);
- ``cuda``: CUDA epilogue (``fastcbm._C_cuda.cam_epilogue``), CUDA tensors.

The compiled backends are forward-only and take fp16/bf16/fp32 (computed in fp32). ``backend="auto"`` uses the
reference when a gradient is needed or for float64, so autograd always works; an explicit compiled backend refuses
inputs that require grad instead of silently cutting the graph.
"""

from __future__ import annotations

import torch

from fastcbm import _ext
from fastcbm.backends import select_backend
from fastcbm.cam.reference import fuse_reference
from fastcbm.errors import InvalidArgument

FUSE_BACKENDS = ("reference", "cpu", "triton", "cuda")
_COMPILED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(weights: torch.Tensor, acts: torch.Tensor, size) -> tuple[int, int] | None:
    if not isinstance(weights, torch.Tensor) or not isinstance(acts, torch.Tensor):
        raise InvalidArgument("fuse: weights and acts must be torch tensors")  # noqa: TRY004 (input error)
    if weights.dim() != 3:
        raise InvalidArgument(f"fuse: weights must be [B, T, C], got shape {tuple(weights.shape)}")
    if acts.dim() != 4:
        raise InvalidArgument(f"fuse: acts must be [B, C, h, w], got shape {tuple(acts.shape)}")
    if weights.shape[0] != acts.shape[0] or weights.shape[2] != acts.shape[1]:
        raise InvalidArgument(f"fuse: weights [B, T, C] = {tuple(weights.shape)} do not match acts [B, C, h, w] = "
                              f"{tuple(acts.shape)} (B and C must agree)")
    if not (weights.is_floating_point() and acts.is_floating_point()) or weights.dtype != acts.dtype:
        raise InvalidArgument(f"fuse: weights and acts must share one float dtype, got {weights.dtype} and {acts.dtype}")
    if weights.device != acts.device:
        raise InvalidArgument(f"fuse: weights and acts must be on one device, got {weights.device} and {acts.device}")
    if acts.shape[2] < 1 or acts.shape[3] < 1:
        raise InvalidArgument(f"fuse: acts maps must be at least 1x1, got shape {tuple(acts.shape)}")
    if size is None:
        return None
    try:
        out = (int(size[0]), int(size[1]))
        ok = len(size) == 2 and out[0] >= 1 and out[1] >= 1
    except (TypeError, ValueError, IndexError):
        ok = False
    if not ok:
        raise InvalidArgument(f"fuse: size must be None or (H, W) with H, W >= 1, got {size!r}")
    return out


def _raw(weights: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """float32 ``[B·T, h, w]`` pre-ReLU maps from one batched GEMM."""
    b, c, h, w = acts.shape
    raw = torch.bmm(weights.float(), acts.float().reshape(b, c, h * w))
    return raw.reshape(b * weights.shape[1], h, w).contiguous()


def fuse(weights: torch.Tensor, acts: torch.Tensor, *, size: tuple[int, int] | None = None, normalize: bool = False,
         backend: str = "auto") -> torch.Tensor:
    """Grad-CAM fusion of many weight vectors with one activation tensor per image.

    Args:
        weights: ``[B, T, C]`` channel weights (e.g. Grad-CAM β for T concepts).
        acts: ``[B, C, h, w]`` activations, same dtype and device as ``weights``; any strides.
        size: ``None`` (keep ``h × w``) or ``(H, W)``: bilinear resize after the ReLU (align_corners=False).
        normalize: per-map min-max to [0, 1] after the resize; a constant map (e.g. all zero) becomes all zero.
        backend: ``"auto"`` or one of ``reference``, ``cpu``, ``triton``, ``cuda``.

    Returns:
        ``[B, T, h, w]`` or ``[B, T, H, W]`` in the inputs' dtype: ReLU(Σ_c weights[b,t,c]·acts[b,c]) [resized]
        [normalised].
    """
    out_size = _check(weights, acts, size)
    b, t = weights.shape[:2]
    h, w = acts.shape[2:]
    oh, ow = out_size if out_size is not None else (h, w)
    needs_grad = torch.is_grad_enabled() and (weights.requires_grad or acts.requires_grad)
    compiled_ok = weights.dtype in _COMPILED_DTYPES and not needs_grad
    if backend == "auto" and not compiled_ok:
        chosen = "reference"
    else:
        chosen = select_backend("cam.fuse", backend, weights.device, FUSE_BACKENDS)
    if chosen == "reference":
        return fuse_reference(weights, acts, out_size, normalize)
    if needs_grad:
        raise InvalidArgument(f"fuse: backend {chosen!r} is forward-only and the inputs require grad; use "
                              "backend='reference' (or 'auto') to differentiate")
    if weights.dtype not in _COMPILED_DTYPES:
        raise InvalidArgument(f"fuse: backend {chosen!r} takes float16/bfloat16/float32, got {weights.dtype}")
    if b * t == 0:
        return torch.zeros((b, t, oh, ow), dtype=weights.dtype, device=weights.device)
    raw = _raw(weights, acts)
    if chosen == "cpu":
        out = torch.empty((b * t, oh, ow), dtype=torch.float32)
        _ext.cpu_ext().cam_epilogue(raw.numpy(), out.numpy(), bool(normalize))
    elif chosen == "triton":
        from fastcbm.kernels import (
            cam as tk,  # lazy: `import fastcbm` never imports triton
        )

        out = tk.epilogue(raw, (oh, ow), normalize)
    else:
        out = torch.empty((b * t, oh, ow), dtype=torch.float32, device=raw.device)
        _ext.cuda_ext().cam_epilogue(raw.data_ptr(), out.data_ptr(), b * t, h, w, oh, ow, bool(normalize),
                                     torch.cuda.current_stream(raw.device).cuda_stream)
    return out.reshape(b, t, oh, ow).to(weights.dtype)


__all__ = ["FUSE_BACKENDS", "fuse"]
