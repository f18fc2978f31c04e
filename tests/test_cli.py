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


# ---- the error contract (fastcbm.errors): user errors one line + exit 2, the system refusing exit 3, bugs propagate
import errno  # noqa: E402

import pytest  # noqa: E402

from fastcbm import errors  # noqa: E402


def _failing_info(monkeypatch, exc: BaseException) -> None:
    import fastcbm.commands.info as info_cmd

    def boom(args):
        raise exc

    monkeypatch.setattr(info_cmd, "run", boom)


@pytest.mark.parametrize("exc", [
    errors.InvalidArgument("--x must be >= 1, got 0"), errors.InvalidFile("f.json: invalid JSON"),
    errors.MissingFile("--model m does not exist"), errors.OutputExists("--out o already holds a model"),
    errors.NotWritable("--out: cannot write in o"), errors.BackendUnavailableError("op: no 'cuda' backend"),
    errors.WeightsUnavailableError("weights offline"), FileNotFoundError(errno.ENOENT, "No such file", "x.png"),
])
def test_user_errors_are_one_line_and_exit_2(monkeypatch, capsys, exc):
    _failing_info(monkeypatch, exc)
    assert main(["info"]) == errors.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("fastcbm info: error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_the_system_refusing_is_one_line_and_exit_3(monkeypatch, capsys):
    _failing_info(monkeypatch, OSError(errno.ENOSPC, "No space left on device", "/x/shard.npy"))
    assert main(["info"]) == errors.EXIT_SYSTEM
    assert capsys.readouterr().err == "fastcbm info: error: No space left on device: /x/shard.npy\n"


@pytest.mark.parametrize("exc", [ValueError("launcher: expected float32"), errors.InternalError("invariant"),
                                 KeyError("k"), RuntimeError("x")])
def test_bugs_are_not_dressed_as_user_errors(monkeypatch, exc):
    _failing_info(monkeypatch, exc)
    with pytest.raises(type(exc)):
        main(["info"])


def test_every_user_error_kind_is_also_the_builtin_a_caller_expects():
    assert issubclass(errors.InvalidArgument, ValueError) and issubclass(errors.InvalidFile, ValueError)
    assert issubclass(errors.MissingFile, FileNotFoundError) and issubclass(errors.OutputExists, FileExistsError)
    assert issubclass(errors.NotWritable, PermissionError)
    assert not issubclass(errors.InternalError, errors.UserError)
    from fastcbm.backends import BackendUnavailableError
    from fastcbm.compat import WeightsUnavailableError

    assert BackendUnavailableError is errors.BackendUnavailableError
    assert WeightsUnavailableError is errors.WeightsUnavailableError
