"""Read side of the prompt-embedding cache: memmapped rows in the original input order, P = E·Tᵀ on the fly."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from fastcbm.cache.store import CacheIncompleteError, ArraySpec, file_sha256, iter_row_ranges, load_manifest

Rows = slice | int | Sequence[int] | np.ndarray | torch.Tensor

# standard array names written by fastcbm.precompute
PROMPT, PROMPT_NORM, GLOBAL, GLOBAL_NORM, INPUT_INDEX, FEATURES = (
    "prompt", "prompt_norm", "global", "global_norm", "input_index", "features")


class CacheReader:
    """Memmapped access to a finished cache written by :func:`fastcbm.precompute.precompute`.

    Rows are the readable input images in input order (skipped ones have no row); ``files`` maps row → path.
    Arrays: ``prompt`` [N, G, D] fp16 unit prompt embeddings, ``prompt_norm`` [N, G] fp32 their norms before
    normalisation, ``global`` [N, D] fp16 unit embeddings of the plain image, ``global_norm`` [N] fp32, optional
    ``features`` [N, C, h, w] fp16 backbone feature maps.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.manifest: dict[str, Any] = load_manifest(self.root)
        if not self.manifest.get("complete"):
            raise CacheIncompleteError(
                f"the cache at {self.root} is unfinished (a run stopped before the end); run the same precompute "
                "command again to complete it")
        self.arrays = {k: ArraySpec.from_json(v) for k, v in self.manifest["arrays"].items()}
        self._shards = self.manifest["shards"]
        self._starts = np.array([s["row_start"] for s in self._shards], dtype=np.int64)
        self._rows = np.array([s["rows"] for s in self._shards], dtype=np.int64)
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
        return self.arrays[PROMPT].row_shape[0]

    @property
    def dim(self) -> int:
        return self.arrays[PROMPT].row_shape[1]

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
            shard = self._shards[k]
            self._maps[key] = np.load(self.root / shard["dir"] / shard["files"][name]["file"], mmap_mode="r")
        return self._maps[key]

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
            raise ValueError(f"rows: expected a slice, an int or a 1-D integer index, got {idx.dtype} {idx.shape}")
        idx = np.where(idx < 0, idx + n, idx)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"rows: indices out of range for a cache of {n} rows")
        return idx

    def array(self, name: str, rows: Rows = slice(None)) -> np.ndarray:
        """Rows of the named array as a numpy array (a copy; a view of the memmap when the rows lie in one shard)."""
        if name not in self.arrays:
            raise ValueError(f"name: the cache has arrays {sorted(self.arrays)}, not {name!r}")
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
            raise ValueError("this cache has no backbone features (precompute with --features BACKBONE)")
        return self._tensor(FEATURES, rows, device, dtype)

    def iter_batches(self, batch_size: int, arrays: Sequence[str] = (PROMPT, GLOBAL), *, device=None,
                     dtype: torch.dtype | None = None) -> Iterator[dict[str, Any]]:
        """Yield ``{"rows": slice, name: tensor, ...}`` for consecutive batches of rows, in input order."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
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
        """Problems found in the shard files (empty list: the cache is intact)."""
        problems = []
        for s in self._shards:
            for name, info in s["files"].items():
                f = self.root / s["dir"] / info["file"]
                if not f.exists():
                    problems.append(f"{s['dir']}/{info['file']}: missing")
                elif f.stat().st_size != info["bytes"]:
                    problems.append(f"{s['dir']}/{info['file']}: size {f.stat().st_size} != {info['bytes']}")
                elif checksums and file_sha256(f) != info["sha256"]:
                    problems.append(f"{s['dir']}/{info['file']}: checksum mismatch")
        return problems
