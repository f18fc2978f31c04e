"""DEAL data, objective, training (resume, plain baseline), `fastcbm deal train` and its bad-input errors."""

from __future__ import annotations

import json

import pytest
import torch

from fastcbm.deal import data as D
from fastcbm.deal import losses as L
from fastcbm.deal.train import DealConfig, train_deal
from tests.conftest import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- data ----------------------------------------------------------------------------------------------------------
def test_concepts_json_first_k_and_errors(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"cat": ["a", "b", "c", "d", "e", "f"], "dog": ["x", "y", "z", "w", "v", "u"]}))
    assert D.load_concepts_json(p) == {"cat": ["a", "b", "c", "d", "e"], "dog": ["x", "y", "z", "w", "v"]}
    assert D.load_concepts_json(p, k=2)["dog"] == ["x", "y"]
    p.write_text(json.dumps({"cat": ["a", "b", "c", "d", "e"], "dog": []}))
    with pytest.raises(ValueError, match="class 'dog' has no descriptors"):
        D.load_concepts_json(p)
    p.write_text(json.dumps({"cat": ["a", "b", "c"]}))
    with pytest.raises(ValueError, match="class 'cat' has 3 descriptors, fewer than k=5"):
        D.load_concepts_json(p)
    p.write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON at line 1"):
        D.load_concepts_json(p)




def test_captions_code_and_paper_forms():
    ds = ["wings", "a beak", "feathers"]
    assert D.captions("bird", ds) == "bird. It may contain wings, a beak, feathers"
    assert D.captions("bird", ds, form="paper") == "An image of bird with wings, a beak, and feathers"
    assert D.captions("bird", ["wings"], form="paper") == "An image of bird with wings"
    with pytest.raises(ValueError, match="caption form"):
        D.captions("bird", ds, form="other")


def test_testbed_concepts_cover_classes_in_vocabulary():
    from fastcbm.data import synthetic as S
    from fastcbm.models.testbed import VOCAB

    concepts = D.testbed_concepts()
    assert sorted(concepts) == sorted(S.class_names())
    for name, descs in concepts.items():
        assert len(descs) == 6 and set(name.split()) <= set(descs)
        assert all(w in VOCAB for d in descs for w in d.split())
    assert D.match_classes(["blue_circle"], concepts) == {"blue_circle": concepts["blue circle"]}
    with pytest.raises(ValueError, match="class 'red_moon' has no descriptors"):
        D.match_classes(["red_moon"], concepts)


# ---- losses --------------------------------------------------------------------------------------------------------
def test_regularisers_match_their_definitions():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 5, 4, 4, generator=g)
    cat, c = maps[:, 0], maps[:, 1:]
    K = c.shape[1]
    pairs = [(i, j) for i in range(K) for j in range(i)]
    sep = sum((c[:, i] * c[:, j]).sum((1, 2)) for i, j in pairs).mean()
    assert_close(L.separation(maps), sep, atol=1e-5, rtol=1e-6, what="code separation")
    sep_l1 = -sum((c[:, i] - c[:, j]).abs().sum((1, 2)) for i, j in pairs).mean()
    assert_close(L.separation(maps, "paper"), sep_l1, atol=1e-5, rtol=1e-6, what="paper separation")
    con = ((c.sum(1) - cat) ** 2).sum() / 3
    assert_close(L.consistency(maps), con, atol=1e-5, rtol=1e-6, what="code consistency")
    con_l1 = (cat - c.mean(1)).abs().sum((1, 2)).mean()
    assert_close(L.consistency(maps, "paper"), con_l1, atol=1e-5, rtol=1e-6, what="paper consistency")
    assert_close(L.sparsity(maps), c.abs().sum((1, 2, 3)).mean(), atol=1e-5, rtol=1e-6, what="sparsity")
    with pytest.raises(ValueError, match="loss form"):
        L.separation(maps, "l2")


