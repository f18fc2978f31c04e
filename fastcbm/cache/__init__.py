"""The prompt-embedding cache: sharded fp16 ``.npy`` files + a JSON manifest (see :mod:`fastcbm.cache.store`).

``CacheReader(path)`` gives memmapped rows in input order and P = E·Tᵀ on the fly; the writer side is used by
:func:`fastcbm.precompute.precompute`.
"""

from fastcbm.cache.reader import CacheReader
from fastcbm.cache.similarities import (
    load_similarities,
    prompt_similarities,
    write_similarities,
)
from fastcbm.cache.store import (
    ArraySpec,
    CacheCorruptError,
    CacheDiskFullError,
    CacheIncompleteError,
    CacheLock,
    CacheLockedError,
    CacheMismatchError,
    ShardedCache,
    load_manifest,
)

__all__ = [
    "ArraySpec",
    "CacheCorruptError",
    "CacheDiskFullError",
    "CacheIncompleteError",
    "CacheLock",
    "CacheLockedError",
    "CacheMismatchError",
    "CacheReader",
    "ShardedCache",
    "load_manifest",
    "load_similarities",
    "prompt_similarities",
    "write_similarities",
]
