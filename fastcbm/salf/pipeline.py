"""Fit a SALF-CBM end to end from images (or cached feature maps), labels and cached prompt embeddings.

    uint8 images ─► frozen backbone ─► maps resized to the grid F [N, C, L]   (or: the cache's stored features)
    cache        ─► prompt embeddings E [N, L, D];  concepts ─► CLIP text T [M, D]
    F, E, T ─► concept bottleneck (fused cubic-cosine) ─► pooled, standardised concepts ─► sparse head (GLM-SAGA)

:func:`fit_salf` takes in-memory tensors; :func:`fit_salf_on` takes :mod:`fastcbm.salf.data` splits, so a cache
written by ``fastcbm precompute --features`` trains at ImageNet scale without holding the features in memory.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from fastcbm.models.features import extract_feature_maps, normalize_for_backbone
from fastcbm.salf.bottleneck import BottleneckConfig, BottleneckResult, train_bottleneck_on
from fastcbm.salf.model import SALFCBM, SALFConfig
from fastcbm.errors import InvalidArgument

log = logging.getLogger("fastcbm.salf")


@dataclass
class SALFFitConfig:
    """Training settings for :func:`fit_salf` (model structure lives in :class:`SALFConfig`)."""

    bottleneck: BottleneckConfig = field(default_factory=BottleneckConfig)
    head: str = "sparse"  # "sparse" (GLM-SAGA elastic-net path) | "dense" (L2-regularised, all weights)
    head_alpha: float = 0.99  # elastic-net mixing: 1 = lasso
    head_criterion: str = "val_acc"
    max_nnz_per_class: float | None = None
    # the sparse path stops once the mean non-zeros per class pass this (label-free CBM's sparsity target); None: the
    # whole path. Classes rarely need more than a few dozen concepts, and the denser end of the path costs the most.
    stop_nnz_per_class: float | None = 30.0
    head_options: dict = field(default_factory=dict)  # forwarded to fit_elastic_net_path / fit_dense_head
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
def pooled_concepts_on(weight: torch.Tensor, data, grid: tuple[int, int], pooling: str, temperature: float,
                       chunk: int = 4096, progress: bool = True) -> torch.Tensor:
    """Raw pooled concept activations ``[N, M]`` (on ``weight``'s device) of a :mod:`fastcbm.salf.data` split, read
    ``chunk`` rows at a time."""
    from fastcbm.heads import pool_concept_maps

    parts = []
    bar = tqdm(total=len(data), desc="pooled concepts", disable=not progress, leave=False, unit="img")
    n = len(data)
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(start + chunk, n))
        f = data.features(rows).to(weight.device, torch.float32)
        maps = torch.einsum("mc,ncl->nml", weight, f)
        parts.append(pool_concept_maps(maps.reshape(*maps.shape[:2], *grid), pooling, temperature))
        bar.update(len(rows))
    bar.close()
    return torch.cat(parts) if parts else weight.new_zeros(0, weight.shape[0])


def _check_split(name: str, images: torch.Tensor, labels: torch.Tensor, prompt_emb: torch.Tensor, cells: int) -> None:
    n = images.shape[0]
    if labels.shape != (n,):
        raise InvalidArgument(f"{name} labels must be [{n}], got shape {tuple(labels.shape)}")
    if prompt_emb.dim() != 3 or prompt_emb.shape[0] != n or prompt_emb.shape[1] != cells:
        raise InvalidArgument(f"{name} prompt embeddings must be [{n}, {cells}, D], got shape {tuple(prompt_emb.shape)}")


def _fit_head(fit: SALFFitConfig, p_train, y_train, p_val, y_val, num_classes: int, progress: bool):
    from fastcbm.heads import LinearHead, Standardizer, fit_dense_head, fit_sparse_head

    if fit.head == "sparse":
        head, _path = fit_sparse_head(
            p_train, y_train, num_classes, val=(p_val, y_val), alpha=fit.head_alpha,
            criterion=fit.head_criterion, max_nnz_per_class=fit.max_nnz_per_class,
            **{"progress": progress, "stop_nnz_per_class": fit.stop_nnz_per_class, **fit.head_options},
        )
        return head
    std = Standardizer.fit(p_train)
    entry = fit_dense_head(std.transform(p_train), y_train, num_classes, val=(std.transform(p_val), y_val),
                           **{"progress": progress, **fit.head_options})
    return LinearHead.from_entry(entry, std)


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
    """Fit a SALF-CBM on in-memory images.

    ``train`` / ``val``: ``(images uint8 [N, 3, S, S], labels long [N], prompt_emb [N, L, D])`` with L = Gy·Gx of
    ``config.grid``; ``text_emb [M, D]`` unit embeddings of ``config.concepts`` (in that order). The backbone's maps
    are computed once and held in memory; see :func:`fit_salf_on` for splits streamed from a cache.
    """
    from fastcbm.salf.data import TensorData

    fit = fit or SALFFitConfig()
    device = torch.device(device)
    cells = config.grid[0] * config.grid[1]
    _check_split("train", *train, cells)
    _check_split("val", *val, cells)
    layer = config.feature_layer or backbone.feature_layers[-1]
    t0 = time.perf_counter()
    f_train = backbone_grid_features(backbone, train[0], config.grid, layer, fit.feature_batch_size, device, progress)
    f_val = backbone_grid_features(backbone, val[0], config.grid, layer, fit.feature_batch_size, device, progress)
    seconds = time.perf_counter() - t0
    config = SALFConfig(**{**config.to_json(), "grid": config.grid, "feature_layer": layer})
    model, report = fit_salf_on(backbone=backbone, config=config, train=TensorData(f_train, train[2], train[1], "train"),
                                val=TensorData(f_val, val[2], val[1], "val"), text_emb=text_emb, fit=fit,
                                device=device, progress=progress)
    report.seconds = {"features": seconds, **report.seconds}
    return model, report


def fit_salf_on(
    *,
    backbone,
    config: SALFConfig,
    train,
    val,
    text_emb: torch.Tensor,
    fit: SALFFitConfig | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    process_group=None,
) -> tuple[SALFCBM, FitReport]:
    """Fit a SALF-CBM on :mod:`fastcbm.salf.data` splits (grid features, prompt embeddings and labels per row).

    ``text_emb [M, D]``: unit embeddings of ``config.concepts`` (in that order); ``backbone`` must be the network
    whose ``config.feature_layer`` produced the features. Returns the model (only the interpretable concepts kept)
    and a report. ``process_group``: train the bottleneck data-parallel (see
    :func:`~fastcbm.salf.bottleneck.train_bottleneck_on`); the head (a small ``[N, M]`` problem) is fitted on every
    process alike.
    """
    fit = fit or SALFFitConfig()
    if fit.head not in ("sparse", "dense"):
        raise InvalidArgument(f"fit.head must be 'sparse' or 'dense', got {fit.head!r}")
    device = torch.device(device)
    cells = config.grid[0] * config.grid[1]
    for name, data in (("train", train), ("val", val)):
        if data.cells != cells:
            raise InvalidArgument(f"{name} rows have {data.cells} grid cells, config.grid {config.grid} has {cells}")
        if bool((data.labels < 0).any()):
            raise InvalidArgument(f"{name}: {int((data.labels < 0).sum())} rows have no label")
    if text_emb.shape[0] != len(config.concepts):
        raise InvalidArgument(f"text_emb has {text_emb.shape[0]} rows for {len(config.concepts)} concepts")
    top_label = int(max(train.labels.max(), val.labels.max()))
    num_classes = len(config.class_names) or top_label + 1
    if top_label >= num_classes:
        raise InvalidArgument(f"labels go up to {top_label} but there are {num_classes} class names")
    layer = config.feature_layer or backbone.feature_layers[-1]
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    result = train_bottleneck_on(train, val, text_emb, fit.bottleneck, device=device, progress=progress,
                                 process_group=process_group)
    seconds["bottleneck"] = time.perf_counter() - t0
    if result.kept.numel() == 0:
        raise InvalidArgument(
                 "no concept passed the interpretability cut-off "
                 f"({fit.bottleneck.interpretability_cutoff}); best validation similarity was "
                 f"{float(result.val_similarity.max()):.3f} — lower the cut-off or check the concept list"
             )
    kept_names = [config.concepts[i] for i in result.kept.tolist()]
    dropped = [c for i, c in enumerate(config.concepts) if i not in set(result.kept.tolist())]

    t0 = time.perf_counter()
    weight = result.weight.to(device)
    chunk = fit.feature_batch_size * 16
    p_train = pooled_concepts_on(weight, train, config.grid, config.pooling, config.softmax_temperature, chunk,
                                 progress)
    p_val = pooled_concepts_on(weight, val, config.grid, config.pooling, config.softmax_temperature, chunk, progress)
    y_train, y_val = train.labels.to(device), val.labels.to(device)
    head = _fit_head(fit, p_train, y_train, p_val, y_val, num_classes, progress)
    seconds["head"] = time.perf_counter() - t0

    model_config = SALFConfig(**{**config.to_json(), "grid": config.grid, "feature_layer": layer,
                                 "concepts": kept_names})
    model = SALFCBM(backbone.model, backbone.kind, model_config, result.weight, head.cpu(),
                    int(getattr(backbone, "num_prefix_tokens", 1))).to(device)
    with torch.no_grad():
        acc_train = float((head(p_train).argmax(1) == y_train).float().mean())
        acc_val = float((head(p_val).argmax(1) == y_val).float().mean())
    report = FitReport(result, kept_names, dropped, acc_train, acc_val,
                       float(head.nnz_per_class().float().mean()), seconds)
    log.info("SALF-CBM: %d concepts, train acc %.3f, val acc %.3f, %.1f non-zero weights per class",
             len(kept_names), acc_train, acc_val, report.nnz_per_class)
    return model, report
