"""CE-FAM evaluation: soft-WPMI against a transcription of the authors' loop, the per-type summary rules, the
evaluation loop against the loop-reference regions on tiny data, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastcbm import metrics
from fastcbm.cefam import clip_dissect as CD
from fastcbm.cefam.datasets import Record, TestbedDataset
from fastcbm.cefam.evaluate import EvalConfig, evaluate_cefam, group_images, summarize
from fastcbm.cefam.model import CEFAM, CEFAMConfig
from fastcbm.cefam.translator import Translator
from fastcbm.models import load_backbone, load_clip

from .conftest import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")
LAYERS = ["layer1", "layer2", "layer3", "layer4"]


def _authors_soft_wpmi(clip_feats, target_feats, top_k, a=10, lam=1, min_prob=1e-7, p_start=0.998, p_end=0.97):
    """A per-neuron loop as the CLIP-Dissect release writes it (similarity.soft_wpmi), in float64."""
    clip_feats = torch.softmax(a * clip_feats.double(), dim=1)
    inds = torch.topk(target_feats.double(), dim=0, k=top_k)[1]
    p_in = (p_start - (torch.arange(top_k, dtype=torch.float64) / top_k * (p_start - p_end))).unsqueeze(1)
    rows = []
    for k in range(target_feats.shape[1]):
        cur = clip_feats.gather(0, inds[:, k:k + 1].expand(-1, clip_feats.shape[1]))
        rows.append(torch.sum(torch.log(1 + p_in * (cur - 1) + min_prob), dim=0, keepdim=True))
    pde = torch.cat(rows)
    pd = torch.logsumexp(pde, dim=0, keepdim=True) - math.log(pde.shape[0])
    return pde - lam * pd


def test_soft_wpmi_matches_authors_loop():
    g = torch.Generator().manual_seed(0)
    sims, acts = torch.rand(30, 7, generator=g) * 0.4, torch.rand(30, 11, generator=g)
    assert_close(CD.soft_wpmi(sims, acts, top_k=10), _authors_soft_wpmi(sims, acts, 10), atol=1e-10, rtol=1e-10,
                 what="soft_wpmi")
    assert_close(CD.soft_wpmi(sims, acts, top_k=10, chunk=3), _authors_soft_wpmi(sims, acts, 10), atol=1e-10,
                 rtol=1e-10, what="soft_wpmi chunked")


def test_dissect_labels_the_correlated_neuron():
    """Neuron 1 of stage b fires exactly on the images whose CLIP embedding is concept 2's: it must be concept 2's."""
    g = torch.Generator().manual_seed(1)
    n, d = 40, 8
    text = torch.eye(4, d)
    which = torch.arange(n) % 4
    img = text[which] + 0.05 * torch.randn(n, d, generator=g)
    pooled = {"a": torch.rand(n, 3, generator=g), "b": torch.rand(n, 2, generator=g) * 0.1}
    pooled["b"][which == 2, 1] += 1.0
    res = CD.dissect(pooled, img, text, top_k=10)
    assert res.neuron[2] == ("b", 1)
    assert int(res.labels["b"][1]) == 2
    with pytest.raises(ValueError, match="text_emb must be"):
        CD.dissect(pooled, img, torch.zeros(0, d))


def test_summarize_rules():
    types = ["object", "object", "part", "color"]
    nra = torch.tensor([0.8, 0.9, 0.4, 0.6], dtype=torch.float64)
    has = torch.tensor([True, False, True, True])
    s = summarize(types, nra, nra, nra, has)
    # NRA over pairs with a map; hit rate over all pairs (the map-less pair is a miss)
    assert s["per_type"]["object"] == {"nra": 0.8, "nra_paper": 0.8, "epg": 0.8, "hit_rate": 0.5, "pairs": 2,
                                       "pairs_with_map": 1}
    assert s["mean"]["nra"] == pytest.approx((0.8 + 0.4 + 0.6) / 3, abs=1e-4)
    assert s["mean"]["hit_rate"] == pytest.approx((0.5 + 0.0 + 1.0) / 3, abs=1e-4)


def test_group_images():
    im = torch.zeros(3, 4, 4, dtype=torch.uint8)
    m = torch.zeros(4, 4, dtype=torch.bool)
    recs = [Record(im, "a", "object", m, k) for k in ("x", "x", "y", "z", "z", "w")]
    batches = list(group_images(recs, 2))
    assert [[len(img) for img in b] for b in batches] == [[2, 1], [2, 1]]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    bb = load_backbone("testbed")
    tr = Translator(160, 128, (32,))
    model = CEFAM(bb, tr.eval(), CEFAMConfig(layers=LAYERS, embed_dim=128, in_features=160, hidden=[32],
                                             widths=[16, 32, 48, 64]))
    clip, pre, _ = load_clip("testbed")
    ds = TestbedDataset(3, chunk=2)
    text = torch.nn.functional.normalize(torch.randn(len(ds.concepts), 128), dim=-1)
    return model, clip, pre, ds, text


def test_evaluate_against_loop_reference(tiny):
    from fastcbm.cefam.regions import concept_regions

    model, clip, pre, ds, text = tiny
    cfg = EvalConfig(batch_size=2, progress=False, keep_pairs=True, wpmi_top_k=2)
    res = evaluate_cefam(model, ds, text_emb=text, clip_model=clip, clip_preprocess=pre, config=cfg)
    recs = list(ds)
    ps = res["pair_scores"]
    assert res["images"] == 3 and res["pairs"] == len(recs) == len(ps["nra"])
    assert ps["keys"] == [r.key for r in recs]
    nra = torch.tensor(ps["nra"])
    # the oracle is the best stage per pair; top-1 reads the association's stage
    top1 = nra.gather(1, torch.tensor(ps["chosen"]).view(-1, 1))[:, 0]
    has = torch.tensor(ps["has"])
    assert res["cefam"]["association_top1"] == summarize(ps["types"], top1, torch.tensor(ps["nra_paper"]).gather(
        1, torch.tensor(ps["chosen"]).view(-1, 1))[:, 0], torch.tensor(ps["epg"]).gather(
        1, torch.tensor(ps["chosen"]).view(-1, 1))[:, 0], has.gather(1, torch.tensor(ps["chosen"]).view(-1, 1))[:, 0])
    assert res["cefam"]["oracle_best_layer"]["mean"]["nra"] >= res["cefam"]["association_top1"]["mean"]["nra"]
    assert "oracle" in res["note"]
    # pair 0 recomputed independently: loop-reference regions (one backward per concept) + the metrics
    r0 = recs[0]
    from fastcbm.cefam.evaluate import to_input

    x = to_input([r0.image], 64, model.backbone.mean, model.backbone.std, "cpu")
    t = ds.concepts.index(r0.concept)
    maps = concept_regions(model.classifier, model.translator, x, text[t:t + 1], LAYERS, method="loop")
    for i, layer in enumerate(LAYERS):
        ref = metrics.nra(maps[layer][0], r0.mask[None].expand(1, -1, -1))
        # NRA ranks pixels: 1e-7 differences between the batched and the loop maps can reorder near-ties of the
        # bilinear upsampling (4x4 -> 64x64 at layer4), moving NRA by ~1e-5
        assert float(ref[0]) == pytest.approx(ps["nra"][0][i], abs=2e-4), layer
    # CLIP-Dissect: every pair has a neuron map, metrics in range
    assert set(res["clip_dissect"]["neurons"]) == set(ps["concepts"])
    assert 0.0 <= res["clip_dissect"]["mean"]["hit_rate"] <= 1.0
    assert set(res["cefam"]["per_layer"]) == set(LAYERS)
    diag = res["cefam"]["stage_diagnostics"]
    assert set(diag) == set(LAYERS) and all(v["z_channel_std"] > 0 for v in diag.values())
    assoc = torch.tensor(ps["association"])
    assert torch.equal(assoc.argmax(1), torch.tensor(ps["chosen"]))
    assert [diag[n]["association_mean"] for n in LAYERS] == pytest.approx(assoc.mean(0).tolist(), abs=1e-4)


def test_evaluate_clip_dissect_probe_set(tiny, monkeypatch):
    """``EvalConfig.probe``: CLIP-Dissect labels its neurons on a separate probe set (as its authors probe a large
    dataset), not on the evaluated images; the neurons are those :func:`dissect` picks from the probe's activations."""
    import fastcbm.cefam.evaluate as E

    model, clip, pre, ds, text = tiny
    probe = TestbedDataset(5, seed=ds.seed + 17)
    seen = []
    real = E._probe
    monkeypatch.setattr(E, "_probe", lambda m, c, cc, d, cfg: seen.append(d) or real(m, c, cc, d, cfg))
    res = evaluate_cefam(model, ds, text_emb=text, clip_model=clip, clip_preprocess=pre,
                         config=EvalConfig(batch_size=2, progress=False, wpmi_top_k=3, probe=probe))
    assert seen == [probe]
    pooled, emb = real(model, clip, E.clip_input_config(clip, pre), probe, EvalConfig(batch_size=2, progress=False))
    want = CD.dissect(pooled, emb, text, LAYERS, top_k=3)
    assert {c: (v["layer"], v["channel"]) for c, v in res["clip_dissect"]["neurons"].items()} == {
        c: want.neuron[ds.concepts.index(c)] for c in res["clip_dissect"]["neurons"]}


