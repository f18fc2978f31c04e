"""CE-FAM on the testbed end to end (small configuration of ``fastcbm demo --method cefam``): the measured quality
claim against CLIP-Dissect, the page, then ``fastcbm explain --method cefam`` and ``fastcbm cefam evaluate`` on the
saved model, and their one-line input errors."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from dataclasses import replace

import pytest
import torch

from fastcbm.cli import main


def _cli(argv: list[str]) -> tuple[int, str]:
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = main(argv)
    return code, buf.getvalue()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from fastcbm.cefam.demo import DEMO_TRANSLATOR, CEFAMDemoConfig, run_cefam_demo

    out = tmp_path_factory.mktemp("cefam_demo")
    # ~40 s on an idle 2-core machine: 200 training scenes, 40 fresh test scenes, at most 40 translator epochs
    result = run_cefam_demo(CEFAMDemoConfig(out=out, n_train=200, n_test=40, report_images=2, comparisons=4,
                                            progress=False, translator=replace(DEMO_TRANSLATOR, max_epochs=40)))
    return out, result


@pytest.mark.slow
def test_demo_summary_and_page(demo):
    out, result = demo
    saved = json.loads((out / "summary.json").read_text())
    assert saved["quality"] == result["quality"]
    ev = result["evaluation"]
    assert ev["images"] == 40 and ev["pairs"] > 100
    assert set(ev["cefam"]["association_top1"]["per_type"]) == {"object", "part", "color", "material"}
    assert sum(ev["cefam"]["layer_choice"].values()) == ev["pairs"]
    page = (out / "report.html").read_text()
    assert "oracle" in page and "CLIP-Dissect" in page and page.count("data:image/png") > 10


@pytest.mark.slow
def test_quality_against_clip_dissect(demo):
    """The issue's claim (the paper's Tables 1–2) on fresh testbed scenes with the bundled 4-stage CNN, as measured:
    CE-FAM's regions at the best stage (Table 1, an oracle) beat CLIP-Dissect's neuron maps (labelled on 2,000
    separate probe scenes) on the same classifier in mean NRA and hit rate (here 0.570 / 0.617 vs 0.422 / 0.446). The
    association's stage (Table 2) does NOT beat CLIP-Dissect on this CNN (here 0.358 / 0.355; the demo's seeds 0–2:
    0.34–0.35 vs 0.43–0.45 NRA; it picks layer4, whose 4×4 maps localise worst, for ~70 % of the pairs:
    docs/cefam_testbed.md); its flag is reported as measured, never assumed. The one-stage ViT classifier: below."""
    _, result = demo
    assert result["evaluation"]["clip_dissect"]["probe_images"] == 2000
    q = result["quality"]
    base = q["clip_dissect"]
    assert q["oracle_best_layer"]["nra"] > base["nra"], q
    assert q["oracle_best_layer"]["hit_rate"] > base["hit_rate"], q
    assert q["oracle_best_layer"]["beats_clip_dissect"] is True
    top1 = q["association_top1"]
    assert top1["beats_clip_dissect"] == (top1["nra"] > base["nra"] and top1["hit_rate"] > base["hit_rate"])
    assert q["oracle_best_layer"]["nra"] >= top1["nra"]


@pytest.fixture(scope="module")
def demo_vit(tmp_path_factory):
    from fastcbm.cefam.demo import DEMO_TRANSLATOR, CEFAMDemoConfig, run_cefam_demo

    out = tmp_path_factory.mktemp("cefam_demo_vit")
    # ~20 s: the bundled ViT classifier, 400 training scenes, 40 fresh test scenes, at most 40 translator epochs
    return run_cefam_demo(CEFAMDemoConfig(out=out, n_train=400, n_test=40, report_images=2, comparisons=4,
                                          classifier="testbed-vit", progress=False, translator=replace(DEMO_TRANSLATOR, max_epochs=40)))


@pytest.mark.slow
def test_quality_vit_classifier_beats_clip_dissect(demo_vit):
    """The claim with the bundled ViT classifier, whose translator reads one stage (the last block's 8×8 tokens), so
    the association has nothing to choose and Tables 1 and 2 coincide (as in the paper's ImageNet-S protocol, a
    single-stage translator on the last stage): CE-FAM beats CLIP-Dissect on the same classifier in mean NRA and hit
    rate (here 0.292 / 0.321 vs 0.208 / 0.181; the demo's seeds 0–2 with 600 / 150 scenes: 0.30–0.32 / 0.30–0.34 vs
    0.19–0.20 / 0.15–0.18)."""
    q = demo_vit["quality"]
    assert demo_vit["summary"]["stages"] == ["blocks.3"] and demo_vit["summary"]["classifier"] == "testbed-vit"
    assert q["association_top1"]["nra"] == q["oracle_best_layer"]["nra"]
    assert q["association_top1"]["nra"] > q["clip_dissect"]["nra"], q
    assert q["association_top1"]["hit_rate"] > q["clip_dissect"]["hit_rate"], q
    assert q["association_top1"]["beats_clip_dissect"] is True


@pytest.mark.slow
def test_explain_and_evaluate_commands(demo, tmp_path):
    from fastcbm.data import synthetic as S

    out, _ = demo
    model = out / "model"
    scene = S.generate(1, S.TRAINING_SEED_LIMIT + 31337)
    from PIL import Image

    img = tmp_path / "scene.png"
    Image.fromarray(scene.images[0].permute(1, 2, 0).numpy()).save(img)
    code, stdout = _cli(["cefam", "explain", "--model", str(model), str(img), "--top-k", "3",
                         "--png", str(tmp_path / "ex.png"), "--html", str(tmp_path / "ex.html")])
    assert code == 0
    res = json.loads(stdout)
    assert res["predicted"] in S.class_names() and len(res["concepts"]) == 3
    assert all(c["layer"] in ("layer1", "layer2", "layer3", "layer4") for c in res["concepts"])
    assert all(torch.isfinite(torch.tensor(c["contribution"])) for c in res["concepts"])
    assert (tmp_path / "ex.png").stat().st_size > 0 and (tmp_path / "ex.html").stat().st_size > 1000

    code, stdout = _cli(["cefam", "evaluate", "--data", "testbed", "--n", "4", "--model", str(model),
                         "--no-baseline", "--no-progress", "--out", str(tmp_path / "ev.json")])
    assert code == 0
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["images"] == 4 and "oracle_best_layer" in ev["cefam"] and "clip_dissect" not in ev
    # CLIP-Dissect on the testbed probes separate fresh scenes (--probe-n), or the evaluated ones with --probe-n 0
    for probe_n, images, where in (("6", 6, "a separate probe set"), ("0", 4, "the evaluated images")):
        code, stdout = _cli(["cefam", "evaluate", "--data", "testbed", "--n", "4", "--model", str(model),
                             "--probe-n", probe_n, "--no-progress"])
        assert code == 0
        cd = json.loads(stdout)["clip_dissect"]
        assert (cd["probe_images"], cd["probe"]) == (images, where)

    from .test_cefam_datasets import _imagenet_s

    root = _imagenet_s(tmp_path)
    code, stdout = _cli(["cefam", "evaluate", "--data", "imagenet-s", str(root), "--model", str(model),
                         "--imagenet-s-authors-target", "--no-progress", "--top-k", "4"])
    assert code == 0
    ev = json.loads(stdout)
    assert ev["pairs"] == 2 and ev["data_options"]["authors_target"] is True
    assert set(ev["cefam"]["association_top1"]["per_type"]) == {"object"} and "clip_dissect" in ev


@pytest.mark.slow
def test_command_input_errors(demo, tmp_path, capsys):
    out, _ = demo
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    img = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (64, 64)).save(img)
    assert main(["cefam", "explain", "--model", str(out / "model"), str(img), "--concepts",
                 str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "concept" in err[0], err
    assert main(["cefam", "evaluate", "--data", "broden", str(tmp_path), "--model", str(out / "model")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a Broden layout" in err[0], err
    assert main(["cefam", "evaluate", "--data", "broden", str(tmp_path), "--model", str(out / "model"),
                 "--probe-n", "5"]) == 2
    assert "--probe-n applies to --data testbed only" in capsys.readouterr().err
    assert main(["cefam", "evaluate", "--data", "testbed", "--model", str(out / "model"), "--probe-n", "-1"]) == 2
    assert "probe set size must be >= 0" in capsys.readouterr().err


def test_demo_cli_passes_the_classifier(monkeypatch, tmp_path, capsys):
    import fastcbm.cefam.demo as D

    seen = {}

    def fake(cfg):
        seen["cfg"] = cfg
        return {k: k for k in ("method", "quality", "summary", "report", "model", "seconds")}

    monkeypatch.setattr(D, "run_cefam_demo", fake)
    assert main(["cefam", "demo", "--classifier", "testbed-vit", "--no-progress", "--out",
                 str(tmp_path)]) == 0
    assert seen["cfg"].classifier == "testbed-vit" and seen["cfg"].n_probe == 2000
    # the choices are the demo's own (read from fastcbm.cefam.demo, not spelled out)
    from fastcbm.cli import build_parser
    from fastcbm.commands import walk

    demo_parser = next(p for path, p, _ in walk(build_parser()) if path == ("cefam", "demo"))
    assert tuple(next(a for a in demo_parser._actions if a.dest == "classifier").choices) == D.DEMO_CLASSIFIERS
    assert json.loads(capsys.readouterr().out)["method"] == "method"
    monkeypatch.undo()
    with pytest.raises(ValueError, match="classifier must be one of"):
        D.run_cefam_demo(D.CEFAMDemoConfig(out=tmp_path / "x", classifier="resnet50"))
