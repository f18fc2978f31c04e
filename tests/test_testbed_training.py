"""The testbed CLIP's training: batches, the attribute hard-negative term, the staged schedule and its CLI (the full
run is `fastcbm testbed train-clip`, ~48 min on 2 cores; here: the pieces, on a small pool)."""

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


TINY_SCHEDULE = (TC.ClipStage(3, 2e-3, seed=0), TC.ClipStage(2, 5e-4, seed=1, attribute_weight=1.0,
                                                               ring_attributes=True))


def _train_tiny(out, **kwargs) -> dict:
    kwargs = {"schedule": TINY_SCHEDULE, "pool_size": TC.POOL_CHUNK, "threads": 1, "channels_last": False, **kwargs}
    return TC.train_clip(out, batch_size=16, progress=False, **kwargs)


def test_train_clip_schedule_is_reproducible_and_resumable(tmp_path):
    """One command runs every stage; a rerun gives the same bytes; resuming at stage 2 from the weights stage 1 saved
    gives the same weights as the uninterrupted run."""
    scores = _train_tiny(tmp_path / "a")
    assert set(scores) >= {"zero_shot_shape", "zero_shot_color", "zero_shot_texture", "ring_sensitivity"}
    full = (tmp_path / "a" / T.WEIGHTS["clip"]).read_bytes()
    _train_tiny(tmp_path / "b")
    assert (tmp_path / "b" / T.WEIGHTS["clip"]).read_bytes() == full
    stage1 = TC.stage_weights(tmp_path / "a", 1)
    assert stage1.read_bytes() != full and TC.stage_weights(tmp_path / "a", 2).read_bytes() == full
    _train_tiny(tmp_path / "c", schedule=TINY_SCHEDULE[:1])
    assert TC.stage_weights(tmp_path / "c", 1).read_bytes() == stage1.read_bytes()
    _train_tiny(tmp_path / "d", init=stage1, start_stage=1)
    assert (tmp_path / "d" / T.WEIGHTS["clip"]).read_bytes() == full
    assert torch.get_num_threads() == 1  # restored


def test_train_clip_default_numerics_are_reproducible(tmp_path):
    """The bundled weights' numerics (2 threads, channels-last image tower): other floating-point sums than 1 thread,
    still the same bytes on a rerun, and loadable, contiguous weights."""
    before = torch.get_num_threads()
    for name in ("a", "b"):
        _train_tiny(tmp_path / name, schedule=TINY_SCHEDULE[:1], threads=TC.TRAIN_THREADS,
                    channels_last=TC.TRAIN_CHANNELS_LAST)
    assert torch.get_num_threads() == before  # restored
    fast = (tmp_path / "a" / T.WEIGHTS["clip"]).read_bytes()
    assert (tmp_path / "b" / T.WEIGHTS["clip"]).read_bytes() == fast
    model = T.load_weights(T.make_clip(), "clip", tmp_path / "a" / T.WEIGHTS["clip"])
    assert all(bool(torch.isfinite(v).all()) for v in model.state_dict().values() if v.is_floating_point())
    assert all(v.is_contiguous() for v in model.state_dict().values())


@pytest.mark.parametrize("kwargs, message", [
    ({"schedule": ()}, "at least one stage"),
    ({"schedule": (TC.ClipStage(0, 1e-3, 0),)}, ">= 1 step"),
    ({"start_stage": 2}, "start_stage must be in [0, 1]"),
    ({"threads": 0}, "threads must be >= 1"),
    ({"pool_size": 1000}, "multiple of 1024"),
])
def test_train_clip_rejects_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError) as err:
        _train_tiny(tmp_path, **kwargs)
    assert message in str(err.value)
    assert not (tmp_path / T.WEIGHTS["clip"]).exists()


@pytest.mark.parametrize("argv, message", [
    (["--start-stage", "2"], "needs --init"),
    (["--start-stage", str(len(TC.SHIPPED_SCHEDULE) + 1), "--init", "w"],
     f"--start-stage must be in 1..{len(TC.SHIPPED_SCHEDULE)}"),
    (["--steps", "10", "--start-stage", "2"], "cannot be combined with a custom stage"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--init", "missing.safetensors"], "--init missing.safetensors not found"),
])
def test_train_clip_cli_errors(tmp_path, monkeypatch, capsys, argv, message):
    from fastcbm.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(TC, "train_clip", lambda *a, **k: pytest.fail("training must not start"))
    assert main(["testbed", "train-clip", "--out", str(tmp_path / "out"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_train_clip_cli_builds_the_schedule(tmp_path, monkeypatch):
    from fastcbm.cli import main

    calls = []
    monkeypatch.setattr(TC, "train_clip", lambda out, schedule, **kw: calls.append((schedule, kw)) or {})
    assert main(["testbed", "train-clip", "--out", str(tmp_path)]) == 0
    assert calls[-1][0] == TC.SHIPPED_SCHEDULE
    assert calls[-1][1]["threads"] == TC.TRAIN_THREADS and calls[-1][1]["channels_last"] == TC.TRAIN_CHANNELS_LAST
    assert main(["testbed", "train-clip", "--out", str(tmp_path), "--steps", "7", "--ring-attributes",
                 "--attribute-weight", "2", "--threads", "1", "--no-channels-last"]) == 0
    assert calls[-1][0] == (TC.ClipStage(7, 2e-3, 0, 2.0, True),)
    assert calls[-1][1]["threads"] == 1 and calls[-1][1]["channels_last"] is False


def test_train_classifier_runs_on_one_thread_and_restores_the_count(tmp_path):
    from fastcbm.testbed.train_classifier import train_classifier

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = train_classifier("cnn", tmp_path, steps=2, progress=False)
        assert torch.get_num_threads() == 2  # the one-thread training does not leak into the caller
    finally:
        torch.set_num_threads(before)
    assert set(result) == {"cnn_accuracy", "train_seconds"} and 0.0 <= result["cnn_accuracy"] <= 1.0
    T.load_weights(T.TinyResNet(), "cnn", tmp_path / T.WEIGHTS["cnn"])
