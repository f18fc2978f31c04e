"""The README's Python API block runs as written (on the bundled testbed, in a scratch folder)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
pytestmark = pytest.mark.usefixtures("one_thread")


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def test_readme_has_the_python_api_block():
    blocks = python_blocks(README.read_text())
    assert blocks and any("train_salf_from_cache" in b and "SALFCBM.load" in b for b in blocks)


def test_readme_python_blocks_run_as_written(tmp_path, capsys):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        namespace: dict = {"__name__": "__readme__"}
        for block in python_blocks(README.read_text()):
            exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - the README is this repo's own text
    finally:
        os.chdir(cwd)
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert namespace["x"].shape[0] == 2 and len(namespace["explanations"]) == 2
    assert namespace["before"].shape == namespace["after"].shape
    assert namespace["report"]["val_accuracy"] >= 0
    assert namespace["deal_report"]["steps"] == 2 and namespace["deal_metrics"]["map_size"] == [4, 4]