def test_evaluate_bad_input(tiny):
    model, _, _, ds, text = tiny

    class Empty:
        concepts = ()
        types = ()

        def __iter__(self):
            return iter(())

    with pytest.raises(ValueError, match="concept list is empty"):
        evaluate_cefam(model, Empty(), text_emb=text[:0], config=EvalConfig(baseline=False, progress=False))
    with pytest.raises(ValueError, match="text_emb has 3 rows"):
        evaluate_cefam(model, ds, text_emb=text[:3], config=EvalConfig(baseline=False, progress=False))
    with pytest.raises(ValueError, match="needs clip_model"):
        evaluate_cefam(model, ds, text_emb=text, config=EvalConfig(progress=False))
    _, clip, pre, _, _ = tiny
    with pytest.raises(ValueError, match="probe set holds no images"):
        evaluate_cefam(model, ds, text_emb=text, clip_model=clip, clip_preprocess=pre,
                       config=EvalConfig(progress=False, probe=Empty()))


def test_evaluate_broden_tree(tmp_path, tiny):
    """End to end on a tiny Broden tree: 224-px image, 112-px masks (maps resized to the mask)."""
    from fastcbm.cefam.datasets import BrodenDataset

    from .test_cefam_datasets import _broden

    model, clip, pre, _, _ = tiny
    ds = BrodenDataset(_broden(tmp_path))
    text = torch.nn.functional.normalize(torch.randn(len(ds.concepts), 128, generator=torch.Generator().manual_seed(2)),
                                         dim=-1)
    res = evaluate_cefam(model, ds, text_emb=text, clip_model=clip, clip_preprocess=pre,
                         config=EvalConfig(batch_size=4, progress=False, top_k=4))
    assert res["pairs"] == 5 and res["images"] == 4
    assert set(res["cefam"]["association_top1"]["per_type"]) == {"object", "part", "color", "material"}
    assert np.isfinite(res["clip_dissect"]["mean"]["nra"])


