"""`fastcbm demo` end to end on a small configuration, then `fastcbm explain` on its saved model."""

from __future__ import annotations

import json

import pytest

from fastcbm.cli import main


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        code = main(["demo", "--out", str(out), "--no-progress"])  # the README's main job, default sizes (~1 min)
    assert code == 0
    return out, buf.getvalue()


def test_demo_prints_one_json_summary_line(demo_run):
    out, stdout = demo_run
    last = stdout.strip().splitlines()[-1]
    summary = json.loads(last)
    for key in ("salf_accuracy", "backbone_accuracy", "segmentation_salf", "segmentation_gradcam", "report"):
        assert key in summary, key
    assert 0.0 <= summary["salf_accuracy"] <= 1.0
    assert set(summary["segmentation_salf"]) == {"pixel_accuracy", "miou", "map"}
    assert (out / "report.html").stat().st_size > 10_000
    assert json.loads((out / "summary.json").read_text())["salf_accuracy"] == summary["salf_accuracy"]


def test_salf_quality_on_fresh_testbed_scenes(demo_run):
    """Issue 4's quality bars: within 5 points of the backbone's accuracy, and concept heatmaps that beat Grad-CAM
    on the same backbone in zero-shot segmentation mIoU (the SALF-CBM paper's Table 2 claim)."""
    out, _ = demo_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["salf_accuracy"] >= summary["backbone_accuracy"] - 0.05, summary
    assert summary["segmentation_salf"]["miou"] > summary["segmentation_gradcam"]["miou"], summary


def test_explain_command_on_the_demo_model(demo_run, capsys):
    out, _ = demo_run
    image = next(p for p in (out / "data").rglob("*.png") if p.parts[-4].startswith("test-"))
    assert main(["salf", "explain", "--model", str(out / "model"), str(image), "--top-k", "3", "--region", "10", "12",
                 "--html", str(out / "one.html")]) == 0
    result = json.loads(capsys.readouterr().out)
    kept = len(json.loads((out / "model" / "config.json").read_text())["config"]["concepts"])
    assert len(result["top_concepts"]) == min(3, kept) and len(result["region"]) == min(3, kept)
    assert (out / "one.html").is_file()


def test_rerun_with_other_sizes_in_the_same_folder(demo_run, capsys):
    """A second run with other sizes must not pick up the first run's exported images or cache."""
    out, _ = demo_run
    assert main(["demo", "--out", str(out), "--n-train", "40", "--n-val", "20", "--n-test", "20", "--grid", "3",
                 "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["images"] == {"train": 40, "val": 20, "test": 20}


def test_demo_rejects_bad_sizes(capsys):
    assert main(["demo", "--n-train", "3"]) == 2
    assert "--n-train must be >= 10" in capsys.readouterr().err


def test_explain_missing_image(tmp_path, capsys):
    assert main(["salf", "explain", "--model", str(tmp_path), str(tmp_path / "nope.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
