"""Evaluate a trained SALF-CBM (``fastcbm evaluate --method salf``): accuracy, per-class accuracy, confusion matrix,
sparsity; with masks, zero-shot segmentation of the class heatmaps against Grad-CAM on the same backbone; and the
Chefer et al. ImageNet-segmentation protocol on ``gtsegs_ijcv.mat``.

Inputs: a precompute cache made with ``--features`` (no backbone pass: concepts come from the cached grid features),
or a folder of images (decoded exactly as precompute and ``fastcbm explain`` do).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fastcbm.salf.model import SALFCBM
from fastcbm.errors import InvalidArgument, InvalidFile, MissingFile
from fastcbm.models.inputs import normalize_uint8


def model_labels(files: Sequence[str], class_names: Sequence[str], labels: str | os.PathLike | None = None
                 ) -> torch.Tensor:
    """Labels ``[N]`` of ``files`` in the model's class order: the image's folder name (ImageFolder) or the class
    column of a ``path,class`` CSV, matched to ``class_names`` as written or humanised (``blue_circle`` ↔
    ``blue circle``, the display names ``fastcbm train`` saves)."""
    from fastcbm.data.labels import csv_labels, folder_labels
    from fastcbm.salf.train import humanize_class_name

    raw, raw_names = csv_labels(labels, files) if labels is not None else folder_labels(files)
    index = {c: i for i, c in enumerate(class_names)}
    index.update({humanize_class_name(c): i for i, c in enumerate(class_names)})
    mapping = []
    for name in raw_names:
        i = index.get(name, index.get(humanize_class_name(name)))
        if i is None:
            where = f"--labels {labels}" if labels is not None else "folder name"
            raise InvalidFile(f"labels: class {name!r} ({where}) is not one of the model's {len(class_names)} classes "
                              f"(e.g. {list(class_names)[:3]})")
        mapping.append(i)
    return torch.tensor(mapping, dtype=torch.long)[raw]


def classification_scores(pred: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]) -> dict:
    """Accuracy, per-class accuracy (None for a class without samples) and the confusion matrix
    (``confusion[true][predicted]`` counts) of predictions ``[N]`` against labels ``[N]``."""
    k = len(class_names)
    conf = torch.bincount(labels.long() * k + pred.long().cpu(), minlength=k * k).reshape(k, k)
    support = conf.sum(1)
    per_class = {name: (round(float(conf[i, i]) / int(support[i]), 4) if int(support[i]) else None)
                 for i, name in enumerate(class_names)}
    return {"images": int(labels.numel()),
            "accuracy": round(float((pred.cpu() == labels.cpu()).float().mean()), 4) if labels.numel() else None,
            "per_class_accuracy": per_class, "confusion": conf.tolist(), "classes": list(class_names)}


def sparsity(model: SALFCBM) -> dict:
    """Concepts and non-zero head weights (total, per class: mean, min, max)."""
    nnz = model.head.nnz_per_class()
    return {"concepts": len(model.config.concepts), "nonzero_weights": int(nnz.sum()),
            "nonzero_per_class": {"mean": round(float(nnz.float().mean()), 2), "min": int(nnz.min()),
                                  "max": int(nnz.max())},
            "concepts_used": int((model.head.weight != 0).any(0).sum())}


@torch.no_grad()
def evaluate_cache(model: SALFCBM, cache: str | os.PathLike, labels: str | os.PathLike | None = None,
                   batch_size: int = 4096, progress: bool = True) -> dict:
    """Accuracy on a cache written by ``fastcbm precompute --features`` with the model's backbone and grid."""
    from fastcbm.cache import CacheReader
    from fastcbm.salf.data import CacheData
    from fastcbm.salf.pipeline import pooled_concepts_on

    reader = CacheReader(cache)
    src = reader.settings.get("features_source") or {}
    cfg = model.config
    if not src:
        raise InvalidArgument(f"--cache {reader.root} has no backbone features; evaluate with --data IMAGES or precompute "
                              "with --features")
    if src.get("backbone") != cfg.backbone or (cfg.feature_layer and src.get("layer") != cfg.feature_layer):
        raise InvalidArgument(f"--cache {reader.root} holds features of {src.get('backbone')}/{src.get('layer')}, the model "
                              f"uses {cfg.backbone}/{cfg.feature_layer}")
    if tuple(reader.settings["prompts"]["grid"]) != tuple(cfg.grid):
        raise InvalidArgument(f"--cache {reader.root} has grid {reader.settings['prompts']['grid']}, the model {cfg.grid}")
    y = model_labels(reader.files, cfg.class_names, labels)
    data = CacheData(reader, y, name="eval")
    weight = model.weight
    pooled = pooled_concepts_on(weight, data, cfg.grid, cfg.pooling, cfg.softmax_temperature, batch_size, progress)
    pred = model.classify(model.standardize(pooled)).argmax(1)
    return {"source": str(reader.root), **classification_scores(pred, y, cfg.class_names), "sparsity": sparsity(model)}


