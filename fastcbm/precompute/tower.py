"""Precompute's image tower, fed straight by the ring kernel (docs/design.md §3, issue 23.6).

Precompute on a GPU is bound by the CLIP image tower (49 prompted copies of every image; a ViT-B/16 at bf16 peak is
≈ 22,500 images/s on an H100, docs/design.md §4). So nothing else may cost bandwidth or launches:

- the batch is encoded in chunks of whole images (``max_encode_batch`` rows, rounded down to whole images); for each
  chunk :func:`fastcbm.prompts.render_rings` writes all 1+G copies directly into the tower's input buffer, in the
  encoder's dtype (bf16 on a GPU), reused from chunk to chunk: no separate normalised batch, no cast, no copy;
- the tower runs under autocast in that dtype: bf16 matmuls, and attention through PyTorch's
  ``scaled_dot_product_attention`` (open_clip's ``nn.MultiheadAttention`` with ``need_weights=False``: flash /
  memory-efficient kernels on a GPU);
- ``mode="graph"`` captures the tower once for the full chunk as a CUDA graph on a static input buffer — the ring
  kernel renders into that buffer and the graph replays, without per-layer launch gaps (a short last chunk runs
  eagerly); ``mode="compile"`` runs a ``torch.compile``\\ d tower (fused layer norms, GELUs and residual adds).

All modes compute the same function; ``eager`` is the default and the reference for the others.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from fastcbm.errors import InvalidArgument

TOWER_MODES = ("eager", "graph", "compile")


def check_tower_mode(mode: str, device: torch.device) -> None:
    """Refuse an unknown mode, or a CUDA graph off a GPU (one line naming the argument)."""
    if mode not in TOWER_MODES:
        raise InvalidArgument(f"tower must be one of {TOWER_MODES}, got {mode!r}")
    if mode == "graph" and device.type != "cuda":
        raise InvalidArgument(f"tower='graph' (a CUDA graph) needs a CUDA device, got {device}")


class PromptTower:
    """``tower(images uint8 [b, 3, S, S]) -> fp32 [b, copies, D]``: render + encode, chunk by chunk.

    ``render(images, out)`` must fill ``out`` ``[n, copies, 3, S, S]`` (``dtype``, on ``device``) for ``n`` images;
    ``model.encode_image(x [rows, 3, S, S]) -> [rows, D]``. ``times`` accumulates the seconds spent rendering and
    encoding (host time: on a GPU the launches are asynchronous, so the encoder's share includes the wait)."""

    def __init__(self, model: torch.nn.Module, render: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
                 copies: int, size: int, device: torch.device, dtype: torch.dtype, max_encode_batch: int,
                 mode: str = "eager") -> None:
        check_tower_mode(mode, device)
        self.model, self.render, self.copies, self.size = model, render, int(copies), int(size)
        self.device, self.dtype, self.mode = device, dtype, mode
        self.per_chunk = max(1, int(max_encode_batch) // self.copies)  # whole images per encoder call
        self.autocast = device.type == "cuda" and dtype != torch.float32
        self.times = {"render": 0.0, "encode": 0.0}
        self._buffer: torch.Tensor | None = None  # [per_chunk, copies, 3, S, S]: the tower's input
        self._graph: tuple[torch.cuda.CUDAGraph, torch.Tensor] | None = None
        self._compiled = torch.compile(self._forward, dynamic=False) if mode == "compile" else None

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, copies, 3, S, S]`` → fp32 ``[n·copies, D]`` (autocast's weight cache off: CUDA graphs need that)."""
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocast, cache_enabled=False):
            return self.model.encode_image(x.reshape(-1, 3, self.size, self.size)).float()

    def _input(self, n: int) -> torch.Tensor:
        if self._buffer is None:
            self._buffer = torch.empty((self.per_chunk, self.copies, 3, self.size, self.size), dtype=self.dtype,
                                       device=self.device)
        return self._buffer[:n]  # a contiguous prefix: what render writes and the tower reads

    def _capture(self) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Capture the full-chunk forward on the input buffer (after warm-up runs on a side stream, as CUDA graphs
        require)."""
        x = self._input(self.per_chunk)
        x.zero_()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):
                self._forward(x)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            out = self._forward(x)
        return graph, out

    def _encode(self, n: int, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "graph" and n == self.per_chunk:
            graph, out = self._graph
            graph.replay()
            return out.clone()  # the next replay overwrites it
        if self._compiled is not None and n == self.per_chunk:
            return self._compiled(x)
        return self._forward(x)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        b = images.shape[0]
        if self.mode == "graph" and self._graph is None:
            self._graph = self._capture()
        outs = []
        with torch.inference_mode():
            for lo in range(0, b, self.per_chunk):
                n = min(self.per_chunk, b - lo)
                t0 = time.perf_counter()
                x = self.render(images[lo:lo + n], self._input(n))
                t1 = time.perf_counter()
                outs.append(self._encode(n, x))
                self.times["render"] += t1 - t0
                self.times["encode"] += time.perf_counter() - t1
        return torch.cat(outs).reshape(b, self.copies, -1)
