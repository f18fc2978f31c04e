"""The Grad-CAM fusion op: validation, the op table and dispatch.

``reference`` (pure torch, ``reference.py``, the definition, differentiable) runs on any device and float dtype; the
compiled backends (``launchers.py``: one batched GEMM in torch + a fused C++ / Triton / CUDA epilogue) are
forward-only and take fp16/bf16/fp32 (computed in fp32). So the op has two variants: ``forward`` (no gradient needed,
fp16/bf16/fp32: every backend) and ``autograd`` (an input requires grad, or float64: the reference only).
``backend="auto"`` therefore uses the reference whenever a gradient is needed, so autograd always works, and an
explicit compiled backend refuses such inputs (``BackendUnavailableError``) instead of silently cutting the graph.
"""

from __future__ import annotations

import torch

from fastcbm import backends
from fastcbm.cam import launchers as L
from fastcbm.cam.reference import fuse_reference
from fastcbm.errors import InvalidArgument

OP = "cam.fuse"
backends.define_op(OP, {
    "forward": {"reference": fuse_reference, "cpu": L.fuse_cpu, "triton": L.fuse_triton, "cuda": L.fuse_cuda},
    "autograd": {"reference": fuse_reference},
}, notes={"autograd": "inputs that require grad, or float64: the compiled backends are forward-only"})


def _check(weights: torch.Tensor, acts: torch.Tensor, size) -> tuple[int, int] | None:
    if not isinstance(weights, torch.Tensor) or not isinstance(acts, torch.Tensor):
        raise InvalidArgument("fuse: weights and acts must be torch tensors")
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
    needs_grad = torch.is_grad_enabled() and (weights.requires_grad or acts.requires_grad)
    variant = "forward" if weights.dtype in L.COMPILED_DTYPES and not needs_grad else "autograd"
    impl = backends.resolve(OP, backend, weights.device, variant)
    oh, ow = out_size if out_size is not None else (h, w)
    if b * t == 0:
        return torch.zeros((b, t, oh, ow), dtype=weights.dtype, device=weights.device)
    return impl.fn(weights, acts, (oh, ow), bool(normalize))


__all__ = ["OP", "fuse"]
