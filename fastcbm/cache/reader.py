"""Read side of the prompt-embedding cache: memmapped rows in the original input order, P = E·Tᵀ on the fly."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastcbm.cache.store import (
    ArraySpec,
    CacheCorruptError,
    CacheIncompleteError,
    file_sha256,
    iter_row_ranges,
    load_manifest,
    npy_header,
)
from fastcbm.errors import InvalidArgument, InvalidFile

Rows = slice | int | Sequence[int] | np.ndarray | torch.Tensor

# files whose sha256 (and finiteness) this process has already checked: (resolved path, size, mtime_ns) -> sha256
_CHECKED: dict[tuple[str, int, int], str] = {}
_FINITE_CHUNK_BYTES = 1 << 26  # the NaN/inf scan reads a file in ~64 MB pieces

# standard array names written by fastcbm.precompute
PROMPT, PROMPT_NORM, GLOBAL, GLOBAL_NORM, INPUT_INDEX, FEATURES = (
    "prompt", "prompt_norm", "global", "global_norm", "input_index", "features")
Z_CAT = "z_cat"  # CE-FAM: a classifier's pooled stages [N, Z] fp16 (precompute --cefam-classifier)


class CacheReader:
    """Memmapped access to a finished cache written by :func:`fastcbm.precompute.precompute`.

    Rows are the readable input images in input order (skipped ones have no row); ``files`` maps row → path.
    Arrays: ``prompt`` [N, G, D] fp16 unit prompt embeddings, ``prompt_norm`` [N, G] fp32 their norms before
    normalisation, ``global`` [N, D] fp16 unit embeddings of the plain image, ``global_norm`` [N] fp32, optional
    ``features`` [N, C, h, w] fp16 backbone feature maps.

    What is read is checked (see the README, "What fastcbm promises about your data"): the manifest's own checksum on
    open; every shard file's size and ``.npy`` header (shape, dtype) whenever it is opened; with ``verify="checksum"``
    (default) also its sha256 and that its floating rows hold no NaN/inf — once per file per process (files are
    re-checked when their size or mtime changes). ``verify="size"`` skips the two full reads. Problems raise
    :class:`~fastcbm.cache.CacheCorruptError` naming the file, the shard and (for NaN/inf) the row and input image.
    """

    def __init__(self, root: str | os.PathLike, *, verify: str = "checksum") -> None:
        if verify not in ("checksum", "size"):
            raise InvalidFile(f"verify must be 'checksum' or 'size', got {verify!r}")
        self.root = Path(root)
        self.verify_mode = verify
        self.manifest: dict[str, Any] = load_manifest(self.root)
        if not self.manifest.get("complete"):
            raise CacheIncompleteError(
                f"the cache at {self.root} is unfinished (a run stopped before the end); run the same precompute "
                "command again to complete it")
        try:
            self.arrays = {k: ArraySpec.from_json(v) for k, v in self.manifest["arrays"].items()}
            self._shards = self.manifest["shards"]
            self._starts = np.array([s["row_start"] for s in self._shards], dtype=np.int64)
            self._rows = np.array([s["rows"] for s in self._shards], dtype=np.int64)
            n_inputs = len(self.manifest["inputs"])
            if int(self._rows.sum()) != int(self.manifest["num_images"]) or any(
                    set(s["files"]) != set(self.arrays) for s in self._shards):
                raise InvalidFile("shard rows or files disagree with the header")
        except (KeyError, TypeError, ValueError) as exc:
            raise CacheCorruptError(f"the cache manifest {self.root / 'manifest.json'} is damaged or inconsistent "
                                    f"({type(exc).__name__}: {exc})") from None
        self._n_inputs = n_inputs
        self._maps: dict[tuple[int, str], np.ndarray] = {}
        self._input_index: np.ndarray | None = None

    # -- metadata ------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.manifest["num_images"])

    @property
    def num_images(self) -> int:
        return len(self)

    @property
    def settings(self) -> dict:
        return self.manifest["settings"]

    @property
    def num_prompts(self) -> int:
        return self.arrays[PROMPT].row_shape[0] if PROMPT in self.arrays else 0  # 0: global-only (--grid 0)

    @property
    def dim(self) -> int:
        return self.arrays[GLOBAL].row_shape[0]

    @property
    def input_index(self) -> np.ndarray:
        """[N] int64: position in the input list of every row."""
        if self._input_index is None:
            self._input_index = self.array(INPUT_INDEX, slice(None))
        return self._input_index

    @property
    def files(self) -> list[str]:
        """Row → input file path."""
        inputs = self.manifest["inputs"]
        return [inputs[i] for i in self.input_index.tolist()]

    @property
    def skipped(self) -> list[dict]:
        """Inputs that have no row: [{"index", "path", "reason"}]."""
        return list(self.manifest.get("skipped", []))

    # -- raw arrays ----------------------------------------------------------------------------------------------
    def _map(self, k: int, name: str) -> np.ndarray:
        key = (k, name)
        if key not in self._maps:
            self._maps[key] = self._open_checked(k, name)
        return self._maps[key]

    def _where(self, k: int, name: str) -> str:
        shard = self._shards[k]
        return f"cache {self.root}: shard {k} file {shard['dir']}/{shard['files'][name]['file']}"

    def _open_checked(self, k: int, name: str) -> np.ndarray:
        """Memmap one shard file after checking it (size and header always; sha256 and NaN/inf once per process)."""
        shard = self._shards[k]
        info = shard["files"][name]
        f = self.root / shard["dir"] / info["file"]
        where = self._where(k, name)
        hint = "; rerun the same fastcbm precompute command to recompute damaged shards"
        try:
            st = f.stat()
        except FileNotFoundError:
            raise CacheCorruptError(f"{where} is missing{hint}") from None
        if st.st_size != info["bytes"]:
            raise CacheCorruptError(f"{where} has {st.st_size} bytes, the manifest records {info['bytes']} "
                                    f"(truncated or replaced){hint}")
        spec = self.arrays[name]
        want_shape = (int(shard["rows"]), *spec.row_shape)
        try:
            shape, dtype = npy_header(f)
        except (ValueError, OSError, EOFError) as exc:
            raise CacheCorruptError(f"{where} is not a readable .npy file ({exc}){hint}") from None
        if shape != want_shape or dtype != np.dtype(spec.dtype):
            raise CacheCorruptError(f"{where} holds {list(shape)} {dtype}, the manifest expects {list(want_shape)} "
                                    f"{spec.dtype}{hint}")
        if self.verify_mode == "checksum":
            ck = (str(f.resolve()), st.st_size, st.st_mtime_ns)
            if _CHECKED.get(ck) != info["sha256"]:
                if file_sha256(f) != info["sha256"]:
                    raise CacheCorruptError(f"{where} fails its sha256 checksum (damaged or modified){hint}")
                arr = np.load(f, mmap_mode="r")
                self._check_finite(k, name, arr)
                _CHECKED[ck] = info["sha256"]
        try:
            return np.load(f, mmap_mode="r")
        except (ValueError, OSError) as exc:
            raise CacheCorruptError(f"{where} cannot be read ({exc}){hint}") from None

    def _check_finite(self, k: int, name: str, arr: np.ndarray) -> None:
        """CacheCorruptError naming the first row of shard ``k`` whose ``name`` values hold NaN/inf."""
        if arr.dtype.kind not in "fc" or arr.shape[0] == 0:
            return
        per_row = max(1, int(np.prod(arr.shape[1:])) * arr.dtype.itemsize)
        step = max(1, _FINITE_CHUNK_BYTES // per_row)
        for lo in range(0, arr.shape[0], step):
            block = np.asarray(arr[lo:lo + step])
            bad = ~np.isfinite(block.reshape(block.shape[0], -1)).all(axis=1)
            if bad.any():
                local = lo + int(np.argmax(bad))
                row = int(self._starts[k]) + local
                try:
                    src = self.manifest["inputs"][int(self.array(INPUT_INDEX, row)[0])]
                except (ValueError, IndexError, KeyError, OSError):  # the index file itself may be damaged
                    src = "unknown input"
                n_bad = int(bad.sum())
                raise CacheCorruptError(
                    f"{self._where(k, name)}: row {row} ({src}) holds NaN/inf values ({n_bad} bad row(s) in this "
                    "piece); the data is unusable — recompute this shard (delete its directory and rerun fastcbm "
                    "precompute)")

    def _normalize_rows(self, rows: Rows) -> tuple[int, int] | np.ndarray:
        n = len(self)
        if isinstance(rows, slice):
            lo, hi, step = rows.indices(n)
            if step == 1:
                return lo, max(lo, hi)
            return np.arange(lo, hi, step)
        if isinstance(rows, (int, np.integer)):
            r = int(rows) + (n if rows < 0 else 0)
            if not 0 <= r < n:
                raise IndexError(f"rows: index {rows} out of range for a cache of {n} rows")
            return r, r + 1
        idx = rows.cpu().numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise InvalidArgument(f"rows: expected a slice, an int or a 1-D integer index, got {idx.dtype} {idx.shape}")
        idx = np.where(idx < 0, idx + n, idx)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"rows: indices out of range for a cache of {n} rows")
        return idx

    def array(self, name: str, rows: Rows = slice(None)) -> np.ndarray:
        """Rows of the named array as a numpy array (a copy; a view of the memmap when the rows lie in one shard)."""
        if name not in self.arrays:
            raise InvalidArgument(f"name: the cache has arrays {sorted(self.arrays)}, not {name!r}")
        spec = self.arrays[name]
        sel = self._normalize_rows(rows)
        if isinstance(sel, np.ndarray):  # fancy index: gather contiguous runs shard by shard
            out = np.empty((len(sel), *spec.row_shape), dtype=spec.dtype)
            shard_of = np.searchsorted(self._starts, sel, side="right") - 1
            # empty shards share their start with the next shard: move indices past them
            for k in np.unique(shard_of):
                m = shard_of == k
                kk = int(k)
                while self._rows[kk] == 0:
                    kk += 1
                out[m] = self._map(kk, name)[sel[m] - self._starts[kk]]
            return out
        lo, hi = sel
        parts = list(iter_row_ranges(self._starts, self._rows, lo, hi))
        if len(parts) == 1:
            k, a, b, _ = parts[0]
            return self._map(k, name)[a:b]
        out = np.empty((hi - lo, *spec.row_shape), dtype=spec.dtype)
        for k, a, b, off in parts:
            out[off:off + b - a] = self._map(k, name)[a:b]
        return out

    def _tensor(self, name: str, rows: Rows, device, dtype) -> torch.Tensor:
        a = np.array(self.array(name, rows))  # own the memory: memmaps are read-only
        t = torch.from_numpy(a)
        return t.to(device=device or "cpu", dtype=dtype or t.dtype)

    def prompt_embeddings(self, rows: Rows = slice(None), *, scaled: bool = False, device=None,
                          dtype: torch.dtype | None = None) -> torch.Tensor:
        """[n, G, D] unit prompt embeddings (fp16 as stored unless ``dtype``); ``scaled`` multiplies back the norms."""
        if PROMPT not in self.arrays:
            raise InvalidFile(f"the cache at {self.root} holds global embeddings only (precompute --grid 0): no ring "
                              "prompt embeddings; run fastcbm precompute with --grid N (default 7) into a new --out")
        e = self._tensor(PROMPT, rows, device, dtype if not scaled else (dtype or torch.float32))
        if scaled:
            e = e * self._tensor(PROMPT_NORM, rows, device, e.dtype).unsqueeze(-1)
        return e

    def global_embeddings(self, rows: Rows = slice(None), *, scaled: bool = False, device=None,
                          dtype: torch.dtype | None = None) -> torch.Tensor:
        """[n, D] unit embeddings of the plain (un-prompted) images; ``scaled`` multiplies back the norms."""
        e = self._tensor(GLOBAL, rows, device, dtype if not scaled else (dtype or torch.float32))
        if scaled:
            e = e * self._tensor(GLOBAL_NORM, rows, device, e.dtype).unsqueeze(-1)
        return e

    def prompt_norms(self, rows: Rows = slice(None)) -> torch.Tensor:
        """[n, G] fp32 norms of the prompt embeddings before normalisation."""
        return self._tensor(PROMPT_NORM, rows, None, None)

    def global_norms(self, rows: Rows = slice(None)) -> torch.Tensor:
        """[n] fp32 norms of the global embeddings before normalisation."""
        return self._tensor(GLOBAL_NORM, rows, None, None)

    def features(self, rows: Rows = slice(None), *, device=None, dtype=None) -> torch.Tensor:
        """[n, C, h, w] backbone feature maps, when the cache was made with ``features=``."""
        if FEATURES not in self.arrays:
            raise InvalidArgument("this cache has no backbone features (precompute with --features BACKBONE)")
        return self._tensor(FEATURES, rows, device, dtype)

    def z_cat(self, rows: Rows = slice(None), *, device=None, dtype=None) -> torch.Tensor:
        """[n, Z] a classifier's pooled stage activations (CE-FAM), when made with ``cefam_classifier=``; the
        manifest's ``settings["cefam"]`` names the classifier, its layers and their widths."""
        if Z_CAT not in self.arrays:
            raise InvalidFile(f"the cache at {self.root} has no CE-FAM stage activations (precompute with "
                              "--cefam-classifier NAME)")
        return self._tensor(Z_CAT, rows, device, dtype)

    def iter_batches(self, batch_size: int, arrays: Sequence[str] = (PROMPT, GLOBAL), *, device=None,
                     dtype: torch.dtype | None = None) -> Iterator[dict[str, Any]]:
        """Yield ``{"rows": slice, name: tensor, ...}`` for consecutive batches of rows, in input order."""
        if batch_size < 1:
            raise InvalidArgument(f"batch_size must be >= 1, got {batch_size}")
        for lo in range(0, len(self), batch_size):
            sl = slice(lo, min(lo + batch_size, len(self)))
            out: dict[str, Any] = {"rows": sl}
            for name in arrays:
                t = self._tensor(name, sl, device, None)
                out[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
            yield out

    def similarities(self, text_emb: torch.Tensor, rows: Rows = slice(None), *, normalize_text: bool = True,
                     device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """P = E·Tᵀ for the given rows: [n, G, M] cosine similarities between prompt embeddings and ``text_emb``
        [M, D] (normalised here unless ``normalize_text=False``). Computed on the fly, never stored."""
        from fastcbm.cache.similarities import prompt_similarities

        device = device or text_emb.device
        e = self.prompt_embeddings(rows, device=device, dtype=dtype)
        return prompt_similarities(e, text_emb.to(device), normalize_text=normalize_text)

    def verify(self, *, checksums: bool = True) -> list[str]:
        """Problems found in the shard files (empty list: the cache is intact): missing files, sizes, ``.npy``
        headers (shape/dtype vs the manifest), each shard's recorded settings fingerprint against the manifest's
        settings and, with ``checksums``, sha256 and NaN/inf rows. Checks every file now (``--verify``)."""
        from fastcbm.cache.store import SHARD_META, canonical_sha256, read_checked_json

        problems = []
        version = self.manifest.get("format_version")
        fingerprint = canonical_sha256({"format_version": version, "settings": self.manifest["settings"],
                                        "arrays": self.manifest["arrays"], "shard_size": self.manifest.get("shard_size")})
        for k, s in enumerate(self._shards):
            if isinstance(version, int) and version >= 2:
                if s.get("fingerprint") != fingerprint:
                    problems.append(f"{s['dir']}: made with other settings than the manifest's")
                try:
                    rec = read_checked_json(self.root / s["dir"] / SHARD_META, "shard record")
                    if rec.get("fingerprint") != fingerprint:
                        problems.append(f"{s['dir']}/{SHARD_META}: records other settings than the manifest's")
                except (ValueError, OSError) as exc:
                    problems.append(f"{s['dir']}/{SHARD_META}: {exc}")
            for name, info in s["files"].items():
                f = self.root / s["dir"] / info["file"]
                if not f.exists():
                    problems.append(f"{s['dir']}/{info['file']}: missing")
                    continue
                if f.stat().st_size != info["bytes"]:
                    problems.append(f"{s['dir']}/{info['file']}: size {f.stat().st_size} != {info['bytes']}")
                    continue
                try:
                    shape, dtype = npy_header(f)
                except (ValueError, OSError, EOFError) as exc:
                    problems.append(f"{s['dir']}/{info['file']}: unreadable .npy header ({exc})")
                    continue
                spec = self.arrays[name]
                if shape != (int(s["rows"]), *spec.row_shape) or dtype != np.dtype(spec.dtype):
                    problems.append(f"{s['dir']}/{info['file']}: holds {list(shape)} {dtype}, expected "
                                    f"{[int(s['rows']), *spec.row_shape]} {spec.dtype}")
                elif checksums and file_sha256(f) != info["sha256"]:
                    problems.append(f"{s['dir']}/{info['file']}: checksum mismatch")
                elif checksums:
                    try:
                        self._check_finite(k, name, np.load(f, mmap_mode="r"))
                    except CacheCorruptError as exc:
                        problems.append(f"{s['dir']}/{info['file']}: {str(exc).split(': ', 1)[-1]}")
        return problems
