"""The precompute job: images → red-ring prompts → CLIP image tower → unit prompt embeddings in a sharded cache.

Per batch of B decoded uint8 images, one kernel call renders all 1+G copies (plain image + G ringed ones) already
normalised, and the image tower encodes them in chunks of ``max_encode_batch``. Rows are stored unit-normalised in
fp16 together with their fp32 norms. Work is organised by cache shard (a fixed range of the input list) and batches
never straddle shards, so every shard's bytes depend only on its inputs: a resumed run, or one split over torchrun
ranks, writes exactly the bytes of an uninterrupted single-process run on the same device.

Under torchrun (``torch.distributed`` initialised from the environment) rank 0 checks the cache and lists the shards
still to do, rank r computes every world-th of them (a strided slice of the input list at shard granularity), and
rank 0 merges the shard records into the manifest at the end.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastcbm.cache.reader import GLOBAL, INPUT_INDEX, PROMPT, CacheReader
from fastcbm.cache.store import ArraySpec, CacheLock, ShardedCache
from fastcbm.distributed import init_distributed, resolve_device
from fastcbm.errors import InvalidArgument
from fastcbm.models.inputs import encoder_input_config
from fastcbm.precompute.config import PrecomputeConfig, resolve_dtype
from fastcbm.precompute.encoder import PromptEncoder
from fastcbm.precompute.sources import backbone_feature_fn, cefam_stage_fn

log = logging.getLogger("fastcbm.precompute")


def precompute(data: str | os.PathLike | Sequence[str], model: str | torch.nn.Module, out: str | os.PathLike,
               config: PrecomputeConfig | None = None, *, pretrained: str | None = None, model_name: str | None = None,
               preprocess: Any = None, **settings: Any) -> CacheReader:
    """Encode every image of ``data`` with ring prompts into the cache at ``out`` and return a reader for it.

    ``data``: a directory (recursive; ImageFolder layout fine), a text file listing image paths, or a list of paths.
    ``model``: an open_clip-style model (``encode_image(x [B, 3, S, S]) -> [B, D]``; pass ``model_name`` and
    ``pretrained`` to identify it in the manifest) or a name for ``fastcbm.models.load_clip(name, pretrained)``.
    ``config``: a :class:`~fastcbm.precompute.config.PrecomputeConfig` (default: its defaults); keyword ``settings``
    replace single fields of it (``precompute(data, "testbed", out, grid=0, cefam_classifier="testbed")``).

    Unreadable images are skipped, counted and listed in the manifest. Reopening ``out`` with other settings raises
    :class:`~fastcbm.cache.CacheMismatchError`; a full disk raises :class:`~fastcbm.cache.CacheDiskFullError`.
    """
    from fastcbm.data.folder import list_images
    from fastcbm.data.loaders import resolve_loader

    cfg = PrecomputeConfig.from_settings(config, **settings)
    cfg.validate()
    dev = resolve_device(cfg.device)
    loader = resolve_loader(cfg.loader, dev)  # fail before any work
    rank, world, owns_pg = init_distributed(dev)
    model, preprocess, model_name, pretrained = _load_model(model, preprocess, model_name, pretrained, dev)
    size, mean, std = encoder_input_config(model, preprocess)
    encoder, settings_record, extra = _build_encoder(cfg, model, preprocess, model_name, pretrained, dev, size, mean,
                                                     std)
    arrays = encoder.probe(size)  # validates the prompt settings and finds D before any work
    arrays[INPUT_INDEX] = ArraySpec("int64", ())
    extra["embed_dim"] = arrays[GLOBAL].row_shape[0]
    files = [os.path.abspath(f) for f in list_images(data)]
    _write_cache(out, files, settings_record, arrays, extra, encoder, cfg, size=size, loader=loader, device=dev,
                 rank=rank, world=world, owns_pg=owns_pg)
    reader = CacheReader(out)
    if len(reader) == 0:
        first = reader.skipped[0] if reader.skipped else {"path": "?", "reason": "?"}
        what = data if isinstance(data, (str, os.PathLike)) else "the given list"
        raise InvalidArgument(f"data: none of the {len(files)} inputs of {what} could be read as an image (e.g. "
                              f"{first['path']}: {first['reason']}); the cache at {out} holds 0 images")
    reader.stats = encoder.stats  # type: ignore[attr-defined]
    return reader


def _load_model(model, preprocess, model_name: str | None, pretrained: str | None, dev: torch.device):
    """The CLIP model on ``dev`` and the name (+ pretrained tag) that rebuilds it, recorded in the manifest."""
    if isinstance(model, str):
        from fastcbm.models import load_clip

        model_name = model_name or model
        model, preprocess, _ = load_clip(model, pretrained)
    source = getattr(model, "fastcbm_source", None)  # set by load_clip: the name that rebuilds this object
    if model_name is None and isinstance(source, dict):
        model_name, pretrained = source["name"], pretrained if pretrained is not None else source.get("pretrained")
    elif model_name is None:
        log.warning("precompute: the model object has no name fastcbm can rebuild it from; pass model_name= (and "
                    "pretrained=) naming it for load_clip, or fastcbm train on this cache cannot load its text tower")
    return model.eval().to(dev), preprocess, model_name or type(model).__name__, pretrained


def _build_encoder(cfg: PrecomputeConfig, model, preprocess, model_name: str, pretrained, dev: torch.device,
                   size: int, mean, std) -> tuple[PromptEncoder, dict, dict]:
    """The encoder (prompts, tower, extra sources) and the settings the manifest records (what a resume must match)."""
    from fastcbm.prompts import default_ring_geometry
    from fastcbm.prompts.reference import normalize_grid

    from fastcbm.precompute.tower import check_tower_mode

    check_tower_mode(cfg.tower, dev)  # a CUDA graph needs a GPU: refused before any work
    cdtype = resolve_dtype(cfg.dtype, dev)
    max_encode_batch = cfg.resolved_max_encode_batch(dev, size)
    global_only = cfg.global_only
    gy, gx = (0, 0) if global_only else normalize_grid(cfg.grid)
    radius = cfg.radius
    if radius is None and not global_only:
        radius = default_ring_geometry(size)[0]
    features, features_name = cfg.features, cfg.features_name
    feature_fn = (backbone_feature_fn(features, pretrained=cfg.features_pretrained, layer=cfg.features_layer,
                                      device=dev) if isinstance(features, str) else features)
    if feature_fn is not None and features_name is None:
        features_name = features if isinstance(features, str) else getattr(feature_fn, "name",
                                                                           type(feature_fn).__name__)
    cefam_fn = (cefam_stage_fn(cfg.cefam_classifier, pretrained=cfg.cefam_pretrained, layers=cfg.cefam_layers,
                               device=dev, size=size) if cfg.cefam_classifier else None)
    if cfg.engine != "torch":  # an exported image tower runs the encoder (fastcbm.deploy): onnxruntime or TensorRT
        from fastcbm.deploy.encoder import engine_encoder

        model = engine_encoder(model, preprocess, cfg.engine, device=dev, max_batch=max_encode_batch, dtype=cdtype,
                               model_name=model_name)
    encoder = PromptEncoder(model, grid=(gy, gx), radius=None if global_only else float(radius),
                            width=float(cfg.width), centers=cfg.centers, mean=mean, std=std, device=dev, dtype=cdtype,
                            max_encode_batch=max_encode_batch, features=feature_fn, grid_hw=(gy, gx), cefam=cefam_fn,
                            tower=cfg.tower)
    settings = {
        "model": {"name": model_name, "pretrained": pretrained},
        "prompts": {"grid": [gy, gx], "radius": None if global_only else float(radius), "width": float(cfg.width),
                    "centers": cfg.centers, "image_size": size, "mean": list(mean), "std": list(std),
                    "ring_rgb": [255, 0, 0]},
        "encoder_dtype": str(cdtype).replace("torch.", ""),
        "features": features_name,
        "features_source": getattr(feature_fn, "source", None),
        "decode": {"resize": "shorter side, bicubic", "crop": "center", "jpeg_draft": bool(cfg.draft)},
    }
    if cefam_fn is not None:  # only then: caches made without it keep their settings (and fingerprints) unchanged
        settings["cefam"] = cefam_fn.source  # type: ignore[attr-defined]
    extra = {"embedding": "unit rows fp16; norms fp32 (before normalisation)", "num_prompts": gy * gx}
    if cfg.engine != "torch":  # bytes equal torch's to ~1e-5 before fp16 rounding: recorded, not a setting to match
        extra["encoder_engine"] = model.engine
    return encoder, settings, extra


def _write_cache(out, files: list[str], settings: dict, arrays: dict[str, ArraySpec], extra: dict,
                 encoder: PromptEncoder, cfg: PrecomputeConfig, *, size: int, loader: str, device: torch.device,
                 rank: int, world: int, owns_pg: bool) -> None:
    """Open (or resume) the cache, compute this rank's pending shards, and (rank 0) finalise the manifest."""
    import torch.distributed as dist

    def barrier() -> None:
        if world > 1:
            dist.barrier()

    lock = None
    try:
        if rank == 0:
            # one writer per cache folder: a second `fastcbm precompute` on it is refused while this one lives
            lock = CacheLock(out).acquire()
            cache = ShardedCache(out, settings=settings, inputs=files, arrays=arrays, shard_size=cfg.shard_size,
                                 extra=extra)
            cache.cleanup_tmp()
            pending = cache.pending_shards(checksums=cfg.verify == "checksum")
        barrier()
        if rank != 0:
            cache = ShardedCache(out, settings=settings, inputs=files, arrays=arrays, shard_size=cfg.shard_size,
                                 extra=extra, create=False)
        if world > 1:
            box = [pending if rank == 0 else None]
            dist.broadcast_object_list(box, src=0)
            pending = box[0]
        _run_shards(cache, files, pending[rank::world], encoder, size=size, batch_size=cfg.resolved_batch_size(device),
                    loader=loader, device=device, num_workers=cfg.resolved_num_workers(), draft=cfg.draft,
                    progress=cfg.progress and rank == 0, rank=rank)
        barrier()
        if rank == 0:
            m = cache.finalize()
            if m["num_skipped"]:
                log.warning("%d of %d inputs were skipped (unreadable, corrupt or too small); see 'skipped' in %s",
                            m["num_skipped"], len(files), Path(out) / "manifest.json")
        barrier()
    finally:
        if lock is not None:
            lock.release()
        if owns_pg and dist.is_initialized():
            dist.destroy_process_group()


