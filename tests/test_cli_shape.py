"""The CLI's shape: `fastcbm <method> {train,evaluate,explain,demo}`, the old spellings as aliases (one notice line),
options of another method refused in one line, model folders of another method named, every parser default read from
its dataclass, the README's command table generated from the parsers, one version string."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

from fastcbm.cli import build_parser, main
from fastcbm.commands import config_from_args, walk

ROOT = Path(__file__).resolve().parents[1]
NOTICE = "is now spelled"


def _leaves():
    return [(path, p) for path, p, children in walk(build_parser()) if children is None and path]


def _run(argv, capsys) -> tuple[int, list[str], str]:
    """``(exit code, stderr lines, stdout)`` of one CLI call; argparse's own exits count as their code."""
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.err.strip().splitlines(), out.out


# ---- one shape ------------------------------------------------------------------------------------------------------
def test_every_method_has_the_four_verbs_and_the_shared_verbs_stay_top_level():
    names = {path for path, _ in _leaves()}
    for method in ("salf", "cefam", "deal"):
        for verb in ("train", "evaluate", "explain", "demo"):
            assert (method, verb) in names, (method, verb)
    for shared in ("demo", "precompute", "similarities", "export", "metrics", "info", "bench"):
        assert (shared,) in names, shared
    for old in ("train", "evaluate", "explain"):  # old spellings are aliases, not commands of their own
        assert (old,) not in names


@pytest.mark.parametrize("path", [p for p, _ in _leaves()], ids=" ".join)
def test_every_command_has_help(path, capsys):
    rc, err, out = _run([*path, "-h"], capsys)
    assert rc == 0 and not err
    assert out.startswith(f"usage: fastcbm {' '.join(path)}")


def test_every_option_of_every_command_has_help():
    missing = [f"{' '.join(path)} {a.option_strings or a.dest}" for path, p in _leaves() for a in p._actions
               if a.help is None]
    assert not missing, missing


def test_a_method_group_without_a_verb_prints_its_help(capsys):
    for method in ("salf", "cefam", "deal"):
        rc, _, out = _run([method], capsys)
        assert rc == 2 and f"usage: fastcbm {method}" in out and "train" in out and "explain" in out


# ---- the old spellings ----------------------------------------------------------------------------------------------
# every old spelling, with arguments that fail fast in the NEW command: the error line names the new command, so the
# alias reached it (the end-to-end tests of train / evaluate / explain / demo use the new spellings)
ALIAS_CASES = [
    (["train", "--cache", "NOPE", "--concepts", "c.txt", "--out", "o"], "fastcbm salf train", "--cache NOPE"),
    (["train", "--method", "salf", "--cache", "NOPE", "--concepts", "c.txt", "--out", "o"], "fastcbm salf train",
     "--cache NOPE"),
    (["evaluate", "--model", "NOPE", "--cache", "c"], "fastcbm salf evaluate", "--model NOPE"),
    (["evaluate", "--method=salf", "--model", "NOPE", "--cache", "c"], "fastcbm salf evaluate", "--model NOPE"),
    (["explain", "NOPE.png", "--model", "m"], "fastcbm salf explain", "NOPE.png"),
    (["explain", "--method", "salf", "NOPE.png", "--model", "m"], "fastcbm salf explain", "NOPE.png"),
    (["explain", "NOPE.png", "--engine", "m.onnx"], "fastcbm salf explain", "NOPE.png"),
    (["explain", "NOPE.png", "--method", "cefam", "--model", "NOPE"], "fastcbm cefam explain", "--model NOPE"),
    (["demo", "--method", "salf", "--n-train", "3"], "fastcbm salf demo", "--n-train must be >= 10"),
    (["demo", "--method", "cefam", "--n-train", "3"], "fastcbm cefam demo", "--n-train must be >= 10"),
    (["demo", "--method", "deal", "--steps", "0"], "fastcbm deal demo", "--steps must be >= 1"),
    (["-v", "demo", "--meth", "deal", "--steps", "0"], "fastcbm deal demo", "--steps must be >= 1"),
]


