"""Train a SALF-CBM from a precompute cache: the path for user data at any scale (``fastcbm train --method salf``).

    fastcbm precompute --data DIR --model CLIP --out CACHE --features BACKBONE   (prompt embeddings + feature maps)
    train_salf_from_cache(CACHE, concepts)  →  labels (folders or CSV) → train/val split → concept filter
        → text embeddings → bottleneck streamed from the cache → sparse head → SALFCBM saved with its report

Everything a model needs is read from the cache manifest (CLIP name, ring geometry, backbone and layer), so the saved
model explains new images with exactly the settings it was trained on.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fastcbm.salf.bottleneck import BottleneckConfig
from fastcbm.salf.pipeline import SALFFitConfig
from fastcbm.errors import InvalidArgument, OutputExists

log = logging.getLogger("fastcbm.salf")


@dataclass
class ConceptFilterConfig:
    """Label-free concept filtering (see :func:`fastcbm.concepts.filter_concepts`); ``None`` switches a stage off."""

    max_length: int | None = 30
    # "auto": label-free CBM's >= 0.85 to a class name (after exact text matches) and >= 0.9 between concepts (the
    # less general of the pair goes), unless the cache's CLIP declares its own calibration
    # (fastcbm.concepts.MODEL_CUTOFFS: the bundled testbed CLIP switches the class stage off)
    class_sim_cutoff: float | str | None = "auto"
    concept_sim_cutoff: float | str | None = "auto"
    # label-free CBM's presence cut-offs (fastcbm.concepts.PRESENCE_CUTOFFS: "default" 0.25, "cub" 0.26, "imagenet"
    # / "places365" 0.28) are calibrated on real CLIP similarities; off by default (None), a number or preset name
    presence_cutoff: float | str | None = None
    templates: tuple[str, ...] = ("{}",)
    # label-free CBM averages CLIP with this sentence model, (mpnet + 3·CLIP)/4, when it is installed with local
    # weights (None: CLIP alone). Not used with the bundled testbed CLIP, whose vocabulary is the testbed's own.
    sentence_model: str | None = "all-mpnet-base-v2"


@dataclass
class TrainConfig:
    """Settings of :func:`train_salf_from_cache` beyond the data; defaults follow the SALF-CBM / label-free papers."""

    val_fraction: float = 0.1  # used when no validation cache is given
    seed: int = 0
    pooling: str = "mean"
    softmax_temperature: float = 1.0
    humanize_class_names: bool = True  # folder "blue_circle" → class "blue circle" (filter and saved model)
    filter: ConceptFilterConfig = field(default_factory=ConceptFilterConfig)
    fit: SALFFitConfig = field(default_factory=SALFFitConfig)


def humanize_class_name(name: str) -> str:
    """Display name of a class folder: ``blue_circle`` → ``blue circle`` (underscores, hyphens and repeated spaces
    become single spaces). Used for the class-similarity filter and the saved model's class names, so a folder name
    is compared with concepts as words, the way a class name is written in label-free CBM's class lists."""
    return " ".join(name.replace("_", " ").replace("-", " ").split()) or name


def humanize_class_names(names: list[str]) -> list[str]:
    """:func:`humanize_class_name` for every class, keeping the folder name where two would collide."""
    out = [humanize_class_name(n) for n in names]
    if len(set(out)) < len(out):
        seen: dict[str, int] = {}
        for h in out:
            seen[h] = seen.get(h, 0) + 1
        out = [h if seen[h] == 1 else n for h, n in zip(out, names)]
    return out


def _labels_for(reader, labels, class_names):
    from fastcbm.data.labels import csv_labels, folder_labels

    files = reader.files
    if labels is None:
        return folder_labels(files, class_names)
    if isinstance(labels, (str, os.PathLike)):
        return csv_labels(labels, files, class_names)
    y = torch.as_tensor(labels).long()
    if y.shape != (len(reader),):
        raise InvalidArgument(f"labels must have one entry per cache row ({len(reader)}), got shape {tuple(y.shape)}")
    names = list(class_names) if class_names is not None else [str(i) for i in range(int(y.max()) + 1)]
    return y, names


def _source(settings: dict, cache_root: Path) -> dict:
    if list((settings.get("prompts") or {}).get("grid") or []) == [0, 0]:
        raise InvalidArgument(f"cache {cache_root} holds global embeddings only (precompute --grid 0): SALF-CBM needs ring "
                              "prompts; run fastcbm precompute with --grid N (default 7) --features BACKBONE into a new --out")
    src = settings.get("features_source")
    if not src:
        name = settings.get("features")
        raise InvalidArgument(
                 f"cache {cache_root}: " + ("has no backbone features" if not name else
                                            f"features {name!r} come from a custom function, not a named backbone")
                 + "; run fastcbm precompute with --features BACKBONE (e.g. --features resnet50) into a new --out")
    return src


