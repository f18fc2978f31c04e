"""The synthetic testbed generator and its ImageFolder export."""

from __future__ import annotations

import pytest
import torch

from fastcbm.data import synthetic as S
from fastcbm.data.export import export_image_folder, read_image_folder, scene_index


@pytest.fixture(scope="module")
def scenes():
    return S.generate(24, seed=123)


def test_deterministic(scenes):
    again = S.generate(24, seed=123)
    assert torch.equal(again.images, scenes.images) and torch.equal(again.labels, scenes.labels)
    assert again.captions() == scenes.captions()
    other = S.generate(24, seed=124)
    assert not torch.equal(other.images, scenes.images)


def test_shapes_and_types(scenes):
    n, s = len(scenes), S.TESTBED_IMAGE_SIZE
    assert scenes.images.shape == (n, 3, s, s) and scenes.images.dtype == torch.uint8
    assert scenes.labels.dtype == torch.long and scenes.labels.min() >= 0
    assert scenes.labels.max() < len(S.class_names())
    assert len(S.class_names()) >= 10 and len(S.class_rules()) == len(S.class_names())
    assert len(S.SHAPES) >= 5 and len(S.COLORS) >= 5 and len(S.TEXTURES) >= 3
    assert "red" not in S.COLORS
    types = {t for _, t in S.vocabulary()}
    assert types <= {"object", "part", "color", "material"} and {"object", "color", "material", "part"} <= types
    assert all(1 <= len(objs) <= 3 for objs in scenes.objects)


def test_masks_match_concepts_present(scenes):
    masks = scenes.concept_masks
    assert masks.shape == (len(scenes), S.NUM_CONCEPTS, *scenes.images.shape[-2:])
    assert torch.equal(masks.flatten(2).any(2), scenes.concepts_present)


def test_labels_follow_the_rules(scenes):
    pairs = S.class_concepts()
    for i, objs in enumerate(scenes.objects):
        shape, color = pairs[int(scenes.labels[i])]
        assert any(o.shape == shape and o.color == color for o in objs)


def test_no_red_except_rings(scenes):
    img = scenes.images.int()
    red = (img[:, 0] == 255) & (img[:, 1] == 0) & (img[:, 2] == 0)
    assert not red.any()
    ringed = S.draw_ring(scenes.images[:2], torch.tensor([[20.0, 30.0], [40.0, 40.0]]), 9.0, 2.0)
    red = (ringed[:, 0] == 255) & (ringed[:, 1] == 0) & (ringed[:, 2] == 0)
    assert red.flatten(1).sum(1).min() > 40


@pytest.mark.parametrize("bad", [dict(n=-1, seed=0), dict(n=2, seed=0, num_objects=4), dict(n=2, seed=0, size=16)])
def test_bad_arguments(bad):
    with pytest.raises(ValueError):
        S.generate(**bad)


def test_export_round_trip(scenes, tmp_path):
    images_dir = export_image_folder(scenes, tmp_path / "exp")
    assert sorted(p.name for p in images_dir.iterdir()) == sorted(n.replace(" ", "_") for n in S.class_names())
    back = read_image_folder(tmp_path / "exp", masks=True)
    order = torch.tensor([scene_index(f) for f in back["files"]])
    assert torch.equal(back["images"], scenes.images[order])
    assert torch.equal(back["labels"], scenes.labels[order])
    assert torch.equal(back["concept_masks"], scenes.concept_masks[order])
    assert (tmp_path / "exp" / "concepts.txt").read_text().split("\n")[0] == S.concept_names()[0]


def test_export_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a fastcbm testbed export"):
        read_image_folder(tmp_path)
    with pytest.raises(ValueError, match="not an exported testbed image"):
        scene_index("foo/bar.png")
