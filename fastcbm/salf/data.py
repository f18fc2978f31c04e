"""Training data for the SALF-CBM bottleneck and head, in memory or streamed from a precompute cache.

A split is three aligned row arrays: grid features ``F [N, C, L]`` (backbone maps resized to the Gy×Gx prompt grid),
prompt embeddings ``E [N, L, D]`` and labels ``[N]``. :class:`TensorData` holds them in memory (the demo, small sets);
:class:`CacheData` reads rows of a cache written by ``fastcbm precompute --features BACKBONE`` on demand from the
memmapped fp16 shards, so ImageNet-scale splits (1.28 M × 2048 × 49 fp16 ≈ 257 GB of features) never have to fit in
RAM: each optimiser step gathers only its own batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Protocol

import numpy as np
import torch

from fastcbm.errors import InvalidArgument


class SALFData(Protocol):
    """Rows of one split; ``rows`` are int64 indices ``[b]`` into ``0..len-1``."""

    labels: torch.Tensor  # long [N]

    def __len__(self) -> int: ...

    @property
    def channels(self) -> int: ...

    @property
    def cells(self) -> int: ...

    @property
    def dim(self) -> int: ...

    def features(self, rows: torch.Tensor) -> torch.Tensor:  # [b, C, L] (fp16 or fp32)
        ...

    def prompt_emb(self, rows: torch.Tensor) -> torch.Tensor:  # [b, L, D] (fp16 or fp32)
        ...


class TensorData:
    """An in-memory split: ``features [N, C, L]``, ``prompt_emb [N, L, D]``, ``labels [N]``."""

    def __init__(self, features: torch.Tensor, prompt_emb: torch.Tensor, labels: torch.Tensor | None = None,
                 name: str = "data") -> None:
        if features.dim() != 3:
            raise InvalidArgument(f"{name} features must be [N, C, L], got shape {tuple(features.shape)}")
        n, _, cells = features.shape
        if prompt_emb.dim() != 3 or prompt_emb.shape[:2] != (n, cells):
            raise InvalidArgument(f"{name} prompt embeddings must be [N={n}, L={cells}, D], got shape "
                                  f"{tuple(prompt_emb.shape)}")
        labels = torch.full((n,), -1, dtype=torch.long) if labels is None else labels
        if labels.shape != (n,):
            raise InvalidArgument(f"{name} labels must be [{n}], got shape {tuple(labels.shape)}")
        self._f, self._e, self.labels, self.name = features, prompt_emb, labels.long(), name

    def __len__(self) -> int:
        return self._f.shape[0]

    @property
    def channels(self) -> int:
        return self._f.shape[1]

    @property
    def cells(self) -> int:
        return self._f.shape[2]

    @property
    def dim(self) -> int:
        return self._e.shape[2]

    def features(self, rows: torch.Tensor) -> torch.Tensor:
        return self._f[rows]

    def prompt_emb(self, rows: torch.Tensor) -> torch.Tensor:
        return self._e[rows]


class CacheData:
    """A split streamed from a precompute cache with stored backbone features.

    ``cache``: a :class:`~fastcbm.cache.CacheReader` (or its directory); ``labels [N_cache]`` for every cache row
    (``-1`` for rows without one); ``rows``: the cache rows of this split (default: all). Rows are read on demand,
    sorted within a batch so that reads walk each shard forward.
    """

    def __init__(self, cache, labels: torch.Tensor, rows: Sequence[int] | np.ndarray | torch.Tensor | None = None,
                 name: str = "data") -> None:
        from fastcbm.cache import CacheReader
        from fastcbm.cache.reader import FEATURES

        self.cache = cache if isinstance(cache, CacheReader) else CacheReader(cache)
        if self.cache.num_prompts == 0:
            raise InvalidArgument(f"{name}: the cache at {self.cache.root} holds global embeddings only (precompute --grid "
                                  "0): SALF-CBM needs ring prompts; run fastcbm precompute with --grid N --features BACKBONE "
                                  "into a new --out")
        if FEATURES not in self.cache.arrays:
            raise InvalidArgument(
                     f"{name}: the cache at {self.cache.root} has no backbone features; run fastcbm precompute again with "
                     "--features BACKBONE (finished prompt shards are reused only with identical settings, so use a new "
                     "--out)")
        spec = self.cache.arrays[FEATURES].row_shape  # (C, gy, gx)
        if int(np.prod(spec[1:])) != self.cache.num_prompts:
            raise InvalidArgument(f"{name}: cached features have a {spec[1]}×{spec[2]} grid but the cache has "
                                  f"{self.cache.num_prompts} prompts per image")
        n_cache = len(self.cache)
        labels = torch.as_tensor(labels).long()
        if labels.shape != (n_cache,):
            raise InvalidArgument(f"{name} labels must be [{n_cache}] (one per cache row), got shape {tuple(labels.shape)}")
        self._rows = np.arange(n_cache, dtype=np.int64) if rows is None else np.asarray(
            torch.as_tensor(rows).cpu().numpy(), dtype=np.int64)
        if self._rows.ndim != 1 or (self._rows.size and (self._rows.min() < 0 or self._rows.max() >= n_cache)):
            raise InvalidArgument(f"{name} rows must be 1-D indices into the cache's {n_cache} rows")
        self.labels = labels[torch.from_numpy(self._rows)]
        self._channels = int(spec[0])
        self.name = name

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def channels(self) -> int:
        return self._channels

    @property
    def cells(self) -> int:
        return self.cache.num_prompts

    @property
    def dim(self) -> int:
        return self.cache.dim

    @property
    def rows(self) -> torch.Tensor:
        """long [N]: the cache rows of this split."""
        return torch.from_numpy(self._rows)

    def _read(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Rows of a cache array in the requested order, read in cache order (forward through each shard). Sorted
        requests — what the trainer sends — need no reordering copy (at 50,000 ImageNet rows a copy is 10 GB)."""
        wanted = self._rows[np.asarray(torch.as_tensor(rows).cpu().numpy(), dtype=np.int64)]
        if wanted.size < 2 or bool(np.all(wanted[1:] >= wanted[:-1])):
            return torch.from_numpy(np.ascontiguousarray(self.cache.array(name, wanted)))
        order = np.argsort(wanted, kind="stable")
        out = np.empty((len(wanted), *self.cache.arrays[name].row_shape), dtype=self.cache.arrays[name].dtype)
        out[order] = self.cache.array(name, wanted[order])
        return torch.from_numpy(out)

    def features(self, rows: torch.Tensor) -> torch.Tensor:
        return self._read("features", rows).flatten(2)

    def prompt_emb(self, rows: torch.Tensor) -> torch.Tensor:
        return self._read("prompt", rows)


def batches(data: SALFData, rows_per_step: Iterator[torch.Tensor], device: torch.device,
            prefetch: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(F [b, C, L], E [b, L, D])`` fp32 on ``device`` for each index tensor of ``rows_per_step``; with ``prefetch``
    the next batch is read (memmap → RAM) in a background thread while the current one trains."""

    def load(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return data.features(rows), data.prompt_emb(rows)

    def to_device(fe: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return (fe[0].to(device, torch.float32, non_blocking=True), fe[1].to(device, torch.float32, non_blocking=True))

    if not prefetch:
        for rows in rows_per_step:
            yield to_device(load(rows))
        return
    with ThreadPoolExecutor(1) as pool:
        pending = None
        for rows in rows_per_step:
            nxt = pool.submit(load, rows)
            if pending is not None:
                yield to_device(pending.result())
            pending = nxt
        if pending is not None:
            yield to_device(pending.result())
