"""Evaluation metrics for concept explanations.

- Localisation (CE-FAM): :func:`nra` (Normalised Rank AUC, official or paper variant), :func:`iou_curve`,
  :func:`epg` (energy-based pointing game), :func:`hit_rate`.
- Zero-shot segmentation (Chefer et al. protocol, SALF-CBM): :func:`segmentation_scores` and the streaming
  :class:`SegmentationScores`.
"""

from __future__ import annotations

from fastcbm.metrics.ops import epg, hit_rate, iou_curve, nra
from fastcbm.metrics.segmentation import SegmentationScores, segmentation_scores

__all__ = ["nra", "iou_curve", "epg", "hit_rate", "segmentation_scores", "SegmentationScores"]
