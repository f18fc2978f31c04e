"""The testbed CLIP's training batches and its attribute hard-negative term (the full run is `fastcbm testbed
train-clip`, ~1 h; here: the pieces, on a small pool)."""

from __future__ import annotations

import random

import pytest
import torch

from fastcbm.data import synthetic as S
from fastcbm.models import testbed as T
from fastcbm.testbed import train_clip as TC

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pool():
    return TC.make_pool(n=TC.POOL_CHUNK)  # one chunk of 1,024 scenes


def test_make_batch_is_seeded_and_reports_objects(pool):
    objects: list = []
    images, captions = TC.make_batch(pool, 24, random.Random(5), objects)
    again, captions2 = TC.make_batch(pool, 24, random.Random(5))
    assert images.shape == (24, 3, S.TESTBED_IMAGE_SIZE, S.TESTBED_IMAGE_SIZE) and images.dtype == torch.uint8
    assert torch.equal(images, again) and captions == captions2
    assert len(objects) == 24 and all(1 <= len(o) <= S.MAX_OBJECTS for o in objects)
    tokens = T.WordTokenizer()(captions)
    assert tokens.shape[0] == 24 and bool((tokens != 0).any(1).all())


def test_make_batch_reports_the_ringed_object(pool):
    objects: list = []
    inside: list = []
    _, captions = TC.make_batch(pool, 64, random.Random(2), objects, inside)
    assert len(inside) == 64
    ringed = [i for i, c in enumerate(captions) if c.endswith("in a red ring") or c in S.concept_names()]
    assert ringed and {i for i, o in enumerate(inside) if o is not None} <= set(ringed)
    for i, obj in enumerate(inside):
        if obj is not None:
            assert obj in objects[i]
            words = set(captions[i].split())
            assert words & {obj.shape, obj.color, obj.texture, *obj.parts}, (captions[i], obj)


def test_attribute_loss_scores_every_value_of_each_attribute(pool):
    torch.manual_seed(0)
    model = T.make_clip()
    tokenizer = T.WordTokenizer()
    objects: list = []
    images, _ = TC.make_batch(pool, 32, random.Random(1), objects)
    emb = model.encode_image(T.normalize(images), normalize=True)
    scale = model.logit_scale.exp()
    loss = TC.attribute_loss(model, tokenizer, emb, objects, scale)
    assert loss.dim() == 0 and bool(torch.isfinite(loss.detach())) and float(loss.detach()) > 0
    loss.backward()
    assert model.visual.conv1.weight.grad is not None and float(model.visual.conv1.weight.grad.abs().sum()) > 0
    # a batch without single-object scenes contributes nothing (and still backpropagates)
    multi = [o if len(o) > 1 else o + o for o in objects]
    zero = TC.attribute_loss(model, tokenizer, emb.detach().requires_grad_(), multi, scale)
    assert float(zero.detach()) == 0.0
    # the local term alone (no single-object scene, but ringed objects) is a real loss
    inside = [o[0] for o in multi]
    local = TC.attribute_loss(model, tokenizer, emb.detach(), multi, scale, inside)
    assert bool(torch.isfinite(local.detach())) and float(local.detach()) > 0


def test_attribute_loss_prefers_the_true_attribute():
    """With the bundled weights, the true values' template captions win: the loss is well below chance level."""
    import math

    from fastcbm.models import load_clip

    model, _, tokenizer = load_clip("testbed")
    scenes = S.generate(60, seed=S.TRAINING_SEED_LIMIT + 31, num_objects=1)
    with torch.no_grad():
        emb = model.encode_image(T.normalize(scenes.images), normalize=True)
        loss = TC.attribute_loss(model, tokenizer, emb, scenes.objects, model.logit_scale.exp())
    chance = (math.log(len(S.SHAPES)) + math.log(len(S.COLORS)) + math.log(len(S.TEXTURES))) / 3
    assert float(loss) < 0.5 * chance, (float(loss), chance)
