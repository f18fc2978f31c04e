"""Sharded on-disk cache of prompt embeddings: atomic shards of ``.npy`` files plus a JSON manifest.

Layout of a cache directory::

    CACHE/manifest.json                 settings, input files in order, shard list + checksums (written atomically)
    CACHE/shards/00000/<array>.npy      one directory per shard, one .npy per named array (rows along axis 0)
    CACHE/shards/00000/shard.json       per-shard record: input range, rows, sha256 and size of every array file

Shards are defined over the *input list*: shard k covers input files [k·shard_size, (k+1)·shard_size). Rows of a shard
are the readable images of that range, in order (unreadable ones are recorded as skipped). Because a shard's content
depends only on its own inputs, shards can be written in any order, by any rank, and resumed after a kill.

A shard is written into ``shards/00000.tmp-<host>-<pid>/``, every file fsynced, then the directory is renamed to
``shards/00000`` with ``os.replace``: a shard directory either exists complete or not at all. Half-written ``.tmp``
directories of *dead* writers (same host, pid gone) are removed on the next open; a live writer's are never touched.

Integrity (see the README, "What fastcbm promises about your data"): every ``shard.json`` records the settings it was
made with (and their fingerprint), a fingerprint of its own input paths, the shape/dtype/size/sha256 of every array
file and a checksum of the record itself; ``manifest.json`` carries a checksum of its own content. A resume compares
each finished shard's settings with the requested ones and refuses to mix; a damaged shard is recomputed; a damaged
manifest is rebuilt from the shards. One writer per cache directory: :class:`CacheLock` (``flock`` on ``.lock``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fastcbm.errors import InvalidArgument, InvalidFile, MissingFile
from fastcbm.files import (  # noqa: F401  (canonical_sha256, file_sha256, tmp_suffix: part of this module's API)
    FolderLock,
    FolderLockedError,
    os_error_line,
    atomic_write_json,
    canonical_sha256,
    file_sha256,
    fsync_dir,
    remove_dead_temps,
    tmp_suffix,
    tmp_writer_alive,
)
from fastcbm.files import read_checked_json as _read_checked_json

log = logging.getLogger("fastcbm.cache")

FORMAT = "fastcbm-prompt-cache"
FORMAT_VERSION = 2  # 2: per-shard settings, record and manifest checksums
MANIFEST = "manifest.json"
SHARD_META = "shard.json"
_HASH_CHUNK = 1 << 22


class CacheMismatchError(InvalidFile):
    """An existing cache was made with other settings (model, prompts, inputs, array layout)."""


class CacheDiskFullError(OSError):
    """The disk filled up while writing a shard; finished shards stay valid and a rerun resumes."""


class CacheIncompleteError(InvalidFile):
    """The cache has not been finished (some shards are missing)."""


class CacheCorruptError(InvalidFile):
    """A file of a finished cache is damaged (truncated, checksum mismatch, NaN/inf rows, unreadable manifest)."""


class CacheLockedError(FolderLockedError):
    """Another live process is writing this cache directory."""


class CacheLock(FolderLock):
    """One writer per cache directory (:class:`fastcbm.files.FolderLock` on ``CACHE/.lock``)."""

    error = CacheLockedError

    def __init__(self, root: str | os.PathLike) -> None:
        super().__init__(root, what="the cache", command="fastcbm precompute")


@dataclass(frozen=True)
class ArraySpec:
    """One named per-row array of every shard: ``row_shape`` is the shape after the row axis."""

    dtype: str
    row_shape: tuple[int, ...]

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "row_shape": list(self.row_shape)}

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> ArraySpec:
        return ArraySpec(str(d["dtype"]), tuple(int(s) for s in d["row_shape"]))


@dataclass
class ShardRecord:
    """What ``shard.json`` holds: the input range it covers, its rows and the checksum of every array file."""

    index: int
    start: int  # first input index covered
    stop: int  # one past the last input index covered
    rows: int
    files: dict[str, dict[str, Any]]  # array name -> {"file", "sha256", "bytes", "shape", "dtype"}
    skipped: list[dict[str, Any]] = field(default_factory=list)  # [{"index", "path", "reason"}]
    settings: dict[str, Any] | None = None  # what the shard was made with: settings, arrays, shard_size, format
    fingerprint: str | None = None  # canonical_sha256(settings)
    inputs_sha256: str | None = None  # canonical_sha256(the input paths of [start, stop))

    def to_json(self) -> dict:
        d = {"index": self.index, "start": self.start, "stop": self.stop, "rows": self.rows,
             "files": self.files, "skipped": self.skipped}
        if self.fingerprint is not None:
            d.update({"fingerprint": self.fingerprint, "inputs_sha256": self.inputs_sha256,
                      "settings": self.settings})
        return d

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> ShardRecord:
        return ShardRecord(int(d["index"]), int(d["start"]), int(d["stop"]), int(d["rows"]), dict(d["files"]),
                           list(d.get("skipped", [])), d.get("settings"), d.get("fingerprint"),
                           d.get("inputs_sha256"))


def shard_dirname(index: int) -> str:
    return f"{index:05d}"


class _HashingWriter:
    """File-like object for ``np.lib.format.write_array`` that hashes what it writes."""

    def __init__(self, fh) -> None:
        self.fh, self.sha, self.nbytes = fh, hashlib.sha256(), 0

    def write(self, data) -> int:
        mv = memoryview(data).cast("B")
        self.sha.update(mv)
        self.fh.write(mv)
        self.nbytes += mv.nbytes
        return mv.nbytes


def _write_array(path: Path, array: np.ndarray) -> tuple[str, int]:
    """Write ``array`` as a .npy file, fsync it; return (sha256 hex, file size in bytes)."""
    with open(path, "wb") as fh:
        w = _HashingWriter(fh)
        np.lib.format.write_array(w, np.ascontiguousarray(array), allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())
    return w.sha.hexdigest(), w.nbytes


def read_checked_json(path: Path, what: str) -> dict:
    """:func:`fastcbm.files.read_checked_json`, failing with :class:`CacheCorruptError`."""
    return _read_checked_json(path, what, error=CacheCorruptError)


def npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from a .npy file's header; ValueError when it is not a readable .npy header."""
    with open(path, "rb") as fh:
        try:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
            return tuple(int(s) for s in shape), np.dtype(dtype)
        except (ValueError, EOFError):
            raise
        except Exception as exc:  # noqa: BLE001 - numpy parses the header with ast: SyntaxError, TokenError, ...
            raise InvalidFile(f"unparsable .npy header ({type(exc).__name__})") from None


