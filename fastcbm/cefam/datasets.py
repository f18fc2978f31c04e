"""Concept-localisation data for CE-FAM evaluation: Broden, ImageNet-S and the synthetic testbed.

Every reader is a re-iterable object (iterate it twice: the CLIP-Dissect baseline needs a probe pass first) yielding
:class:`Record` ``(image, concept, concept_type, mask, key)``: ``image`` uint8 ``[3, H, W]`` at the file's own size,
``mask`` bool ``[H_m, W_m]`` with the image's aspect ratio (Broden ships 112-px masks for 224-px images; maps are
resized to the mask, never the mask to the map), ``key`` identifies the image (records of one image are consecutive
and share the same image tensor).

- **Broden** (``root/label.csv``, ``root/images/{ade20k,dtd,opensurfaces,pascal}/*``), as the CE-FAM authors read it:
  every mask PNG is one image record; its label number per pixel is G·256 + R (decoded as uint16: the authors' uint8
  arithmetic overflows under NumPy 2); each non-zero label present is one (concept, mask) pair; the concept's name and
  type come from label.csv (type = the *first* category of ``category``, e.g. ``material(36);object(3)`` →
  material; the ``-c`` / ``-s`` suffixes of colour and scene names dropped, ``_`` → space); the image is the mask's
  file name up to the mask suffix + ``.jpg`` (``ADE_train_00000001_object.png`` → ``ADE_train_00000001.jpg``).
- **ImageNet-S** (``root/validation/<wnid>/<name>.JPEG``, ``root/validation-segmentation/<wnid>/<name>.png``):
  one pair per image, the image's class (its wnid, or the name given in ``class_names``), type "object". The mask id
  1000 marks "ignore" and is never the target: the target is the largest id present other than 0 and 1000 (images
  with none are skipped). ``authors_target=True`` reproduces the authors' code, which takes the largest id present —
  the ignore region whenever an image has one.
- **testbed** (:mod:`fastcbm.data.synthetic`): fresh seeds (≥ ``TRAINING_SEED_LIMIT``), the generator's own
  per-concept masks, concept types from :func:`~fastcbm.data.synthetic.vocabulary`.
"""

from __future__ import annotations

import csv
import json
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from fastcbm.errors import InvalidArgument, InvalidFile, MissingFile

BRODEN_SOURCES = ("ade20k", "dtd", "opensurfaces", "pascal")
IMAGENET_S_IGNORE = 1000
CONCEPT_TYPES = ("object", "part", "color", "material")
# CE-FAM authors' prompt per Broden concept type (text embeddings of the concept set)
BRODEN_TEMPLATES = {"color": "a photo of a {} object", "material": "a photo of an object made of {}",
                    "object": "a photo of a {}", "part": "a photo of a {}", "scene": "a photo of an object on {}",
                    "texture": "a photo of a {} object"}
# the testbed CLIP's caption forms (fastcbm.testbed.train_clip / evaluate): backgrounds are named as they are
TESTBED_TEMPLATES = {"object": "a photo of a {}", "part": "a photo of something with a {}",
                     "color": "a photo of a {} object", "material": "a photo of a {} object"}
IMAGENET_TEMPLATE = "a photo of a {}"


class Record(NamedTuple):
    """One (image, concept) pair. ``image`` uint8 ``[3, H, W]``; ``mask`` bool ``[H_m, W_m]`` (same aspect ratio)."""
    image: torch.Tensor
    concept: str
    concept_type: str
    mask: torch.Tensor
    key: str


