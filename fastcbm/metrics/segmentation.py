"""Zero-shot segmentation scores (Chefer et al. protocol, as used by SALF-CBM).

Per image: upsample the heatmap bilinearly to the mask size (the shared ``resize_maps`` helper), min-max normalise
(a constant map becomes all zeros), predict foreground where the normalised map R exceeds its own mean (mean taken in
float64). Over the set: pixel accuracy = Σcorrect / Σpixels; mIoU = mean over {background, foreground} of
Σintersection / Σunion (a class whose accumulated union is 0 is left out of the mean); mAP = mean over images of the
average precision of the 2·H·W scores [1 - R, R] against the one-hot labels [1 - mask, mask], with scikit-learn's
``average_precision_score`` semantics (step-wise precision at each distinct score, ties grouped).
"""

from __future__ import annotations

import torch

from fastcbm.errors import InvalidArgument
from fastcbm.metrics._common import check_finite, check_maps_masks, resize_maps

_CHUNK_ELEMENTS = 1 << 21


def normalised_heatmaps(heatmaps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[N, h, w]`` -> float32 ``[N, H, W]`` in [0, 1]: resized, per-image min-max normalised (constant -> 0)."""
    r = resize_maps(heatmaps, size)
    check_finite(r, heatmaps, "heatmaps")
    from fastcbm.cam.reference import minmax_normalize

    return minmax_normalize(r)


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Row-wise AP (sklearn semantics) of float ``[B, K]`` scores vs bool ``[B, K]`` labels -> float64 ``[B]``.

    AP = Σ_t (recall_t - recall_{t-1}) · precision_t over the distinct score thresholds t, descending (tied scores
    form one step). Rows without a positive label give 0.0 (recall is undefined; the [1-R, R] protocol never has one).
    """
    s, order = torch.sort(scores, dim=1, descending=True)
    y = labels.gather(1, order).to(torch.int64)
    tps = torch.cumsum(y, dim=1)
    seen = torch.arange(1, s.shape[1] + 1, device=s.device, dtype=torch.float64)
    # the last element of each group of tied scores is where sklearn evaluates precision and recall
    is_end = torch.ones_like(y, dtype=torch.bool)
    is_end[:, :-1] = s[:, 1:] != s[:, :-1]
    tp_end = torch.where(is_end, tps, torch.zeros_like(tps))
    prev = torch.cummax(torch.cat([torch.zeros_like(tps[:, :1]), tp_end[:, :-1]], dim=1), dim=1).values
    gain = torch.where(is_end, tps - prev, torch.zeros_like(tps)).to(torch.float64)
    positives = tps[:, -1:].to(torch.float64)
    ap = (gain * tps.to(torch.float64) / seen).sum(1) / positives.clamp_min(1)[:, 0]
    return torch.where(positives[:, 0] > 0, ap, torch.zeros_like(ap))


def _image_stats(heatmaps: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image sums for a validated batch: correct [N], pixels [N], inter/union [N, 2] (bg, fg), ap [N]."""
    n_img, h, w = masks.shape
    r = normalised_heatmaps(heatmaps, (h, w)).reshape(n_img, h * w)
    gt = masks.reshape(n_img, h * w)
    pred = r.to(torch.float64) > r.to(torch.float64).mean(dim=1, keepdim=True)
    inter = torch.stack([(~pred & ~gt).sum(1), (pred & gt).sum(1)], dim=1)
    union = torch.stack([(~pred | ~gt).sum(1), (pred | gt).sum(1)], dim=1)
    ap = torch.empty(n_img, dtype=torch.float64, device=r.device)
    per = max(1, _CHUNK_ELEMENTS // (2 * h * w))
    for start in range(0, n_img, per):
        sl = slice(start, start + per)
        scores = torch.cat([1.0 - r[sl], r[sl]], dim=1)
        labels = torch.cat([~gt[sl], gt[sl]], dim=1)
        ap[sl] = average_precision(scores, labels)
    return {
        "correct": (pred == gt).sum(1),
        "pixels": torch.full((n_img,), h * w, dtype=torch.int64, device=r.device),
        "inter": inter,
        "union": union,
        "ap": ap,
    }


class SegmentationScores:
    """Streaming zero-shot segmentation scores: ``update(heatmaps, masks)`` per batch, then ``compute()``.

    Gives exactly the numbers of :func:`segmentation_scores` on the concatenated batches (batches may have different
    mask sizes).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._correct = 0
        self._pixels = 0
        self._inter = torch.zeros(2, dtype=torch.int64)
        self._union = torch.zeros(2, dtype=torch.int64)
        self._ap_sum = 0.0
        self._images = 0

    def update(self, heatmaps: torch.Tensor, masks: torch.Tensor) -> None:
        """Add a batch: heatmaps float ``[N, h, w]``, masks bool ``[N, H, W]`` (foreground)."""
        check_maps_masks(heatmaps, masks, maps_name="heatmaps")
        st = _image_stats(heatmaps, masks)
        self._correct += int(st["correct"].sum())
        self._pixels += int(st["pixels"].sum())
        self._inter += st["inter"].sum(0).cpu()
        self._union += st["union"].sum(0).cpu()
        self._ap_sum += float(st["ap"].sum())
        self._images += masks.shape[0]

    def compute(self) -> dict[str, float]:
        """``{"pixel_accuracy", "miou", "map"}`` over everything seen since the last reset."""
        if self._images == 0:
            raise InvalidArgument("SegmentationScores.compute() called before any update()")
        valid = self._union > 0
        iou = self._inter[valid].to(torch.float64) / self._union[valid].to(torch.float64)
        return {
            "pixel_accuracy": self._correct / self._pixels,
            "miou": float(iou.mean()),
            "map": self._ap_sum / self._images,
        }


def segmentation_scores(heatmaps: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    """Pixel accuracy, mIoU and mAP of heatmaps float ``[N, h, w]`` against foreground masks bool ``[N, H, W]``.

    See the module docstring for the protocol. Raises ``ValueError`` on bad shapes/dtypes, NaN/inf or empty input.
    """
    scores = SegmentationScores()
    scores.update(heatmaps, masks)
    return scores.compute()