def train_salf_from_cache(
    cache: str | os.PathLike,
    concepts,
    out: str | os.PathLike | None = None,
    *,
    val_cache: str | os.PathLike | None = None,
    labels=None,
    val_labels=None,
    class_names: list[str] | None = None,
    config: TrainConfig | None = None,
    device: str | torch.device = "auto",
    progress: bool = True,
    overwrite: bool = False,
    verify: str = "checksum",
):
    """Train a SALF-CBM on a cache written by ``fastcbm precompute --features BACKBONE``.

    ``concepts``: a path (text or JSON, :func:`fastcbm.concepts.load_concepts`), a ConceptSet or a list of strings.
    ``labels``: None (ImageFolder: each image's parent folder is its class), a CSV/TSV of ``path,class`` lines, or a
    tensor ``[N]`` per cache row (then ``class_names`` names them). Validation rows come from ``val_cache`` (labelled
    the same way with ``val_labels``) or a seeded ``config.val_fraction`` of the training cache.
    Writes the model to ``out`` (``SALFCBM.save`` + ``train_report.json``) when given; returns ``(model, report)``.
    Under ``torchrun`` (one process per GPU, or gloo processes on CPU) the bottleneck trains data-parallel: each
    process reads and processes its share of every batch; rank 0 writes the model.
    ``verify``: how the caches' files are checked when first read (:class:`~fastcbm.cache.CacheReader`): "checksum"
    (sha256 and NaN/inf once per file, the default) or "size" (sizes and headers only: no extra full read of an
    ImageNet-size cache; ``fastcbm similarities --verify`` checks everything once, on demand).
    """
    from fastcbm.cache import CacheReader
    from fastcbm.distributed import init_distributed, resolve_device
    from fastcbm.models import load_backbone
    from fastcbm.salf.model import SALFConfig
    from fastcbm.salf.pipeline import fit_salf_on

    config = config or TrainConfig()
    if out is not None and not overwrite and (Path(out) / "model.safetensors").exists():
        raise OutputExists(f"out: {out} already holds a model; choose another folder or pass overwrite=True "
                           "(--overwrite)")
    if out is not None:  # an existing file or an unwritable folder fails now, not after the training
        from fastcbm.files import check_output_dir

        check_output_dir(out, "out")
    t_start = time.perf_counter()
    dev = resolve_device(device)
    rank, world, owns_group = init_distributed(dev)
    group = None
    if world > 1:
        import torch.distributed as dist

        group = dist.group.WORLD
        progress = progress and rank == 0
    reader = CacheReader(cache, verify=verify)
    source = _source(reader.settings, reader.root)
    rows = _training_rows(reader, val_cache, labels, val_labels, class_names, config, verify)
    log.info("SALF-CBM training: %d train / %d val images, %d classes", len(rows.train), len(rows.val),
             len(rows.names))
    concept_names, kept, filter_report, text_emb = _concepts_for(reader, concepts, rows, config, dev)

    backbone = load_backbone(source["backbone"], pretrained=source.get("pretrained"), device=str(dev))
    model_info, prompts = reader.settings["model"], reader.settings["prompts"]
    salf_config = SALFConfig(
        backbone=source["backbone"], backbone_pretrained=source.get("pretrained"), feature_layer=source["layer"],
        clip=model_info["name"], clip_pretrained=model_info.get("pretrained"), grid=tuple(prompts["grid"]),
        radius=prompts["radius"], width=prompts["width"], centers=prompts["centers"], pooling=config.pooling,
        softmax_temperature=config.softmax_temperature, concepts=list(kept), class_names=list(rows.display))
    model, fit_report = fit_salf_on(backbone=backbone, config=salf_config, train=rows.train, val=rows.val,
                                    text_emb=text_emb, fit=config.fit, device=dev, progress=progress,
                                    process_group=group)
    report = {
        "cache": str(reader.root), "val_cache": str(val_cache) if val_cache is not None else None,
        "images": {"train": len(rows.train), "val": len(rows.val)}, "classes": len(rows.names),
        "class_names": list(rows.display), "processes": world, "labels": rows.label_report,
        "concepts": {"candidates": len(concept_names), "after_filter": len(kept),
                     "kept": len(fit_report.concepts_kept), "filter": filter_report.summary(),
                     "dropped_by_filter": {k: list(v) for k, v in filter_report.dropped.items()},
                     "dropped_by_interpretability": fit_report.concepts_dropped},
        "train_accuracy": round(fit_report.train_accuracy, 4), "val_accuracy": round(fit_report.val_accuracy, 4),
        "nonzero_weights_per_class": round(fit_report.nnz_per_class, 2),
        "bottleneck": {"best_step": fit_report.bottleneck.best_step, "history": fit_report.bottleneck.history},
        "config": _jsonable(asdict(config)),
        "seconds": {**{k: round(v, 1) for k, v in fit_report.seconds.items()},
                    "total": round(time.perf_counter() - t_start, 1)},
    }
    if out is not None:
        out = Path(out)
        if rank == 0:
            model.save(out)
            (out / "train_report.json").write_text(json.dumps(report, indent=2))
        report["model"] = str(out)
    if group is not None:
        import torch.distributed as dist

        dist.barrier(group)  # the model folder is complete before any process returns
        if owns_group:
            dist.destroy_process_group()
    return model, report