def _input_spec(model: SALFCBM):
    """The backbone's ``(input_size, mean, std)`` (a random-init build of the named backbone: no download)."""
    from fastcbm.models import load_backbone

    b = load_backbone(model.config.backbone, pretrained=None)
    return int(b.input_size), b.mean, b.std


def load_images(paths: Sequence[str | os.PathLike] | str | os.PathLike, model: SALFCBM,
                device: str | torch.device = "cpu") -> torch.Tensor:
    """Image files → ``x [N, 3, S, S]`` normalised for the model's backbone (decoded as precompute does: RGB, shorter
    side to S, centre crop). A single path gives ``N = 1``. Raises ``ValueError`` naming an unreadable file."""
    from fastcbm.data.folder import BadImageError, decode_image

    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    size, mean, std = _input_spec(model)
    imgs = []
    for p in paths:
        if not Path(p).is_file():
            raise MissingFile(f"image {p} does not exist")
        try:
            imgs.append(decode_image(p, size))
        except BadImageError as exc:
            raise InvalidArgument(f"image {p}: {exc}") from None
    return normalize_uint8(torch.stack(imgs), mean, std, device=device)


def _read_mask(root: Path, rel: Path, size: int) -> torch.Tensor | None:
    """A foreground mask for image ``rel`` under ``root`` (same relative path or stem; .png/.npy; non-zero =
    foreground), resized and centre-cropped like the image (nearest neighbour)."""
    import numpy as np
    from PIL import Image

    from fastcbm.data.folder import resize_crop_geometry

    for cand in (root / rel.with_suffix(".png"), root / rel.with_suffix(".npy"), root / f"{rel.stem}.png",
                 root / f"{rel.stem}.npy"):
        if cand.is_file():
            arr = np.load(cand) if cand.suffix == ".npy" else np.asarray(Image.open(cand))
            if arr.ndim == 3:
                arr = arr.max(-1)
            img = Image.fromarray(((arr != 0) * 255).astype(np.uint8), mode="L")
            nw, nh, left, top = resize_crop_geometry(*img.size, size)
            img = img.resize((nw, nh), Image.NEAREST).crop((left, top, left + size, top + size))
            return torch.from_numpy(np.asarray(img) > 127)
    return None


def _segmentation_pair(model: SALFCBM, backbone, x: torch.Tensor, masks: torch.Tensor, salf_meter, cam_meter):
    from fastcbm.cam.gradcam import grad_cam
    from fastcbm.salf import explain as ex

    salf_meter.update(ex.class_heatmap(model, x).cpu(), masks)
    layer = model.config.feature_layer or backbone.feature_layers[-1]
    cam = grad_cam(backbone.model, x, layer, kind=backbone.kind,
                   num_prefix_tokens=int(getattr(backbone, "num_prefix_tokens", 1)), size=tuple(masks.shape[-2:]))
    cam_meter.update(cam.detach().cpu(), masks)


def _meters():
    from fastcbm.metrics.segmentation import SegmentationScores

    return SegmentationScores(), SegmentationScores()