def _drop_nonfinite(res: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[int]]:
    """Remove the rows whose floating outputs hold NaN/inf; returns the kept arrays and the dropped input indices."""
    ok = np.ones(len(res[INPUT_INDEX]), dtype=bool)
    for a in res.values():
        if a.dtype.kind == "f" and a.size:
            ok &= np.isfinite(a.reshape(a.shape[0], -1)).all(axis=1)
    if ok.all():
        return res, []
    bad = res[INPUT_INDEX][~ok].tolist()
    return {name: a[ok] for name, a in res.items()}, bad


def _run_shards(cache: ShardedCache, files: list[str], shards: list[int], encoder: PromptEncoder, *, size: int,
                batch_size: int, loader: str, device: torch.device, num_workers: int, draft: bool, progress: bool,
                rank: int) -> None:
    from fastcbm.data.loaders import make_loader

    plan: list[list[int]] = []
    per_shard: dict[int, int] = {}
    for k in shards:
        lo, hi = cache.shard_range(k)
        chunks = [list(range(a, min(a + batch_size, hi))) for a in range(lo, hi, batch_size)] or [[]]
        plan += [c for c in chunks if c]
        per_shard[k] = len([c for c in chunks if c])
    n_images = sum(len(b) for b in plan)
    stats = {"images": 0, "prompted": 0, "skipped": 0, "decode": 0.0, "write": 0.0, "wall": 0.0, "shards": 0}
    encoder.stats = stats  # type: ignore[attr-defined]
    if not plan:
        return
    batches = make_loader(files, size, plan, loader=loader, device=device, num_workers=num_workers, draft=draft)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_images, unit="img", desc=f"precompute {cache.root.name}", smoothing=0.05)
    g1 = 1 + (cache.arrays[PROMPT].row_shape[0] if PROMPT in cache.arrays else 0)
    acc: dict[str, list[np.ndarray]] = {}
    skipped: list[dict] = []
    done_in_shard = 0
    # shards are hashed and written by one background thread while the next shard computes; waiting for the
    # previous write before queueing the next bounds memory to one shard and surfaces write errors (ENOSPC) promptly
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastcbm-shard-writer")
    writing = None

    def wait_write() -> None:
        nonlocal writing
        if writing is not None:
            t0 = time.perf_counter()
            w, writing = writing, None
            w.result()
            stats["write"] += time.perf_counter() - t0
            stats["shards"] += 1

    t_start = time.perf_counter()
    t_wait = t_start
    try:
        for batch in batches:
            stats["decode"] += time.perf_counter() - t_wait
            k = batch.indices[0] // cache.shard_size
            if batch.ok:
                res = encoder(batch.images)
                res[INPUT_INDEX] = np.asarray(batch.ok, dtype=np.int64)
                res, bad = _drop_nonfinite(res)
                for i in bad:  # never store NaN/inf: the row is skipped, counted and listed like a bad image
                    log.warning("skipping %s: the encoder produced NaN/inf values", files[i])
                    batch.skipped.append((i, "non-finite embedding or features (NaN/inf) from the encoder"))
                for name, a in res.items():
                    acc.setdefault(name, []).append(a)
            for i, reason in batch.skipped:
                log.info("skipping %s: %s", files[i], reason)
                skipped.append({"index": i, "path": files[i], "reason": reason})
            stats["images"] += len(batch.ok)
            stats["prompted"] += len(batch.ok) * g1
            stats["skipped"] += len(batch.skipped)
            done_in_shard += 1
            if done_in_shard == per_shard[k]:
                t0 = time.perf_counter()
                arrays = {name: (np.concatenate(acc[name]) if acc.get(name) else
                                 np.zeros((0, *spec.row_shape), dtype=spec.dtype))
                          for name, spec in cache.arrays.items()}
                stats["write"] += time.perf_counter() - t0
                wait_write()
                writing = pool.submit(cache.write_shard, k, arrays, skipped)
                acc, skipped, done_in_shard = {}, [], 0
            if bar is not None:
                el = max(time.perf_counter() - t_start, 1e-9)
                bar.update(len(batch.indices))
                bar.set_postfix_str(f"{stats['images'] / el:.1f} img/s, {stats['prompted'] / el:.0f} prompted/s, "
                                    f"{stats['skipped']} skipped", refresh=False)
            t_wait = time.perf_counter()
        wait_write()
    finally:
        try:
            wait_write()  # an interrupted run still finishes (or cleans up) the shard being written
        finally:
            pool.shutdown(wait=True)
        if bar is not None:
            bar.close()
        stats["wall"] = time.perf_counter() - t_start
        stats.update(encoder.times)
        if stats["skipped"]:
            log.warning("rank %d: skipped %d unreadable image(s) so far", rank, stats["skipped"])