def _diff(expected: Any, found: Any, prefix: str = "") -> list[str]:
    """Names of the fields that differ between two JSON-like values (dicts compared key by key)."""
    if isinstance(expected, Mapping) and isinstance(found, Mapping):
        out: list[str] = []
        for k in sorted(set(expected) | set(found)):
            out += _diff(expected.get(k), found.get(k), f"{prefix}{k}.")
        return out
    if expected != found:
        exp = f"{len(expected)} entries" if isinstance(expected, list) and len(expected) > 6 else repr(expected)
        got = f"{len(found)} entries" if isinstance(found, list) and len(found) > 6 else repr(found)
        return [f"{prefix[:-1]}: cache has {got}, requested {exp}"]
    return []


class ShardedCache:
    """Writer side of a cache directory: create or reopen it, find finished shards, write shards atomically.

    ``settings`` identifies what the cache contains (model, prompt settings, ...): reopening a cache with different
    settings, input files, shard size or array layout raises :class:`CacheMismatchError` listing the fields — whether
    the difference is found in ``manifest.json`` or in a finished shard's own record (a deleted manifest does not let
    a rerun with other settings mix shards). Writers should hold :class:`CacheLock` (``fastcbm precompute`` does).
    """

    def __init__(self, root: str | os.PathLike, *, settings: Mapping[str, Any], inputs: Sequence[str],
                 arrays: Mapping[str, ArraySpec], shard_size: int, extra: Mapping[str, Any] | None = None,
                 create: bool = True) -> None:
        if shard_size < 1:
            raise InvalidArgument(f"shard_size must be >= 1, got {shard_size}")
        from fastcbm import __version__

        self.root = Path(root)
        self.shard_dir = self.root / "shards"
        self.settings = json.loads(json.dumps(dict(settings)))  # normalise tuples -> lists for comparison
        self.inputs = [str(p) for p in inputs]
        self.arrays = dict(arrays)
        self.shard_size = int(shard_size)
        self.num_shards = max(1, -(-len(self.inputs) // self.shard_size)) if self.inputs else 0
        # what every shard records and a resume compares (the input paths are fingerprinted per shard)
        self.shard_settings = {"format_version": FORMAT_VERSION, "settings": self.settings,
                               "arrays": {k: v.to_json() for k, v in self.arrays.items()},
                               "shard_size": self.shard_size}
        self.fingerprint = canonical_sha256(self.shard_settings)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "fastcbm_version": __version__,
            "settings": self.settings, "arrays": {k: v.to_json() for k, v in self.arrays.items()},
            "shard_size": self.shard_size, "num_inputs": len(self.inputs), "num_shards": self.num_shards,
            "complete": False, **dict(extra or {}), "inputs": self.inputs,
        }
        path = self.root / MANIFEST
        existing = None
        if path.exists():
            try:
                existing = read_checked_json(path, "the cache manifest")
            except (CacheCorruptError, OSError) as exc:
                if not create:
                    raise
                # every shard carries its own settings and checksums: the manifest can be rebuilt safely
                log.warning("%s; rebuilding it from the finished shards (each is checked against the requested "
                            "settings)", exc)
        if existing is not None:
            self._check_compatible(existing, manifest)
        elif not create:
            raise MissingFile(f"no cache at {self.root} ({MANIFEST} missing)")
        if create:
            self._check_existing_shards()  # before a (new) manifest claims the directory for these settings
        if existing is None:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                self.shard_dir.mkdir(exist_ok=True)
                atomic_write_json(path, manifest, checksum=True)
            except OSError as exc:
                raise self._disk_error(exc, "the manifest") from exc
        try:
            self.shard_dir.mkdir(exist_ok=True)
        except OSError as exc:
            raise os_error_line(exc, f"cannot write the cache directory {self.root}") from exc
        self.manifest = manifest

    # -- compatibility -------------------------------------------------------------------------------------------
    def _check_compatible(self, existing: Mapping[str, Any], wanted: Mapping[str, Any]) -> None:
        if existing.get("format") != FORMAT:
            raise CacheMismatchError(f"{self.root} is not a fastcbm prompt cache (format={existing.get('format')!r})")
        diffs: list[str] = []
        for key in ("format_version", "settings", "arrays", "shard_size"):
            diffs += _diff(wanted.get(key), existing.get(key), f"{key}.")
        if existing.get("inputs") != wanted["inputs"]:
            old, new = existing.get("inputs") or [], wanted["inputs"]
            first = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
            diffs.append(f"inputs: cache has {len(old)} files, requested {len(new)}; first difference at position "
                         f"{first}")
        if diffs:
            raise CacheMismatchError(
                f"the cache at {self.root} was made with other settings; refusing to mix. Differing fields:\n  "
                + "\n  ".join(diffs) + "\nUse another --out directory (or delete this one) to start afresh.")

    def _inputs_sha(self, index: int) -> str:
        lo, hi = self.shard_range(index)
        return canonical_sha256(self.inputs[lo:hi])

    def _shard_mismatch(self, index: int, rec: ShardRecord) -> str | None:
        """Why an intact shard record was made for other settings/inputs than this cache's, or None."""
        if rec.fingerprint is None or not isinstance(rec.settings, Mapping):
            return (f"shard {index} was written by an older fastcbm that did not record its settings, so it cannot "
                    "be checked against this run")
        if rec.fingerprint != self.fingerprint:
            diffs = _diff(self.shard_settings, rec.settings)
            return f"shard {index} was made with other settings ({'; '.join(diffs[:4]) or 'fingerprint differs'})"
        if rec.inputs_sha256 != self._inputs_sha(index) or (rec.start, rec.stop) != self.shard_range(index):
            return f"shard {index} was made from other input files (its input range or paths differ)"
        return None

    def _refuse(self, problems: list[str]) -> CacheMismatchError:
        return CacheMismatchError(
            f"the cache at {self.root} holds shards made with other settings or inputs; refusing to mix: "
            + "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
            + ". Use another --out directory (or delete this one) to start afresh.")

    def _check_existing_shards(self) -> None:
        if not self.shard_dir.is_dir():
            return
        problems = []
        for d in sorted(self.shard_dir.iterdir()):
            if not d.name.isdigit():
                continue
            k = int(d.name)
            rec = self.read_record(k)
            if rec is None:
                continue  # damaged: pending_shards recomputes it
            why = (f"shard {k} lies beyond this run's {self.num_shards} shards" if k >= self.num_shards
                   else self._shard_mismatch(k, rec))
            if why:
                problems.append(why)
        if problems:
            raise self._refuse(problems)

    # -- shards --------------------------------------------------------------------------------------------------
    def shard_range(self, index: int) -> tuple[int, int]:
        return index * self.shard_size, min((index + 1) * self.shard_size, len(self.inputs))

    def cleanup_tmp(self) -> list[Path]:
        """Remove temporary shard directories and manifest files left by *dead* writers (a killed run): names carry
        ``tmp-<host>-<pid>``; a file of a live process, of another host or with an unknown owner is kept.
        Returns what was removed."""
        return remove_dead_temps(self.shard_dir) + remove_dead_temps(self.root, f"*{MANIFEST}*.tmp-*")

    def read_record(self, index: int) -> ShardRecord | None:
        """The shard's record, or None when it is missing, unreadable, or fails its own checksum."""
        meta = self.shard_dir / shard_dirname(index) / SHARD_META
        if not meta.exists():
            return None
        try:
            d = read_checked_json(meta, "shard record")
            rec = ShardRecord.from_json(d)
            if rec.index != index:
                return None
            return rec
        except (ValueError, KeyError, TypeError, OSError):
            return None

    def verify_shard(self, index: int, *, checksums: bool = True) -> str | None:
        """None if shard ``index`` is complete and intact, else the reason it is not ("missing", ...). A shard made
        with other settings or inputs raises :class:`CacheMismatchError` (it is not damaged: never silently
        replaced)."""
        d = self.shard_dir / shard_dirname(index)
        if not d.exists():
            return "missing"
        rec = self.read_record(index)
        if rec is None:
            return f"unreadable or damaged {SHARD_META}"
        why = self._shard_mismatch(index, rec)
        if why:
            raise self._refuse([why])
        if set(rec.files) != set(self.arrays):
            return "covers other arrays than this cache expects"
        for name, info in rec.files.items():
            f = d / info["file"]
            if not f.exists():
                return f"{info['file']} is missing"
            if f.stat().st_size != info["bytes"]:
                return f"{info['file']} has {f.stat().st_size} bytes, expected {info['bytes']}"
            spec = self.arrays[name]
            try:
                shape, dtype = npy_header(f)
            except (ValueError, OSError, EOFError) as exc:
                return f"{info['file']} has no readable .npy header ({exc})"
            if shape != (rec.rows, *spec.row_shape) or dtype != np.dtype(spec.dtype):
                return (f"{info['file']} holds {list(shape)} {dtype}, expected {[rec.rows, *spec.row_shape]} "
                        f"{spec.dtype}")
            if checksums and file_sha256(f) != info["sha256"]:
                return f"{info['file']} fails its sha256 checksum"
        return None

    def pending_shards(self, shards: Iterable[int] | None = None, *, checksums: bool = True) -> list[int]:
        """Shards that still need computing; a finished shard that fails verification is removed (with a warning)
        and counted as pending. A shard made with other settings raises :class:`CacheMismatchError`."""
        out = []
        for k in (range(self.num_shards) if shards is None else shards):
            problem = self.verify_shard(k, checksums=checksums)
            if problem is None:
                continue
            if problem != "missing":
                log.warning("cache %s: shard %d is damaged (%s); recomputing it", self.root, k, problem)
                shutil.rmtree(self.shard_dir / shard_dirname(k), ignore_errors=True)
            out.append(k)
        return out

    def _disk_error(self, exc: OSError, what: str) -> OSError:
        if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
            done = sum(1 for k in range(self.num_shards) if (self.shard_dir / shard_dirname(k)).exists())
            return CacheDiskFullError(
                exc.errno, f"no space left on the device holding the cache directory {self.root} while writing "
                f"{what} ({exc.strerror}). The {done} finished shard(s) stay valid: free some space and run the same "
                f"command again to resume.")
        return os_error_line(exc, f"cannot write {what} of the cache at {self.root}")

    def write_shard(self, index: int, arrays: Mapping[str, np.ndarray], skipped: Sequence[Mapping] = ()) -> ShardRecord:
        """Write shard ``index`` atomically. ``arrays`` maps every declared array name to an array of shape
        ``[rows, *row_shape]`` with the declared dtype (all with the same number of rows)."""
        if set(arrays) != set(self.arrays):
            raise InvalidArgument(f"arrays: expected names {sorted(self.arrays)}, got {sorted(arrays)}")
        rows = {name: a.shape[0] for name, a in arrays.items()}
        if len(set(rows.values())) > 1:
            raise InvalidArgument(f"arrays: every array needs the same number of rows, got {rows}")
        for name, a in arrays.items():
            spec = self.arrays[name]
            if tuple(a.shape[1:]) != spec.row_shape or np.dtype(a.dtype) != np.dtype(spec.dtype):
                raise InvalidArgument(f"arrays[{name!r}]: expected [rows, {', '.join(map(str, spec.row_shape))}] "
                                      f"{spec.dtype}, got {list(a.shape)} {a.dtype}")
        start, stop = self.shard_range(index)
        final = self.shard_dir / shard_dirname(index)
        tmp = self.shard_dir / f"{shard_dirname(index)}.{tmp_suffix()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            files = {}
            for name in sorted(arrays):
                sha, nbytes = _write_array(tmp / f"{name}.npy", arrays[name])
                files[name] = {"file": f"{name}.npy", "sha256": sha, "bytes": nbytes,
                               "shape": [int(s) for s in arrays[name].shape], "dtype": self.arrays[name].dtype}
            rec = ShardRecord(index, start, stop, next(iter(rows.values()), 0), files, [dict(s) for s in skipped],
                              self.shard_settings, self.fingerprint, self._inputs_sha(index))
            atomic_write_json(tmp / SHARD_META, rec.to_json(), checksum=True)
            fsync_dir(tmp)
            if final.exists():  # a damaged leftover (pending_shards removes those; be safe anyway)
                shutil.rmtree(final)
            os.replace(tmp, final)  # the commit point: the shard becomes visible complete
            fsync_dir(self.shard_dir)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise self._disk_error(exc, f"shard {index}") from exc
        except BaseException:  # interrupted: leave nothing half-written behind (a SIGKILL leaves .tmp, see cleanup)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return rec

    def finalize(self, extra: Mapping[str, Any] | None = None) -> dict:
        """Merge the shard records into the manifest and mark the cache complete (every shard must be there)."""
        records = {k: self.read_record(k) for k in range(self.num_shards)}
        missing = [k for k, r in records.items() if r is None]
        if missing:
            raise CacheIncompleteError(f"cannot finalize {self.root}: shards {missing[:10]} missing")
        problems = [why for k, r in records.items() if r is not None and (why := self._shard_mismatch(k, r))]
        if problems:
            raise self._refuse(problems)
        shards, skipped, row = [], [], 0
        for k in range(self.num_shards):
            rec = records[k]
            assert rec is not None
            entry = {**rec.to_json(), "row_start": row, "dir": f"shards/{shard_dirname(k)}"}
            entry.pop("skipped")
            entry.pop("settings", None)  # the manifest holds them once; the fingerprint stays per shard
            shards.append(entry)
            skipped += rec.skipped
            row += rec.rows
        manifest = dict(self.manifest)
        manifest.update(extra or {})
        manifest.update({"complete": True, "num_images": row, "num_skipped": len(skipped), "skipped": skipped,
                         "shards": shards})
        manifest["inputs"] = manifest.pop("inputs")  # keep the long list last: the header stays readable
        try:
            atomic_write_json(self.root / MANIFEST, manifest, checksum=True)
        except OSError as exc:
            raise self._disk_error(exc, "the manifest") from exc
        self.manifest = manifest
        return manifest


def load_manifest(root: str | os.PathLike) -> dict:
    """The checked manifest of the cache at ``root``: FileNotFoundError / :class:`CacheCorruptError` (truncated, not
    JSON, checksum) / ValueError (not a fastcbm cache), each one line naming the file."""
    path = Path(root) / MANIFEST
    if not Path(root).is_dir():
        raise MissingFile(f"no fastcbm cache at {root} (not a directory)")
    if not path.exists():
        raise MissingFile(f"no fastcbm cache at {root} ({MANIFEST} missing)")
    manifest = read_checked_json(path, "the cache manifest")
    if manifest.get("format") != FORMAT:
        raise InvalidFile(f"{root} is not a fastcbm prompt cache (format={manifest.get('format')!r} in {path})")
    for key in ("arrays", "settings"):
        if not isinstance(manifest.get(key), dict):
            raise CacheCorruptError(f"the cache manifest {path} is damaged ({key!r} missing or not an object)")
    return manifest


def iter_row_ranges(starts: np.ndarray, rows: np.ndarray, lo: int, hi: int) -> Iterator[tuple[int, int, int, int]]:
    """For global rows [lo, hi): yield (shard position, local start, local stop, output offset)."""
    k = int(np.searchsorted(starts, lo, side="right")) - 1
    off = 0
    while lo < hi and k < len(starts):
        a, b = lo - int(starts[k]), min(hi - int(starts[k]), int(rows[k]))
        if b > a:
            yield k, a, b, off
            off += b - a
            lo += b - a
        k += 1
