"""From concept maps to the features a linear head sees: spatial pooling and standardisation.

Shared by SALF-CBM (pooled concept maps), CE-FAM and DEAL (concept scores): plain tensors in, plain tensors out.
"""

from __future__ import annotations

import torch
from torch import nn

from fastcbm.errors import InvalidArgument

POOL_MODES = ("mean", "softmax")


def pool_concept_maps(maps: torch.Tensor, mode: str = "mean", temperature: float = 1.0) -> torch.Tensor:
    """Pool concept maps ``[N, M, h, w]`` or ``[N, M, L]`` (L = h·w cells) into concept activations ``[N, M]``.

    ``mode="mean"``: the average over cells (SALF-CBM paper).
    ``mode="softmax"``: Σ_cells softmax(x/τ)·x, a soft maximum as in the authors' released model; τ → 0 tends to the
    max over cells, τ → ∞ to the mean. ``temperature`` is τ (> 0). Differentiable; runs on any device and dtype
    (half inputs are pooled in float32 and cast back, so the softmax does not lose precision).
    """
    if not isinstance(maps, torch.Tensor):
        raise InvalidArgument(f"maps must be a torch.Tensor, got {type(maps).__name__}")
    if maps.dim() not in (3, 4):
        raise InvalidArgument(f"maps must have shape [N, M, h, w] or [N, M, L], got shape {tuple(maps.shape)}")
    if not maps.is_floating_point():
        raise InvalidArgument(f"maps must be a floating-point tensor, got dtype {maps.dtype}")
    if mode not in POOL_MODES:
        raise InvalidArgument(f"mode must be one of {POOL_MODES}, got {mode!r}")
    if not temperature > 0:
        raise InvalidArgument(f"temperature must be > 0, got {temperature!r}")
    cells = maps.flatten(2)  # [N, M, L]
    if cells.shape[-1] == 0:
        raise InvalidArgument(f"maps has no spatial cells (shape {tuple(maps.shape)})")
    if mode == "mean":
        return cells.mean(dim=-1)
    work = cells.float() if cells.dtype in (torch.float16, torch.bfloat16) else cells
    weights = torch.softmax(work / temperature, dim=-1)
    return (weights * work).sum(dim=-1).to(maps.dtype)


class Standardizer(nn.Module):
    """Per-concept standardisation with training statistics: ``(x − mean) / max(std, eps)``.

    Buffers ``mean [M]`` and ``std [M]`` (std already floored) travel with ``.to(device)`` and ``state_dict``. The
    floor keeps constant (dead) concepts from blowing up: they map to 0 instead of ±inf.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        if num_features < 1:
            raise InvalidArgument(f"num_features must be >= 1, got {num_features}")
        if not eps > 0:
            raise InvalidArgument(f"eps must be > 0, got {eps!r}")
        self.eps = float(eps)
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))
        self.fitted = False

    @property
    def num_features(self) -> int:
        return self.mean.shape[0]

    @classmethod
    def fit(cls, features: torch.Tensor, eps: float = 1e-5, chunk_size: int = 65536) -> "Standardizer":
        """Fit on training features ``[N, M]`` (population std, accumulated in float64 over row chunks)."""
        _check_features(features, "features")
        if features.shape[0] < 1:
            raise InvalidArgument("features must have at least one row")
        n, m = features.shape
        total = torch.zeros(m, dtype=torch.float64, device=features.device)
        for start in range(0, n, chunk_size):
            total += features[start:start + chunk_size].double().sum(0)
        mean = total / n
        # Second pass around the mean: the one-pass E[x²]−E[x]² cancels badly for large offsets.
        sq = torch.zeros(m, dtype=torch.float64, device=features.device)
        for start in range(0, n, chunk_size):
            sq += (features[start:start + chunk_size].double() - mean).square().sum(0)
        std = (sq / n).sqrt().clamp_min(eps)
        out = cls(m, eps=eps).to(features.device)
        out.mean.copy_(mean)
        out.std.copy_(std)
        out.fitted = True
        return out

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        """Standardise ``[N, M]`` features (any leading shape with M last); returns the input's dtype."""
        if not isinstance(features, torch.Tensor) or features.shape[-1:] != self.mean.shape:
            got = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise InvalidArgument(f"features must have last dimension {self.num_features}, got {got}")
        mean = self.mean.to(features.device, features.dtype)
        std = self.std.to(features.device, features.dtype)
        return (features - mean) / std

    forward = transform

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: D401 - torch hook
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.fitted = True

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], eps: float = 1e-5) -> "Standardizer":
        """Rebuild from ``state_dict()`` (shapes are taken from the saved buffers)."""
        if "mean" not in state or "std" not in state:
            raise InvalidArgument(f"state must contain 'mean' and 'std', got keys {sorted(state)}")
        out = cls(state["mean"].shape[0], eps=eps)
        out.load_state_dict(state)
        return out

    def extra_repr(self) -> str:
        return f"num_features={self.num_features}, eps={self.eps}"


def _check_features(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise InvalidArgument(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise InvalidArgument(f"{name} must have shape [N, M], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InvalidArgument(f"{name} must be floating point, got dtype {x.dtype}")
