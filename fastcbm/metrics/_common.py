"""Input validation and the one shared resize helper for the metrics op family.

Every backend receives the output of :func:`prepare`: a contiguous float32 ``[N, H*W]`` map and a contiguous bool
``[N, H*W]`` mask. The resize happens here, once, so all backends rank exactly the same float32 values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastcbm.errors import InvalidArgument

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}"


def check_maps_masks(maps: torch.Tensor, masks: torch.Tensor, *, maps_name: str = "maps") -> None:
    """Raise ``InvalidArgument`` naming the argument unless maps is float ``[N, h, w]`` and masks bool ``[N, H, W]``."""
    if not isinstance(maps, torch.Tensor):
        raise InvalidArgument(f"{maps_name} must be a torch.Tensor, got {type(maps).__name__}")
    if not isinstance(masks, torch.Tensor):
        raise InvalidArgument(f"masks must be a torch.Tensor, got {type(masks).__name__}")
    if maps.dim() != 3:
        raise InvalidArgument(f"{maps_name} must have shape [N, h, w], got {_describe(maps)}")
    if maps.dtype not in FLOAT_DTYPES:
        raise InvalidArgument(f"{maps_name} must be fp16/bf16/fp32/fp64, got {_describe(maps)}")
    if masks.dim() != 3:
        raise InvalidArgument(f"masks must have shape [N, H, W], got {_describe(masks)}")
    if masks.dtype != torch.bool:
        raise InvalidArgument(f"masks must be a bool tensor, got {_describe(masks)} (convert 0/1 masks with masks.bool())")
    if maps.shape[0] != masks.shape[0]:
        raise InvalidArgument(f"{maps_name} and masks disagree on N: {maps_name} {_describe(maps)}, masks {_describe(masks)}")
    if maps.numel() == 0:
        raise InvalidArgument(f"{maps_name} is empty (N=0 or h*w=0): {_describe(maps)}")
    if masks.numel() == 0:
        raise InvalidArgument(f"masks is empty (N=0 or H*W=0): {_describe(masks)}")
    if maps.device != masks.device:
        raise InvalidArgument(f"{maps_name} is on {maps.device} but masks is on {masks.device}")


def check_finite(x: torch.Tensor, original: torch.Tensor, maps_name: str) -> None:
    """Raise unless the float32 values ``x`` (converted from ``original``) are all finite.

    Fast path: one float32 sum (~15x cheaper than an elementwise isfinite). NaN and inf propagate through a sum, so a
    finite sum proves every value finite; a non-finite sum (NaN/inf, or mere overflow) gets the exact check.
    """
    if bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all()):
        return
    if original.dtype == torch.float64 and bool(torch.isfinite(original).all()):
        raise InvalidArgument(f"{maps_name} overflows float32 ({_describe(original)})")
    raise InvalidArgument(f"{maps_name} contains NaN or inf ({_describe(original)})")


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[N, h, w]`` any float -> ``[N, H, W]`` float32; bilinear, align_corners=False, skipped when sizes match."""
    maps = maps.to(torch.float32)
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps.unsqueeze(1), size=tuple(size), mode="bilinear", align_corners=False).squeeze(1)
    return maps.contiguous()


def prepare(maps: torch.Tensor, masks: torch.Tensor, *, maps_name: str = "maps") -> tuple[torch.Tensor, torch.Tensor]:
    """Validate, resize once, flatten: returns float32 ``[N, H*W]`` values and bool ``[N, H*W]`` mask, contiguous."""
    check_maps_masks(maps, masks, maps_name=maps_name)
    n, h, w = masks.shape
    x = resize_maps(maps, (h, w)).reshape(n, h * w)
    check_finite(x, maps, maps_name)
    return x, masks.reshape(n, h * w).contiguous()


def official_step(n_pixels: int) -> int:
    """The authors' step ``HW // 100``; their loop (``idx % step``) needs at least 100 pixels."""
    if n_pixels < 100:
        raise InvalidArgument(
            f"masks has H*W={n_pixels} pixels; the official NRA (CE-FAM authors' formula, step = H*W // 100, "
            "then idx % step) needs H*W >= 100; use variant='paper' or larger masks"
        )
    return n_pixels // 100


def descending_keys(x: torch.Tensor) -> torch.Tensor:
    """int64 composite keys ``[N, n]`` whose ascending order is the metrics pixel order.

    High 32 bits: the float32 value mapped to an order-preserving int32 and negated (descending value); low 32 bits:
    ``n - 1 - index`` (ties: higher flat index first). ``x`` must be float32.
    """
    n = x.shape[-1]
    x = x + 0.0  # -0.0 + 0.0 == +0.0: the two compare equal, so they must get the same key
    bits = x.contiguous().view(torch.int32).to(torch.int64)
    # order-preserving signed int of an IEEE float: negative floats have their magnitude bits flipped
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    hi = -ordered - 1  # == ~ordered: reverses the order, stays inside int32
    low = (n - 1) - torch.arange(n, device=x.device, dtype=torch.int64)
    return hi * (1 << 32) + low


def key_index(keys: torch.Tensor, n: int) -> torch.Tensor:
    """Flat pixel index stored in the low bits of :func:`descending_keys` output (``n`` pixels per map)."""
    return (n - 1) - (keys & 0xFFFFFFFF)
