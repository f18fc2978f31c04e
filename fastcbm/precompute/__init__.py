"""Precompute: images → red-ring prompts → CLIP image tower → unit embeddings (and optional backbone feature maps or
CE-FAM stage activations) in a sharded, resumable cache. Shared by SALF-CBM (prompt embeddings + feature maps) and
CE-FAM (global embeddings + pooled stages, ``grid=0``).

- :mod:`fastcbm.precompute.config`: :class:`PrecomputeConfig`, every setting and its default;
- :mod:`fastcbm.precompute.run`: :func:`precompute`, the job (shards, resume, torchrun ranks);
- :mod:`fastcbm.precompute.encoder`: :class:`PromptEncoder`, prompts → tower → rows;
- :mod:`fastcbm.precompute.sources`: the extra arrays (backbone features, CE-FAM stages).
"""

from __future__ import annotations

from fastcbm.models.inputs import encoder_input_config
from fastcbm.precompute.config import PrecomputeConfig, resolve_dtype
from fastcbm.precompute.encoder import PromptEncoder
from fastcbm.precompute.run import precompute
from fastcbm.precompute.sources import backbone_feature_fn, cefam_stage_fn

__all__ = ["PrecomputeConfig", "PromptEncoder", "backbone_feature_fn", "cefam_stage_fn", "encoder_input_config",
           "precompute", "resolve_dtype"]
