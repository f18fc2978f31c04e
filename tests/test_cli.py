"""The CLI entry point: `fastcbm info` and argument handling."""

from __future__ import annotations

import json

from fastcbm.cli import build_parser, main


def test_info_reports_backends(capsys):
    assert main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["backends"]["cpu"].startswith("available")
    assert "OpenMP" in report["backends"]["cpu"]
    for key in ("DALI", "TensorRT", "onnxruntime", "open_clip"):
        assert key in report["optional"]
    assert not report["optional"]["open_clip"].startswith("missing")


def test_info_text(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backends:" in out and "triton" in out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage: fastcbm" in capsys.readouterr().out


def test_every_command_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert "info" in sub.choices
    for name, p in sub.choices.items():
        assert p.format_help(), name
