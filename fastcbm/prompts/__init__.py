"""Red-ring visual prompts for SALF-CBM (docs/design.md §3 "Red-circle prompts"): :func:`render_rings` and its geometry.

Public API; the dispatcher is :mod:`fastcbm.prompts.ops`, the definition :mod:`fastcbm.prompts.reference`.
"""

from fastcbm.prompts.ops import (
    CLIP_MEAN,
    CLIP_STD,
    MAX_GRID,
    OP,
    default_ring_geometry,
    render_rings,
    ring_centers,
    ring_masks,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "MAX_GRID",
    "OP",
    "default_ring_geometry",
    "render_rings",
    "ring_centers",
    "ring_masks",
]
