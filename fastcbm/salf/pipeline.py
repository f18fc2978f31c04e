"""Fit a SALF-CBM end to end from images, labels and cached prompt embeddings.

    uint8 images ─► frozen backbone ─► maps resized to the grid F [N, C, L]
    cache        ─► prompt embeddings E [N, L, D];  concepts ─► CLIP text T [M, D]
    F, E, T ─► concept bottleneck (fused cubic-cosine) ─► pooled, standardised concepts ─► sparse head (GLM-SAGA)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastcbm.features import extract_feature_maps
from fastcbm.salf.bottleneck import BottleneckConfig, BottleneckResult, train_bottleneck
from fastcbm.salf.model import SALFCBM, SALFConfig

log = logging.getLogger("fastcbm.salf")


@dataclass
class SALFFitConfig:
    """Training settings for :func:`fit_salf` (model structure lives in :class:`SALFConfig`)."""

    bottleneck: BottleneckConfig = field(default_factory=BottleneckConfig)
    head_alpha: float = 0.99  # elastic-net mixing: 1 = lasso
    head_criterion: str = "val_acc"
    max_nnz_per_class: float | None = None
    head_options: dict = field(default_factory=dict)  # forwarded to fastcbm.heads.fit_elastic_net_path
    feature_batch_size: int = 256


@dataclass
class FitReport:
    bottleneck: BottleneckResult
    concepts_kept: list[str]
    concepts_dropped: list[str]
    train_accuracy: float
    val_accuracy: float
    nnz_per_class: float
    seconds: dict[str, float]


def normalize_for_backbone(images: torch.Tensor, backbone, device: torch.device) -> torch.Tensor:
    """uint8 ``[N, 3, S, S]`` → float ``[N, 3, S', S']`` resized to the backbone's input size and normalised."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 [N, 3, S, S], got {images.dtype} {tuple(images.shape)}")
    x = images.to(device).float().div_(255)
    size = int(getattr(backbone, "input_size", images.shape[-1]) or images.shape[-1])
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(backbone.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def backbone_grid_features(backbone, images: torch.Tensor, grid: tuple[int, int], layer: str | None = None,
                           batch_size: int = 256, device: torch.device | str = "cpu",
                           progress: bool = True) -> torch.Tensor:
    """Backbone feature maps of ``images`` (uint8 ``[N, 3, S, S]``) resized to ``grid`` → ``[N, C, Gy·Gx]`` float32 (CPU)."""
    device = torch.device(device)
    layer = layer or backbone.feature_layers[-1]
    model = backbone.model.to(device).eval()
    prefix = int(getattr(backbone, "num_prefix_tokens", 1))
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc="backbone features", disable=not progress, leave=False):
        x = normalize_for_backbone(images[start : start + batch_size], backbone, device)
        fmap = extract_feature_maps(model, x, layer, kind=backbone.kind, grid=grid, num_prefix_tokens=prefix)
        out.append(fmap.flatten(2).cpu())
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def pooled_concepts(weight: torch.Tensor, features: torch.Tensor, grid: tuple[int, int], pooling: str,
                    temperature: float, chunk: int = 4096) -> torch.Tensor:
    """Raw pooled concept activations ``[N, M]`` from grid features ``[N, C, L]`` and bottleneck ``W [M, C]``."""
    from fastcbm.heads import pool_concept_maps

    parts = []
    for start in range(0, features.shape[0], chunk):
        maps = torch.einsum("mc,ncl->nml", weight, features[start : start + chunk].float())
        parts.append(pool_concept_maps(maps.reshape(*maps.shape[:2], *grid), pooling, temperature))
    return torch.cat(parts)