@torch.no_grad()
def evaluate_images(model: SALFCBM, backbone, data: str | os.PathLike, labels: str | os.PathLike | None = None,
                    masks: str | os.PathLike | None = None, batch_size: int = 64, device: str | torch.device = "cpu",
                    progress: bool = True) -> dict:
    """Accuracy on a folder of images (ImageFolder, or ``labels`` CSV); with ``masks`` (a folder of foreground masks
    named like the images) also zero-shot segmentation of the class heatmap vs Grad-CAM (Chefer protocol)."""
    from fastcbm.data.folder import BadImageError, decode_image, list_images

    files = list_images(data)
    y = model_labels(files, model.config.class_names, labels)
    size = int(backbone.input_size)
    root = Path(data)
    salf_meter, cam_meter = _meters() if masks is not None else (None, None)
    preds, skipped, missing_masks = [], [], 0
    keep = []
    for start in tqdm(range(0, len(files), batch_size), desc="evaluate", disable=not progress, leave=False):
        imgs, ms, idx = [], [], []
        for i in range(start, min(start + batch_size, len(files))):
            try:
                imgs.append(decode_image(files[i], size))
            except BadImageError as exc:
                skipped.append(f"{files[i]}: {exc}")
                continue
            idx.append(i)
            if masks is not None:
                m = _read_mask(Path(masks), Path(files[i]).relative_to(root) if root.is_dir() else Path(files[i]),
                               size)
                missing_masks += m is None
                ms.append(m)
        if not imgs:
            continue
        x = normalize_uint8(torch.stack(imgs), backbone.mean, backbone.std, device=device)
        preds.append(model(x).argmax(1).cpu())
        keep += idx
        have = [j for j, m in enumerate(ms) if m is not None]
        if have:
            _segmentation_pair(model, backbone, x[have], torch.stack([ms[j] for j in have]), salf_meter, cam_meter)
    if not keep:
        raise InvalidArgument(f"--data {data}: no readable image")
    pred = torch.cat(preds)
    out = {"source": str(data), **classification_scores(pred, y[keep], model.config.class_names),
           "sparsity": sparsity(model), "skipped_images": skipped}
    if masks is not None:
        if salf_meter._images == 0:
            raise InvalidArgument(f"--masks {masks}: no mask matches an image (expected <image stem>.png or .npy)")
        out["segmentation"] = {"images": salf_meter._images, "images_without_mask": int(missing_masks),
                               "salf": _rounded(salf_meter.compute()), "gradcam": _rounded(cam_meter.compute())}
    return out


def _rounded(d: dict) -> dict:
    return {k: round(float(v), 4) for k, v in d.items()}


def evaluate_segmentation(model: SALFCBM, backbone, path: str | os.PathLike, batch_size: int = 32,
                          limit: int | None = None, device: str | torch.device = "cpu", progress: bool = True) -> dict:
    """The Chefer et al. protocol on ImageNet-segmentation (``gtsegs_ijcv.mat``): images resized to the backbone's
    input, the SALF-CBM class heatmap of the predicted class vs Grad-CAM, pixel accuracy / mIoU / mAP over the set."""
    from fastcbm.data.imagenet_seg import ImageNetSegmentation

    salf_meter, cam_meter = _meters()
    with ImageNetSegmentation(path) as ds:
        n = len(ds) if limit is None else min(limit, len(ds))
        bar = tqdm(total=n, desc="segmentation", disable=not progress, leave=False, unit="img")
        for imgs, masks in ds.batches(int(backbone.input_size), batch_size, limit):
            x = normalize_uint8(imgs, backbone.mean, backbone.std, device=device)
            with torch.no_grad():
                _segmentation_pair(model, backbone, x, masks, salf_meter, cam_meter)
            bar.update(len(imgs))
        bar.close()
    return {"source": str(path), "images": n, "salf": _rounded(salf_meter.compute()),
            "gradcam": _rounded(cam_meter.compute())}


__all__ = ["classification_scores", "evaluate_cache", "evaluate_images", "evaluate_segmentation", "load_images",
           "model_labels", "sparsity"]
