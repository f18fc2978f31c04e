"""Every setting of a precompute run, with its default defined once: :func:`fastcbm.precompute.precompute`, ``fastcbm
precompute`` (its options are built from these fields), the demos and the benchmark read them from here."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fastcbm.errors import InvalidArgument

VERIFY_MODES = ("checksum", "size")
CENTERS = ("inset", "paper")
DTYPES = ("auto", "bf16", "bfloat16", "fp16", "float16", "fp32", "float32")


@dataclass(frozen=True)
class PrecomputeConfig:
    """What a precompute run stores and how it runs.

    Ring prompts (SALF-CBM): ``grid`` G×G rings (``0``: no prompts, only the global embedding — CE-FAM's cheap mode),
    ``radius`` in px (None: ``fastcbm.prompts.default_ring_geometry`` of the encoder's input side), ring ``width`` in
    px, ``centers`` "inset" (every ring inside the image) or "paper" (k·⌊S/(G−1)⌋).

    Extra arrays: ``features`` — a backbone whose feature maps are stored on the prompt grid ``[N, C, gy, gx]`` fp16
    (a ``fastcbm.models.load_backbone`` name with ``features_pretrained`` / ``features_layer``, or a callable uint8
    ``[B, 3, S, S]`` → ``[B, C, h, w]`` named by ``features_name``); ``cefam_classifier`` — a classifier whose pooled
    stages ``z_cat [N, Z]`` fp16 are stored (``cefam_layers``, default its feature layers).

    Execution: ``device`` ("auto" | "cpu" | "cuda[:N]"), encoder ``dtype`` ("auto": bf16 autocast on GPU, fp32 on
    CPU), ``engine`` ("torch", or an exported graph on "onnxruntime" / "tensorrt"), how engine "torch" runs the tower
    ``tower`` ("eager", "graph": a CUDA graph, "compile": torch.compile; :mod:`fastcbm.precompute.tower`), images
    per step ``batch_size``
    (None: by device), images per encoder call ``max_encode_batch`` (None: by device and image size), decoding
    ``num_workers`` (None: up to 4), ``loader`` ("auto" | "torch" | "dali"), JPEG ``draft`` decoding, images per
    cache shard ``shard_size``, how finished shards are checked on resume ``verify``, and a progress bar.
    """

    grid: int | tuple[int, int] = 7
    radius: float | None = None
    width: float = 2.0
    centers: str = "inset"
    features: str | Callable[[torch.Tensor], torch.Tensor] | None = None
    features_name: str | None = None
    features_pretrained: bool | str | None = True
    features_layer: str | None = None
    cefam_classifier: str | None = None
    cefam_layers: tuple[str, ...] | None = None
    cefam_pretrained: bool | str | None = True
    device: str | torch.device = "auto"
    dtype: str | torch.dtype = "auto"
    engine: str = "torch"
    tower: str = "eager"
    batch_size: int | None = None
    max_encode_batch: int | None = None
    num_workers: int | None = None
    loader: str = "auto"
    draft: bool = False
    shard_size: int = 4096
    verify: str = "checksum"
    progress: bool = True

    @classmethod
    def from_settings(cls, base: PrecomputeConfig | None = None, **settings: Any) -> PrecomputeConfig:
        """``base`` (default: the defaults) with ``settings`` replaced; an unknown name is refused in one line."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise InvalidArgument(f"precompute: unknown setting(s) {unknown}; the settings are {sorted(names)}")
        if isinstance(settings.get("cefam_layers"), list):
            settings["cefam_layers"] = tuple(settings["cefam_layers"])
        return dataclasses.replace(base or cls(), **settings)

    @property
    def global_only(self) -> bool:
        """No ring prompts: only the global embedding (and z_cat) is stored."""
        return not isinstance(self.grid, bool) and self.grid in (0, (0, 0), [0, 0])

    def validate(self) -> None:
        """Refuse impossible combinations before any model is loaded."""
        if self.verify not in VERIFY_MODES:
            raise InvalidArgument(f"verify must be one of {VERIFY_MODES}, got {self.verify!r}")
        if self.centers not in CENTERS:
            raise InvalidArgument(f"centers must be one of {CENTERS}, got {self.centers!r}")
        if isinstance(self.dtype, str) and self.dtype not in DTYPES:
            raise InvalidArgument(f"dtype must be 'auto', 'bf16', 'fp16' or 'fp32', got {self.dtype!r}")
        if self.shard_size < 1:
            raise InvalidArgument(f"shard_size must be >= 1, got {self.shard_size}")
        for name in ("batch_size", "max_encode_batch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InvalidArgument(f"{name} must be >= 1, got {value}")
        if self.num_workers is not None and self.num_workers < 0:
            raise InvalidArgument(f"num_workers must be >= 0, got {self.num_workers}")
        if not self.global_only:
            from fastcbm.prompts import MAX_GRID
            from fastcbm.prompts.reference import normalize_grid

            gy, gx = normalize_grid(self.grid)
            if not (1 <= gy <= MAX_GRID and 1 <= gx <= MAX_GRID):
                raise InvalidArgument(f"--grid must be 0 (no prompts) or 1 to {MAX_GRID} rings per axis, got "
                                      f"{self.grid} ({gy * gx:,} prompted copies of every image)")
        if self.global_only and self.features is not None:
            raise InvalidArgument("features: SALF-CBM feature maps are stored on the prompt grid; --features needs "
                                  "--grid >= 1")
        from fastcbm.precompute.tower import TOWER_MODES

        if self.tower not in TOWER_MODES:
            raise InvalidArgument(f"tower must be one of {TOWER_MODES}, got {self.tower!r}")
        if self.tower != "eager" and self.engine != "torch":
            raise InvalidArgument(f"tower={self.tower!r} applies to engine 'torch' (an exported graph runs as built)")
        if self.cefam_layers is not None and not self.cefam_classifier:
            raise InvalidArgument("cefam_layers: needs cefam_classifier (--cefam-classifier NAME)")

    # -- defaults that depend on the machine ------------------------------------------------------------------------
    def resolved_batch_size(self, device: torch.device) -> int:
        return self.batch_size or (64 if device.type == "cuda" else 4)

    def resolved_num_workers(self) -> int:
        # decoding workers: up to 4, never more than the machine's cores
        return self.num_workers if self.num_workers is not None else min(4, os.cpu_count() or 1)

    def resolved_max_encode_batch(self, device: torch.device, size: int) -> int:
        if self.max_encode_batch is not None:
            return self.max_encode_batch
        # GPU: large batches fill the device. CPU: per-image cost grows with the batch once activations leave the
        # caches (ViT-B/16: 215 ms/img at 16, 287 at 100); ~1 M pixels per forward: 20 at 224 px, 256 at 64 px
        return 1024 if device.type == "cuda" else max(8, min(1024, (1 << 20) // (size * size)))


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The encoder's compute dtype: "auto" is bf16 on a GPU and fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if dtype not in table:
        raise InvalidArgument(f"dtype must be 'auto', 'bf16', 'fp16' or 'fp32', got {dtype!r}")
    return table[dtype]


def config_fields() -> Mapping[str, dataclasses.Field]:
    """The fields of :class:`PrecomputeConfig` by name (the CLI builds its options' defaults from them)."""
    return {f.name: f for f in dataclasses.fields(PrecomputeConfig)}


__all__ = ["PrecomputeConfig", "config_fields", "resolve_dtype"]
