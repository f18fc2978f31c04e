"""``fastcbm deal evaluate``: the DEAL metrics of a CLIP on a data set (:mod:`fastcbm.deal.metrics` for the formulas).

Data sources (all give normalised images in the model's input space, labels and, where available, concept masks):

- ``"testbed"``: fresh synthetic scenes (seeds the testbed models never saw) with their ground-truth concept masks.
  A descriptor's mask is the intersection of the masks of the testbed concepts it names ("blue" → blue pixels,
  "blue circle" → pixels both blue and circle-shaped); descriptors that name none get no mask.
- an ImageFolder ``DIR/<class>/<image>``: no masks (no part mIoU).
- a mask folder (CUB-Part / PartImageNet style), recognised by ``DIR/images`` next to ``DIR/masks``::

      DIR/images/<class>/<name>.jpg        (or DIR/images/<name>.jpg with DIR/labels.csv holding "name,class" rows)
      DIR/masks/<name>/<concept>.png       one binary mask per concept present (non-zero = concept)

  ``<name>`` is the image file's stem (unique over the set); ``<concept>`` is the concept's text with spaces or
  underscores. A mask belongs to a class descriptor when the two names match (case and ``_``/space insensitive).
  Masks get the images' resize + centre crop (nearest neighbour).

Per image the explained texts are its true class (row 0) and the class's first K descriptors (rows 1..K), as in the
authors' notebooks; localizability scores each concept map against the descriptor's own text embedding.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fastcbm.deal import metrics as M
from fastcbm.errors import InvalidArgument, InvalidFile, MissingFile

log = logging.getLogger("fastcbm.deal")


@dataclass
class EvalSet:
    """images: normalised float ``[N, 3, S, S]``; labels: long ``[N]``; class_names: label → name; masks: per image a
    dict concept name → bool ``[S, S]`` (None: no masks); names: image identifiers."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    masks: list[dict[str, torch.Tensor]] | None = None
    names: list[str] | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _key(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


# ---- data sources ----------------------------------------------------------------------------------------------
def testbed_set(n: int = 200, seed: int | None = None) -> EvalSet:
    """Fresh testbed scenes (default seed: the testbed's evaluation seed + 11) with per-concept masks."""
    from fastcbm.data import synthetic as S
    from fastcbm.models import testbed as T
    from fastcbm.testbed.evaluate import EVAL_SEED

    batch = S.generate(n, seed=EVAL_SEED + 11 if seed is None else seed)
    names = S.concept_names()
    cm = batch.concept_masks  # [N, K_all, S, S]
    masks = [{name: cm[i, j] for j, name in enumerate(names)} for i in range(n)]
    return EvalSet(images=T.normalize(batch.images), labels=batch.labels.clone(), class_names=S.class_names(),
                   masks=masks, names=[f"scene{i}" for i in range(n)])


def testbed_descriptor_mask(masks: dict[str, torch.Tensor], descriptor: str) -> torch.Tensor | None:
    """Intersection of the masks of the testbed concepts named in ``descriptor`` (whole words; "grey background"
    counts as one concept), or None when it names none."""
    words = f" {_key(descriptor)} "
    hits = [m for name, m in masks.items() if f" {name} " in words]
    if not hits:
        return None
    out = hits[0].clone()
    for m in hits[1:]:
        out &= m
    return out


def image_size(model) -> int:
    """The CLIP's input side length (open_clip's preprocess config, else ``visual.image_size``)."""
    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    size = cfg.get("size") or getattr(model.visual, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _load_images(files: list[Path], preprocess) -> torch.Tensor:
    from PIL import Image

    out = []
    for f in files:
        try:
            with Image.open(f) as img:
                out.append(preprocess(img.convert("RGB")))
        except (OSError, ValueError) as exc:
            raise InvalidArgument(f"data: cannot read the image {f}: {exc}") from None
    return torch.stack(out)


def folder_set(root: str | os.PathLike, preprocess, size: int) -> EvalSet:
    """An ImageFolder (``root/<class>/<image>``) or a mask folder (``root/images`` + ``root/masks``; module doc)."""
    from fastcbm.data.folder import list_images
    from fastcbm.data.labels import csv_labels, folder_labels

    root = Path(root)
    if not root.is_dir():
        raise MissingFile(f"--data: {root} is not a directory (expected an ImageFolder, a mask folder or "
                          "'testbed')")
    mask_layout = (root / "images").is_dir() and (root / "masks").is_dir()
    img_root = root / "images" if mask_layout else root
    files = [Path(f) for f in list_images(img_root)]
    if all(p.parent == img_root for p in files):  # a flat folder: classes from labels.csv ("name,class" rows)
        labels_csv = root / "labels.csv"
        if not labels_csv.is_file():
            raise MissingFile(f"--data: the images sit directly in {img_root}; put them in class folders "
                              f"({img_root}/<class>/<image>) or list 'name,class' rows in {labels_csv}")
        labels, class_names = csv_labels(labels_csv, [str(p) for p in files])
    else:
        labels, class_names = folder_labels([str(p) for p in files])
    images = _load_images(files, preprocess)
    masks = _read_masks(root / "masks", files, size) if mask_layout else None
    return EvalSet(images=images, labels=labels, class_names=class_names, masks=masks, names=[p.stem for p in files])


def _read_masks(mask_root: Path, files: list[Path], size: int) -> list[dict[str, torch.Tensor]]:
    import numpy as np
    from PIL import Image

    from fastcbm.data.folder import resize_crop_geometry

    stems = [p.stem for p in files]
    if len(set(stems)) != len(stems):
        raise InvalidFile(f"--data: image names must be unique for {mask_root}/<name>/ (duplicate stems)")
    out = []
    for stem in stems:
        d = mask_root / stem
        masks: dict[str, torch.Tensor] = {}
        for f in sorted(d.glob("*.png")) if d.is_dir() else []:
            with Image.open(f) as m:
                m = m.convert("L")
                nw, nh, left, top = resize_crop_geometry(*m.size, size)
                m = m.resize((nw, nh), Image.NEAREST).crop((left, top, left + size, top + size))
                masks[_key(f.stem)] = torch.from_numpy(np.asarray(m) > 0)
        out.append(masks)
    if not any(out):
        raise InvalidFile(f"--data: no masks found under {mask_root} (expected {mask_root}/<image name>/<concept>.png)")
    return out


# ---- evaluation --------------------------------------------------------------------------------------------------
def evaluate(model, tokenizer, data: EvalSet, concepts: dict[str, list[str]], *, k: int = 5, batch_size: int = 32,
             steps: int = 5, curve_steps: int = 20, localizability_images: int | None = None,
             testbed_masks: bool = False, progress: bool = True, explain_layer: str = "layer4") -> dict:
    """All DEAL metrics of ``model`` on ``data``; returns a JSON-ready dict.

    concepts: ``{class: [descriptors]}`` (the first ``k`` of each class are explained; classes need at least k).
    localizability_images: insertion runs on the first this-many images only (it costs ~20 image-tower passes per
    concept); None = all. testbed_masks: match descriptors to masks with :func:`testbed_descriptor_mask`.
    explain_layer: the ResNet stage the maps are computed at (:func:`fastcbm.deal.explain.explanations`' ``layer``);
    score a DEAL model at the stage it was trained on, so the metrics see the maps its regularisers shaped.
    """
    from tqdm import tqdm

    from fastcbm.deal.explain import encode_text_rows, explanations

    desc = _descriptors(data, concepts, k)
    model.eval()
    device = next(model.parameters()).device
    n = len(data)
    n_loc = n if localizability_images is None else min(n, localizability_images)
    desc_emb, cls_emb = _accuracy_texts(model, tokenizer, data.class_names, desc)
    seps, ins, img_emb = [], [], []
    parts = M.PartIoU(sorted({d for c in data.class_names for d in desc[c]})) if data.masks is not None else None
    bar = tqdm(range(0, n, batch_size), desc="deal evaluate", unit="batch", disable=not progress)
    for start in bar:
        sl = slice(start, min(start + batch_size, n))
        x = data.images[sl].to(device)
        labels = data.labels[sl].tolist()
        rows = [[data.class_names[y], *desc[data.class_names[y]]] for y in labels]
        with torch.no_grad():
            text_emb = encode_text_rows(model, tokenizer, rows)
            img_emb.append(model.encode_image(x).float().cpu())
        maps = explanations(model, x, text_emb, create_graph=False, layer=explain_layer).detach()
        seps.append(M.separation_per_image(maps[:, 1:]).cpu())
        m_loc = max(0, min(sl.stop, n_loc) - start)
        if m_loc:
            ins.append(M.insertion_scores(model, x[:m_loc], text_emb[:m_loc, 1:], maps[:m_loc, 1:], steps=steps,
                                          curve_steps=curve_steps))
        if parts is not None:
            _update_parts(parts, maps[:, 1:].cpu(), data.masks[sl], rows, testbed_masks)
    sep = torch.cat(seps)
    out = {"images": n, "k": k,
           **M.accuracy_with_concepts(torch.cat(img_emb), data.labels, desc_emb, cls_emb),
           "disentanglability": M.disentanglability_from_separation(float(sep.mean())),
           "mean_separation": float(sep.mean()),
           "explain_layer": explain_layer, "map_size": list(maps.shape[-2:])}
    if ins:
        loc = M.summarize_insertion(ins)
        out.update(localizability=loc["localizability"], insertion_auc=loc["insertion_auc"],
                   localizability_pairs=loc["pairs"], localizability_skipped=loc["skipped"])
    if parts is not None:
        p = parts.compute()
        out.update({"part_miou": p["part_miou"], "part_pairs": p["pairs"], "part_iou_per_concept": p["per_concept"]})
    return out


def _descriptors(data: EvalSet, concepts: dict[str, list[str]], k: int) -> dict[str, list[str]]:
    for c in data.class_names:
        if len(concepts.get(c, [])) < k:
            raise InvalidArgument(f"concepts: the class {c!r} has {len(concepts.get(c, []))} descriptors, {k} needed")
    return {c: list(concepts[c][:k]) for c in data.class_names}


@torch.no_grad()
def _accuracy_texts(model, tokenizer, class_names: list[str], desc: dict[str, list[str]]):
    """Per class its descriptor-sentence embeddings ``[k, D]`` and the class prompts ``[C, D]`` (eq. 6, zero-shot)."""
    from fastcbm.deal.explain import encode_text_rows

    desc_emb = [encode_text_rows(model, tokenizer, [s])[0] for s in M.descriptor_sentences(class_names, desc)]
    cls_emb = encode_text_rows(model, tokenizer, [[M.CLASS_TEMPLATE.format(cls=c) for c in class_names]])[0]
    return desc_emb, cls_emb


@torch.no_grad()
def accuracy(model, tokenizer, data: EvalSet, concepts: dict[str, list[str]], *, k: int = 5,
             batch_size: int = 256) -> dict[str, float]:
    """Only :func:`evaluate`'s accuracies (with concepts, eq. 6, and zero-shot): one image-tower pass per image and no
    explanations, so it affords the thousands of images that resolve differences of a point or less."""
    if len(data) == 0:
        raise InvalidArgument("data: no images to score")
    desc = _descriptors(data, concepts, k)
    model.eval()
    device = next(model.parameters()).device
    desc_emb, cls_emb = _accuracy_texts(model, tokenizer, data.class_names, desc)
    img = torch.cat([model.encode_image(data.images[i:i + batch_size].to(device)).float().cpu()
                     for i in range(0, len(data), batch_size)])
    return M.accuracy_with_concepts(img, data.labels, desc_emb, cls_emb)


def _update_parts(parts: M.PartIoU, maps: torch.Tensor, masks: list[dict[str, torch.Tensor]],
                  rows: list[list[str]], testbed: bool) -> None:
    sel_maps, sel_masks, ids = [], [], []
    index = {name: i for i, name in enumerate(parts.names)}
    for b, (row, mk) in enumerate(zip(rows, masks)):
        for j, d in enumerate(row[1:]):
            m = testbed_descriptor_mask(mk, d) if testbed else mk.get(_key(d))
            if m is None or not bool(m.any()):
                continue
            sel_maps.append(maps[b, j])
            sel_masks.append(m)
            ids.append(index[d])
    if sel_maps:
        parts.update(torch.stack(sel_maps), torch.stack(sel_masks), torch.tensor(ids))
