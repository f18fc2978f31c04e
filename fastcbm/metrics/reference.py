"""Pure-PyTorch reference implementations (the definitions) of the localisation metrics.

All functions here take the *prepared* inputs of :func:`fastcbm.metrics._common.prepare`: float32 values ``x`` of
shape ``[N, n]`` (n = H*W, already resized to the mask resolution) and a bool mask ``[N, n]``. They are vectorised
over N (processed in chunks to bound memory) and device-agnostic, so they also run on CUDA tensors.

Pixel order: value descending, ties by descending flat index (the reverse of a stable ascending argsort, i.e. the
deterministic reading of the authors' ``np.argsort(x.ravel())[::-1]``).
"""

from __future__ import annotations

import torch

from fastcbm.metrics._common import official_step

_CHUNK_ELEMENTS = 1 << 22  # maps per chunk * pixels: bounds the int64 temporaries (~32 MiB each)


def _chunks(n_maps: int, n_pixels: int):
    per = max(1, _CHUNK_ELEMENTS // max(n_pixels, 1))
    for start in range(0, n_maps, per):
        yield slice(start, min(start + per, n_maps))


def sorted_order(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Values ``[N, n]`` in metrics order and the flat pixel indices ``[N, n]`` that produce them."""
    n = x.shape[-1]
    # a stable descending sort of the index-reversed map puts, among equal values, the higher original index first
    vals, perm = torch.sort(x.flip(-1), dim=-1, descending=True, stable=True)
    return vals, (n - 1) - perm


def _true_positives(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted values ``[N, n]`` and TP_k = mask pixels among the first k pixels, ``[N, n]`` int64 (column k-1)."""
    vals, idx = sorted_order(x)
    return vals, torch.cumsum(mask.gather(1, idx).to(torch.int64), dim=1)


def _finish(auc: torch.Tensor, ideal: torch.Tensor, rand: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """NRA = max(AUC - rand, 0) / (AUC* - rand); 0 for an empty mask or a non-positive denominator."""
    den = ideal - rand
    ok = (m > 0) & (den > 0)
    safe = torch.where(ok, den, torch.ones_like(den))
    return torch.where(ok, (auc - rand).clamp_min(0) / safe, torch.zeros_like(den))


def nra_official(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Official (CE-FAM authors') NRA of prepared inputs ``[N, n]`` -> float64 ``[N]``. See ``fastcbm.metrics.nra``."""
    n_maps, n = x.shape
    step = official_step(n)
    # the authors' loop adds a point at idx < step (weight 1/n) and at idx = j*step, j >= 1 (weight 1/100)
    pos = torch.cat([torch.arange(step), torch.arange(step, n, step)]).to(x.device)
    unit = torch.where(pos < step, float(n), 100.0).to(torch.float64)  # n and 100 are exact in float32
    weight = 1.0 / unit
    posf = pos.to(torch.float64)
    out = torch.empty(n_maps, dtype=torch.float64, device=x.device)
    for sl in _chunks(n_maps, n):
        _, tp = _true_positives(x[sl], mask[sl])
        tp = tp[:, pos].to(torch.float64)  # TP_{idx+1}
        m = mask[sl].sum(1, dtype=torch.int64).to(torch.float64)[:, None]
        seg = tp / (posf + 1 - tp + m).clamp_min(1)  # = IoU_{idx+1}; clamp only guards m = 0 (then tp = 0)
        upper = torch.where(posf < m, posf / m.clamp_min(1), m / posf.clamp_min(1))
        auc = (seg * weight).sum(1)
        ideal = (upper * weight).sum(1)
        m = m[:, 0]
        out[sl] = _finish(auc, ideal, m / n / 2, m)
    return out


def paper_ranks(n: int, device: torch.device | None = None) -> torch.Tensor:
    """k_p = ceil(p * n / 100) for p = 1..100, int64 ``[100]`` (1-based ranks)."""
    p = torch.arange(1, 101, dtype=torch.int64, device=device)
    return (p * n + 99) // 100


def paper_from_counts(region: torch.Tensor, inter: torch.Tensor, m: torch.Tensor, n: int) -> torch.Tensor:
    """Paper NRA from |R_p| and |R_p ∩ M| (``[N, 100]``) and |M| (``[N]``) -> float64 ``[N]``."""
    region, inter = region.to(torch.float64), inter.to(torch.float64)
    mf = m.to(torch.float64)[:, None]
    iou = inter / (region + mf - inter).clamp_min(1)
    k = paper_ranks(n, region.device).to(torch.float64)[None, :]
    ideal_iou = torch.minimum(k, mf) / torch.maximum(k, mf)

    def trapezoid(y: torch.Tensor) -> torch.Tensor:  # x = 0, 0.01, ..., 1 with y_0 = 0
        prev = torch.cat([torch.zeros_like(y[:, :1]), y[:, :-1]], dim=1)
        return ((prev + y) * 0.5).sum(1) / 100

    return _finish(trapezoid(iou), trapezoid(ideal_iou), mf[:, 0] / n / 2, mf[:, 0])


def nra_paper(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Paper-variant NRA (top-p% thresholds, ties included, trapezoid AUC) -> float64 ``[N]``."""
    n_maps, n = x.shape
    ranks = paper_ranks(n, x.device) - 1
    out = torch.empty(n_maps, dtype=torch.float64, device=x.device)
    for sl in _chunks(n_maps, n):
        vals, tp = _true_positives(x[sl], mask[sl])
        thr = vals[:, ranks]  # T_p, [c, 100]
        # |{x >= T}|: pixels >= T form a prefix of the descending order; count them on the ascending copy
        region = n - torch.searchsorted(vals.flip(-1).contiguous(), thr.contiguous(), right=False)
        inter = tp.gather(1, region - 1)
        out[sl] = paper_from_counts(region, inter, mask[sl].sum(1), n)
    return out


def iou_curve(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """IoU_k for k = 1..n in metrics order -> float32 ``[N, n]`` (computed in float64); empty mask -> zeros."""
    n_maps, n = x.shape
    k = torch.arange(1, n + 1, device=x.device, dtype=torch.float64)
    out = torch.empty(n_maps, n, dtype=torch.float32, device=x.device)
    for sl in _chunks(n_maps, n):
        _, tp = _true_positives(x[sl], mask[sl])
        tp = tp.to(torch.float64)
        m = mask[sl].sum(1, dtype=torch.int64).to(torch.float64)[:, None]
        out[sl] = (tp / (k + m - tp)).to(torch.float32)
    return out


def epg(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Energy-based pointing game Σ((x-min)·mask) / Σ(x-min) -> float64 ``[N]``; constant map or empty mask -> 0."""
    xd = x.to(torch.float64)
    d = xd - xd.amin(dim=1, keepdim=True)
    num = (d * mask).sum(1)
    den = d.sum(1)
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(den))