@dataclass
class _Rows:
    """The labelled training and validation rows of a SALF-CBM run."""

    train: object  # CacheData
    val: object  # CacheData
    names: list[str]  # classes as the folders / CSV name them
    display: list[str]  # classes as the model and the class filter name them
    label_report: dict


def _training_rows(reader, val_cache, labels, val_labels, class_names, config: TrainConfig, verify: str) -> _Rows:
    """Labels (folders, a CSV or a tensor) for the training cache and a validation set: ``val_cache`` with the same
    settings, else a seeded ``config.val_fraction`` of the training rows."""
    from fastcbm.cache import CacheReader
    from fastcbm.data.split import split_rows
    from fastcbm.salf.data import CacheData

    settings = reader.settings
    train_labels = _labels_for(reader, labels, class_names)
    y, names = train_labels
    # labels are matched with the folder / CSV names; the model and the class filter use display names
    display = humanize_class_names(names) if config.humanize_class_names else list(names)
    # how every label was found (folders, or CSV rows matched by path / unique bare name): train_report.json
    label_report = {"train": getattr(train_labels, "report", {"source": "tensor"})}
    if val_cache is not None:
        val_reader = CacheReader(val_cache, verify=verify)
        for key in ("model", "prompts", "features", "features_source"):
            if val_reader.settings.get(key) != settings.get(key):
                raise InvalidArgument(f"val_cache {val_reader.root} was made with other {key} settings than "
                                      f"{reader.root}: {val_reader.settings.get(key)} != {settings.get(key)}")
        val_labels_found = _labels_for(val_reader, val_labels, names)
        y_val, _ = val_labels_found
        label_report["val"] = getattr(val_labels_found, "report", {"source": "tensor"})
        return _Rows(CacheData(reader, y, name="train"), CacheData(val_reader, y_val, name="val"), list(names),
                     display, label_report)
    tr_rows, va_rows = split_rows(len(reader), config.val_fraction, config.seed)
    return _Rows(CacheData(reader, y, tr_rows, name="train"), CacheData(reader, y, va_rows, name="val"), list(names),
                 display, label_report)


def _concepts_for(reader, concepts, rows: _Rows, config: TrainConfig, dev: torch.device):
    """Load the concepts, filter them as label-free CBM does (presence reads the cached global embeddings of the
    training rows) and embed the survivors with the cache's CLIP → (candidates, kept, FilterReport, text_emb [M, D])."""
    from fastcbm.concepts import (
        ConceptSet,
        encode_texts,
        filter_concepts,
        load_concepts,
        load_sentence_encoder,
        resolve_cutoff,
    )
    from fastcbm.models import load_clip

    if isinstance(concepts, (str, os.PathLike)):
        concepts = load_concepts(concepts)
    concept_names = list(concepts.names if isinstance(concepts, ConceptSet) else concepts)
    model_info = reader.settings["model"]
    try:
        clip, _, tokenizer = load_clip(model_info["name"], model_info.get("pretrained"), device=str(dev))
    except (ValueError, ImportError) as exc:
        raise InvalidArgument(f"cache {reader.root} records the CLIP model {model_info['name']!r}, which fastcbm "
                              f"cannot rebuild ({str(exc).splitlines()[0][:160]}); precompute with the model's "
                              "load_clip name (precompute(data, 'ViT-B-16', out, pretrained='openai'), or "
                              "model_name=/pretrained= next to a model object)") from None
    f = config.filter

    def text_encoder(texts: list[str]) -> torch.Tensor:
        return encode_texts(clip, tokenizer, texts, templates=f.templates, device=dev, progress=False)

    image_emb = (reader.global_embeddings(rows.train.rows, dtype=torch.float32) if f.presence_cutoff is not None
                 else None)
    sentence = (load_sentence_encoder(f.sentence_model, dev)
                if f.sentence_model and model_info["name"] != "testbed" else None)
    kept, filter_report = filter_concepts(concept_names, rows.display, text_encoder, max_length=f.max_length,
                                          class_sim_cutoff=resolve_cutoff(f.class_sim_cutoff, "class_sim_cutoff",
                                                                          model_info["name"]),
                                          concept_sim_cutoff=resolve_cutoff(f.concept_sim_cutoff,
                                                                            "concept_sim_cutoff", model_info["name"]),
                                          image_embeddings=image_emb,
                                          presence_cutoff=f.presence_cutoff, sentence_encoder=sentence)
    log.info("concept filter: %s", filter_report.summary())
    if not kept:
        raise InvalidArgument(f"concepts: none left after filtering ({filter_report.summary()}); relax the cut-offs")
    return concept_names, kept, filter_report, text_encoder(kept)


def _jsonable(d):
    if isinstance(d, dict):
        return {k: _jsonable(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_jsonable(v) for v in d]
    return d if isinstance(d, (str, int, float, bool, type(None))) else str(d)


__all__ = ["BottleneckConfig", "ConceptFilterConfig", "TrainConfig", "train_salf_from_cache"]
