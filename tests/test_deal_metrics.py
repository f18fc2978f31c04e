"""fastcbm.deal.metrics: hand-computed small cases and explicit per-pair loops (the notebook's semantics, fixed)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastcbm.deal import metrics as M
from tests.conftest import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- disentanglability ---------------------------------------------------------------------------------------------
def _authors_separation(per_image_maps: list[torch.Tensor]) -> float:
    """The authors' BatchSeparationLoss (loss.py): per image, normalise each map, sum the lower-triangle overlaps."""
    total = 0.0
    for maps in per_image_maps:
        g = torch.stack([(h - h.min()) / (h.max() - h.min() + 1e-8) for h in maps]).double()
        ov = g[:, None] * g[None, :]
        i, j = torch.tril_indices(g.shape[0], g.shape[0], offset=-1)
        total += float(ov[i, j].sum())
    return total / len(per_image_maps)


def test_separation_hand_case():
    # g1 = [1, 0], g2 = [0, 1], g3 = [1, 0.5] -> normalised [1, 0]: overlaps g1·g3 = 1, the others 0
    maps = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 0.5]]]])
    sep = M.separation_per_image(maps)
    assert sep.shape == (1,)
    assert abs(float(sep[0]) - 1.0) < 1e-6


def test_separation_matches_authors_loop():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(4, 5, 7, 7, generator=g) ** 3
    ours = float(M.separation_per_image(maps).mean())
    assert abs(ours - _authors_separation(list(maps))) < 1e-6 * max(1.0, ours)


def test_disentanglability_formula():
    assert abs(M.disentanglability_from_separation(0.0) - 1 / (1 + math.exp(-2))) < 1e-12  # the maximum, ~0.881
    assert abs(M.disentanglability_from_separation(20.0) - 0.5) < 1e-12
    # disjoint maps: separation 0, the maximum score
    maps = torch.zeros(2, 3, 1, 3)
    for k in range(3):
        maps[:, k, 0, k] = 1.0
    out = M.disentanglability(maps)
    assert out["mean_separation"] < 1e-9 and abs(out["disentanglability"] - 0.8807970779778823) < 1e-9
    # identical maps overlap: lower score
    same = torch.ones(2, 3, 1, 3)
    same[..., 0] = 0
    assert M.disentanglability(same)["disentanglability"] < out["disentanglability"]


# ---- localizability ------------------------------------------------------------------------------------------------
class _GreenModel(torch.nn.Module):
    """A toy 'CLIP': e = [a, sqrt(1 - a²)] with a = 5·mean|green − 0.5| (over the whole image or a region), so the
    cosine with the text [1, 0] is exactly a, and texts [0, 1] give sqrt(1 - a²)."""

    def __init__(self, region: tuple[slice, slice] | None = None):
        super().__init__()
        self.region = region

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        g = (x[:, 1] - 0.5).abs() * 5
        if self.region is not None:
            g = g[:, self.region[0], self.region[1]]
        a = g.flatten(1).mean(1).clamp(0, 1)
        return torch.stack([a, (1 - a * a).clamp_min(0).sqrt()], dim=1)


def _checker_green(b: int, s: int = 10) -> torch.Tensor:
    """Green = 0.5 ± 0.1 in a checkerboard (its blur is exactly 0.5), red/blue random."""
    g = torch.Generator().manual_seed(1)
    img = torch.rand(b, 3, s, s, generator=g)
    ii, jj = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    img[:, 1] = 0.5 + 0.1 * (((ii + jj) % 2) * 2 - 1).float()
    return img


def test_blur_is_half_bilinear_down_then_up():
    x = torch.rand(2, 3, 8, 8)
    small = F.interpolate(x, size=(4, 4), mode="bilinear", align_corners=False)
    assert_close(M.blur(x), F.interpolate(small, size=(8, 8), mode="bilinear", align_corners=False),
                 atol=1e-6, rtol=0, what="blur")
    assert_close(M.blur(_checker_green(1))[:, 1], torch.full((1, 10, 10), 0.5), atol=1e-6, rtol=0, what="checker blur")