@pytest.mark.parametrize("argv,prog,what", ALIAS_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_old_spellings_still_work_and_say_the_new_one_once(argv, prog, what, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, err, _ = _run(argv, capsys)
    assert rc == 2, err
    assert len(err) == 2, err  # the notice, then the new command's one-line error
    assert NOTICE in err[0] and f"'{prog}'" in err[0] and sum(NOTICE in line for line in err) == 1
    assert err[1].startswith(f"{prog}: error: ") and what in err[1], err
    assert not (tmp_path / "o").exists() and not (tmp_path / "fastcbm_out").exists()


def test_old_spellings_reach_the_new_commands_help(capsys):
    rc, err, out = _run(["explain", "--method", "cefam", "-h"], capsys)
    assert rc == 0 and len(err) == 1 and NOTICE in err[0]
    assert out.startswith("usage: fastcbm cefam explain")


def test_the_readmes_main_job_is_not_an_alias(capsys):
    rc, err, _ = _run(["demo", "--n-train", "3"], capsys)
    assert rc == 2 and err == ["fastcbm demo: error: --n-train must be >= 10, got 3"]


@pytest.mark.parametrize("argv,error", [
    (["train", "--method", "nope"], "--method must be one of salf, cefam, deal, got 'nope'"),
    (["explain", "x.png", "--method"], "--method needs a value"),
])
def test_a_bad_method_is_one_line(argv, error, capsys):
    rc, err, _ = _run(argv, capsys)
    assert rc == 2 and len(err) == 1 and error in err[0]


# ---- options of another method --------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,owner", [
    (["cefam", "demo", "--grid", "3"], "fastcbm salf demo"),
    (["deal", "demo", "--n-val", "30"], "fastcbm salf demo"),
    (["cefam", "demo", "--n-val", "30"], "fastcbm salf demo"),
    (["salf", "demo", "--classifier", "testbed-vit"], "fastcbm cefam demo"),
    (["cefam", "explain", "x.png", "--model", "m", "--region", "1", "2"], "fastcbm salf explain"),
    (["cefam", "explain", "x.png", "--model", "m", "--engine", "m.onnx"], "fastcbm salf explain"),
    (["salf", "explain", "x.png", "--model", "m", "--png", "x.png"], "fastcbm cefam explain"),
    (["salf", "train", "--cache", "c", "--concepts", "c", "--out", "o", "--plain"], "fastcbm deal train"),
    (["demo", "--method", "cefam", "--grid", "3"], "fastcbm salf demo"),
    (["explain", "--method", "cefam", "x.png", "--model", "m", "--batch-size", "4"], "fastcbm salf explain"),
])
def test_an_option_of_another_method_is_refused_in_one_line(argv, owner, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, err, _ = _run(argv, capsys)
    err = [line for line in err if NOTICE not in line]
    assert rc == 2 and len(err) == 1, err
    assert "unrecognized arguments" in err[0] and f"is an option of {owner}" in err[0], err[0]
    assert not any(tmp_path.iterdir())  # refused before any work


# ---- model folders of another method (issue 24.5) -------------------------------------------------------------------
def _folder(tmp_path: Path, fmt: str) -> Path:
    d = tmp_path / fmt.replace(".", "_")
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"format": fmt, "version": 1}))
    return d


def test_the_folder_formats_are_what_the_methods_write(tmp_path):
    from fastcbm.cefam.model import FORMAT as CEFAM_FORMAT
    from fastcbm.commands import FOLDER_FORMATS
    from fastcbm.deal.train import FORMAT as DEAL_FORMAT
    from fastcbm.errors import InvalidFile
    from fastcbm.salf.model import read_config

    assert FOLDER_FORMATS == {"fastcbm.salf": "salf", CEFAM_FORMAT: "cefam", DEAL_FORMAT: "deal"}
    salf = _folder(tmp_path, "fastcbm.salf")
    (salf / "model.safetensors").write_bytes(b"")
    with pytest.raises(InvalidFile, match="'kind'"):  # SALF's reader got past the format: "fastcbm.salf" is its own
        read_config(salf)


