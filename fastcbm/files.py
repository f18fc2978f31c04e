"""Checks of output paths made *before* long work starts, so a bad ``--out`` fails in a second with one line instead
of after training or evaluation (issue 14: "nothing silently wrong")."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fastcbm.errors import InvalidFile, NotWritable, OutputExists


def _writable_dir(d: Path, flag: str) -> None:
    """``d`` (an existing directory) accepts new files: try one, since permission bits lie (root, read-only mounts)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".fastcbm-write-test-", dir=d)
    except OSError as exc:
        raise NotWritable(f"{flag}: cannot write in {d} ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(name)


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_file(path: str | os.PathLike, flag: str, *, overwrite: bool = True) -> Path:
    """``path`` can be written as a file: not a directory, its folder writable (or creatable), and — unless
    ``overwrite`` — not an existing file. Returns it as a Path; raises a one-line error naming ``flag``."""
    path = Path(path)
    if path.is_dir():
        raise InvalidFile(f"{flag}: {path} is a directory; give a file name")
    if path.exists() and not overwrite:
        raise OutputExists(f"{flag}: {path} already exists")
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise InvalidFile(f"{flag}: {base} is a file, so {path} cannot be created under it")
    _writable_dir(base, flag)
    return path


def check_output_dir(path: str | os.PathLike, flag: str, *, must_be_empty_of: tuple[str, ...] = ()) -> Path:
    """``path`` can be used as an output folder: not an existing file, writable (or creatable under a writable
    folder), and holding none of ``must_be_empty_of`` (files a run would overwrite). Creates nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExists(f"{flag}: {path} is an existing file, not a folder")
    for name in must_be_empty_of:
        if (path / name).exists():
            raise OutputExists(f"{flag}: {path} already holds {name}")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise InvalidFile(f"{flag}: {base} is a file, so the folder {path} cannot be created")
    _writable_dir(base, flag)
    return path
