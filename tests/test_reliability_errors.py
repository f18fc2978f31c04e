"""Issue 14 item 6: one line per error, everywhere — bad array files, --threshold nan, output paths that are
directories or files (checked before any work), read-only folders, a data list whose lines are not images."""

from __future__ import annotations

import errno
import os
import re

import numpy as np
import pytest
import torch

from fastcbm.cli import main
from fastcbm.data.folder import list_images
from tests.reliability_helpers import RUN, FakeCLIP, make_images


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, f"not one line: {err!r}"
    return err


@pytest.fixture
def arrays(tmp_path):
    maps, masks = tmp_path / "maps.npy", tmp_path / "masks.npy"
    np.save(maps, np.random.default_rng(0).random((3, 4, 4)).astype(np.float32))
    np.save(masks, np.random.default_rng(1).random((3, 8, 8)) > 0.5)
    return maps, masks


@pytest.mark.parametrize("kind,match", [
    ("strings", r"holds <U1 values \(strings\)"),
    ("complex", r"holds complex64 values \(complex numbers\)"),
    ("text_npy", "could not read .* as .npy"),
    ("garbage_pt", "could not read .* as .pt"),
    ("complex_pt", "holds torch.complex64 values"),
    ("nan_maps", "NaN/inf values in 1 map"),
    ("dir", "is a directory"),
])
def test_bad_metric_inputs_are_one_line(arrays, tmp_path, capsys, kind, match):
    maps, masks = arrays
    bad = {"strings": tmp_path / "s.npy", "complex": tmp_path / "c.npy", "text_npy": tmp_path / "t.npy",
           "garbage_pt": tmp_path / "g.pt", "complex_pt": tmp_path / "cp.pt", "nan_maps": tmp_path / "n.npy",
           "dir": tmp_path}[kind]
    if kind == "strings":
        np.save(bad, np.array([["a"] * 4] * 4))
    elif kind == "complex":
        np.save(bad, np.ones((3, 4, 4), np.complex64))
    elif kind == "text_npy":
        bad.write_text("this is a text file\n")
    elif kind == "garbage_pt":
        bad.write_bytes(os.urandom(64))
    elif kind == "complex_pt":
        torch.save(torch.ones(3, 4, 4, dtype=torch.complex64), bad)
    elif kind == "nan_maps":
        a = np.load(maps)
        a[1, 2, 2] = np.nan
        np.save(bad, a)
    assert main(["metrics", "--maps", str(bad), "--masks", str(masks)]) == 2
    err = _err(capsys)
    assert "--maps" in err and (kind == "dir" or str(bad) in err)
    assert re.search(match, err), err


def test_threshold_nan_and_out_checked_before_work(arrays, tmp_path, capsys, monkeypatch):
    maps, masks = arrays
    assert main(["metrics", "--maps", str(maps), "--masks", str(masks), "--threshold", "nan"]) == 2
    assert "--threshold must be a finite number" in _err(capsys)
    import fastcbm.metrics as M

    monkeypatch.setattr(M, "nra", lambda *a, **k: pytest.fail("evaluated before checking --out"))
    assert main(["metrics", "--maps", str(maps), "--masks", str(masks), "--out", str(tmp_path)]) == 2
    assert "--out" in _err(capsys)


def test_output_paths_are_checked_before_precompute(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    imgs = make_images(tmp_path / "imgs", 2)
    import fastcbm.precompute as P

    monkeypatch.setattr(P, "precompute", lambda *a, **k: pytest.fail("started before checking --out"))
    assert main(["precompute", "--data", str(imgs), "--model", "testbed", "--out", str(tmp_path / "file")]) == 2
    err = _err(capsys)
    assert "--out" in err and "is an existing file" in err
    # a read-only folder (EROFS cannot be made here; the check writes a probe file and reports its error)
    import tempfile

    def ro(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", ro)
    assert main(["precompute", "--data", str(imgs), "--model", "testbed", "--out", str(tmp_path / "new")]) == 2
    err = _err(capsys)
    assert "--out: cannot write in" in err and "Read-only file system" in err


def test_os_errors_during_a_run_are_one_line(tmp_path, capsys, monkeypatch):
    imgs = make_images(tmp_path / "imgs", 2)
    import fastcbm.precompute as P

    def erofs(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "c" / "manifest.json"))

    monkeypatch.setattr(P, "precompute", erofs)
    assert main(["precompute", "--data", str(imgs), "--model", "testbed", "--out", str(tmp_path / "c")]) == 3  # EXIT_SYSTEM
    assert "Read-only file system" in _err(capsys)


def test_data_list_whose_lines_are_not_images(tmp_path):
    lst = tmp_path / "labels.csv"
    lst.write_text("a.png,cat\nb.png,dog\n")
    with pytest.raises(ValueError, match=r"none of the 2 lines .* names an existing file.*looks like a CSV"):
        list_images(lst)
    (tmp_path / "bin.dat").write_bytes(b"\xff\xfe\x00\x01" * 10)
    with pytest.raises(ValueError, match="it is binary"):
        list_images(tmp_path / "bin.dat")


def test_existing_files_that_are_not_images_give_no_empty_cache(tmp_path):
    from fastcbm.precompute import precompute

    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "list.txt").write_text(f"{tmp_path / 'notes.txt'}\n")
    with pytest.raises(ValueError, match=r"none of the 1 inputs .* could be read as an image .*holds 0 images"):
        precompute(str(tmp_path / "list.txt"), FakeCLIP(), tmp_path / "c", **RUN)


def test_similarities_out_and_verify(tmp_path, capsys):
    from fastcbm.precompute import precompute
    from tests.reliability_helpers import flip_byte

    imgs = make_images(tmp_path / "imgs", 2)
    precompute(str(imgs), FakeCLIP(), tmp_path / "c", **RUN)
    (tmp_path / "concepts.txt").write_text("red\n")
    (tmp_path / "f").write_text("x")
    base = ["similarities", "--cache", str(tmp_path / "c"), "--concepts", str(tmp_path / "concepts.txt"), "--model",
            "fake"]
    assert main(base + ["--out", str(tmp_path / "f")]) == 2
    assert "--out" in _err(capsys)
    flip_byte(tmp_path / "c" / "shards" / "00000" / "prompt.npy", -2)
    assert main(base + ["--out", str(tmp_path / "P"), "--verify"]) == 2
    err = _err(capsys)
    assert "is damaged" in err and "shards/00000/prompt.npy: checksum mismatch" in err
    assert not (tmp_path / "P").exists()