def test_insertion_all_channels_linear_curve():
    # s_blur = 0, s_orig = 0.5, and every inserted pixel adds 0.5/100: the normalised change is exactly the inserted
    # fraction (10×10 pixels: every step inserts a whole number), whatever the map. Fidelity over 5 steps = mean(0.2..1.0) = 0.6, AUC = 0.5. Inserting only the red
    # channel (the notebook's flat C·H·W indices) would leave green blurred: change 0.
    images = _checker_green(2)
    text = torch.tensor([1.0, 0.0]).expand(2, 3, 2)
    maps = torch.rand(2, 3, 2, 2)
    out = M.insertion_scores(_GreenModel(), images, text, maps, steps=5, curve_steps=20)
    assert bool(out["valid"].all())
    assert_close(out["s_blur"], torch.zeros(2, 3), atol=1e-6, rtol=0, what="s_blur")
    assert_close(out["s_orig"], torch.full((2, 3), 0.5), atol=1e-6, rtol=0, what="s_orig")
    assert_close(out["fidelity"], torch.full((2, 3), 0.6), atol=1e-6, rtol=0, what="fidelity")
    assert_close(out["auc"], torch.full((2, 3), 0.5), atol=1e-6, rtol=0, what="auc")


def test_insertion_images_exact_counts_every_channel():
    images = torch.rand(1, 3, 10, 10)
    canvas = torch.zeros_like(images)
    ranks = M.pixel_ranks(torch.rand(1, 10, 10), (10, 10))
    x = M.insertion_images(images, canvas, ranks, [0.29, 0.5, 1.0])  # 0.29·100 is 28.999… in floats
    for t, n in enumerate((29, 50, 100)):
        kept = (x[0, t] != 0).all(0)  # every channel copied where kept
        assert int(kept.sum()) == n
        assert bool((kept.flatten() == (ranks[0] < n)).all())


