"""Red-ring prompts: geometry, input checks and the pure-PyTorch reference (the definition).

Geometry (docs/design.md §3 "Red-circle prompts"). Pixel centres sit at integer coordinates; pixel (x, y) is on ring g
when |sqrt((x − cx_g)² + (y − cy_g)²) − r| ≤ w/2. Every backend evaluates this rule with the SAME float64 arithmetic
so that ring membership matches bit for bit, including pixels exactly on the boundary:

- per-axis squared offsets are tabulated on the host in float64: ``dy2[g, y] = (y − cy_g)·(y − cy_g)`` and
  ``dx2[g, x] = (x − cx_g)·(x − cx_g)`` (``RingPlan.dy2 / dx2``, shape ``[G, S]``);
- a kernel does exactly one float64 addition ``d2 = dy2[g, y] + dx2[g, x]`` (one correctly rounded operation, so
  no compiler can contract it into an FMA and change the result) and two comparisons
  ``lo2 ≤ d2 ≤ hi2`` with ``lo2 = (r − w/2)²`` (or −1 when r ≤ w/2: every inner pixel qualifies) and
  ``hi2 = (r + w/2)²``, both computed in float64 on the host.

Comparing squares instead of taking a square root is equivalent to the rule above for all pixels except ones within
a few float64 ulps of the boundary; for integer and half-integer centres with radii/widths that are small binary
fractions (the defaults, "paper" centres, "inset" centres at 224) the arithmetic is exact and pixels exactly on the
boundary count as on the ring. The test-suite checks the set against a per-pixel ``sqrt`` drawing.

Colours. Output values are ``(pixel/255 − mean[c]) / std[c]`` computed in float64, rounded to float32 and then to
``out_dtype`` (round to nearest even). Kernels read them from a ``[3, 257]`` float32 table (256 pixel values plus
the ring colour, pure red (255, 0, 0), at index 256), so every backend writes bit-identical values.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fastcbm.errors import InvalidArgument

from fastcbm.models.inputs import CLIP_MEAN, CLIP_STD  # noqa: E402,F401  (the one copy; re-exported)

#: Ring colour before normalisation (pure red), as 0..255 pixel values per channel.
RING_RGB: tuple[int, int, int] = (255, 0, 0)
#: Index of the ring colour in the ``[3, 257]`` value table.
RING_INDEX = 256

OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CENTER_MODES = ("inset", "paper")


# Rings per axis a run may ask for: 32×32 = 1,024 prompted copies of every image, 21× the published 7×7 (a
# 100×100 grid is 10,000 tower passes per image: hours per thousand images, gigabytes per batch).
MAX_GRID = 32


def default_ring_geometry(size: int) -> tuple[float, float]:
    """SALF-CBM ring geometry scaled to an encoder input of ``size`` pixels: ``(radius, width)``.

    The radius scales with the image, r = 32·size/224, and is NOT rounded (a float: 41.14… px at 288) so that the ring
    covers the same fraction of the image at every resolution; the width stays 2 px (a line, not an area: thicker
    lines at larger inputs would hide more of the object than the published setting does).
    """
    size = _check_size(size)
    return 32.0 * size / 224.0, 2.0


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InvalidArgument(f"size must be a positive int (image side in pixels), got {size!r}")
    return size


def _check_positive(name: str, value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"{name} must be a positive number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise InvalidArgument(f"{name} must be a positive finite number, got {value!r}")
    return v


def normalize_grid(grid: int | Sequence[int]) -> tuple[int, int]:
    """``grid`` as ``(rows, cols)``; an int means a square grid."""

    def as_int(v: object) -> int:
        if isinstance(v, bool):
            raise TypeError
        return operator.index(v)  # ints and numpy integers, not floats

    try:
        if not isinstance(grid, (tuple, list)):
            gy = gx = as_int(grid)
        elif len(grid) == 2:
            gy, gx = as_int(grid[0]), as_int(grid[1])
        else:
            raise TypeError
    except TypeError:
        raise InvalidArgument(f"grid must be an int or a pair (rows, cols) of ints, got {grid!r}") from None
    if gy < 1 or gx < 1:
        raise InvalidArgument(f"grid must be >= 1 along both axes, got {grid!r}")
    return gy, gx


def _axis_centers(size: int, n: int, radius: float, mode: str) -> list[float]:
    if mode == "inset":
        lo, hi = radius, size - 1 - radius
        if n == 1:
            return [(size - 1) / 2.0]  # a single ring goes in the middle (linspace would put it at the corner)
        return [lo + (hi - lo) * k / (n - 1) for k in range(n)]
    # "paper": k·⌊S/(G−1)⌋, integers; with one ring the step is irrelevant (k = 0 only).
    step = size // (n - 1) if n > 1 else 0
    return [float(k * step) for k in range(n)]


def ring_centers(
    size: int, grid: int | Sequence[int] = (7, 7), radius: float = 32, centers: str = "inset"
) -> torch.Tensor:
    """Ring centres ``[G, 2]`` as (y, x) float32 pixel coordinates, row-major (g = row·Gx + col).

    ``"inset"``: linspace(r, S−1−r, G) per axis (a single ring per axis is centred at (S−1)/2), every ring inside the
    image; requires 2r ≤ S−1. ``"paper"``: k·⌊S/(G−1)⌋ for k = 0..G−1 (rings may be clipped at the border).
    These float32 values are THE centres: all backends use them (promoted exactly to float64).
    """
    size = _check_size(size)
    gy, gx = normalize_grid(grid)
    r = _check_positive("radius", radius)
    if not isinstance(centers, str) or centers not in CENTER_MODES:
        raise InvalidArgument(f"centers must be one of {CENTER_MODES} or a float tensor [G, 2], got {centers!r}")
    if centers == "inset" and 2 * r > size - 1:
        raise InvalidArgument(
            f"radius={radius!r} is too large for centers='inset' at size {size}: rings need 2*radius <= size-1 "
            f"= {size - 1} to fit inside the image"
        )
    ys = _axis_centers(size, gy, r, centers)
    xs = _axis_centers(size, gx, r, centers)
    return torch.tensor([(y, x) for y in ys for x in xs], dtype=torch.float32).reshape(gy * gx, 2)


def _check_centers_tensor(centers: torch.Tensor) -> torch.Tensor:
    if not centers.is_floating_point() or centers.ndim != 2 or centers.shape[1] != 2 or centers.shape[0] < 1:
        raise InvalidArgument(
            f"centers tensor must be a float tensor [G, 2] of (y, x) with G >= 1, got dtype {centers.dtype} "
            f"shape {tuple(centers.shape)}"
        )
    c = centers.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(c).all()):
        raise InvalidArgument("centers tensor must contain only finite values")
    return c


def _check_mean_std(mean: Sequence[float] | None, std: Sequence[float] | None) -> tuple[list[float], list[float]]:
    out = []
    for name, val, default in (("mean", mean, 0.0), ("std", std, 1.0)):
        if val is None:
            out.append([default] * 3)
            continue
        try:
            vals = [float(v) for v in val]
        except (TypeError, ValueError):
            raise InvalidArgument(f"{name} must be a sequence of 3 numbers or None, got {val!r}") from None
        if len(vals) != 3:
            raise InvalidArgument(f"{name} must have 3 values (one per RGB channel), got {len(vals)}: {val!r}")
        if not all(math.isfinite(v) for v in vals):
            raise InvalidArgument(f"{name} must be finite, got {val!r}")
        if name == "std" and any(v == 0 for v in vals):
            raise InvalidArgument(f"std must not contain 0, got {val!r}")
        out.append(vals)
    return out[0], out[1]


def check_images(images: torch.Tensor) -> int:
    """Validate ``images`` (uint8 ``[B, 3, S, S]``) and return S."""
    if not isinstance(images, torch.Tensor):
        raise InvalidArgument(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise InvalidArgument(f"images must be uint8 (0..255 pixels in the encoder's input space), got {images.dtype}")
    if images.ndim != 4:
        raise InvalidArgument(f"images must have shape [B, 3, S, S], got rank {images.ndim} shape {tuple(images.shape)}")
    if images.shape[1] != 3:
        raise InvalidArgument(f"images must have 3 channels (RGB), got shape {tuple(images.shape)}")
    if images.shape[2] != images.shape[3]:
        raise InvalidArgument(f"images must be square [B, 3, S, S], got shape {tuple(images.shape)}")
    if images.shape[2] < 1:
        raise InvalidArgument(f"images must have S >= 1, got shape {tuple(images.shape)}")
    return int(images.shape[2])


@dataclass(frozen=True)
class RingPlan:
    """Everything a kernel needs, precomputed on the host (CPU tensors).

    ``dy2``/``dx2``: float64 ``[Gt, S]`` squared per-axis offsets; with ``include_plain`` row 0 of ``dy2`` is +inf so
    that slot never matches a ring. ``lo2``/``hi2``: float64 bounds on the squared distance. ``table``: float32
    ``[3, 257]`` normalised values of pixel 0..255 plus the ring colour at index 256.
    """

    dy2: torch.Tensor
    dx2: torch.Tensor
    lo2: float
    hi2: float
    table: torch.Tensor

    @property
    def bounds(self) -> torch.Tensor:
        """``[lo2, hi2]`` as a float64 tensor (Triton would round Python float arguments to float32)."""
        return torch.tensor([self.lo2, self.hi2], dtype=torch.float64)


def squared_offsets(size: int, centers64: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dy2, dx2)``: float64 ``[G, S]`` with ``(i − c)·(i − c)`` (a product, never pow, for exactness)."""
    i = torch.arange(size, dtype=torch.float64)
    dy = i[None, :] - centers64[:, 0:1]
    dx = i[None, :] - centers64[:, 1:2]
    return dy * dy, dx * dx


