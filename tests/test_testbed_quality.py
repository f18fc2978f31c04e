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


@pytest.mark.parametrize("attribute", ["shape", "color", "texture"])
def test_clip_zero_shot(clip_scores, attribute):
    assert clip_scores[f"zero_shot_{attribute}"] >= 0.90, clip_scores


def test_clip_red_ring_sensitivity(clip_scores):
    assert clip_scores["ring_sensitivity"] >= 0.85, clip_scores


@pytest.mark.parametrize("name", ["testbed", "testbed-vit"])
def test_classifier_accuracy(name):
    acc = evaluate_classifier(load_backbone(name).model, n=400)
    assert acc >= 0.90, f"{name}: {acc:.3f}"
