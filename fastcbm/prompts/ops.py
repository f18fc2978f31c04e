"""Red-ring visual prompts (docs/design.md §3 "Red-circle prompts"): public functions and dispatch.

``render_rings`` turns a batch of decoded uint8 images ``[B, 3, S, S]`` (already resized/cropped to the encoder's
input) into every prompted copy ``[B, G(+1), 3, S, S]``, normalised for the encoder and in its dtype, in one kernel:
only ring pixels differ between copies, so no per-prompt drawing or transform is needed.

Geometry and arithmetic (shared bit for bit by all backends) are documented in :mod:`fastcbm.prompts.reference`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastcbm import backends
from fastcbm.errors import InvalidArgument
from fastcbm.prompts import launchers
from fastcbm.prompts.reference import (
    CLIP_MEAN,
    CLIP_STD,
    OUT_DTYPES,
    check_images,
    MAX_GRID,
    default_ring_geometry,
    make_plan,
    plan_masks,
    render_rings_reference,
    ring_centers,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "MAX_GRID",
    "default_ring_geometry",
    "render_rings",
    "ring_centers",
    "ring_masks",
]

OP = "prompts.render_rings"


def _reference(images: torch.Tensor, plan, out_dtype: torch.dtype, mean, std, out=None) -> torch.Tensor:
    res = render_rings_reference(images, plan, mean, std, out_dtype)
    return res if out is None else out.copy_(res)


def _compiled(launcher):
    """A launcher as an implementation: the compiled kernels take the plan's value table, not mean/std."""
    return lambda images, plan, out_dtype, mean, std, out=None: launcher(images.contiguous(), plan, out_dtype, out)


backends.define_op(OP, {"default": {
    "reference": _reference,
    "cpu": _compiled(launchers.render_rings_cpu),
    "triton": _compiled(launchers.render_rings_triton),
    "cuda": _compiled(launchers.render_rings_cuda),
}})


def ring_masks(
    size: int,
    grid: int | Sequence[int] = (7, 7),
    radius: float | None = None,
    width: float = 2,
    centers: str | torch.Tensor = "inset",
) -> torch.Tensor:
    """bool ``[G, S, S]``: ``masks[g, y, x]`` is True where ring g covers pixel (x, y) (same rule as the kernels).

    ``radius`` None → ``default_ring_geometry(size)[0]`` (32 px at 224, scaled with the image)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InvalidArgument(f"size must be a positive int, got {size!r}")
    if radius is None:
        radius = default_ring_geometry(size)[0]
    plan = make_plan(size, grid, radius, width, centers, None, None, include_plain=False)
    return plan_masks(plan)


def render_rings(
    images: torch.Tensor,
    grid: int | Sequence[int] = (7, 7),
    radius: float | None = None,
    width: float = 2,
    centers: str | torch.Tensor = "inset",
    mean: Sequence[float] | None = CLIP_MEAN,
    std: Sequence[float] | None = CLIP_STD,
    out_dtype: torch.dtype = torch.float32,
    include_plain: bool = False,
    backend: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw a red ring at each grid position and normalise: uint8 ``[B, 3, S, S]`` → ``[B, G(+1), 3, S, S]``.

    Args:
        images: uint8 ``[B, 3, S, S]`` pixels in the encoder's input space (square; CPU or CUDA; any strides).
            An empty batch (B = 0) returns an empty ``[0, G(+1), 3, S, S]`` tensor.
        grid: ``(rows, cols)`` or an int for a square grid; prompt g = row·cols + col. Ignored when ``centers`` is
            a tensor (then G = ``centers.shape[0]``).
        radius: ring radius in pixels (float allowed); None (default) → ``default_ring_geometry(S)[0]``: 32 px at
            224, scaled with the image (9.14 px at 64), as precompute does.
        width: ring line width in pixels: pixel (x, y) is on the ring when |dist − radius| ≤ width/2.
        centers: ``"inset"`` (rings inside the image), ``"paper"`` (k·⌊S/(G−1)⌋), or a float tensor ``[G, 2]`` of
            (y, x) centres.
        mean, std: per-channel normalisation ``(pixel/255 − mean) / std``; None → 0 / 1 (values in [0, 1]).
        out_dtype: float32, float16 or bfloat16.
        include_plain: put the un-prompted normalised image at index 0 (for the global embedding E0).
        backend: ``"auto"`` (CPU tensors → C++, CUDA tensors → CUDA, then Triton), or an explicit backend name.
        out: write into this contiguous ``[B, G + include_plain, 3, S, S]`` tensor of ``out_dtype`` on the images'
            device (e.g. the encoder's reused input buffer) instead of allocating; it is returned.

    Returns:
        ``[B, G + include_plain, 3, S, S]`` contiguous, ``out_dtype``, on the images' device.
    """
    S = check_images(images)
    if out_dtype not in OUT_DTYPES:
        raise InvalidArgument(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype!r}")
    if radius is None:
        radius = default_ring_geometry(S)[0]
    plan = make_plan(S, grid, radius, width, centers, mean, std, bool(include_plain))
    if out is not None:
        _check_out(out, (images.shape[0], plan.dy2.shape[0], 3, S, S), out_dtype, images.device)
    impl = backends.resolve(OP, backend, images.device)
    return impl.fn(images, plan, out_dtype, mean, std, out)


def _check_out(out: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(out, torch.Tensor):
        raise InvalidArgument(f"out must be a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise InvalidArgument(f"out must be a contiguous {dtype} tensor of shape {list(shape)} on {device}, got "
                              f"{out.dtype} {list(out.shape)} on {out.device}"
                              f"{'' if out.is_contiguous() else ' (not contiguous)'}")