# ----------------------------------------------------------------------------------------------------------- helpers
def read_rgb(path: str | os.PathLike) -> torch.Tensor:
    """An image file → uint8 ``[3, H, W]`` at its own size (no resize, no crop: masks must stay aligned)."""
    from PIL import Image

    from fastcbm.data.folder import _to_rgb

    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"image {path} not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                img.load()
                arr = np.asarray(_to_rgb(img), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidFile(f"image {path}: cannot decode ({type(exc).__name__}: {str(exc)[:100]})") from None
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def decode_label_png(path: str | os.PathLike) -> np.ndarray:
    """A Broden / ImageNet-S label PNG → uint16 ``[H, W]`` label ids, G·256 + R computed in uint16."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"), dtype=np.uint16)
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidFile(f"mask {path}: cannot decode ({type(exc).__name__}: {str(exc)[:100]})") from None
    return rgb[:, :, 1] * np.uint16(256) + rgb[:, :, 0]


def check_mask_size(image: torch.Tensor, mask: torch.Tensor | np.ndarray, where: str) -> None:
    """A mask must have the image's size or a scaled copy of it (same aspect ratio, e.g. Broden's half-size masks)."""
    H, W = int(image.shape[-2]), int(image.shape[-1])
    h, w = int(mask.shape[-2]), int(mask.shape[-1])
    if h * W != w * H or h < 1:
        raise InvalidFile(f"{where}: mask is {h}x{w} but its image is {H}x{W}; expected the image's size or the same "
                          "aspect ratio")


def concept_texts(names: Sequence[str], types: Sequence[str], templates: dict[str, str] | None) -> list[str]:
    """The text to embed for each concept: ``templates[type].format(name)`` (names as they are without templates)."""
    if templates is None:
        return list(names)
    return [templates.get(t, "{}").format(n) for n, t in zip(names, types)]


# ------------------------------------------------------------------------------------------------------------ Broden
def read_broden_labels(root: str | os.PathLike) -> dict[int, tuple[str, str]]:
    """label.csv → ``{number: (concept name, concept type)}`` (type = first category)."""
    path = Path(root) / "label.csv"
    if not path.is_file():
        raise InvalidFile(f"{root}: not a Broden layout (expected label.csv and images/{{{','.join(BRODEN_SOURCES)}}})")
    out: dict[int, tuple[str, str]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0][:3]] != ["number", "name", "category"]:
        raise InvalidFile(f"{path}: expected a header 'number,name,category,...', got {rows[0][:3] if rows else 'nothing'}")
    for i, row in enumerate(rows[1:], start=2):
        if len(row) < 3:
            raise InvalidFile(f"{path}:{i}: expected 'number,name,category,...', got {row}")
        try:
            number = int(row[0])
        except ValueError:
            raise InvalidFile(f"{path}:{i}: label number must be an integer, got {row[0]!r}") from None
        ctype = row[2].split(";")[0].split("(")[0].strip()
        name = row[1]
        if ctype in ("color", "scene"):  # "red-c", "street-s": the authors drop the two-character suffix
            name = re.sub(r"-[cs]$", "", name)
        out[number] = (name.replace("_", " "), ctype)
    return out


def _broden_image_for(mask_path: Path, source: str) -> Path:
    parts = mask_path.stem.split("_")
    keep = {"ade20k": 3, "dtd": 2, "pascal": 2, "opensurfaces": 1}[source]
    return mask_path.with_name("_".join(parts[:keep]) + ".jpg")


class BrodenDataset:
    """Broden in the CE-FAM authors' reading (module docstring). ``limit``: at most this many mask files.

    ``concepts`` / ``types``: every label of label.csv, in label-number order (the evaluation's concept set).
    """

    def __init__(self, root: str | os.PathLike, *, limit: int | None = None, sources: Sequence[str] = BRODEN_SOURCES):
        self.root = Path(root)
        self.labels = read_broden_labels(self.root)
        images = self.root / "images"
        found = [s for s in sources if (images / s).is_dir()]
        if not found:
            raise InvalidFile(f"{root}: not a Broden layout (expected label.csv and "
                              f"images/{{{','.join(BRODEN_SOURCES)}}}; none of those folders exists)")
        self.files = [(s, p) for s in found for p in sorted((images / s).glob("*.png"))]
        if limit is not None:
            self.files = self.files[:limit]
        if not self.files:
            raise InvalidArgument(f"{images}: no mask PNG files under {found}")
        numbers = sorted(self.labels)
        self.concepts = [self.labels[n][0] for n in numbers]
        self.types = [self.labels[n][1] for n in numbers]
        self.templates = BRODEN_TEMPLATES

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[Record]:
        for source, mask_path in self.files:
            image_path = _broden_image_for(mask_path, source)
            labels = decode_label_png(mask_path)
            image = read_rgb(image_path)
            check_mask_size(image, labels, str(mask_path))
            key = f"{source}/{mask_path.name}"
            for number in np.unique(labels).tolist():
                if number == 0:
                    continue
                if number not in self.labels:
                    raise InvalidFile(f"{mask_path}: label {number} is not in {self.root / 'label.csv'}")
                name, ctype = self.labels[number]
                yield Record(image, name, ctype, torch.from_numpy(labels == number), key)


# -------------------------------------------------------------------------------------------------------- ImageNet-S
def _load_class_names(path: str | os.PathLike | None) -> dict[str, str]:
    """``{wnid: name}`` from JSON (``{wnid: name}``) or text lines ``wnid name...``."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"class names file {path} not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise InvalidFile(f"{path}: expected a JSON object {{wnid: name}}")
        return {str(k): (v[0] if isinstance(v, list) else str(v)) for k, v in data.items()}
    out = {}
    for line in text.splitlines():
        if line.strip():
            wnid, _, name = line.strip().partition(" ")
            out[wnid] = name.strip() or wnid
    return out


class ImageNetSDataset:
    """ImageNet-S validation masks (module docstring). ``names``: optional list file of ``image mask`` lines
    (paths relative to ``validation/`` and ``validation-segmentation/``); default: every mask PNG, with the image of
    the same stem. ``class_names``: JSON ``{wnid: name}`` or ``wnid name`` lines."""

    def __init__(self, root: str | os.PathLike, *, names: str | os.PathLike | None = None,
                 class_names: str | os.PathLike | dict[str, str] | None = None, authors_target: bool = False,
                 limit: int | None = None):
        self.root = Path(root)
        img_dir, seg_dir = self.root / "validation", self.root / "validation-segmentation"
        if not img_dir.is_dir() or not seg_dir.is_dir():
            raise InvalidFile(f"{root}: not an ImageNet-S layout (expected validation/<wnid>/ and "
                              "validation-segmentation/<wnid>/)")
        self.authors_target = bool(authors_target)
        self.class_names = dict(class_names) if isinstance(class_names, dict) else _load_class_names(class_names)
        pairs: list[tuple[Path, Path]] = []
        if names is not None:
            for i, line in enumerate(Path(names).read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                parts = line.split()
                if len(parts) < 2:
                    raise InvalidArgument(f"{names}:{i}: expected 'image mask', got {line!r}")
                pairs.append((img_dir / parts[0], seg_dir / parts[1]))
        else:
            for m in sorted(seg_dir.glob("*/*.png")):
                cands = [p for p in sorted((img_dir / m.parent.name).glob(m.stem + ".*"))]
                if not cands:
                    raise InvalidArgument(f"{m}: no image {img_dir / m.parent.name / m.stem}.* for this mask")
                pairs.append((cands[0], m))
        if limit is not None:
            pairs = pairs[:limit]
        if not pairs:
            raise InvalidFile(f"{seg_dir}: no mask PNG files")
        self.pairs = pairs
        wnids = sorted({m.parent.name for _, m in pairs})
        self.concepts = [self.class_names.get(w, w) for w in wnids]
        self.types = ["object"] * len(self.concepts)
        self.templates = {"object": IMAGENET_TEMPLATE}

    def __len__(self) -> int:
        return len(self.pairs)

    def target_mask(self, labels: np.ndarray) -> np.ndarray | None:
        ids = np.unique(labels)
        if self.authors_target:  # the authors' `mask == np.unique(mask)[-1]`: 1000 (ignore) whenever present
            return labels == ids[-1]
        ids = ids[(ids != 0) & (ids != IMAGENET_S_IGNORE)]
        return None if ids.size == 0 else labels == ids[-1]

    def __iter__(self) -> Iterator[Record]:
        for image_path, mask_path in self.pairs:
            labels = decode_label_png(mask_path)
            mask = self.target_mask(labels)
            if mask is None:
                continue
            image = read_rgb(image_path)
            check_mask_size(image, labels, str(mask_path))
            wnid = mask_path.parent.name
            yield Record(image, self.class_names.get(wnid, wnid), "object", torch.from_numpy(mask),
                         f"{wnid}/{mask_path.stem}")


# ----------------------------------------------------------------------------------------------------------- testbed
class TestbedDataset:
    """``n`` fresh testbed scenes from ``seed`` (≥ ``TRAINING_SEED_LIMIT``: scenes no bundled model saw), every
    present concept with a non-empty mask one pair. Generated in chunks of ``chunk`` scenes."""

    __test__ = False  # not a pytest class

    def __init__(self, n: int = 200, seed: int | None = None, *, chunk: int = 64):
        from fastcbm.data import synthetic as S

        if n < 1:
            raise InvalidArgument(f"n must be >= 1, got {n}")
        self.n, self.chunk = int(n), int(chunk)
        self.seed = S.TRAINING_SEED_LIMIT + 4242 if seed is None else int(seed)
        if self.seed < S.TRAINING_SEED_LIMIT:
            raise InvalidArgument(f"testbed evaluation seeds must be >= {S.TRAINING_SEED_LIMIT} (scenes the bundled models "
                                  f"never saw), got {self.seed}")
        vocab = S.vocabulary()
        self.concepts = [c for c, _ in vocab]
        self.types = [t for _, t in vocab]
        self.templates = TESTBED_TEMPLATES

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[Record]:
        from fastcbm.data import synthetic as S

        for c, start in enumerate(range(0, self.n, self.chunk)):
            batch = S.generate(min(self.chunk, self.n - start), self.seed + c)
            for i in range(len(batch)):
                masks = batch.scene_concept_masks(i)
                image = batch.images[i]
                for k in torch.nonzero(batch.concepts_present[i]).flatten().tolist():
                    if bool(masks[k].any()):
                        yield Record(image, self.concepts[k], self.types[k], masks[k], f"scene{start + i}")


def open_dataset(kind: str, path: str | os.PathLike | None = None, **options):
    """``kind`` = "broden" | "imagenet-s" | "testbed" → the reader (``path``: the dataset root; for the testbed, the
    number of scenes may be given as ``n``)."""
    if kind == "broden":
        return BrodenDataset(_existing(path, kind), **options)
    if kind == "imagenet-s":
        return ImageNetSDataset(_existing(path, kind), **options)
    if kind == "testbed":
        return TestbedDataset(**options)
    raise InvalidArgument(f"--data must be one of broden, imagenet-s, testbed; got {kind!r}")


def _existing(path, kind: str) -> Path:
    if path is None:
        raise InvalidArgument(f"--data {kind} needs the dataset's root folder")
    p = Path(path)
    if not p.is_dir():
        raise MissingFile(f"{kind} root {p} not found (expected a folder)")
    return p


__all__ = [
    "BRODEN_TEMPLATES",
    "CONCEPT_TYPES",
    "IMAGENET_S_IGNORE",
    "TESTBED_TEMPLATES",
    "BrodenDataset",
    "ImageNetSDataset",
    "Record",
    "TestbedDataset",
    "check_mask_size",
    "concept_texts",
    "decode_label_png",
    "open_dataset",
    "read_broden_labels",
    "read_rgb",
]
