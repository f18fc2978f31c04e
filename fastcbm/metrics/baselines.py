"""The papers' evaluation loops, transcribed in plain Python/numpy: slow on purpose.

They are the oracles of the metrics tests and the baselines of ``bench/metrics.py`` (the authors' per-pixel loop and
a per-threshold loop); use :mod:`fastcbm.metrics` for real work.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def resized(maps: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """The documented resize, done independently: float32, bilinear, align_corners=False, none when sizes match."""
    x = maps.float()
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return x.numpy().astype(np.float32)


def naive_official_nra(x: np.ndarray, mask: np.ndarray) -> float:
    """The CE-FAM authors' per-pixel loop over np.argsort(x.ravel(), kind='stable')[::-1]."""
    flat, gt = x.ravel(), mask.ravel().astype(bool)
    order = np.argsort(flat, kind="stable")[::-1]
    n, m = flat.size, int(gt.sum())
    if m == 0:
        return 0.0
    step = n // 100
    tp = 0
    vea = upper = 0.0
    for idx, p in enumerate(order):
        tp += int(gt[p])
        fp = idx + 1 - tp
        if idx < step or idx % step == 0:
            unit = n if idx < step else 100
            vea += tp / (fp + m) / unit
            upper += (idx / m if idx < m else m / idx) / unit
    lower = m / n / 2
    if upper - lower <= 0:
        return 0.0
    return max(vea - lower, 0.0) / (upper - lower)


def loop_paper_nra(x: np.ndarray, mask: np.ndarray) -> float:
    """Per-threshold loop: T_p = value at rank ceil(p*HW/100), R_p = {x >= T_p}, trapezoid AUCs."""
    flat, gt = x.ravel().astype(np.float64), mask.ravel().astype(bool)
    n, m = flat.size, int(gt.sum())
    if m == 0:
        return 0.0
    desc = np.sort(flat)[::-1]
    ious, ideal = [0.0], [0.0]
    for p in range(1, 101):
        k = math.ceil(p * n / 100)
        region = flat >= desc[k - 1]
        inter = int((region & gt).sum())
        ious.append(inter / int((region | gt).sum()))
        ideal.append(min(k, m) / max(k, m))
    auc = sum((a + b) / 2 for a, b in zip(ious[:-1], ious[1:])) / 100
    auc_ideal = sum((a + b) / 2 for a, b in zip(ideal[:-1], ideal[1:])) / 100
    rand = m / n / 2
    if auc_ideal - rand <= 0:
        return 0.0
    return max(auc - rand, 0.0) / (auc_ideal - rand)


def loop_iou_curve(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    flat, gt = x.ravel(), mask.ravel().astype(bool)
    order = np.argsort(flat, kind="stable")[::-1]
    m, tp, out = int(gt.sum()), 0, []
    for k, p in enumerate(order, start=1):
        tp += int(gt[p])
        out.append(tp / (k + m - tp))
    return np.array(out)


def authors_epg(x: np.ndarray, mask: np.ndarray) -> float:
    """Min-max normalise, then Σ(norm·mask)/Σ norm (0 for a constant map)."""
    x = x.astype(np.float64)
    rng = x.max() - x.min()
    if rng == 0:
        return 0.0
    norm = (x - x.min()) / rng
    return float((norm * mask).sum() / norm.sum())