def _loop_fidelity(model, image, text, heat, steps=5):
    """Explicit reference for ONE (image, concept) pair: per step, copy the top pixels (all channels) one by one."""
    _c, h, w = image.shape
    canvas = M.blur(image[None])[0]
    up = F.interpolate(heat[None, None], size=(h, w), mode="bicubic", align_corners=False)[0, 0].flatten()
    order = torch.sort(up, descending=True, stable=True).indices

    def score(x):
        return float(F.cosine_similarity(model.encode_image(x[None]), text[None], eps=1e-6)[0])

    s_o, s_b = score(image), score(canvas)
    vals = []
    for t in range(1, steps + 1):
        x = canvas.clone()
        for p in order[: t * h * w // steps].tolist():
            x[:, p // w, p % w] = image[:, p // w, p % w]
        vals.append(min(max(abs(score(x) - s_b) / abs(s_o - s_b), 0.0), 1.0))
    return sum(vals) / steps


def test_insertion_pairs_each_image_with_its_own_maps():
    # B = 3 images, K = 2 concepts; the model looks at the top-left quadrant only, so which map ranks which image's
    # pixels changes the fidelity. Pair (b, k) must use image b (repeat_interleave), not image p % B (repeat).
    g = torch.Generator().manual_seed(3)
    b, k, s = 3, 2, 8
    images = 0.5 + 0.3 * (torch.rand(b, 3, s, s, generator=g) - 0.5)
    images[1, 1] = 0.5 + 0.05 * (torch.rand(s, s, generator=g) - 0.5)  # image 1 has little green signal
    texts = F.normalize(torch.rand(b, k, 2, generator=g) + 0.1, dim=-1)
    maps = torch.rand(b, k, 4, 4, generator=g)
    model = _GreenModel(region=(slice(0, 4), slice(0, 4)))
    out = M.insertion_scores(model, images, texts, maps, steps=5, chunk=7)
    right = torch.tensor([[_loop_fidelity(model, images[i], texts[i, j], maps[i, j]) for j in range(k)]
                          for i in range(b)])
    assert_close(out["fidelity"], right, atol=1e-5, rtol=0, what="fidelity vs per-pair loop")
    # the notebook's pairing: flattened pair p = i·K + j gets image p % B (images.repeat(K, 1, 1, 1))
    wrong = torch.tensor([[_loop_fidelity(model, images[(i * k + j) % b], texts[i, j], maps[i, j]) for j in range(k)]
                          for i in range(b)])
    assert float((wrong - right).abs().max()) > 1e-2  # the test can tell the two pairings apart


def test_insertion_skips_pairs_without_signal():
    images = torch.full((1, 3, 4, 4), 0.5)  # no green signal: s_orig = s_blur
    out = M.localizability(_GreenModel(), images, torch.tensor([[[1.0, 0.0]]]), torch.rand(1, 1, 4, 4))
    assert out["pairs"] == 1 and out["skipped"] == 1 and math.isnan(out["localizability"])


def test_insertion_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="agree on B"):
        M.insertion_scores(_GreenModel(), torch.rand(2, 3, 4, 4), torch.rand(3, 2, 2), torch.rand(3, 2, 2, 2))


# ---- accuracy with concepts ----------------------------------------------------------------------------------------
def test_accuracy_with_concepts_hand_case():
    # two classes in 2-D. Class 0's descriptors point at 0° and 90° (mean direction 45°), class 1's at 30° and 40°
    # (mean 35°); class names at 80° and 10°. Images at 60° (label 0) and 20° (label 1).
    def unit(deg):
        return torch.tensor([math.cos(math.radians(deg)), math.sin(math.radians(deg))])

    images = torch.stack([unit(60), unit(20)]) * torch.tensor([[3.0], [0.5]])  # norms do not matter
    labels = torch.tensor([0, 1])
    desc = [torch.stack([unit(0), unit(90)]), torch.stack([unit(30), unit(40)])]
    cls = torch.stack([unit(80), unit(10)])
    # concept scores: image 60°: class 0 = (cos60 + cos30)/2 = 0.683, class 1 = (cos30 + cos20)/2 = 0.903 -> wrong;
    # image 20°: class 0 = (cos20 + cos70)/2 = 0.641, class 1 = (cos10 + cos20)/2 = 0.962 -> right. Zero-shot:
    # 60° is nearer 80° (right), 20° nearer 10° (right).
    out = M.accuracy_with_concepts(images, labels, desc, cls)
    assert out == {"concept_accuracy": 0.5, "zero_shot_accuracy": 1.0}


def test_descriptor_sentences_and_errors():
    s = M.descriptor_sentences(["tench"], {"tench": ["a long body", "fins"]})
    assert s == [["tench, which has a long body.", "tench, which has fins."]]
    with pytest.raises(ValueError, match="'goldfish' has no descriptors"):
        M.descriptor_sentences(["goldfish"], {"goldfish": []})


# ---- part mIoU -----------------------------------------------------------------------------------------------------
def test_part_miou_hand_case():
    maps = torch.tensor([[[1.0, 0.0], [0.0, 0.0]],  # fg = top-left
                         [[1.0, 1.0], [0.0, 0.0]],  # fg = top row
                         [[0.0, 0.0], [0.0, 1.0]],  # fg = bottom-right
                         [[1.0, 0.0], [0.0, 0.0]]])  # concept 2 absent: empty mask, ignored
    masks = torch.tensor([[[1, 1], [0, 0]],
                          [[1, 1], [0, 0]],
                          [[0, 0], [1, 1]],
                          [[0, 0], [0, 0]]]).bool()
    ids = torch.tensor([0, 0, 1, 2])
    out = M.part_miou(maps, masks, ids, ["beak", "wing", "tail"])
    # concept 0: inter 1 + 2 = 3, union 2 + 2 = 4 -> 0.75; concept 1: 1/2; concept 2 unseen
    assert out["per_concept"] == {"beak": 0.75, "wing": 0.5}
    assert abs(out["part_miou"] - 0.625) < 1e-12 and out["pairs"] == 3


def test_part_miou_upsamples_maps():
    maps = torch.zeros(1, 2, 2)
    maps[0, 0, 0] = 1.0
    masks = torch.zeros(1, 8, 8, dtype=torch.bool)
    masks[0, :4, :4] = True
    out = M.part_miou(maps, masks, torch.tensor([0]), ["x"])
    assert 0.3 < out["part_miou"] <= 1.0


def test_part_miou_bad_ids():
    with pytest.raises(ValueError, match="concept_ids"):
        M.part_miou(torch.rand(2, 2, 2), torch.ones(2, 2, 2, dtype=torch.bool), torch.tensor([0, 5]), ["a"])


# ---- evaluation data and the end-to-end evaluation ----------------------------------------------------------------
def test_testbed_descriptor_mask():
    from fastcbm.deal.evaluate import testbed_descriptor_mask

    a = torch.tensor([True, True, False, False])
    b = torch.tensor([True, False, True, False])
    c = torch.tensor([False, False, False, True])
    masks = {"blue": a, "circle": b, "grey background": c}
    assert testbed_descriptor_mask(masks, "blue").tolist() == a.tolist()
    assert testbed_descriptor_mask(masks, "Blue circle").tolist() == [True, False, False, False]
    assert testbed_descriptor_mask(masks, "on a grey background").tolist() == c.tolist()
    assert testbed_descriptor_mask(masks, "bluish fins") is None


def _png(path, array):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_mask_folder_reader_aligns_masks_with_the_crop(tmp_path):
    import numpy as np

    from fastcbm.deal.evaluate import folder_set
    from fastcbm.models.testbed import preprocess_pil

    # a 40×32 (w×h) image: resized to 80×64, centre-cropped at x = 8..72. Its left half (x < 20) is a concept.
    img = np.zeros((32, 40, 3), dtype=np.uint8)
    img[:, :20] = 255
    mask = np.zeros((32, 40), dtype=np.uint8)
    mask[:, :20] = 255
    _png(tmp_path / "images" / "bird" / "img1.png", img)
    _png(tmp_path / "images" / "fish" / "img2.png", img[:, ::-1].copy())
    _png(tmp_path / "masks" / "img1" / "left_wing.png", mask)
    data = folder_set(tmp_path, preprocess_pil, 64)
    assert data.class_names == ["bird", "fish"] and data.labels.tolist() == [0, 1]
    assert data.images.shape == (2, 3, 64, 64)
    m = data.masks[0]["left wing"]  # underscores read as spaces
    assert m.shape == (64, 64) and bool(m[:, :30].all()) and not bool(m[:, 34:].any())
    bright = data.images[0].mean(0) > 0
    assert float((bright == m).float().mean()) > 0.95  # the mask sits on the image's own pixels
    assert data.masks[1] == {}


def test_mask_folder_flat_layout_needs_labels(tmp_path):
    import numpy as np

    from fastcbm.deal.evaluate import folder_set
    from fastcbm.models.testbed import preprocess_pil

    _png(tmp_path / "images" / "a1.png", np.zeros((16, 16, 3), dtype=np.uint8))
    _png(tmp_path / "masks" / "a1" / "beak.png", np.full((16, 16), 255, dtype=np.uint8))
    with pytest.raises(FileNotFoundError, match="labels.csv"):
        folder_set(tmp_path, preprocess_pil, 64)
    (tmp_path / "labels.csv").write_text("name,class\na1,sparrow\n")
    data = folder_set(tmp_path, preprocess_pil, 64)
    assert data.class_names == ["sparrow"] and bool(data.masks[0]["beak"].all())


def test_evaluate_testbed_end_to_end():
    from fastcbm.deal.evaluate import evaluate, testbed_set
    from fastcbm.models import load_clip

    model, _, tok = load_clip("testbed")
    data = testbed_set(6)
    concepts = {c: [c.split()[1], c.split()[0], "dot"] for c in data.class_names}  # shape, colour, dot
    out = evaluate(model, tok, data, concepts, k=2, batch_size=4, localizability_images=3, curve_steps=4,
                   testbed_masks=True, progress=False)
    assert out["images"] == 6 and out["localizability_pairs"] == 6
    assert 0 < out["disentanglability"] <= 0.881 and out["mean_separation"] >= 0
    assert 0 <= out["localizability"] <= 1 and 0 <= out["insertion_auc"] <= 1
    assert 0 <= out["part_miou"] <= 1 and out["part_pairs"] == 12  # every scene has its class's shape and colour
    with pytest.raises(ValueError, match="descriptors, 4 needed"):
        evaluate(model, tok, data, concepts, k=4, progress=False)
