"""Linear heads on concept activations: SALF-CBM's sparse (GLM-SAGA elastic net) and dense final layers, kept apart from
the method because they fit any ``[N, M]`` concept activations.

Pipeline: concept maps ``[N, M, h, w]`` → :func:`pool_concept_maps` → ``[N, M]`` → :class:`Standardizer` (training
statistics) → :func:`fit_elastic_net_path` (GLM-SAGA elastic net, sparse) or :func:`fit_dense_head` → :func:`select`
→ :class:`LinearHead`. :func:`fit_sparse_head` does all of it in one call.
"""

from __future__ import annotations

from fastcbm.heads.dense import fit_dense_head
from fastcbm.heads.features import POOL_MODES, Standardizer, pool_concept_maps
from fastcbm.heads.linear import LinearHead, fit_sparse_head
from fastcbm.heads.sparse import (
    PathEntry,
    PathResult,
    elastic_net_objective,
    fit_elastic_net_path,
    lambda_max,
    select,
)

__all__ = [
    "POOL_MODES",
    "LinearHead",
    "PathEntry",
    "PathResult",
    "Standardizer",
    "elastic_net_objective",
    "fit_dense_head",
    "fit_elastic_net_path",
    "fit_sparse_head",
    "lambda_max",
    "pool_concept_maps",
    "select",
]