@pytest.mark.parametrize("argv,folder_format,use", [
    (["salf", "evaluate", "--model", "{dir}", "--cache", "c"], "fastcbm.cefam", "fastcbm cefam evaluate"),
    (["salf", "explain", "{img}", "--model", "{dir}"], "fastcbm-deal", "fastcbm deal explain"),
    (["evaluate", "--model", "{dir}", "--data", "d"], "fastcbm-deal", "fastcbm deal evaluate"),
    (["cefam", "explain", "{img}", "--model", "{dir}"], "fastcbm.salf", "fastcbm salf explain"),
    (["cefam", "evaluate", "--data", "testbed", "--model", "{dir}"], "fastcbm-deal", "fastcbm deal evaluate"),
    (["deal", "evaluate", "--data", "testbed", "--model", "{dir}"], "fastcbm.salf", "fastcbm salf evaluate"),
    (["deal", "explain", "{img}", "--model", "{dir}"], "fastcbm.cefam", "fastcbm cefam explain"),
    (["deal", "train", "--data", "{tmp}", "--concepts", "{img}", "--model", "{dir}", "--out", "o"], "fastcbm.salf",
     "fastcbm salf train"),
])
def test_a_model_folder_of_another_method_names_the_command_that_reads_it(argv, folder_format, use, tmp_path,
                                                                          capsys):
    folder = _folder(tmp_path, folder_format)
    img = tmp_path / "x.png"
    img.write_bytes(b"not read")
    argv = [a.format(dir=folder, img=img, tmp=tmp_path) for a in argv]
    rc, err, _ = _run(argv, capsys)
    err = [line for line in err if NOTICE not in line]
    assert rc == 2 and len(err) == 1, err
    assert f"is a {({'fastcbm.salf': 'SALF-CBM', 'fastcbm.cefam': 'CE-FAM', 'fastcbm-deal': 'DEAL'})[folder_format]} " \
           f"model folder" in err[0] and f"use '{use}'" in err[0], err[0]


# ---- one source for every default -----------------------------------------------------------------------------------
def _configs():
    """command → (its dataclass's defaults, the smallest argv that parses)."""
    from fastcbm.cefam.demo import CEFAMDemoConfig
    from fastcbm.cefam.evaluate import EvalConfig
    from fastcbm.cefam.train import TranslatorConfig
    from fastcbm.deal.demo import DealDemoConfig
    from fastcbm.deal.train import DealConfig
    from fastcbm.salf.demo import DemoConfig

    return {
        ("demo",): (DemoConfig(), []),
        ("salf", "demo"): (DemoConfig(), []),
        ("cefam", "train"): (TranslatorConfig(), ["--cache", "c", "--out", "o"]),
        ("cefam", "evaluate"): (EvalConfig(), ["--data", "testbed", "--model", "m"]),
        ("cefam", "demo"): (CEFAMDemoConfig(), []),
        ("deal", "train"): (DealConfig(), ["--data", "d", "--concepts", "c", "--out", "o"]),
        ("deal", "demo"): (DealDemoConfig(), []),
    }


def test_every_config_option_defaults_to_its_dataclass_field():
    configs = _configs()
    with_config = {path for path, p in _leaves() if p.get_default("config_fields")}
    assert with_config == set(configs), "a command builds options from a dataclass this test does not check"
    for path, (defaults, argv) in configs.items():
        args = build_parser().parse_args([*path, *argv])
        assert args.config_fields, path
        for name in args.config_fields:
            assert getattr(args, name) == getattr(defaults, name), (path, name)
        assert config_from_args(defaults, args) == defaults, path  # parsing no option gives back the defaults


def test_every_training_setting_is_an_option():
    """`fastcbm cefam train` and `fastcbm deal train` expose every field of their config (templates: --template,
    repeatable; DEAL's Adam betas / eps and loader workers stay API-only)."""
    from dataclasses import fields

    from fastcbm.cefam.train import TranslatorConfig
    from fastcbm.deal.train import DealConfig

    for path, cls, api_only in ((("cefam", "train"), TranslatorConfig, {"templates"}),
                                (("deal", "train"), DealConfig, {"betas", "eps", "workers"})):
        argv = {"cefam": ["--cache", "c", "--out", "o"], "deal": ["--data", "d", "--concepts", "c", "--out", "o"]}
        args = build_parser().parse_args([*path, *argv[path[0]]])
        assert set(args.config_fields) == {f.name for f in fields(cls)} - api_only, path


