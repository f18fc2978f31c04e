"""Small helpers shared across the package."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with ``torch.set_num_threads(n)`` and restore the previous count.

    Code made of many small tensor ops (scene generation, tiny-model training, path solvers) is faster on one thread
    than on two oversubscribed ones when other processes share a small machine, and one thread is deterministic."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
