"""Pure-PyTorch definition of the Grad-CAM fusion op (differentiable; every other backend is tested against it).

``fuse(weights [B, T, C], acts [B, C, h, w])`` = ReLU(Σ_c weights[b, t, c]·acts[b, c]) → ``[B, T, h, w]``, then
optionally a bilinear resize to ``size`` (align_corners=False, as ``F.interpolate``), then optionally a per-map
min-max normalisation to [0, 1] where a map with max == min (e.g. all zero after the ReLU) becomes all zero.
Computed in float32 at least (fp16/bf16 inputs are upcast), returned in the inputs' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the op computes in: float64 stays, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def minmax_normalize(maps: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """Per-map min-max over the last two dims ``[..., H, W]`` → [0, 1]: the one min-max of fastcbm.

    ``eps=None``: ``(x − min) / (max − min)``, a constant map (max == min) becomes 0 (reports, segmentation, CE-FAM).
    ``eps`` given: ``(x − min) / (max − min + eps)``, the DEAL authors' form (differentiable everywhere, so their
    regularisers use it with eps = 1e-8)."""
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    span = maps.amax(dim=(-2, -1), keepdim=True) - lo
    if eps is not None:
        return (maps - lo) / (span + eps)
    ok = span > 0
    return torch.where(ok, (maps - lo) / torch.where(ok, span, torch.ones_like(span)), torch.zeros_like(maps))


def fuse_reference(weights: torch.Tensor, acts: torch.Tensor, size: tuple[int, int] | None = None,
                   normalize: bool = False) -> torch.Tensor:
    """The definition (see the module docstring); inputs already validated by :func:`fastcbm.cam.fuse`."""
    dtype = compute_dtype(weights.dtype)
    b, c, h, w = acts.shape
    if b * weights.shape[1] == 0:
        return torch.zeros((b, weights.shape[1], *(size or (h, w))), dtype=weights.dtype, device=weights.device)
    raw = torch.bmm(weights.to(dtype), acts.to(dtype).reshape(b, c, h * w))  # [B, T, h*w]
    maps = F.relu(raw).reshape(b, weights.shape[1], h, w)
    if size is not None and tuple(size) != (h, w):
        maps = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
    if normalize:
        maps = minmax_normalize(maps)
    return maps.to(weights.dtype)
