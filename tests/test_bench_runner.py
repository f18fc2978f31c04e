"""The benchmark runner (``python -m bench`` / ``fastcbm bench``), its CSV tags and the README table it generates."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import _rows  # noqa: E402
import _table  # noqa: E402

from bench.__main__ import BENCHMARKS  # noqa: E402


def test_readme_table_is_generated_from_the_csvs():
    """The README's benchmark table is exactly what `python -m bench --table --write-readme` writes: no drift."""
    expected = _table.readme_section(list(BENCHMARKS))
    found = _table.readme_table(ROOT / "README.md")
    assert found, "README.md lost its generated benchmark-table markers"
    assert found == expected, "README benchmark table differs from the CSVs: run `python -m bench --table --write-readme`"


def test_rows_are_tagged_with_machine_and_versions(tmp_path):
    path = tmp_path / "x.csv"
    _rows.append_rows(path, [{"case": "a", "value": 1.5}])
    _rows.append_rows(path, [{"case": "b", "value": 2.0, "extra": "new column"}])
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == ["a", "b"]
    for key in ("date", "cpu_model", "cores", "gpu_model", "torch_version", "cuda_version", "onnxruntime_version",
                "tensorrt_version", "fastcbm_version"):
        assert key in rows[0], key
    assert rows[0]["cores"] and rows[0]["torch_version"]
    assert rows[0]["extra"] == "" and rows[1]["extra"] == "new column"


def _write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_table_prefers_the_latest_full_run_over_quick_ones(tmp_path):
    base = {"cpu_model": "Intel(R) Xeon(R) Processor", "cores": "2", "device": "cpu", "n_maps": "200",
            "size": "224"}
    rows = []
    for date, quick, fast_rate in (("2026-01-01", "False", 1000.0), ("2026-02-01", "True", 5.0),
                                   ("2025-12-01", "False", 7.0)):
        for metric, impl, rate in (("nra_official", "naive per-pixel loop (extrapolated from 20 maps)", 10.0),
                                   ("nra_official", "cpu", fast_rate)):
            rows.append({**base, "date": date, "quick": quick, "metric": metric, "implementation": impl,
                         "maps_per_s": rate})
    _write(tmp_path / "metrics.csv", rows)
    text = _table.table(["metrics"], results=tmp_path)
    assert "C++: 1,000 maps/s" in text and "**100.0×**" in text
    assert "quick" not in text
    assert "Intel Xeon, 2 cores (cpu)" in text


def test_replace_in_readme_roundtrip(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n\n{_table.BEGIN}\nold\n{_table.END}\n\nafter\n")
    assert _table.replace_in_readme(readme, ["metrics"], results=tmp_path)
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro") and text.rstrip().endswith("after")
    assert not _table.replace_in_readme(readme, ["metrics"], results=tmp_path)  # idempotent
    (tmp_path / "bad.md").write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        _table.replace_in_readme(tmp_path / "bad.md", ["metrics"], results=tmp_path)


def test_runner_lists_and_refuses_unknown_names():
    out = subprocess.run([sys.executable, "-m", "bench", "--list"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0
    for name in ("metrics", "losses", "precompute"):
        assert name in out.stdout
    bad = subprocess.run([sys.executable, "-m", "bench", "nope"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown benchmark" in bad.stderr


def test_fastcbm_bench_command_forwards_to_the_runner(capsys):
    from fastcbm.cli import main
    from fastcbm.commands.bench import runner_argv
    from fastcbm.cli import build_parser

    args = build_parser().parse_args(["bench", "metrics", "--quick", "--device", "cpu", "--note", "x"])
    assert runner_argv(args) == ["metrics", "--quick", "--device", "cpu", "--note", "x"]
    assert main(["bench", "--list"]) == 0


def test_gpu_rows_of_a_gpu_check_become_table_lines(tmp_path):
    """What bench/gpu_check.sh appends on a GPU (device cuda, the GPU's name) turns into README table lines: the
    tower's roofline fraction and a cuda loss backend with zero extra memory included."""
    gpu = {"gpu_model": "NVIDIA H200", "device": "cuda", "date": "2027-01-01", "quick": "False"}
    _write(tmp_path / "precompute.csv", [
        {**gpu, "model": "ViT-B-16 (random init)", "pipeline": f"tower:{mode}", "grid": "7", "images": "256",
         "prompted_per_s": rate, "roofline_frac": rate / 22500, "speedup_vs_eager": rate / 9000.0,
         "encoder_dtype": "bfloat16"} for mode, rate in (("eager", 9000.0), ("graph", 9900.0))])
    _write(tmp_path / "losses.csv", [
        {**gpu, "backend": b, "B": "4096", "M": "1000", "L": "49", "C": "512", "D": "512", "features_grad": "False",
         "median_s": t, "peak_extra_mib": mib} for b, t, mib in (("reference", 2.0, 5000.0), ("cuda", 0.1, 0.0))])
    text = _table.table(["precompute", "losses"], results=tmp_path)
    assert "NVIDIA H200 (cuda)" in text
    assert "graph" in text and "44 % of the bf16 roofline" in text and "1.10×" in text
    assert "fused cuda" in text
