"""CE-FAM on the testbed end to end (small configuration of ``fastcbm demo --method cefam``): the measured quality
claim against CLIP-Dissect, the page, then ``fastcbm explain --method cefam`` and ``fastcbm cefam evaluate`` on the
saved model, and their one-line input errors."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

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
    from fastcbm.cefam.demo import CEFAMDemoConfig, run_cefam_demo

    out = tmp_path_factory.mktemp("cefam_demo")
    # ~40 s on an idle 2-core machine: 200 training scenes, 40 fresh test scenes, at most 40 translator epochs
    result = run_cefam_demo(CEFAMDemoConfig(out=out, n_train=200, n_test=40, report_images=2, comparisons=4,
                                            progress=False, train={"max_epochs": 40}))
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
    """The issue's claim (the paper's Tables 1–2) on fresh testbed scenes, as measured: CE-FAM's regions at the best
    stage (Table 1, an oracle) beat CLIP-Dissect's neuron maps on the same classifier in mean NRA and hit rate. The
    association's stage (Table 2) does NOT beat CLIP-Dissect on this tiny CNN (measured: NRA 0.33 vs 0.38 at 600
    training / 100 test scenes; the association picks layer4, whose 4×4 maps localise worst, for ~70 % of the pairs);
    its flag is reported as measured, never assumed."""
    _, result = demo
    q = result["quality"]
    base = q["clip_dissect"]
    assert q["oracle_best_layer"]["nra"] > base["nra"], q
    assert q["oracle_best_layer"]["hit_rate"] > base["hit_rate"], q
    assert q["oracle_best_layer"]["beats_clip_dissect"] is True
    top1 = q["association_top1"]
    assert top1["beats_clip_dissect"] == (top1["nra"] > base["nra"] and top1["hit_rate"] > base["hit_rate"])
    assert q["oracle_best_layer"]["nra"] >= top1["nra"]


@pytest.mark.slow
def test_explain_and_evaluate_commands(demo, tmp_path):
    from fastcbm.data import synthetic as S

    out, _ = demo
    model = out / "model"
    scene = S.generate(1, S.TRAINING_SEED_LIMIT + 31337)
    from PIL import Image

    img = tmp_path / "scene.png"
    Image.fromarray(scene.images[0].permute(1, 2, 0).numpy()).save(img)
    code, stdout = _cli(["explain", "--method", "cefam", "--model", str(model), str(img), "--top-k", "3",
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
    assert main(["explain", "--method", "cefam", "--model", str(out / "model"), str(img), "--concepts",
                 str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "concept" in err[0], err
    assert main(["cefam", "evaluate", "--data", "broden", str(tmp_path), "--model", str(out / "model")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a Broden layout" in err[0], err
