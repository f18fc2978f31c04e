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
from fastcbm.errors import InvalidArgument

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


def dali_loader(files: Sequence[str], size: int, batches: Sequence[Sequence[int]], *, device_id: int | None = 0,
                num_threads: int = 4) -> Iterator[ImageBatch]:
    """DALI decoding loader, same contract as :func:`torch_loader`. With a ``device_id`` it decodes on that GPU
    (nvJPEG via ``decoders.image(device="mixed")``) and images come back there; ``device_id=None`` runs DALI's CPU
    decoder (images on the CPU; what the CPU tests exercise). Files DALI cannot decode are found beforehand with a
    cheap PIL header check; a batch that still fails in DALI is decoded again with PIL, so bad files are skipped,
    not fatal."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import feed_ndarray

    from fastcbm.data.folder import BadImageError, decode_image, resize_crop_geometry

    def header(i: int) -> tuple[int, int] | str:
        """(width, height) from the file header, or why the file is unusable."""
        from PIL import Image

        try:
            with Image.open(files[i]) as im:
                if min(im.size) < MIN_SIDE:
                    return f"too small ({im.size[0]}x{im.size[1]} < {MIN_SIDE} px)"
                return im.size
        except Exception as exc:
            return f"not an image ({type(exc).__name__})"

    on_gpu = device_id is not None
    if not batches:
        return

    @pipeline_def(batch_size=max(len(b) for b in batches), num_threads=num_threads, device_id=device_id,
                  prefetch_queue_depth=1)
    def pipe():
        # per-image output size and crop anchor come from resize_crop_geometry, so DALI samples the pixels PIL does
        # (DALI's own resize_shorter rounds the longer side: a sub-pixel shift of the whole image)
        raw = fn.external_source(name="raw", dtype=types.UINT8, ndim=1)
        hw = fn.external_source(name="hw", dtype=types.FLOAT, ndim=1)
        anchor = fn.external_source(name="anchor", dtype=types.FLOAT, ndim=1)
        img = fn.decoders.image(raw, device="mixed" if on_gpu else "cpu", output_type=types.RGB,
                                adjust_orientation=False)  # PIL does not apply EXIF rotation either
        img = fn.resize(img, size=hw, interp_type=types.INTERP_CUBIC, antialias=True)
        img = fn.slice(img, anchor, np.array([size, size], dtype=np.float32), axes=[0, 1], normalized_anchor=False,
                       normalized_shape=False)
        return fn.transpose(img, perm=[2, 0, 1])

    p = pipe()
    p.build()
    dev = torch.device("cuda", device_id) if on_gpu else torch.device("cpu")
    for batch in batches:
        headers = {i: header(i) for i in batch}
        bad = {i: h for i, h in headers.items() if isinstance(h, str)}
        good = [i for i in batch if i not in bad]
        images = torch.empty((len(good), 3, size, size), dtype=torch.uint8, device=dev)
        if good:
            try:
                geometry = [resize_crop_geometry(*headers[i], size) for i in good]
                p.feed_input("raw", [np.fromfile(files[i], dtype=np.uint8) for i in good])
                p.feed_input("hw", [np.array([nh, nw], dtype=np.float32) for nw, nh, _, _ in geometry])
                p.feed_input("anchor", [np.array([top, left], dtype=np.float32) for _, _, left, top in geometry])
                (out,) = p.run()
                if on_gpu:
                    feed_ndarray(out.as_tensor(), images, cuda_stream=torch.cuda.current_stream(dev).cuda_stream)
                else:
                    images = torch.from_numpy(out.as_array())
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
    """``"dali"`` (needs nvidia.dali; GPU decoding on a CUDA device, DALI's CPU decoder otherwise) or ``"torch"``;
    ``"auto"``: DALI on a CUDA device when it is installed, else torch (on CPU, PIL in worker processes is as fast)."""
    if loader not in LOADERS:
        raise InvalidArgument(f"loader must be one of {LOADERS}, got {loader!r}")
    device = torch.device(device)
    if loader == "dali" and not dali_available():
        raise InvalidArgument("loader='dali' needs nvidia.dali installed (pip install nvidia-dali-cuda130); "
                              f"device={device}")
    if loader == "auto":
        return "dali" if device.type == "cuda" and dali_available() else "torch"
    return loader


def make_loader(files: Sequence[str], size: int, batches: Sequence[Sequence[int]], *, loader: str = "auto",
                device: torch.device | str = "cpu", num_workers: int = 4, draft: bool = False) -> Iterable[ImageBatch]:
    """The loader chosen by :func:`resolve_loader`, yielding one :class:`ImageBatch` per entry of ``batches``."""
    device = torch.device(device)
    if resolve_loader(loader, device) == "dali":
        return dali_loader(files, size, batches, device_id=(device.index or 0) if device.type == "cuda" else None,
                           num_threads=max(1, num_workers))
    return torch_loader(files, size, batches, num_workers=num_workers, pin_memory=device.type == "cuda", draft=draft)
