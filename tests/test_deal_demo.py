"""fastcbm deal demo, fastcbm deal evaluate, fastcbm deal explain, and the DEAL HTML page (tiny settings)."""

from __future__ import annotations

import json

import pytest
import torch

from fastcbm.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_deal_demo_tiny(tmp_path, capsys):
    from fastcbm.deal.demo import DealDemoConfig, run_deal_demo

    out = tmp_path / "demo"
    s = run_deal_demo(DealDemoConfig(out=out, steps=2, batch_size=8, n_train=32, n_eval=6, n_accuracy=10,
                                     localizability_images=2, progress=False))
    assert s["k"] == 3 and s["concepts"].startswith("distinct") and s["accuracy_images"] == 10
    for m in ("base", "plain", "deal"):
        for key in ("disentanglability", "localizability", "concept_accuracy", "zero_shot_accuracy", "part_miou"):
            assert 0.0 <= s[f"{m}_{key}"] <= 1.0, (m, key)
    assert s["deal_minus_plain_disentanglability"] == pytest.approx(
        s["deal_disentanglability"] - s["plain_disentanglability"], abs=2e-4)
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 * 5  # 3 models × (image + category + 3 concepts)
    assert "accuracy with concepts" in page and "part mIoU" in page
    saved = json.loads((out / "summary.json").read_text())
    assert set(saved["results"]) == {"base", "plain", "deal"}
    # both runs trained the same number of steps from the same start; the DEAL run's regularisers moved it elsewhere
    plain = json.loads((out / "plain" / "train_report.json").read_text())
    deal = json.loads((out / "deal" / "train_report.json").read_text())
    assert plain["steps"] == deal["steps"] == 2
    assert deal["final"]["separation"] > 0 and plain["final"]["separation"] == 0
    # a DEAL output folder is scored with the concepts it was trained on unless --concepts / --k say otherwise
    assert json.loads((out / "deal" / "config.json").read_text())["concepts"]["blue circle"] == ["circle", "border",
                                                                                                 "dot"]
    assert main(["deal", "evaluate", "--data", "testbed", "--model", str(out / "deal"), "--n", "2",
                 "--localizability-images", "0", "--device", "cpu", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["k"] == 3
    assert main(["deal", "evaluate", "--data", "testbed", "--model", str(out / "deal"), "--n", "2", "--k", "5",
                 "--localizability-images", "0", "--device", "cpu", "--no-progress"]) == 2
    assert "config.json: class 'blue circle' has 3 descriptors, fewer than k=5" in capsys.readouterr().err
    # one image's maps from the DEAL model: its concepts (K = 3) at the stage it was trained on
    img = _scene_png(tmp_path)
    assert main(["deal", "explain", str(img), "--model", str(out / "deal"), "--device", "cpu"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["texts"]) == 4 and res["explain_layer"] == "layer3" and res["map_size"] == [4, 4]


def _scene_png(tmp_path):
    from PIL import Image

    from fastcbm.data import synthetic as S

    scene = S.generate(1, S.TRAINING_SEED_LIMIT + 4242)
    img = tmp_path / "scene.png"
    Image.fromarray(scene.images[0].permute(1, 2, 0).numpy()).save(img)
    return img


def test_deal_explain_cli(tmp_path, capsys):
    """`fastcbm deal explain`: one image's category + concept maps from any CLIP (here the base testbed CLIP), the
    zero-shot class or --class, and the page of deal/report.py without a metrics table."""
    from fastcbm.data import synthetic as S

    img = _scene_png(tmp_path)
    html = tmp_path / "x.html"
    assert main(["deal", "explain", str(img), "--device", "cpu", "--html", str(html)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["class"] in S.class_names() and res["class_source"] == "zero-shot prediction"
    assert [t["text"] for t in res["texts"]][0] == res["class"] and len(res["texts"]) == 6  # class + K = 5
    assert sum(z["probability"] for z in res["zero_shot"]) <= 1.0 + 1e-6 and res["map_size"] == [2, 2]
    page = html.read_text()
    assert page.count("data:image/png;base64,") == 1 + 6 and "<h2>Metrics</h2>" not in page
    assert main(["deal", "explain", str(img), "--class", "green square", "--k", "2", "--explain-layer", "layer3",
                 "--device", "cpu"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["class"] == "green square" and res["class_source"] == "--class" and len(res["texts"]) == 3
    assert res["map_size"] == [4, 4]
    assert main(["deal", "explain", str(img), "--class", "purple cow", "--device", "cpu"]) == 2
    assert "--class 'purple cow' is not a class" in capsys.readouterr().err
    assert main(["deal", "explain", str(tmp_path / "none.png")]) == 2
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert main(["deal", "explain", str(tmp_path / "bad.png"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "does not exist" in err[0] and "bad.png" in err[1]


def test_demo_cli_dispatches_to_deal(monkeypatch, tmp_path, capsys):
    import fastcbm.deal.demo as D

    seen = {}

    def fake(cfg):
        seen["cfg"] = cfg
        return {"method": "deal"}

    monkeypatch.setattr(D, "run_deal_demo", fake)
    assert main(["deal", "demo", "--seed", "3", "--no-progress", "--out", str(tmp_path)]) == 0
    assert seen["cfg"].seed == 3 and seen["cfg"].out == tmp_path and not seen["cfg"].progress
    assert json.loads(capsys.readouterr().out) == {"method": "deal"}
    assert main(["deal", "demo", "--no-progress"]) == 0  # the default folder is the DEAL demo's own
    assert str(seen["cfg"].out) == "fastcbm_out/deal_demo"


def test_deal_evaluate_cli_testbed(tmp_path, capsys):
    out = tmp_path / "m.json"
    rc = main(["deal", "evaluate", "--data", "testbed", "--n", "4", "--k", "2", "--localizability-images", "1",
               "--curve-steps", "4", "--device", "cpu", "--no-progress", "--out", str(out)])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["images"] == 4 and printed["localizability_pairs"] == 2 and 0 <= printed["part_miou"] <= 1


def test_accuracy_alone_equals_evaluate():
    """``deal.evaluate.accuracy`` (no explanations, for thousands of scenes) gives :func:`evaluate`'s accuracies."""
    import dataclasses

    from fastcbm.deal.data import testbed_concepts
    from fastcbm.deal.evaluate import accuracy, evaluate, testbed_set
    from fastcbm.models import load_clip

    model, _, tok = load_clip("testbed")
    data = testbed_set(12)
    concepts = testbed_concepts(distinct=True)
    full = evaluate(model, tok, data, concepts, k=3, batch_size=5, localizability_images=0, progress=False)
    alone = accuracy(model, tok, data, concepts, k=3, batch_size=7)
    assert alone == {k: full[k] for k in ("concept_accuracy", "zero_shot_accuracy")}
    with pytest.raises(ValueError, match="has 3 descriptors, 5 needed"):
        accuracy(model, tok, data, concepts, k=5)
    empty = dataclasses.replace(data, images=data.images[:0], labels=data.labels[:0], masks=None, names=None)
    with pytest.raises(ValueError, match="no images"):
        accuracy(model, tok, empty, concepts, k=3)


def test_deal_evaluate_cli_folder_and_errors(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    for cls in ("blue_circle", "green_circle"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "data" / cls / "a.png")
    assert main(["deal", "evaluate", "--data", str(tmp_path / "data")]) == 2
    assert "--concepts: required" in capsys.readouterr().err
    concepts = tmp_path / "c.json"
    concepts.write_text(json.dumps({"blue circle": ["circle", "blue"], "green circle": ["circle", "green"]}))
    rc = main(["deal", "evaluate", "--data", str(tmp_path / "data"), "--concepts", str(concepts), "--k", "2",
               "--curve-steps", "2", "--device", "cpu", "--no-progress"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["images"] == 2 and "part_miou" not in res  # an ImageFolder has no masks
    assert main(["deal", "evaluate", "--data", str(tmp_path / "data"), "--concepts", str(concepts), "--k", "3",
                 "--device", "cpu"]) == 2
    assert "fewer than k=3" in capsys.readouterr().err


def test_deal_report_rejects_bad_maps(tmp_path):
    from fastcbm.deal.report import write_deal_report

    img = torch.zeros(3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"maps\['x'\] must be \[K\+1, h, w\]"):
        write_deal_report(tmp_path / "r.html", image=img, maps={"x": torch.rand(2, 2, 2)}, texts=["a", "b", "c"],
                          results={"x": {}})
    p = write_deal_report(tmp_path / "r.html", image=img, maps={"x": torch.rand(3, 2, 2)}, texts=["a", "b", "c"],
                          results={"x": {"disentanglability": 0.5}})
    assert "0.5" in p.read_text()


def test_deal_lowers_separation_vs_plain_same_steps(tmp_path):
    """The regularisers reach the weights: 6 steps of DEAL leave concept maps that overlap less than 6 steps of plain
    fine-tuning with the same data order and captions (seed 0: 7.84 vs 8.46; DEAL was lower for seeds 0-2 too)."""
    from fastcbm.data import synthetic as S
    from fastcbm.deal.data import testbed_concepts
    from fastcbm.deal.evaluate import testbed_set
    from fastcbm.deal.explain import encode_text_rows, explanations
    from fastcbm.deal.metrics import separation_per_image
    from fastcbm.deal.train import DealConfig, load_deal_clip, train_deal

    concepts = testbed_concepts()
    train = S.generate(96, seed=S.TRAINING_SEED_LIMIT + 70_000)
    data = testbed_set(24, seed=S.TRAINING_SEED_LIMIT + 71_000)
    rows = [[data.class_names[int(y)], *concepts[data.class_names[int(y)]][:5]] for y in data.labels]
    sep = {}
    for plain in (True, False):
        out = tmp_path / ("plain" if plain else "deal")
        train_deal(train, concepts, "testbed", DealConfig(lr=1e-4, steps=6, batch_size=16, plain=plain,
                                                          checkpoint_every=0), out, resume=False, progress=False)
        model, _, tok = load_deal_clip(out)
        maps = explanations(model, data.images, encode_text_rows(model, tok, rows), create_graph=False)
        sep[plain] = float(separation_per_image(maps[:, 1:]).mean())
    assert sep[False] < sep[True] - 0.2, sep


def test_deal_demo_settings_raise_localisation_without_lowering_accuracy(tmp_path):
    """The issue's quality claim at the demo's settings (layer3 maps, lr 3e-5, 60 steps of 32, the testbed's distinct
    concepts shape / border / dot): DEAL raises disentanglability, localizability and part mIoU over plain
    fine-tuning with the same steps, data order and captions, and accuracy with concepts does not drop (on 1,024
    fresh scenes). `python -m fastcbm.deal.demo 0 1 2` measures the same on more scenes and seeds (its module
    docstring). Measured here, DEAL − plain: disentanglability +0.065, localizability +0.031, part mIoU +0.033,
    accuracy with concepts 0.000 (the six-descriptor set, whose shape/colour/texture share pixels, lowers accuracy
    by 0.3–2.3 points at these settings, ten seeds)."""
    from fastcbm.data import synthetic as S
    from fastcbm.deal.data import testbed_concepts
    from fastcbm.deal.demo import DEMO_LAYER, DEMO_LR, DEMO_STEPS
    from fastcbm.deal.evaluate import accuracy, evaluate, testbed_set
    from fastcbm.deal.train import DealConfig, load_deal_clip, train_deal

    assert DEMO_LAYER == "layer3"
    concepts = testbed_concepts(distinct=True)
    train = S.generate(2048, seed=S.TRAINING_SEED_LIMIT + 72_000)
    data = testbed_set(64, seed=S.TRAINING_SEED_LIMIT + 73_000)
    acc_data = testbed_set(1024, seed=S.TRAINING_SEED_LIMIT + 74_000)
    res = {}
    for plain in (True, False):
        out = tmp_path / ("plain" if plain else "deal")
        train_deal(train, concepts, "testbed", DealConfig(lr=DEMO_LR, steps=DEMO_STEPS, batch_size=32, k=3,
                                                          plain=plain, checkpoint_every=0, explain_layer=DEMO_LAYER),
                   out, resume=False, progress=False)
        model, _, tok = load_deal_clip(out)
        res[plain] = evaluate(model, tok, data, concepts, k=3, localizability_images=48, testbed_masks=True,
                              progress=False, explain_layer=DEMO_LAYER)
        res[plain].update(accuracy(model, tok, acc_data, concepts, k=3))
    diff = {k: res[False][k] - res[True][k]
            for k in ("disentanglability", "localizability", "part_miou", "concept_accuracy")}
    assert res[False]["map_size"] == [4, 4]
    assert diff["disentanglability"] > 0.02, diff
    assert diff["localizability"] > 0.01, diff
    assert diff["part_miou"] > 0.01, diff
    assert diff["concept_accuracy"] > -0.01, diff