def test_info_nce_and_deal_loss():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    logits = 10 * torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T
    ref = (torch.nn.functional.cross_entropy(logits, torch.arange(4))
           + torch.nn.functional.cross_entropy(logits.T, torch.arange(4))) / 2
    assert_close(L.info_nce(a, b, 10.0), ref, atol=1e-6, rtol=1e-6, what="InfoNCE")
    maps = torch.rand(4, 3, 2, 2, generator=g)
    t = L.deal_loss(maps, a, b, 10.0, lambda_sep=0.1, lambda_con=0.01, lambda_spa=5e-4)
    expect = ref + 0.1 * L.separation(maps) + 0.01 * L.consistency(maps) + 5e-4 * L.sparsity(maps)
    assert_close(t["loss"], expect, atol=1e-6, rtol=1e-6, what="total")
    plain = L.deal_loss(None, a, b, 10.0)
    assert float(plain["separation"]) == 0 and torch.equal(plain["loss"], plain["contrastive"])


# ---- training ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scenes():
    from fastcbm.data import synthetic as S

    return S.generate(12, 3)


def _visual_state(model_or_dir):
    from fastcbm.models import load_clip

    model = load_clip(str(model_or_dir))[0]
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith("visual.")}


def test_deal_trains_image_tower_differently_from_plain(scenes, tmp_path):
    cfg = dict(steps=1, batch_size=6, lr=1e-4, checkpoint_every=0)
    plain = train_deal(scenes, D.testbed_concepts(), config=DealConfig(plain=True, **cfg), out=tmp_path / "plain",
                       progress=False)
    deal = train_deal(scenes, D.testbed_concepts(), config=DealConfig(**cfg), out=tmp_path / "deal",
                      progress=False)
    p, d = plain["history"][0], deal["history"][0]
    assert p["separation"] == 0 and d["separation"] > 0 and d["consistency"] > 0 and d["sparsity"] > 0
    assert p["contrastive"] == pytest.approx(d["contrastive"], abs=1e-6)  # same data, captions and start
    assert deal["captions"]["blue circle"] == "blue circle. It may contain circle, blue, border, dot, striped"
    vp, vd = _visual_state(tmp_path / "plain"), _visual_state(tmp_path / "deal")
    base = _visual_state("testbed")
    moved = [k for k in vp if not torch.equal(vp[k], base[k])]
    assert moved, "plain fine-tuning changed no image-tower weight"
    differ = [k for k in vp if not torch.equal(vp[k], vd[k])]
    assert "visual.layer1.0.conv1.weight" in differ  # the regularisers reach the first stage too


def test_explained_texts_without_gradient_by_default_text_grad_opt_in(scenes, tmp_path):
    """Default (``explain_text_grad=False``): the K+1 explained texts are constants, so the regularisers train the image
    tower only and the text tower moves as in plain fine-tuning (captions only); ``explain_text_grad=True`` also sends
    the regularisers' gradient into the text tower. Same forward values either way."""
    from safetensors.torch import load_file

    assert DealConfig().explain_text_grad is False
    cfg = dict(steps=1, batch_size=6, lr=1e-4, checkpoint_every=0)
    runs = {}
    for name, kw in (("plain", dict(plain=True)), ("default", {}), ("text_grad", dict(explain_text_grad=True))):
        runs[name] = train_deal(scenes, D.testbed_concepts(), config=DealConfig(**cfg, **kw), out=tmp_path / name,
                                progress=False)
    assert runs["default"]["history"][0] == runs["text_grad"]["history"][0]  # same forward values
    w = {name: load_file(str(tmp_path / name / "weights.safetensors")) for name in runs}
    base = _visual_state("testbed")
    key = "visual.layer1.0.conv1.weight"
    assert not torch.equal(w["default"][key], base[key])  # the image tower trains
    text = [k for k in w["plain"] if not k.startswith("visual.")]

    def dist(a, b):
        return max(float((w[a][k] - w[b][k]).abs().max()) for k in text)

    # text tower: default ≈ plain (only float rounding of the shared contrastive gradient), text_grad moves elsewhere
    assert dist("default", "plain") < 0.05 * dist("text_grad", "plain"), (dist("default", "plain"),
                                                                          dist("text_grad", "plain"))