def ring_bounds(radius: float, width: float) -> tuple[float, float]:
    """``(lo2, hi2)`` in float64: a pixel is on the ring when lo2 ≤ d² ≤ hi2."""
    inner = radius - width / 2.0
    lo2 = inner * inner if inner > 0 else -1.0
    outer = radius + width / 2.0
    return lo2, outer * outer


def value_table(mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """float32 ``[3, 257]``: ``(v/255 − mean[c]) / std[c]`` for v = 0..255 (float64, then rounded), ring colour last."""
    v = torch.arange(256, dtype=torch.float64)[None, :].expand(3, 256)
    m = torch.tensor(mean, dtype=torch.float64)[:, None]
    s = torch.tensor(std, dtype=torch.float64)[:, None]
    vals = (v / 255.0 - m) / s
    red = torch.tensor(RING_RGB, dtype=torch.float64)[:, None]
    ring = (red / 255.0 - m) / s
    return torch.cat([vals, ring], dim=1).to(torch.float32).contiguous()


def resolve_centers(
    size: int, grid: int | Sequence[int], radius: float, centers: str | torch.Tensor
) -> torch.Tensor:
    """Centres as float64 ``[G, 2]`` (y, x) on the CPU, from a mode name or an explicit tensor."""
    if isinstance(centers, torch.Tensor):
        normalize_grid(grid)  # still validated, but the explicit centres define G
        return _check_centers_tensor(centers)
    return ring_centers(size, grid, radius, centers).to(torch.float64)


def make_plan(
    size: int,
    grid: int | Sequence[int],
    radius: float,
    width: float,
    centers: str | torch.Tensor,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    include_plain: bool,
) -> RingPlan:
    """Validate the prompt settings and precompute the kernel inputs (see :class:`RingPlan`)."""
    r = _check_positive("radius", radius)
    w = _check_positive("width", width)
    c64 = resolve_centers(size, grid, r, centers)
    m, s = _check_mean_std(mean, std)
    dy2, dx2 = squared_offsets(size, c64)
    if include_plain:
        dy2 = torch.cat([torch.full((1, size), math.inf, dtype=torch.float64), dy2])
        dx2 = torch.cat([torch.zeros((1, size), dtype=torch.float64), dx2])
    lo2, hi2 = ring_bounds(r, w)
    return RingPlan(dy2.contiguous(), dx2.contiguous(), lo2, hi2, value_table(m, s))


def plan_masks(plan: RingPlan) -> torch.Tensor:
    """bool ``[Gt, S, S]`` ring membership from a plan (the single float64 addition every kernel does)."""
    d2 = plan.dy2[:, :, None] + plan.dx2[:, None, :]
    return (d2 >= plan.lo2) & (d2 <= plan.hi2)


def render_rings_reference(
    images: torch.Tensor,
    plan: RingPlan,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Pure-PyTorch definition: uint8 ``[B, 3, S, S]`` → ``out_dtype`` ``[B, Gt, 3, S, S]``.

    Normalises in float64 (rounded to float32, then ``out_dtype``) and replaces ring pixels with the normalised red.
    """
    m, s = _check_mean_std(mean, std)
    dev = images.device
    m64 = torch.tensor(m, dtype=torch.float64, device=dev)[:, None, None]
    s64 = torch.tensor(s, dtype=torch.float64, device=dev)[:, None, None]
    norm = ((images.to(torch.float64) / 255.0 - m64) / s64).to(torch.float32)  # [B, 3, S, S]
    red = (torch.tensor(RING_RGB, dtype=torch.float64, device=dev)[:, None, None] / 255.0 - m64) / s64
    red = red.to(torch.float32)  # [3, 1, 1]
    masks = plan_masks(plan).to(dev)  # [Gt, S, S]
    out = torch.where(masks[None, :, None], red[None, None], norm[:, None])  # [B, Gt, 3, S, S]
    return out.to(out_dtype).contiguous()
