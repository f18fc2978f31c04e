"""Batch loaders for the precompute job: a torch DataLoader (PIL, CPU workers) and a guarded DALI loader (GPU decode).

Both yield :class:`ImageBatch`: the input indices of the batch, the decoded uint8 images ``[b, 3, S, S]`` of the
readable ones (in index order) and ``(index, reason)`` for the unreadable ones. Batches are given explicitly (lists of
input indices) so the caller controls their composition (the precompute job aligns batches to cache shards, which
makes its output independent of where a run was resumed and of the number of ranks).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch

from fastcbm.data.folder import ImageFileDataset, MIN_SIDE

log = logging.getLogger("fastcbm.data")

LOADERS = ("auto", "torch", "dali")


@dataclass
class ImageBatch:
    """``indices``: all input indices of the batch; ``ok``: the readable ones (rows of ``images``);
    ``images``: uint8 ``[len(ok), 3, S, S]``; ``skipped``: ``[(index, reason)]``."""

    indices: list[int]
    ok: list[int]
    images: torch.Tensor
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def pin_memory(self) -> "ImageBatch":  # called by DataLoader(pin_memory=True): faster, async host→GPU copies
        return ImageBatch(self.indices, self.ok, self.images.pin_memory(), self.skipped)


def _collate(size: int):
    def collate(items) -> ImageBatch:
        ok = [i for i, img, _ in items if img is not None]
        imgs = [img for _, img, _ in items if img is not None]
        images = torch.stack(imgs) if imgs else torch.empty((0, 3, size, size), dtype=torch.uint8)
        return ImageBatch([i for i, _, _ in items], ok, images, [(i, r) for i, img, r in items if img is None])
    return collate


class _ListSampler(torch.utils.data.Sampler):
    def __init__(self, batches: Sequence[Sequence[int]]) -> None:
        self.batches = [list(b) for b in batches]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def torch_loader(files: Sequence[str], size: int, batches: Sequence[Sequence[int]], *, num_workers: int = 4,
                 pin_memory: bool = False, draft: bool = False) -> Iterable[ImageBatch]:
    """DataLoader decoding ``files`` with PIL in ``num_workers`` processes, yielding one ImageBatch per entry of
    ``batches`` (in order)."""
    ds = ImageFileDataset(files, size, draft=draft)
    kw = {"prefetch_factor": 4, "persistent_workers": False} if num_workers > 0 else {}
    return torch.utils.data.DataLoader(ds, batch_sampler=_ListSampler(batches), num_workers=num_workers,
                                       collate_fn=_collate(size), pin_memory=pin_memory, **kw)


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def dali_loader(files: Sequence[str], size: int, batches: Sequence[Sequence[int]], *, device_id: int = 0,
                num_threads: int = 4) -> Iterator[ImageBatch]:  # pragma: no cover - needs DALI and a GPU
    """GPU-decoding loader (nvJPEG via ``decoders.image(device="mixed")``), same contract as :func:`torch_loader`;
    images come back on the GPU. Files DALI cannot decode are found beforehand with a cheap PIL header check;
    a batch that still fails in DALI is decoded again with PIL, so bad files are skipped, not fatal."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import feed_ndarray

    from fastcbm.data.folder import BadImageError, decode_image

    def header_ok(i: int) -> str | None:
        from PIL import Image

        try:
            with Image.open(files[i]) as im:
                if min(im.size) < MIN_SIDE:
                    return f"too small ({im.size[0]}x{im.size[1]} < {MIN_SIDE} px)"
                return None
        except Exception as exc:
            return f"not an image ({type(exc).__name__})"

    @pipeline_def(batch_size=max(len(b) for b in batches), num_threads=num_threads, device_id=device_id,
                  prefetch_queue_depth=1)
    def pipe():
        raw = fn.external_source(name="raw", dtype=types.UINT8, ndim=1)
        img = fn.decoders.image(raw, device="mixed", output_type=types.RGB)
        img = fn.resize(img, resize_shorter=size, interp_type=types.INTERP_CUBIC, antialias=True)
        img = fn.crop(img, crop=(size, size), crop_pos_x=0.5, crop_pos_y=0.5)
        return fn.transpose(img, perm=[2, 0, 1])

    p = pipe()
    p.build()
    dev = torch.device("cuda", device_id)
    for batch in batches:
        bad = {i: r for i in batch if (r := header_ok(i)) is not None}
        good = [i for i in batch if i not in bad]
        images = torch.empty((len(good), 3, size, size), dtype=torch.uint8, device=dev)
        if good:
            try:
                p.feed_input("raw", [np.fromfile(files[i], dtype=np.uint8) for i in good])
                (out,) = p.run()
                feed_ndarray(out.as_tensor(), images, cuda_stream=torch.cuda.current_stream(dev).cuda_stream)
            except Exception as exc:  # DALI stops on the first corrupt file: decode this batch with PIL instead
                log.warning("DALI failed on a batch (%s); decoding it with PIL", exc)
                p = pipe()  # a failed pipeline is not reusable
                p.build()
                imgs, keep = [], []
                for i in good:
                    try:
                        imgs.append(decode_image(files[i], size))
                        keep.append(i)
                    except BadImageError as e:
                        bad[i] = e.reason
                good = keep
                images = (torch.stack(imgs) if imgs else torch.empty((0, 3, size, size), dtype=torch.uint8)).to(dev)
        yield ImageBatch(list(batch), good, images, sorted(bad.items()))


def resolve_loader(loader: str, device: torch.device | str) -> str:
    """``"dali"`` (needs nvidia.dali and a CUDA device) or ``"torch"``; ``"auto"``: DALI when both are there."""
    if loader not in LOADERS:
        raise ValueError(f"loader must be one of {LOADERS}, got {loader!r}")
    device = torch.device(device)
    if loader == "dali" and (not dali_available() or device.type != "cuda"):
        raise ValueError("loader='dali' needs nvidia.dali installed (pip install nvidia-dali-cuda130) and a CUDA "
                         f"device; got device={device}, DALI {'installed' if dali_available() else 'not installed'}")
    if loader == "auto":
        return "dali" if device.type == "cuda" and dali_available() else "torch"
    return loader


def make_loader(files: Sequence[str], size: int, batches: Sequence[Sequence[int]], *, loader: str = "auto",
                device: torch.device | str = "cpu", num_workers: int = 4, draft: bool = False) -> Iterable[ImageBatch]:
    """The loader chosen by :func:`resolve_loader`, yielding one :class:`ImageBatch` per entry of ``batches``."""
    device = torch.device(device)
    if resolve_loader(loader, device) == "dali":
        return dali_loader(files, size, batches, device_id=device.index or 0)
    return torch_loader(files, size, batches, num_workers=num_workers, pin_memory=device.type == "cuda", draft=draft)
