"""The synthetic testbed generator (fastcbm.data.synthetic): seeding, scene contents, concept masks, rings."""

from __future__ import annotations

import pytest
import torch

from fastcbm.data import synthetic as S

N = 24


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def batch() -> S.SceneBatch:
    return S.generate(N, seed=S.TRAINING_SEED_LIMIT + 7)


@pytest.mark.parametrize("seed", [0, 3, S.TRAINING_SEED_LIMIT])
@pytest.mark.parametrize("n", [1, 5])
def test_deterministic(seed, n):
    a, b = S.generate(n, seed), S.generate(n, seed)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.concept_masks, b.concept_masks) and a.captions() == b.captions()
    assert not torch.equal(a.images, S.generate(n, seed + 1).images)


def test_masks_consistent_with_concepts_present(batch):
    masks = batch.concept_masks
    assert torch.equal(masks.flatten(2).any(-1), batch.concepts_present)
    for i in range(N):
        assert torch.equal(masks[i], batch.scene_concept_masks(i))
        objs = batch.objects[i]
        om = batch.object_masks[i, : len(objs)]
        assert int(om.sum(0).max()) <= 1 and not batch.object_masks[i, len(objs):].any()
        bg = masks[i, S.concept_names().index(f"{batch.backgrounds[i]} background")]
        assert torch.equal(bg, ~om.any(0))
        for slot, o in enumerate(objs):
            assert not (batch.part_masks[i, slot] & ~om[slot]).any()
            for p_i, part in enumerate(S.PARTS):
                assert bool(batch.part_masks[i, slot, p_i].any()) == (part in o.parts)


def test_labels_follow_the_rules(batch):
    pairs = S.class_concepts()
    for i, objs in enumerate(batch.objects):
        matches = [k for k, (shape, color) in enumerate(pairs)
                   if any(o.shape == shape and o.color == color for o in objs)]
        assert matches == [int(batch.labels[i])], (i, matches)


def test_no_red_pixels_without_rings():
    img = S.generate(64, seed=11).images.int()
    assert not ((img[:, 0] - torch.maximum(img[:, 1], img[:, 2])) > 80).any()


def test_vocabulary_types():
    vocab = S.vocabulary()
    assert {t for _, t in vocab} == {"object", "part", "color", "material"}
    types = dict(vocab)
    assert all(types[s] == "object" for s in S.SHAPES) and all(types[c] == "color" for c in S.COLORS)
    assert all(types[t] == "material" for t in S.TEXTURES) and all(types[p] == "part" for p in S.PARTS)
    for rule, (shape, color) in zip(S.class_rules(), S.class_concepts()):
        assert shape in rule and color in rule


@pytest.mark.parametrize("width", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("radius", [4.0, 9.14])
def test_draw_ring_rule(radius, width):
    imgs = S.generate(3, seed=1).images
    centers = torch.tensor([[20.0, 30.0], [31.5, 31.5], [0.0, 63.0]])
    out = S.draw_ring(imgs, centers, radius, width)
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    for b in range(3):
        on = (torch.sqrt((xs - centers[b, 0]) ** 2 + (ys - centers[b, 1]) ** 2) - radius).abs() <= width / 2
        expected = torch.where(on, torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1), imgs[b])
        assert torch.equal(out[b], expected)


def test_draw_ring_single_image_per_image_radius_and_input_untouched():
    imgs = S.generate(2, seed=2).images
    before = imgs.clone()
    one = S.draw_ring(imgs[0], (32.0, 32.0), 9.0, 2.0)
    assert one.shape == (3, 64, 64) and torch.equal(imgs, before)
    both = S.draw_ring(imgs, torch.tensor([[32.0, 32.0], [10.0, 12.0]]), torch.tensor([9.0, 5.0]))
    assert torch.equal(both[0], one) and torch.equal(both[1], S.draw_ring(imgs[1], (10.0, 12.0), 5.0))


@pytest.mark.parametrize("bad", [dict(images=torch.zeros(2, 3, 8, 8)), dict(images=torch.zeros(2, 4, 8, 8, dtype=torch.uint8)),
                                 dict(centers=torch.zeros(3, 2)), dict(radius=torch.ones(3)), dict(width=0.0)])
def test_draw_ring_errors(bad):
    kw = dict(images=torch.zeros(2, 3, 8, 8, dtype=torch.uint8), centers=torch.zeros(2, 2), radius=2.0, width=2.0)
    kw.update(bad)
    with pytest.raises(ValueError):
        S.draw_ring(kw["images"], kw["centers"], kw["radius"], kw["width"])


def test_salf_ring_geometry():
    centers, r, w = S.salf_ring_geometry()
    assert centers.shape == (49, 2) and w == 2.0 and abs(r - 32 * 64 / 224) < 1e-6
    assert float(centers.min()) >= r - 1e-5 and float(centers.max()) <= 63 - r + 1e-5


@pytest.mark.parametrize("kwargs", [dict(n=-1), dict(num_objects=0), dict(num_objects=(2, 4)), dict(size=16)])
def test_generate_errors(kwargs):
    args = dict(n=2, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError):
        S.generate(**args)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_exact_object_count(k):
    assert all(len(o) == k for o in S.generate(6, seed=5, num_objects=k).objects)


def test_empty_batch():
    b = S.generate(0, seed=0)
    assert b.images.shape == (0, 3, 64, 64) and b.concept_masks.shape[0] == 0


def test_export_round_trip_with_masks(tmp_path):
    from fastcbm.data.export import export_image_folder, read_image_folder, scene_index
    sub = S.generate(7, seed=S.TRAINING_SEED_LIMIT + 99)
    export_image_folder(sub, tmp_path / "tb")
    back = read_image_folder(tmp_path / "tb", masks=True)
    order = torch.tensor([scene_index(f) for f in back["files"]])
    assert torch.equal(back["images"], sub.images[order]) and torch.equal(back["labels"], sub.labels[order])
    assert torch.equal(back["concept_masks"], sub.concept_masks[order])
    for f, label in zip(back["files"], back["labels"].tolist()):
        assert f.split("/")[-2] == S.class_names()[label].replace(" ", "_")


def test_export_layout_and_reader_errors(tmp_path):
    from fastcbm.data.export import export_image_folder, read_image_folder, scene_index

    images_dir = export_image_folder(S.generate(4, seed=5), tmp_path / "exp")
    assert sorted(p.name for p in images_dir.iterdir()) == sorted(n.replace(" ", "_") for n in S.class_names())
    assert (tmp_path / "exp" / "concepts.txt").read_text().split("\n")[0] == S.concept_names()[0]
    with pytest.raises(FileNotFoundError, match="not a fastcbm testbed export"):
        read_image_folder(tmp_path)
    with pytest.raises(ValueError, match="not an exported testbed image"):
        scene_index("foo/bar.png")