def test_resume_equals_uninterrupted_run(scenes, tmp_path):
    cfg = dict(batch_size=4, lr=1e-4, checkpoint_every=1)
    straight = train_deal(scenes, D.testbed_concepts(), config=DealConfig(steps=3, **cfg), out=tmp_path / "a",
                          progress=False)
    train_deal(scenes, D.testbed_concepts(), config=DealConfig(steps=2, **cfg), out=tmp_path / "b", progress=False)
    resumed = train_deal(scenes, D.testbed_concepts(), config=DealConfig(steps=3, **cfg), out=tmp_path / "b",
                         progress=False)
    assert resumed["resumed_from"] == 2 and len(resumed["history"]) == 3
    assert resumed["history"] == straight["history"]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "a" / "weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "weights.safetensors"))
    for k in a:
        assert_close(b[k], a[k], atol=1e-7, rtol=1e-6, what=k)
    with pytest.raises(ValueError, match="different run"):
        train_deal(scenes, D.testbed_concepts(), config=DealConfig(steps=3, **{**cfg, "lr": 1e-3}),
                   out=tmp_path / "b", progress=False)


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(scenes, tmp_path, monkeypatch):
    import fastcbm.deal.train as T

    real = T.deal_loss
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        if calls["n"] == 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(T, "deal_loss", flaky)
    with pytest.raises(T.NonFiniteLossError, match=r"nan at step 3; stopped, the last good checkpoint \(step 2\)"):
        train_deal(scenes, D.testbed_concepts(), config=DealConfig(steps=5, batch_size=4, checkpoint_every=1,
                                                                   plain=True),
                   out=tmp_path, progress=False)
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["step"] == 2
    assert not (tmp_path / "weights.safetensors").exists()


def test_vit_tower_trains(scenes, tmp_path):
    from fastcbm.compat import import_open_clip
    from fastcbm.models import register_clip

    open_clip = import_open_clip()
    from open_clip.model import CLIP

    def tiny(pretrained):
        torch.manual_seed(0)
        model = CLIP(embed_dim=16, vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16),
                     text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
        return model, None, open_clip.get_tokenizer("ViT-B-32")

    register_clip("test-tiny-vit", tiny)
    report = train_deal(scenes, D.testbed_concepts(), "test-tiny-vit",
                        DealConfig(steps=1, batch_size=4, checkpoint_every=0), out=tmp_path, progress=False)
    assert report["final"]["separation"] > 0
    from fastcbm.models import load_clip

    model = load_clip(str(tmp_path))[0]
    assert model.visual.image_size == (32, 32)


# ---- CLI -----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folder(tmp_path_factory, scenes):
    from fastcbm.data.export import export_image_folder

    root = tmp_path_factory.mktemp("deal_data")
    export_image_folder(scenes, root, masks=False)
    (root / "concepts.json").write_text(json.dumps(D.testbed_concepts()))
    return root


def _cli(args):
    from fastcbm.cli import main

    return main(["deal", "train", *args, "--no-progress"])