def _check_split(name: str, images: torch.Tensor, labels: torch.Tensor, prompt_emb: torch.Tensor, cells: int) -> None:
    n = images.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"{name} labels must be [{n}], got shape {tuple(labels.shape)}")
    if prompt_emb.dim() != 3 or prompt_emb.shape[0] != n or prompt_emb.shape[1] != cells:
        raise ValueError(f"{name} prompt embeddings must be [{n}, {cells}, D], got shape {tuple(prompt_emb.shape)}")


def fit_salf(
    *,
    backbone,
    config: SALFConfig,
    train: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    text_emb: torch.Tensor,
    fit: SALFFitConfig | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[SALFCBM, FitReport]:
    """Fit a SALF-CBM.

    ``train`` / ``val``: ``(images uint8 [N, 3, S, S], labels long [N], prompt_emb [N, L, D])`` with L = Gy·Gx of
    ``config.grid``; ``text_emb [M, D]`` unit embeddings of ``config.concepts`` (in that order). Returns the model (with
    only the interpretable concepts kept) and a report.
    """
    from fastcbm.heads import fit_sparse_head

    fit = fit or SALFFitConfig()
    device = torch.device(device)
    cells = config.grid[0] * config.grid[1]
    _check_split("train", *train, cells)
    _check_split("val", *val, cells)
    if text_emb.shape[0] != len(config.concepts):
        raise ValueError(f"text_emb has {text_emb.shape[0]} rows for {len(config.concepts)} concepts")
    num_classes = len(config.class_names) or int(max(train[1].max(), val[1].max())) + 1
    layer = config.feature_layer or backbone.feature_layers[-1]
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    f_train = backbone_grid_features(backbone, train[0], config.grid, layer, fit.feature_batch_size, device, progress)
    f_val = backbone_grid_features(backbone, val[0], config.grid, layer, fit.feature_batch_size, device, progress)
    seconds["features"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    result = train_bottleneck(f_train, train[2], text_emb, f_val, val[2], fit.bottleneck, device=device,
                              progress=progress)
    seconds["bottleneck"] = time.perf_counter() - t0
    if result.kept.numel() == 0:
        raise ValueError(
            "no concept passed the interpretability cut-off "
            f"({fit.bottleneck.interpretability_cutoff}); best validation similarity was "
            f"{float(result.val_similarity.max()):.3f} — lower the cut-off or check the concept list"
        )
    kept_names = [config.concepts[i] for i in result.kept.tolist()]
    dropped = [c for i, c in enumerate(config.concepts) if i not in set(result.kept.tolist())]

    t0 = time.perf_counter()
    weight = result.weight.to(device)
    p_train = pooled_concepts(weight, f_train.to(device), config.grid, config.pooling, config.softmax_temperature)
    p_val = pooled_concepts(weight, f_val.to(device), config.grid, config.pooling, config.softmax_temperature)
    head, _path = fit_sparse_head(
        p_train, train[1].to(device), num_classes, val=(p_val, val[1].to(device)), alpha=fit.head_alpha,
        criterion=fit.head_criterion, max_nnz_per_class=fit.max_nnz_per_class,
        **{"progress": progress, **fit.head_options},
    )
    seconds["head"] = time.perf_counter() - t0

    model_config = SALFConfig(**{**config.to_json(), "grid": config.grid, "feature_layer": layer,
                                 "concepts": kept_names})
    model = SALFCBM(backbone.model, backbone.kind, model_config, result.weight, head.cpu(),
                    int(getattr(backbone, "num_prefix_tokens", 1))).to(device)
    with torch.no_grad():
        acc_train = float((head(p_train).argmax(1).cpu() == train[1]).float().mean())
        acc_val = float((head(p_val).argmax(1).cpu() == val[1]).float().mean())
    report = FitReport(result, kept_names, dropped, acc_train, acc_val,
                       float(head.nnz_per_class().float().mean()), seconds)
    log.info("SALF-CBM: %d concepts, train acc %.3f, val acc %.3f, %.1f non-zero weights per class",
             len(kept_names), acc_train, acc_val, report.nnz_per_class)
    return model, report
