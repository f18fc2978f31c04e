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


def test_export_clip_tower(tmp_path, capsys):
    out = tmp_path / "clip.onnx"
    assert main(["export", "--model", "testbed", "--out", str(out), "--max-batch", "2"]) == 0
    meta = read_metadata(out)
    assert meta["kind"] == "clip_image" and meta["model"] == "testbed" and meta["input_size"] == 64
