"""Robust image listing and decoding: folders (recursive, ImageFolder layout allowed) or path lists, PIL decoding to
uint8 ``[3, S, S]`` in the encoder's input space (resize shorter side, centre crop), bad files reported, not raised.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from fastcbm.errors import InvalidArgument, InvalidFile, MissingFile

log = logging.getLogger("fastcbm.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif")
MIN_SIDE = 8  # images smaller than this (either side) carry no usable content for a 7x7 prompt grid


class BadImageError(Exception):
    """An input that cannot be used; ``reason`` is short and goes into the cache manifest."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def list_images(data: str | os.PathLike | Sequence[str | os.PathLike],
                extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[str]:
    """The input files, in a deterministic order.

    ``data``: a directory (searched recursively for files with an image extension, sorted by relative path, so
    ImageFolder layouts ``root/class/x.jpg`` work), a text file listing one path per line (relative paths are relative
    to the list file; blank lines and ``#`` comments ignored; order kept), or a sequence of paths (order kept).
    """
    if not isinstance(data, (str, os.PathLike)):
        return [str(p) for p in data]
    root = Path(data)
    if root.is_dir():
        exts = tuple(e.lower() for e in extensions)
        files = [p for p in root.rglob("*") if p.suffix.lower() in exts and p.is_file()]
        files.sort(key=lambda p: p.relative_to(root).as_posix())
        if not files:
            raise InvalidFile(f"data: no image files ({', '.join(exts)}) under the directory {root}")
        return [str(p) for p in files]
    if root.is_file():
        if root.suffix.lower() in tuple(e.lower() for e in extensions):
            return [str(root)]
        try:
            text = root.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InvalidFile(f"data: {root} is neither an image nor a text file listing image paths (it is binary; "
                              f"image extensions: {', '.join(extensions)})") from None
        out, first_line = [], None
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            p = Path(line)
            first_line = first_line or line
            out.append(str(p if p.is_absolute() else root.parent / p))
        if not out:
            raise InvalidFile(f"data: the list file {root} names no images")
        # a list whose lines are not image paths (a CSV, a concept list, ...) would give a 0-image cache: refuse
        if not any(os.path.isfile(f) for f in out[:10_000]):
            hint = " (it looks like a CSV: give one path per line)" if "," in first_line or "\t" in first_line else ""
            raise InvalidFile(f"data: none of the {len(out)} lines of the list file {root} names an existing file "
                              f"(line 1: {first_line[:80]!r}){hint}")
        return out
    if not root.exists():
        raise MissingFile(f"data: {root} does not exist (expected an image folder or a list file)")
    raise MissingFile(f"data: {root} is neither a directory nor a list file")


def _to_rgb(img):
    """Any PIL mode (L, LA, P, PA, CMYK, RGBA, I;16, ...) → RGB, as CLIP's preprocessing does (alpha dropped)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # palette transparency must go through RGBA, or PIL warns
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        from PIL import Image

        img = Image.fromarray(np.clip(np.rint(arr * (255.0 / hi)), 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def decode_image(path: str | os.PathLike, size: int, *, draft: bool = False) -> torch.Tensor:
    """Decode ``path`` to uint8 ``[3, size, size]``: RGB, shorter side resized to ``size`` (bicubic, as CLIP), then
    centre-cropped. Raises :class:`BadImageError` for missing, unreadable, corrupt, truncated or tiny images.
    ``draft``: let the JPEG decoder downscale by a power of two first (much faster for large photos; slightly
    different pixels)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF / palette warnings: noise over a million images
            with Image.open(path) as img:
                if min(img.size) < MIN_SIDE:
                    raise BadImageError(f"too small ({img.size[0]}x{img.size[1]} < {MIN_SIDE} px)")
                if draft and img.format == "JPEG":
                    img.draft("RGB", (size, size))
                img.load()
                rgb = _to_rgb(img)
    except BadImageError:
        raise
    except FileNotFoundError:
        raise BadImageError("file not found") from None
    except UnidentifiedImageError:
        raise BadImageError("not an image (unidentified format)") from None
    except Image.DecompressionBombError as exc:
        raise BadImageError(f"decompression bomb ({exc})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # truncated / corrupt data
        raise BadImageError(f"corrupt ({type(exc).__name__}: {str(exc)[:120]})") from None
    return resize_center_crop(rgb, size)


def resize_crop_geometry(w: int, h: int, size: int) -> tuple[int, int, int, int]:
    """``(new_w, new_h, left, top)`` of the shorter-side resize to ``size`` (torchvision ``Resize(size)``: the longer
    side truncated) and the centre crop; every decoder (PIL here, DALI in :mod:`fastcbm.data.loaders`) uses it, so
    they sample the same pixels."""
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    return nw, nh, int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))


def resize_center_crop(image, size: int) -> torch.Tensor:
    """PIL image (any mode) → uint8 ``[3, size, size]``: RGB, shorter side resized to ``size`` (bicubic, torchvision
    ``Resize(size)`` semantics: the longer side truncated), centre crop — CLIP's preprocessing without normalisation."""
    from PIL import Image

    rgb = _to_rgb(image)
    nw, nh, left, top = resize_crop_geometry(*rgb.size, size)
    if (nw, nh) != rgb.size:
        rgb = rgb.resize((nw, nh), Image.BICUBIC)
    rgb = rgb.crop((left, top, left + size, top + size))
    arr = np.asarray(rgb, dtype=np.uint8)  # [S, S, 3]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


class ImageFileDataset(torch.utils.data.Dataset):
    """Map-style dataset over ``files``: item i → ``(i, uint8 [3, S, S] or None, reason or None)``.

    Never raises on a bad image (a long run must not stop half-way): the caller counts and records the reason.
    """

    def __init__(self, files: Sequence[str], size: int, *, draft: bool = False) -> None:
        if size < MIN_SIDE:
            raise InvalidArgument(f"size must be >= {MIN_SIDE}, got {size}")
        self.files, self.size, self.draft = list(files), int(size), draft

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            return i, decode_image(self.files[i], self.size, draft=self.draft), None
        except BadImageError as exc:
            return i, None, exc.reason
        except Exception as exc:  # anything else PIL may throw on hostile input
            return i, None, f"decode failed ({type(exc).__name__}: {str(exc)[:120]})"
