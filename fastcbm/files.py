"""Writing outputs safely: the one home of fastcbm's atomic writes, writer-owned temporary names, folder locks,
checksums, and the output-path checks made *before* long work starts.

- Atomic writes: a file is written under a temporary name next to its destination, fsynced, then ``os.replace``-d into
  place, so a reader (or a rerun after a kill) sees the old file or the new one, never half of one. A failed write
  removes its temporary file. Use :func:`atomic_path` for writers that take a path (numpy, safetensors, onnx) and
  :func:`atomic_write_text` / :func:`atomic_write_bytes` / :func:`atomic_write_json` otherwise.
- Temporary names carry their writer (``NAME.tmp-<host>-<pid>``), so :func:`remove_dead_temps` can delete a killed
  run's leftovers and never a live writer's.
- :class:`FolderLock`: one writer per output folder (``flock``; released by the kernel when the process dies).
- :func:`check_output_file` / :func:`check_output_dir`: a bad ``--out`` fails in a second with one line instead of
  after training or evaluation.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

from fastcbm.errors import InvalidArgument, InvalidFile, NotWritable, OutputExists

log = logging.getLogger("fastcbm.files")
_HASH_CHUNK = 1 << 22


# ---- checksums -----------------------------------------------------------------------------------------------------
def canonical_sha256(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys, no spaces): equal for equal content."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


# ---- writer-owned temporary names ------------------------------------------------------------------------------------
def _hostname() -> str:
    # dots/slashes never reach a file name; the pid follows the last '-'
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname() or "host")[:64]


def tmp_suffix() -> str:
    """``tmp-<host>-<pid>``: names every temporary file/dir of this process, so cleanup can tell dead writers'."""
    return f"tmp-{_hostname()}-{os.getpid()}"


_TMP_RE = re.compile(r"\.tmp-(?:(?P<host>[A-Za-z0-9_]+)-)?(?P<pid>\d+)$")


def tmp_writer_alive(name: str) -> bool:
    """Whether the writer that owns temporary file/dir ``name`` may still be running. Unknown owners (another host,
    an unparsable name) count as alive: we never remove what we cannot prove dead."""
    m = _TMP_RE.search(name)
    if m is None:
        return True
    host, pid = m.group("host"), int(m.group("pid"))
    if host is not None and host != _hostname():
        return True
    if pid == os.getpid():
        return False  # our own leftovers (a previous attempt in this process) are never in use at cleanup time
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:  # pragma: no cover
        return True
    return True


def remove_dead_temps(folder: str | os.PathLike, pattern: str = "*.tmp-*") -> list[Path]:
    """Delete the temporary files and folders in ``folder`` matching ``pattern`` whose writer is dead (a killed run);
    a live writer's, another host's and unknown owners' are kept. Returns what was removed."""
    removed = []
    for p in sorted(Path(folder).glob(pattern)):
        if tmp_writer_alive(p.name):
            log.info("%s: keeping %s (its writer may still be running)", folder, p.name)
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        removed.append(p)
    return removed