def test_report_page(tmp_path):
    from fastcbm.cefam.explain import CEFAMExplanation, ConceptExplanation
    from fastcbm.cefam.report import write_cefam_report

    e = CEFAMExplanation(1, "blue circle", torch.tensor([0.1, 0.9]),
                         [ConceptExplanation("circle", 12.0, "layer2", {"layer2": 0.3}, 0.4),
                          ConceptExplanation("blue", 9.0, "layer1", {"layer1": 0.1}, -0.1)],
                         torch.rand(2, 16, 16))
    images = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    evaluation = {"cefam": {"association_top1": summarize(["object"], torch.tensor([0.6]), torch.tensor([0.6]),
                                                          torch.tensor([0.3]), torch.tensor([True]))},
                  "note": "oracle note"}
    cmp = {"images": images, "masks": [torch.ones(8, 8, dtype=torch.bool)], "concepts": ["circle"],
           "cefam": [torch.rand(4, 4)], "clip_dissect": [torch.rand(2, 2)]}
    path = write_cefam_report(tmp_path / "r.html", images=images, explanations=[e], summary={"a": 1.0},
                              evaluation=evaluation, comparisons=cmp)
    page = path.read_text()
    assert "blue circle" in page and "layer2" in page and "oracle note" in page and page.count("data:image/png") == 7
    with pytest.raises(ValueError, match="images has 2 images, expected 1"):
        write_cefam_report(tmp_path / "x.html", images=images.expand(2, -1, -1, -1), explanations=[e], summary={})
    e.regions = torch.rand(3, 16, 16)
    with pytest.raises(ValueError, match=r"regions must be \[k, H, W\] with k = 2"):
        write_cefam_report(tmp_path / "x.html", images=images, explanations=[e], summary={})
