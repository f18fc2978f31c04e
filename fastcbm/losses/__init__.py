"""Losses of fastcbm: the SALF-CBM / label-free CBM cubic-cosine loss (fused, never holding [B, M·L])."""

from __future__ import annotations

from fastcbm.losses.ops import OP, CubicCosineLossFunction, cubic_cosine_loss
from fastcbm.losses.reference import (
    EPS,
    cubic_cosine_loss_dense,
    cubic_cosine_loss_reference,
    cubic_cosine_similarity,
)

__all__ = [
    "EPS",
    "OP",
    "CubicCosineLossFunction",
    "cubic_cosine_loss",
    "cubic_cosine_loss_dense",
    "cubic_cosine_loss_reference",
    "cubic_cosine_similarity",
]
