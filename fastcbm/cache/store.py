"""Sharded on-disk cache of prompt embeddings: atomic shards of ``.npy`` files plus a JSON manifest.

Layout of a cache directory::

    CACHE/manifest.json                 settings, input files in order, shard list + checksums (written atomically)
    CACHE/shards/00000/<array>.npy      one directory per shard, one .npy per named array (rows along axis 0)
    CACHE/shards/00000/shard.json       per-shard record: input range, rows, sha256 and size of every array file

Shards are defined over the *input list*: shard k covers input files [k·shard_size, (k+1)·shard_size). Rows of a shard
are the readable images of that range, in order (unreadable ones are recorded as skipped). Because a shard's content
depends only on its own inputs, shards can be written in any order, by any rank, and resumed after a kill.

A shard is written into ``shards/00000.tmp-<pid>/``, every file fsynced, then the directory is renamed to
``shards/00000`` with ``os.replace``: a shard directory either exists complete or not at all. Half-written ``.tmp``
directories are removed on the next open.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

log = logging.getLogger("fastcbm.cache")

FORMAT = "fastcbm-prompt-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_META = "shard.json"
_HASH_CHUNK = 1 << 22


class CacheMismatchError(ValueError):
    """An existing cache was made with other settings (model, prompts, inputs, array layout)."""


class CacheDiskFullError(OSError):
    """The disk filled up while writing a shard; finished shards stay valid and a rerun resumes."""


class CacheIncompleteError(ValueError):
    """The cache has not been finished (some shards are missing)."""


@dataclass(frozen=True)
class ArraySpec:
    """One named per-row array of every shard: ``row_shape`` is the shape after the row axis."""

    dtype: str
    row_shape: tuple[int, ...]

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "row_shape": list(self.row_shape)}

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> "ArraySpec":
        return ArraySpec(str(d["dtype"]), tuple(int(s) for s in d["row_shape"]))


@dataclass
class ShardRecord:
    """What ``shard.json`` holds: the input range it covers, its rows and the checksum of every array file."""

    index: int
    start: int  # first input index covered
    stop: int  # one past the last input index covered
    rows: int
    files: dict[str, dict[str, Any]]  # array name -> {"file", "sha256", "bytes"}
    skipped: list[dict[str, Any]] = field(default_factory=list)  # [{"index", "path", "reason"}]

    def to_json(self) -> dict:
        return {"index": self.index, "start": self.start, "stop": self.stop, "rows": self.rows,
                "files": self.files, "skipped": self.skipped}

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> "ShardRecord":
        return ShardRecord(int(d["index"]), int(d["start"]), int(d["stop"]), int(d["rows"]), dict(d["files"]),
                           list(d.get("skipped", [])))


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


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` so readers see the old or the new file, never a partial one."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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
    settings, input files, shard size or array layout raises :class:`CacheMismatchError` listing the fields.
    """

    def __init__(self, root: str | os.PathLike, *, settings: Mapping[str, Any], inputs: Sequence[str],
                 arrays: Mapping[str, ArraySpec], shard_size: int, extra: Mapping[str, Any] | None = None,
                 create: bool = True) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        from fastcbm import __version__

        self.root = Path(root)
        self.shard_dir = self.root / "shards"
        self.settings = json.loads(json.dumps(dict(settings)))  # normalise tuples -> lists for comparison
        self.inputs = [str(p) for p in inputs]
        self.arrays = dict(arrays)
        self.shard_size = int(shard_size)
        self.num_shards = max(1, -(-len(self.inputs) // self.shard_size)) if self.inputs else 0
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "fastcbm_version": __version__,
            "settings": self.settings, "arrays": {k: v.to_json() for k, v in self.arrays.items()},
            "shard_size": self.shard_size, "num_inputs": len(self.inputs), "num_shards": self.num_shards,
            "complete": False, **dict(extra or {}), "inputs": self.inputs,
        }
        path = self.root / MANIFEST
        if path.exists():
            existing = json.loads(path.read_text())
            self._check_compatible(existing, manifest)
        elif create:
            self.root.mkdir(parents=True, exist_ok=True)
            self.shard_dir.mkdir(exist_ok=True)
            try:
                atomic_write_json(path, manifest)
            except OSError as exc:
                raise self._disk_error(exc, "the manifest") from exc
        else:
            raise FileNotFoundError(f"no cache at {self.root} ({MANIFEST} missing)")
        self.shard_dir.mkdir(exist_ok=True)
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

    # -- shards --------------------------------------------------------------------------------------------------
    def shard_range(self, index: int) -> tuple[int, int]:
        return index * self.shard_size, min((index + 1) * self.shard_size, len(self.inputs))

    def cleanup_tmp(self) -> None:
        """Remove half-written shard directories left by a killed run (only those of dead writers' pids are safe
        to remove; with several ranks, call this before they start)."""
        for p in self.shard_dir.glob("*.tmp-*"):
            shutil.rmtree(p, ignore_errors=True)

    def read_record(self, index: int) -> ShardRecord | None:
        meta = self.shard_dir / shard_dirname(index) / SHARD_META
        if not meta.exists():
            return None
        try:
            return ShardRecord.from_json(json.loads(meta.read_text()))
        except (ValueError, KeyError, TypeError):
            return None

    def verify_shard(self, index: int, *, checksums: bool = True) -> str | None:
        """None if shard ``index`` is complete and intact, else the reason it is not ("missing", ...)."""
        d = self.shard_dir / shard_dirname(index)
        if not d.exists():
            return "missing"
        rec = self.read_record(index)
        if rec is None:
            return f"unreadable {SHARD_META}"
        if (rec.start, rec.stop) != self.shard_range(index) or set(rec.files) != set(self.arrays):
            return "covers other inputs or arrays than this cache expects"
        for name, info in rec.files.items():
            f = d / info["file"]
            if not f.exists():
                return f"{info['file']} is missing"
            if f.stat().st_size != info["bytes"]:
                return f"{info['file']} has {f.stat().st_size} bytes, expected {info['bytes']}"
            if checksums and file_sha256(f) != info["sha256"]:
                return f"{info['file']} fails its sha256 checksum"
        return None

    def pending_shards(self, shards: Iterable[int] | None = None, *, checksums: bool = True) -> list[int]:
        """Shards that still need computing; a finished shard that fails verification is removed (with a warning)
        and counted as pending."""
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
        return exc

    def write_shard(self, index: int, arrays: Mapping[str, np.ndarray], skipped: Sequence[Mapping] = ()) -> ShardRecord:
        """Write shard ``index`` atomically. ``arrays`` maps every declared array name to an array of shape
        ``[rows, *row_shape]`` with the declared dtype (all with the same number of rows)."""
        if set(arrays) != set(self.arrays):
            raise ValueError(f"arrays: expected names {sorted(self.arrays)}, got {sorted(arrays)}")
        rows = {name: a.shape[0] for name, a in arrays.items()}
        if len(set(rows.values())) > 1:
            raise ValueError(f"arrays: every array needs the same number of rows, got {rows}")
        for name, a in arrays.items():
            spec = self.arrays[name]
            if tuple(a.shape[1:]) != spec.row_shape or np.dtype(a.dtype) != np.dtype(spec.dtype):
                raise ValueError(f"arrays[{name!r}]: expected [rows, {', '.join(map(str, spec.row_shape))}] "
                                 f"{spec.dtype}, got {list(a.shape)} {a.dtype}")
        start, stop = self.shard_range(index)
        final = self.shard_dir / shard_dirname(index)
        tmp = self.shard_dir / f"{shard_dirname(index)}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            files = {}
            for name in sorted(arrays):
                sha, nbytes = _write_array(tmp / f"{name}.npy", arrays[name])
                files[name] = {"file": f"{name}.npy", "sha256": sha, "bytes": nbytes}
            rec = ShardRecord(index, start, stop, next(iter(rows.values()), 0), files, [dict(s) for s in skipped])
            atomic_write_json(tmp / SHARD_META, rec.to_json())
            _fsync_dir(tmp)
            if final.exists():  # a damaged leftover (pending_shards removes those; be safe anyway)
                shutil.rmtree(final)
            os.replace(tmp, final)  # the commit point: the shard becomes visible complete
            _fsync_dir(self.shard_dir)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise self._disk_error(exc, f"shard {index}") from exc
        except BaseException:  # interrupted: leave nothing half-written behind (a SIGKILL leaves .tmp, see cleanup)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return rec

    def finalize(self, extra: Mapping[str, Any] | None = None) -> dict:
        """Merge the shard records into the manifest and mark the cache complete (every shard must be there)."""
        missing = [k for k in range(self.num_shards) if self.read_record(k) is None]
        if missing:
            raise CacheIncompleteError(f"cannot finalize {self.root}: shards {missing[:10]} missing")
        shards, skipped, row = [], [], 0
        for k in range(self.num_shards):
            rec = self.read_record(k)
            assert rec is not None
            shards.append({**rec.to_json(), "row_start": row, "dir": f"shards/{shard_dirname(k)}"})
            shards[-1].pop("skipped")
            skipped += rec.skipped
            row += rec.rows
        manifest = dict(self.manifest)
        manifest.update(extra or {})
        manifest.update({"complete": True, "num_images": row, "num_skipped": len(skipped), "skipped": skipped,
                         "shards": shards})
        manifest["inputs"] = manifest.pop("inputs")  # keep the long list last: the header stays readable
        try:
            atomic_write_json(self.root / MANIFEST, manifest)
        except OSError as exc:
            raise self._disk_error(exc, "the manifest") from exc
        self.manifest = manifest
        return manifest


def load_manifest(root: str | os.PathLike) -> dict:
    path = Path(root) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"no fastcbm cache at {root} ({MANIFEST} missing)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{root} is not a fastcbm prompt cache (format={manifest.get('format')!r})")
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
