"""The bundled testbed models meet the quality bars of the model card, on fresh seeds never used in training."""

from __future__ import annotations

import pytest

from fastcbm.models import load_backbone, load_clip
from fastcbm.testbed.evaluate import evaluate_classifier, evaluate_clip


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip_scores():
    model, _, _ = load_clip("testbed")
    return evaluate_clip(model, n=300)


@pytest.mark.parametrize("attribute", ["shape", "color"])
def test_clip_zero_shot(clip_scores, attribute):
    assert clip_scores[f"zero_shot_{attribute}"] >= 0.90, clip_scores


@pytest.mark.xfail(strict=True, reason="known gap (issue 3 open): texture zero-shot is 0.82 < the 0.90 bar; the "
                   "tower's stride-4 stem blurs stripes vs checks on light colours")
def test_clip_zero_shot_texture_meets_the_bar(clip_scores):
    assert clip_scores["zero_shot_texture"] >= 0.90, clip_scores


def test_clip_zero_shot_texture_does_not_regress(clip_scores):
    # far above chance (1/3); guards the bundled weights until the 0.90 bar above is met
    assert clip_scores["zero_shot_texture"] >= 0.78, clip_scores


def test_clip_red_ring_sensitivity(clip_scores):
    assert clip_scores["ring_sensitivity"] >= 0.85, clip_scores


@pytest.mark.parametrize("name", ["testbed", "testbed-vit"])
def test_classifier_accuracy(name):
    acc = evaluate_classifier(load_backbone(name).model, n=400)
    assert acc >= 0.90, f"{name}: {acc:.3f}"