def test_cli_options_reach_the_dataclass(monkeypatch, tmp_path):
    import fastcbm.cefam.train as T

    seen = {}

    def fake(cache, out, cfg, **kw):
        seen["cfg"] = cfg
        return None, {"best": {}, "classifier": "x", "layers": [], "epochs_run": 0, "stopped": "", "best_epoch": 0,
                      "seconds": {"this_run": 0}}

    monkeypatch.setattr(T, "train_translator", fake)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "manifest.json").write_text("{}")
    args = build_parser().parse_args(["cefam", "train", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o"),
                                      "--layers", "layer3,layer4", "--warmup", "--standardize", "--batch-size", "7",
                                      "--template", "a {}"])
    assert args.func(args) == 0
    assert seen["cfg"] == T.TranslatorConfig(layers=("layer3", "layer4"), warmup=True, standardize=True,
                                             batch_size=7, templates=("a {}",))


def test_the_demo_presets_are_derived_from_the_library_defaults():
    from dataclasses import fields

    from fastcbm.cefam.demo import DEMO_PRECOMPUTE, DEMO_TRANSLATOR, CEFAMDemoConfig
    from fastcbm.cefam.train import TranslatorConfig
    from fastcbm.deal.demo import DealDemoConfig
    from fastcbm.deal.train import DealConfig
    from fastcbm.precompute import PrecomputeConfig

    def changed(a, b):
        return {f.name for f in fields(a) if getattr(a, f.name) != getattr(b, f.name)}

    assert changed(DEMO_TRANSLATOR, TranslatorConfig()) == {"batch_size"}
    assert changed(DEMO_PRECOMPUTE, PrecomputeConfig()) == {"grid", "cefam_classifier", "batch_size", "num_workers"}
    assert CEFAMDemoConfig().translator == DEMO_TRANSLATOR
    d, lib = DealDemoConfig(), DealConfig()
    assert (d.batch_size, d.lambda_sep, d.lambda_con) == (lib.batch_size, lib.lambda_sep, lib.lambda_con)
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['max_epoch'\]"):
        TranslatorConfig.from_settings(max_epoch=3)


# ---- the command reference (issue 24.6) -----------------------------------------------------------------------------
def test_the_readme_command_table_is_the_generated_one():
    from fastcbm.commands.reference import between_markers, markdown

    readme = (ROOT / "README.md").read_text()
    assert between_markers(readme) == markdown(), (
        "README.md's command table differs from the parsers: run `python -m fastcbm.commands.reference --write "
        "README.md`")
    for path, _ in _leaves():
        assert f"`fastcbm {' '.join(path)}" in readme, path  # every command is in the table


def test_the_reference_prints_markdown(capsys):
    from fastcbm.commands.reference import main as reference

    assert reference([]) == 0
    out = capsys.readouterr().out
    assert out.count("\n| `fastcbm ") >= 25 and "| `fastcbm salf train --cache CACHE" in out
    assert "| `fastcbm demo --method cefam ...` | `fastcbm cefam demo ...` |" in out


# ---- one version string ---------------------------------------------------------------------------------------------
def test_the_version_is_read_from_the_package(capsys):
    import fastcbm

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    meta = project["tool"]["scikit-build"]["metadata"]["version"]
    assert meta == {"provider": "scikit_build_core.metadata.regex", "input": "fastcbm/__init__.py"}
    try:  # what the build backend will read
        from scikit_build_core.metadata.regex import dynamic_metadata
    except ImportError:  # the provider's documented default pattern for Python files
        found = re.search(r"(?im)^__version__ *= *([\"'])v?(?P<value>.+?)\1", (ROOT / meta["input"]).read_text())
        version = found["value"]
    else:
        version = dynamic_metadata("version", {"input": str(ROOT / meta["input"])})
    assert version == fastcbm.__version__
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"fastcbm {fastcbm.__version__}"
