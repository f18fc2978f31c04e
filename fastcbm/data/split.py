"""Seeded row selections shared by every method: a train/validation split of a cache's rows and a fixed subset."""

from __future__ import annotations

import torch

from fastcbm.errors import InvalidArgument


def subset_rows(n: int, limit: int, seed: int) -> torch.Tensor:
    """All of ``0..n-1`` when ``n <= limit``, else a seeded sorted random subset of ``limit`` rows."""
    if n <= limit:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values


def split_rows(n: int, val_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random train/validation split of ``n`` rows → (train rows, val rows), both sorted."""
    if not 0 < val_fraction < 1:
        raise InvalidArgument(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = int(round(n * val_fraction))
    if n_val < 2 or n - n_val < 2:
        raise InvalidArgument(f"val_fraction {val_fraction} of {n} images leaves fewer than 2 images on one side")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values
