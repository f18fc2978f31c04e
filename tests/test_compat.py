"""The torchvision-on-CPU-torch import shim, checked in fresh interpreters (imports are process-global)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=240)


def test_open_clip_imports_through_fastcbm():
    proc = _run(
        """
        from fastcbm.compat import import_open_clip
        open_clip = import_open_clip()
        import torchvision.transforms as T
        assert hasattr(open_clip, "create_model_and_transforms")
        assert T.Compose is not None
        print("ok")
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


def test_shim_applied_only_when_the_plain_import_fails():
    proc = _run(
        """
        import importlib
        try:
            importlib.import_module("torchvision")
            plain_ok = True
        except Exception as exc:
            plain_ok = False
            assert "torchvision::" in str(exc), exc
        from fastcbm import compat
        compat.import_torchvision()
        # applied exactly when needed: never on a working install, always after the known failure
        assert compat.shim_applied == (not plain_ok), (plain_ok, compat.shim_applied)
        print("plain_ok" if plain_ok else "shimmed")
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_unrelated_import_errors_are_not_swallowed(monkeypatch):
    from fastcbm import compat

    def boom(name):
        raise ImportError("No module named 'torchvision'")

    monkeypatch.setattr(compat.importlib, "import_module", boom)
    with pytest.raises(ImportError, match="No module named"):
        compat.import_torchvision()