# ---- atomic writes -------------------------------------------------------------------------------------------------
def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable (best effort: some platforms have no directory fds)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, mode: int | None = 0o644) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (``.NAME.tmp-<host>-<pid>-<random>``: unique per writer) for a writer
    that takes a file name; when the block ends without an exception the file is fsynced, given ``mode`` (None: keep
    the writer's) and renamed onto ``path``. On any exception the temporary file is removed and nothing changes at
    ``path``. Parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".{tmp_suffix()}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync_file(tmp)
        if mode is not None:
            os.chmod(tmp, mode)  # mkstemp makes 0600; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes | bytearray | memoryview) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` atomically. Text that cannot be encoded (a lone surrogate from a non-UTF-8 file name)
    raises before anything is written."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, checksum: bool = False, indent: int = 1) -> Path:
    """Write JSON atomically. ``checksum`` adds a ``"checksum"`` field (sha256 of the canonical JSON of everything
    else; :func:`read_checked_json` verifies it)."""
    if checksum:
        rest = {k: v for k, v in obj.items() if k != "checksum"}
        obj = {**rest, "checksum": canonical_sha256(rest)}
    return atomic_write_text(path, json.dumps(obj, indent=indent))


def read_checked_json(path: str | os.PathLike, what: str, *, error: type[Exception] = InvalidFile) -> dict:
    """A JSON object written with ``atomic_write_json(checksum=True)``; ``error`` naming ``path`` when it is not
    text, not JSON, not an object, or fails its checksum. A file without a checksum is accepted."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path} is damaged (not text: {exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise error(f"{what} {path} is damaged or truncated (invalid JSON at line {exc.lineno} column "
                    f"{exc.colno}: {exc.msg})") from None
    if not isinstance(obj, dict):
        raise error(f"{what} {path} is damaged (a JSON {type(obj).__name__}, not an object)")
    if "checksum" in obj and obj["checksum"] != canonical_sha256({k: v for k, v in obj.items() if k != "checksum"}):
        raise error(f"{what} {path} fails its checksum (the file was modified or damaged)")
    return obj


# ---- one writer per folder -----------------------------------------------------------------------------------------
class FolderLockedError(OSError):
    """Another live process is writing this folder."""


def os_error_line(exc: OSError, what: str) -> OSError:
    """An OSError whose message is one line naming what failed and why (e.g. a read-only folder)."""
    reason = exc.strerror or str(exc)
    return type(exc)(f"{what}: {reason}" + (f" ({exc.filename})" if exc.filename else ""))


class FolderLock:
    """Exclusive writer lock of an output folder: ``flock`` on ``FOLDER/.lock`` (released by the kernel when the
    process dies, so a killed run never leaves a stale lock). The file holds ``host pid start-time`` for the message a
    second writer gets. Not reliable on network file systems without ``flock`` support (NFS < v4).

    ``what`` names the folder in messages ("the cache", "the model folder"); ``command`` names the writer."""

    NAME = ".lock"
    error: type[OSError] = FolderLockedError

    def __init__(self, root: str | os.PathLike, *, what: str = "the folder", command: str = "fastcbm") -> None:
        self.root = Path(root)
        self.path = self.root / self.NAME
        self.what, self.command = what, command
        self._fd: int | None = None

    def acquire(self) -> Self:
        import fcntl

        for _ in range(20):
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise os_error_line(exc, f"cannot write {self.what} {self.root}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    holder = os.read(fd, 200).decode(errors="replace").split()
                finally:
                    os.close(fd)
                who = (f"pid {holder[1]} on host {holder[0]}, started {holder[2]}" if len(holder) >= 3
                       else "pid unknown")
                raise self.error(
                    f"another {self.command} ({who}) is writing {self.what} at {self.root}; wait for it to finish "
                    "(then rerun to resume) or use another --out") from None
            try:  # the holder we waited on may have removed the file: then our lock is on a dead inode, retry
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:  # pragma: no cover - only under extreme churn
            raise self.error(f"could not lock {self.what} at {self.root} (the lock file keeps changing)")
        os.ftruncate(fd, 0)
        os.write(fd, f"{_hostname()} {os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file (a finished folder holds no lock file) and unlock."""
        if self._fd is not None:
            import fcntl

            with contextlib.suppress(OSError):
                self.path.unlink()
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---- output paths, checked before the work -----------------------------------------------------------------------
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
        raise InvalidArgument(f"{flag}: {path} is a directory; give a file name")
    if path.exists() and not overwrite:
        raise OutputExists(f"{flag}: {path} already exists")
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise InvalidArgument(f"{flag}: {base} is a file, so {path} cannot be created under it")
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
        raise InvalidArgument(f"{flag}: {base} is a file, so the folder {path} cannot be created")
    _writable_dir(base, flag)
    return path
