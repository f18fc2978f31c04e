"""The cam op family: Grad-CAM fusion ``ReLU(Σ_c w·A)`` of many weight vectors at once, with optional bilinear
resize and min-max normalisation (used by CE-FAM's per-concept regions). See :func:`fuse`."""

from fastcbm.cam.ops import OP, fuse
from fastcbm.cam.reference import fuse_reference, minmax_normalize

__all__ = ["OP", "fuse", "fuse_reference", "minmax_normalize"]