def test_cli_train_writes_model_that_load_clip_reads(folder, tmp_path, capsys):
    out = tmp_path / "m"
    rc = _cli(["--data", str(folder), "--concepts", str(folder / "concepts.json"), "--model", "testbed", "--out",
               str(out), "--steps", "1", "--batch-size", "4", "--lr", "1e-4"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 1 and summary["final"]["separation"] > 0
    report = json.loads((out / "train_report.json").read_text())
    assert report["images"] == 12 and report["data"].endswith("images")
    from safetensors.torch import load_file

    from fastcbm.models import load_clip

    model, _, tok = load_clip(str(out))
    saved = load_file(str(out / "weights.safetensors"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert tok("a blue circle").shape[-1] == 24  # the base model's tokenizer


def test_cli_explain_layer_and_text_grad_flags(folder, tmp_path, capsys):
    """--explain-layer layer3 and --explain-text-grad reach DealConfig; the output folder records the layer and
    `fastcbm deal evaluate --model DIR` scores the maps at that layer by default."""
    from fastcbm.cli import main

    out = tmp_path / "m3"
    rc = _cli(["--data", str(folder), "--concepts", str(folder / "concepts.json"), "--out", str(out), "--steps", "1",
               "--batch-size", "4", "--lr", "1e-4", "--explain-layer", "layer3", "--explain-text-grad"])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    cfg = json.loads((out / "train_report.json").read_text())["config"]
    assert cfg["explain_layer"] == "layer3" and cfg["explain_text_grad"] is True
    assert json.loads((out / "config.json").read_text())["explain_layer"] == "layer3"
    rc = main(["deal", "evaluate", "--data", "testbed", "--model", str(out), "--n", "2", "--k", "2",
               "--localizability-images", "1", "--curve-steps", "2", "--device", "cpu", "--no-progress"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["explain_layer"] == "layer3" and res["map_size"] == [4, 4]
    with pytest.raises(ValueError, match="explain_layer must be"):
        DealConfig(explain_layer="layer2").validate()


@pytest.mark.parametrize("case,pattern", [
    ("no_descriptors", "class 'blue circle' has no descriptors"),
    ("missing_class", "class 'blue_circle' has no descriptors"),
    ("few", "has 2 descriptors, fewer than k=5"),
    ("long", "text too long for the tokenizer's context"),
    ("model", "unknown CLIP model 'NoSuchCLIP'"),
])
def test_cli_bad_input_one_clear_line(case, pattern, folder, tmp_path, capsys):
    concepts = D.testbed_concepts()
    model = "testbed"
    if case == "no_descriptors":
        concepts["blue circle"] = []
    elif case == "missing_class":
        del concepts["blue circle"]
    elif case == "few":
        concepts["blue circle"] = ["circle", "blue"]
    elif case == "long":
        concepts["blue circle"] = [f"blue circle with a border and a dot {w}" for w in ("a", "b", "c", "d", "e")]
    else:
        model = "NoSuchCLIP"
    path = tmp_path / "c.json"
    path.write_text(json.dumps(concepts))
    rc = _cli(["--data", str(folder), "--concepts", str(path), "--model", model, "--out", str(tmp_path / "o"),
               "--steps", "1", "--batch-size", "4"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and pattern in err, err


def test_cli_defaults_are_the_published_settings():
    from fastcbm.cli import build_parser

    cfg = DealConfig()
    args = build_parser().parse_args(["deal", "train", "--data", "d", "--concepts", "c.json", "--out", "o"])
    assert len(args.config_fields) >= 17
    for k in args.config_fields:  # every option of DealConfig defaults to its field (tests/test_cli.py: all parsers)
        assert getattr(args, k) == getattr(cfg, k), k
    assert (cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay) == (5e-7, (0.9, 0.98), 1e-6, 1e-3)
    assert (cfg.lambda_sep, cfg.lambda_con, cfg.lambda_spa, cfg.k) == (0.1, 0.01, 5e-4, 5)


@pytest.mark.gpu
def test_gpu_explanations_and_bf16_training_step(scenes, tmp_path):
    from fastcbm.deal.explain import explanations
    from fastcbm.models import load_clip

    model = load_clip("testbed", device="cuda")[0]
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 3, 64, 64, generator=g).cuda(), torch.randn(4, 6, 128, generator=g).cuda()
    assert_close(explanations(model, x, t), explanations(model, x, t, mode="loop"), atol=1e-4, rtol=1e-3,
                 what="cuda fast == loop")
    report = train_deal(scenes, D.testbed_concepts(), config=DealConfig(steps=2, batch_size=4, checkpoint_every=0),
                        out=tmp_path, progress=False, device="cuda")
    assert report["amp"] and all(torch.isfinite(torch.tensor(h["loss"])) for h in report["history"])
    assert report["final"]["separation"] > 0
