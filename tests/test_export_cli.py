"""``fastcbm export``: a saved SALF-CBM folder → an ONNX file a runner labels without the folder; clear one-line
errors for bad input and for TensorRT where it is not installed."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from fastcbm.cli import main
from fastcbm.deploy import load, read_metadata
from tests.test_deploy import make_salf, reference

pytestmark = pytest.mark.usefixtures("one_thread")


def test_export_folder_to_onnx(tmp_path, capsys):
    model, bb = make_salf(m=5, k=3, seed=5)
    model.save(tmp_path / "model")
    out = tmp_path / "out" / "model.onnx"
    assert main(["export", str(tmp_path / "model"), "--out", str(out), "--max-batch", "4"]) == 0
    assert json.loads(capsys.readouterr().out) == {"onnx": str(out)}
    meta = read_metadata(out)
    assert meta["max_batch"] == 4 and meta["concepts"] == model.config.concepts and meta["backbone"] == "testbed"
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    got = load(out, backend="onnxruntime", threads=1)(images)
    ref = reference(model, bb, images)
    for name in ("logits", "contributions"):
        assert (got[name] - ref[name]).abs().max() <= 1e-4, name


def test_export_errors_are_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty"), "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a saved SALF-CBM directory" in err
    assert main(["export", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "give either MODEL_DIR" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert main(["export", str(tmp_path / "empty"), "--format", "tensorrt", "--out", str(tmp_path / "x.engine")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "TensorRT is not available" in err


def test_export_clip_tower_arguments(tmp_path, capsys, monkeypatch):
    """--model routes to export_clip_onnx (its numerics are tested in test_deploy; here only the wiring)."""
    import fastcbm.deploy

    calls = []
    monkeypatch.setattr(fastcbm.deploy, "export_clip_onnx", lambda *a, **kw: calls.append((a, kw)))
    out = tmp_path / "clip.onnx"
    assert main(["export", "--model", "ViT-B-16", "--pretrained", "openai", "--out", str(out), "--max-batch", "2",
                 "--precision", "fp16"]) == 0
    assert calls == [(("ViT-B-16", out), {"pretrained": "openai", "input_dtype": "normalized", "precision": "fp16",
                                          "max_batch": 2, "opset": 17})]
    assert json.loads(capsys.readouterr().out) == {"onnx": str(out)}


def test_explain_from_engine_matches_model_folder(tmp_path, capsys):
    """``fastcbm explain --engine`` serves the explanation ``fastcbm explain --model`` gives, labelled from the
    graph's metadata alone."""
    from PIL import Image

    model, _ = make_salf(m=6, k=3, seed=6)
    model.save(tmp_path / "model")
    onnx_path = tmp_path / "model.onnx"
    assert main(["export", str(tmp_path / "model"), "--out", str(onnx_path), "--max-batch", "2"]) == 0
    capsys.readouterr()
    rng = torch.Generator().manual_seed(0)
    Image.fromarray(torch.randint(0, 256, (80, 96, 3), dtype=torch.uint8, generator=rng).numpy()).save(
        tmp_path / "img.png")
    assert main(["salf", "explain", str(tmp_path / "img.png"), "--model", str(tmp_path / "model"), "--top-k", "3"]) == 0
    ref = json.loads(capsys.readouterr().out)
    html = tmp_path / "r.html"
    assert main(["salf", "explain", str(tmp_path / "img.png"), "--engine", str(onnx_path), "--top-k", "3",
                 "--html", str(html)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["backend"] == "onnxruntime-cpu" and html.is_file()
    assert got["predicted"] == ref["predicted"] and abs(got["probability"] - ref["probability"]) <= 2e-4
    assert [c["concept"] for c in got["top_concepts"]] == [c["concept"] for c in ref["top_concepts"]]
    for a, b in zip(got["top_concepts"], ref["top_concepts"]):
        assert abs(a["contribution"] - b["contribution"]) <= 2e-4 and abs(a["activation"] - b["activation"]) <= 2e-4
    assert main(["salf", "explain", str(tmp_path / "img.png"), "--engine", str(onnx_path), "--region", "1", "2"]) == 2
    assert "--region needs --model" in capsys.readouterr().err
    assert main(["salf", "explain", str(tmp_path / "img.png"), "--engine", str(onnx_path), "--backend", "tensorrt"]) == 2
    assert "TensorRT is not available" in capsys.readouterr().err
    assert main(["salf", "explain", str(tmp_path), "--engine", str(onnx_path)]) == 2
    assert "--engine explains one image file" in capsys.readouterr().err
    assert main(["salf", "explain", str(tmp_path / "img.png")]) == 2
    assert "give --model DIR" in capsys.readouterr().err


def test_precompute_engine_flag_reaches_precompute(tmp_path, monkeypatch, capsys):
    import fastcbm.precompute
    from fastcbm.errors import InvalidArgument

    seen = {}

    def fake(data, model, out, config, **kwargs):
        seen.update(engine=config.engine)
        raise InvalidArgument("stop here")

    monkeypatch.setattr(fastcbm.precompute, "precompute", fake)
    assert main(["precompute", "--data", str(tmp_path), "--model", "testbed", "--out", str(tmp_path / "c"),
                 "--engine", "onnxruntime"]) == 2
    assert seen["engine"] == "onnxruntime" and "stop here" in capsys.readouterr().err
