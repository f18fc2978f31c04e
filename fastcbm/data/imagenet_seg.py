"""ImageNet-segmentation (Guillaumin et al., IJCV 2014) as the Chefer et al. protocol reads it: ``gtsegs_ijcv.mat``.

The file is MATLAB v7.3, i.e. HDF5 (read with h5py). Layout, as the Transformer-Explainability loader reads it:

    /value/img   object references [N, 1]; f[ref] is uint8 [3, W, H]  (MATLAB column-major: transpose → [H, W, 3])
    /value/gt    object references [N, 1]; f[ref] is a [1, 1] array of references; f[that[0, 0]] is [W, H]
                 (transpose → [H, W]; 1 = object, 0 = background)

4,276 images in the real file. The protocol resizes images to the model's input (no crop; bilinear) and the masks
to the same size with nearest neighbour; scores come from :func:`fastcbm.metrics.segmentation_scores`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from fastcbm.errors import InvalidFile, MissingFile


def _h5py():
    try:
        import h5py
    except ImportError as exc:  # pragma: no cover - h5py is a dependency
        raise ImportError("reading gtsegs_ijcv.mat needs h5py: pip install 'fastcbm[eval]' (or h5py)") from exc
    return h5py


class ImageNetSegmentation:
    """Random access to ``gtsegs_ijcv.mat``: ``ds[i] -> (image uint8 [3, H, W], mask bool [H, W])`` at the file's
    own resolution; :meth:`batches` yields them resized for a model. Open with a ``with`` block or call close()."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise MissingFile(f"--segmentation {self.path} does not exist (expected ImageNet-segmentation's "
                              "gtsegs_ijcv.mat)")
        h5py = _h5py()
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as exc:
            raise InvalidFile(f"{self.path}: not an HDF5 / MATLAB v7.3 file ({exc})") from None
        try:
            self._img = self._f["/value/img"]
            self._gt = self._f["/value/gt"]
        except KeyError:
            self._f.close()
            raise InvalidFile(f"{self.path}: no /value/img and /value/gt datasets (not gtsegs_ijcv.mat)") from None
        if len(self._img) != len(self._gt):
            raise InvalidFile(f"{self.path}: {len(self._img)} images but {len(self._gt)} masks")

    def __len__(self) -> int:
        return len(self._img)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range [0, {len(self)})")
        img = np.asarray(self._f[self._img[i, 0]])  # [3, W, H]
        if img.ndim == 2:  # a grayscale image is stored [W, H]
            img = np.stack([img] * 3)
        img = np.ascontiguousarray(img.transpose(0, 2, 1)).astype(np.uint8)  # [3, H, W]
        inner = self._f[self._gt[i, 0]]
        gt = np.asarray(self._f[inner[0, 0]]).T  # [H, W]
        if gt.shape != img.shape[1:]:
            raise InvalidFile(f"{self.path}: image {i} is {img.shape[1:]} but its mask {gt.shape}")
        return torch.from_numpy(img), torch.from_numpy(gt > 0)

    def batches(self, size: int, batch_size: int = 32, limit: int | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Chefer's transforms: images resized to ``size``×``size`` (bilinear, uint8 ``[B, 3, S, S]``), masks with
        nearest neighbour (bool ``[B, S, S]``)."""
        import torch.nn.functional as F

        n = len(self) if limit is None else min(limit, len(self))
        for start in range(0, n, batch_size):
            imgs, masks = [], []
            for i in range(start, min(start + batch_size, n)):
                img, gt = self[i]
                imgs.append(F.interpolate(img[None].float(), size=(size, size), mode="bilinear", antialias=True,
                                          align_corners=False).round().clamp(0, 255).to(torch.uint8)[0])
                masks.append(F.interpolate(gt[None, None].float(), size=(size, size), mode="nearest")[0, 0] > 0.5)
            yield torch.stack(imgs), torch.stack(masks)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> ImageNetSegmentation:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_gtsegs(path: str | os.PathLike, images: list[np.ndarray], masks: list[np.ndarray]) -> Path:
    """Write images (uint8 ``[H, W, 3]``) and masks (``[H, W]``) in ``gtsegs_ijcv.mat``'s exact HDF5 layout (for tests
    and for packing your own data so ``fastcbm evaluate --segmentation`` reads it)."""
    h5py = _h5py()
    path = Path(path)
    with h5py.File(path, "w") as f:
        ref = h5py.special_dtype(ref=h5py.Reference)
        refs = f.create_group("#refs#")
        img_refs = f.create_dataset("value/img", (len(images), 1), dtype=ref)
        gt_refs = f.create_dataset("value/gt", (len(masks), 1), dtype=ref)
        for i, (img, gt) in enumerate(zip(images, masks)):
            d = refs.create_dataset(f"img{i}", data=np.asarray(img, np.uint8).transpose(2, 1, 0))  # [3, W, H]
            img_refs[i, 0] = d.ref
            m = refs.create_dataset(f"gt{i}", data=np.asarray(gt, np.uint8).T)  # [W, H]
            cell = refs.create_dataset(f"gtcell{i}", (1, 1), dtype=ref)
            cell[0, 0] = m.ref
            gt_refs[i, 0] = cell.ref
    return path


__all__ = ["ImageNetSegmentation", "write_gtsegs"]
