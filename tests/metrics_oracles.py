"""Loop oracles for the metrics tests (they live in the package so bench/metrics.py uses the same ones)."""

from fastcbm.metrics.baselines import authors_epg, loop_iou_curve, loop_paper_nra, naive_official_nra, resized  # noqa: F401
