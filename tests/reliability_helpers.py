"""Shared pieces of the reliability tests (issue 14): a tiny deterministic stand-in CLIP image tower that makes an
in-process precompute take a fraction of a second, a few tiny images, and whole-directory byte snapshots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SIZE = 16


class FakeCLIP(torch.nn.Module):
    """``encode_image(x [B, 3, S, S]) -> [B, dim]``: 4×4 average pool then a fixed random projection. Rows of images
    whose mean normalised value is above ``nan_over`` come out NaN (an encoder that overflows)."""

    def __init__(self, dim: int = 8, nan_over: float | None = None) -> None:
        super().__init__()
        self.visual = torch.nn.Module()
        self.visual.output_dim = dim
        self.visual.preprocess_cfg = {"size": SIZE, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
        g = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Parameter(torch.randn(3 * 16, dim, generator=g))
        self.nan_over = nan_over

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        f = F.adaptive_avg_pool2d(x.float(), 4).flatten(1) @ self.proj
        if self.nan_over is not None:
            f = torch.where((x.float().mean((1, 2, 3)) > self.nan_over)[:, None], torch.full_like(f, float("nan")), f)
        return f


RUN = {"model_name": "fake", "grid": 2, "radius": 3.0, "width": 2.0, "batch_size": 2, "shard_size": 2,
       "num_workers": 0, "progress": False, "device": "cpu", "loader": "torch"}


def make_images(root: Path, n: int = 6, bright: tuple[int, ...] = ()) -> Path:
    """``n`` random 20×20 PNGs under ``root/a`` and ``root/b`` (dark unless their index is in ``bright``)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / ("a" if i % 2 == 0 else "b")
        d.mkdir(parents=True, exist_ok=True)
        px = np.full((20, 20, 3), 255, np.uint8) if i in bright else rng.integers(0, 120, (20, 20, 3), dtype=np.uint8)
        Image.fromarray(px).save(d / f"{i:03d}.png")
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path (the writer lock file excluded: it only exists while running)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and p.name != ".lock"}


def flip_byte(path: Path, pos: int, bit: int = 0) -> None:
    b = bytearray(path.read_bytes())
    if not b:  # an empty (truncated) file has no byte to flip
        return
    b[pos % len(b)] ^= 1 << bit
    path.write_bytes(bytes(b))
