"""SALF-CBM model layer on a tiny random backbone: fitting, explanations, interventions, save/load."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from fastcbm.salf import explain as ex
from fastcbm.salf.bottleneck import BottleneckConfig, concept_similarity
from fastcbm.salf.model import SALFCBM, SALFConfig
from fastcbm.salf.pipeline import SALFFitConfig, backbone_grid_features, fit_salf

GRID = (3, 3)


class TinyNet(nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        self.stem = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 8, 3, padding=1), act=nn.ReLU()))
        self.layer4 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(self.layer4(self.stem(x)).mean(dim=(2, 3)))


@dataclass
class FakeBackbone:  # the fields fastcbm.models.Backbone provides
    model: nn.Module
    kind: str = "cnn"
    feature_layers: list = field(default_factory=lambda: ["layer4"])
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.25, 0.25, 0.25)
    input_size: int = 12


def _problem(seed: int = 0, n: int = 90):
    """Images, and CLIP-like prompt embeddings that are a fixed linear function of the backbone's grid features, so a
    bottleneck can match them; labels depend on the pooled concepts."""
    torch.manual_seed(seed)
    backbone = FakeBackbone(TinyNet())
    images = torch.randint(0, 256, (n, 3, 12, 12), dtype=torch.uint8)
    feats = backbone_grid_features(backbone, images, GRID, progress=False)  # [n, 8, 9]
    mix = torch.randn(6, 8)
    emb = torch.nn.functional.normalize(torch.einsum("dc,ncl->nld", mix, feats), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(5, 6), dim=-1)
    scores = torch.einsum("nld,md->nm", emb, text)
    labels = (scores[:, :3] - scores[:, :3].mean(0)).argmax(1)
    return backbone, images, labels, emb, text


@pytest.fixture(scope="module")
def fitted():
    backbone, images, labels, emb, text = _problem()
    cfg = SALFConfig(grid=GRID, concepts=[f"c{i}" for i in range(5)], class_names=["a", "b", "c"])
    fit = SALFFitConfig(bottleneck=BottleneckConfig(lr=0.05, max_steps=150, eval_every=10, patience=20,
                                                    interpretability_cutoff=0.0),
                        head_options={"n_lambdas": 12, "max_epochs": 25})
    model, report = fit_salf(backbone=backbone, config=cfg, train=(images[:60], labels[:60], emb[:60]),
                             val=(images[60:], labels[60:], emb[60:]), text_emb=text, fit=fit, progress=False)
    return model, report, (backbone, images, labels, emb, text)


def _normalized(backbone, images):
    from fastcbm.models.features import normalize_for_backbone

    return normalize_for_backbone(images, backbone, torch.device("cpu"))


def test_bottleneck_learns_the_targets(fitted):
    model, report, _ = fitted
    hist = report.bottleneck.history
    assert hist[-1]["val_loss"] < hist[0]["val_loss"] - 0.1, hist
    assert report.bottleneck.val_similarity.max() > 0.5
    assert len(report.concepts_kept) + len(report.concepts_dropped) == 5


def test_model_forward_matches_pipeline_pieces(fitted):
    model, _, (backbone, images, labels, emb, text) = fitted
    x = _normalized(backbone, images[:7])
    logits = model(x)
    assert logits.shape == (7, 3)
    maps = model.concept_maps(x)
    assert maps.shape == (7, len(model.config.concepts), *GRID)
    manual = model.head(maps.mean(dim=(2, 3)))
    torch.testing.assert_close(logits, manual)


def test_interpretability_cutoff_drops_concepts():
    backbone, images, labels, emb, text = _problem(seed=1)
    cfg = SALFConfig(grid=GRID, concepts=[f"c{i}" for i in range(5)], class_names=["a", "b", "c"])
    fit = SALFFitConfig(bottleneck=BottleneckConfig(lr=0.05, max_steps=40, interpretability_cutoff=0.999),
                        head_options={"n_lambdas": 3, "max_epochs": 3})
    with pytest.raises(ValueError, match="interpretability cut-off"):
        fit_salf(backbone=backbone, config=cfg, train=(images[:60], labels[:60], emb[:60]),
                 val=(images[60:], labels[60:], emb[60:]), text_emb=text, fit=fit, progress=False)


def test_explanations_add_up(fitted):
    model, _, (backbone, images, *_) = fitted
    x = _normalized(backbone, images[:4])
    exps = ex.explain(model, x, top_k=2)
    logits = model(x)
    for i, e in enumerate(exps):
        assert e.predicted == int(logits[i].argmax())
        # contributions sum to the logit minus the bias
        torch.testing.assert_close(e.contributions.sum() + model.head.bias[e.predicted], logits[i, e.predicted],
                                   rtol=1e-5, atol=1e-5)
        assert e.heatmaps.shape == (len(e.top_concepts), 12, 12)
        assert e.top_concepts[0][1] >= e.top_concepts[-1][1]


def test_region_query_and_errors(fitted):
    model, _, (backbone, images, *_) = fitted
    x = _normalized(backbone, images[:1])
    for region in [(3, 4), (0, 0, 6, 6), torch.ones(12, 12, dtype=torch.bool)]:
        top = ex.explain_region(model, x, region, top_k=2)
        assert len(top) == min(2, len(model.config.concepts))
    with pytest.raises(ValueError, match="outside"):
        ex.explain_region(model, x, (20, 1))
    with pytest.raises(ValueError, match="empty"):
        ex.explain_region(model, x, (5, 5, 5, 9))


def test_local_intervention_moves_the_logit(fitted):
    model, _, (backbone, images, *_) = fitted
    x = _normalized(backbone, images[:3])
    w = model.head.weight
    k, m = divmod(int(w.abs().argmax()), w.shape[1])
    before, after = ex.intervene(model, x, m, beta=5.0)
    delta = (after - before)[:, k]
    expected = w[k, m] * 5.0 / model.concept_std[m]  # mean pooling: every cell +β → pooled +β
    torch.testing.assert_close(delta, expected.expand_as(delta), rtol=1e-4, atol=1e-4)
    mask = torch.zeros(12, 12)
    mask[:6] = 1
    _, half = ex.intervene(model, x, model.config.concepts[m], beta=5.0, mask=mask)
    torch.testing.assert_close((half - before)[:, k], expected.expand_as(delta) / 2, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="not in the model"):
        ex.intervene(model, x, "nope", 1.0)


def test_decision_rules_are_the_nonzero_weights(fitted):
    model, *_ = fitted
    rules = ex.decision_rules(model)
    assert list(rules) == ["a", "b", "c"]
    for k, (name, rule) in enumerate(rules.items()):
        assert len(rule) == int((model.head.weight[k] != 0).sum())
        assert all(abs(rule[i][1]) >= abs(rule[i + 1][1]) for i in range(len(rule) - 1))


def test_class_heatmap_shape(fitted):
    model, _, (backbone, images, *_) = fitted
    heat = ex.class_heatmap(model, _normalized(backbone, images[:2]))
    assert heat.shape == (2, 12, 12) and torch.isfinite(heat).all()


def test_save_load_round_trip(fitted, tmp_path):
    model, _, (backbone, images, *_) = fitted
    model.save(tmp_path / "m")
    loaded = SALFCBM.load(tmp_path / "m", backbone=backbone.model)
    x = _normalized(backbone, images[:5])
    torch.testing.assert_close(loaded(x), model(x))
    assert loaded.config == model.config
    (tmp_path / "bad").mkdir()
    with pytest.raises(FileNotFoundError, match="not a saved SALF-CBM"):
        SALFCBM.load(tmp_path / "bad", backbone=backbone.model)
    (tmp_path / "m" / "config.json").write_text("{")
    with pytest.raises(ValueError, match="invalid JSON"):
        SALFCBM.load(tmp_path / "m", backbone=backbone.model)


def test_concept_similarity_matches_reference_chunking():
    torch.manual_seed(0)
    w, f, e, t = torch.randn(7, 4), torch.randn(10, 4, 3), torch.randn(10, 3, 5), torch.randn(7, 5)
    a = concept_similarity(w, f, e, t, concept_chunk=2)
    b = concept_similarity(w, f, e, t, concept_chunk=100)
    torch.testing.assert_close(a, b)
