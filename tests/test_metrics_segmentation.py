"""Zero-shot segmentation scores vs a numpy re-implementation of the protocol with scikit-learn's AP."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from fastcbm.metrics import SegmentationScores, segmentation_scores
from fastcbm.metrics.baselines import resized
from fastcbm.metrics.segmentation import average_precision


def numpy_protocol(heatmaps: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    x = resized(heatmaps, tuple(masks.shape[-2:]))
    gts = masks.numpy()
    correct = pixels = 0
    inter, union, aps = np.zeros(2), np.zeros(2), []
    for r, gt in zip(x, gts):
        rng = r.max() - r.min()
        r = (r - r.min()) / rng if rng > 0 else np.zeros_like(r)
        pred = r.astype(np.float64) > r.astype(np.float64).mean()
        correct += int((pred == gt).sum())
        pixels += gt.size
        for c, (p, g) in enumerate([(~pred, ~gt), (pred, gt)]):
            inter[c] += (p & g).sum()
            union[c] += (p | g).sum()
        scores = np.concatenate([1.0 - r.ravel(), r.ravel()])
        labels = np.concatenate([~gt.ravel(), gt.ravel()]).astype(int)
        aps.append(average_precision_score(labels, scores))
    valid = union > 0
    return {"pixel_accuracy": correct / pixels, "miou": float((inter[valid] / union[valid]).mean()),
            "map": float(np.mean(aps))}


def make(n: int, low: tuple[int, int], size: tuple[int, int], seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    heat = torch.rand(n, *low, generator=gen).to(dtype)
    masks = torch.zeros(n, *size, dtype=torch.bool)
    masks[:, size[0] // 4 : size[0] // 2 + 1, size[1] // 5 : size[1] - 2] = True
    masks ^= torch.rand(n, *size, generator=gen) > 0.9
    return heat, masks


@pytest.mark.parametrize("low, size", [((7, 7), (32, 32)), ((5, 3), (11, 13)), ((9, 9), (9, 9)), ((1, 1), (4, 4))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_matches_numpy_protocol_with_sklearn_ap(low, size, dtype):
    heat, masks = make(4, low, size, seed=size[0], dtype=dtype)
    heat[1] = 0.25  # constant map -> all-zero normalised map, everything background
    got = segmentation_scores(heat, masks)
    want = numpy_protocol(heat, masks)
    assert set(got) == {"pixel_accuracy", "miou", "map"}
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key


def test_ties_quantised_heatmaps():
    gen = torch.Generator().manual_seed(5)
    heat = torch.randint(0, 3, (3, 8, 8), generator=gen).float()
    masks = torch.rand(3, 8, 8, generator=gen) > 0.5
    got, want = segmentation_scores(heat, masks), numpy_protocol(heat, masks)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key


@pytest.mark.parametrize("k", [1, 7, 50])
def test_average_precision_vs_sklearn(k):
    gen = torch.Generator().manual_seed(k)
    scores = torch.randint(0, 5, (6, k), generator=gen).float() / 4  # heavy ties
    labels = torch.rand(6, k, generator=gen) > 0.5
    labels[:, 0] = True
    got = average_precision(scores, labels)
    want = [average_precision_score(labels[i].numpy().astype(int), scores[i].numpy()) for i in range(6)]
    assert np.allclose(got.numpy(), want, atol=1e-12)


def test_streaming_equals_one_shot():
    heat, masks = make(7, (6, 6), (20, 18), seed=1)
    heat2, masks2 = make(3, (4, 5), (13, 9), seed=2)  # a batch with another mask size
    stream = SegmentationScores()
    for sl in (slice(0, 2), slice(2, 3), slice(3, 7)):
        stream.update(heat[sl], masks[sl])
    stream.update(heat2, masks2)
    got = stream.compute()
    a, b = numpy_protocol(heat, masks), numpy_protocol(heat2, masks2)
    one = segmentation_scores(heat, masks)
    assert one["map"] == pytest.approx(a["map"], abs=1e-12)
    assert got["map"] == pytest.approx((a["map"] * 7 + b["map"] * 3) / 10, abs=1e-12)
    stream.reset()
    stream.update(heat, masks)
    assert stream.compute() == pytest.approx(one, abs=1e-12)


def test_all_foreground_masks_drop_empty_class():
    heat = torch.rand(2, 6, 6)
    masks = torch.ones(2, 6, 6, dtype=torch.bool)
    got = segmentation_scores(heat, masks)
    assert not any(np.isnan(v) for v in got.values())
    assert got == pytest.approx(numpy_protocol(heat, masks), abs=1e-12)


def test_errors():
    good_h, good_m = torch.rand(2, 5, 5), torch.ones(2, 5, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="heatmaps must have shape"):
        segmentation_scores(torch.rand(5, 5), good_m)
    with pytest.raises(ValueError, match="masks must be a bool tensor"):
        segmentation_scores(good_h, good_m.float())
    with pytest.raises(ValueError, match="disagree on N"):
        segmentation_scores(good_h, good_m[:1])
    with pytest.raises(ValueError, match="NaN or inf"):
        segmentation_scores(torch.full((2, 5, 5), float("nan")), good_m)
    with pytest.raises(ValueError, match="empty"):
        segmentation_scores(torch.rand(0, 5, 5), good_m[:0])
    with pytest.raises(ValueError, match="before any update"):
        SegmentationScores().compute()
