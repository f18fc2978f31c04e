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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastcbm.cache.reader import FEATURES, GLOBAL, GLOBAL_NORM, INPUT_INDEX, PROMPT, PROMPT_NORM, Z_CAT, CacheReader
from fastcbm.cache.store import ArraySpec, CacheLock, ShardedCache
from fastcbm.distributed import init_distributed, resolve_device
from fastcbm.errors import InvalidArgument, InvalidFile

log = logging.getLogger("fastcbm.precompute")

_DEFAULT_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's (also fastcbm.prompts.CLIP_MEAN)
_DEFAULT_STD = (0.26862954, 0.26130258, 0.27577711)


# -- model and its input space --------------------------------------------------------------------------------------
def encoder_input_config(model: torch.nn.Module, preprocess: Any = None) -> tuple[int, tuple, tuple]:
    """``(size, mean, std)`` of the encoder's input: ``model.visual.preprocess_cfg`` if present, else read from the
    ``preprocess`` transform (Resize/CenterCrop size, Normalize mean/std), else ``model.visual.image_size`` and CLIP
    defaults."""
    visual = getattr(model, "visual", model)
    size = mean = std = None
    cfg = getattr(visual, "preprocess_cfg", None)
    if isinstance(cfg, dict) and cfg:
        size, mean, std = cfg.get("size"), cfg.get("mean"), cfg.get("std")
    if preprocess is not None and hasattr(preprocess, "transforms"):
        for t in preprocess.transforms:
            name = type(t).__name__
            if name == "Normalize" and mean is None:
                mean, std = tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std)
            elif name in ("CenterCrop", "Resize", "RandomResizedCrop") and size is None and name != "Resize":
                size = t.size
    if size is None:
        size = getattr(visual, "image_size", None)
    if size is None:
        raise InvalidArgument("model: cannot tell the encoder's input size (no visual.preprocess_cfg, no preprocess "
                              "transform with a crop, no visual.image_size)")
    if isinstance(size, (tuple, list)):
        if len(set(int(s) for s in size)) != 1:
            raise InvalidArgument(f"model: non-square encoder input {tuple(size)} is not supported")
        size = size[0]
    mean = tuple(float(v) for v in (mean or _DEFAULT_MEAN))
    std = tuple(float(v) for v in (std or _DEFAULT_STD))
    return int(size), mean, std


def backbone_feature_fn(name: str, *, pretrained: bool | str | None = True, layer: str | None = None,
                        device: torch.device | str = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """A backbone for ``precompute(features=...)``: layer ``layer`` (default: the last feature layer) of
    ``fastcbm.models.load_backbone(name, pretrained)`` on uint8 images ``[B, 3, S, S]``, resized to the backbone's
    input size and normalised with its mean/std exactly as SALF-CBM training and inference do → ``[B, C, h, w]``.
    The function carries ``.name`` and ``.source`` (backbone, pretrained, layer: what ``fastcbm train`` rebuilds)."""
    from fastcbm.models.features import extract_feature_maps, normalize_for_backbone
    from fastcbm.models import load_backbone

    backbone = load_backbone(name, pretrained=pretrained, device=str(device))
    layer = layer or backbone.feature_layers[-1]
    from fastcbm.models.features import split_layer

    if split_layer(layer)[0] not in dict(backbone.model.named_modules()):  # "blocks.11+cls": ViT patch + CLS tokens
        raise InvalidArgument(f"features layer: {name} has no module {layer!r} (feature layers: {backbone.feature_layers})")
    prefix = int(getattr(backbone, "num_prefix_tokens", 1))
    dev = torch.device(device)

    def fn(images: torch.Tensor) -> torch.Tensor:
        x = normalize_for_backbone(images, backbone, dev)
        return extract_feature_maps(backbone.model, x, layer, kind=backbone.kind, num_prefix_tokens=prefix)

    fn.name = name  # type: ignore[attr-defined]
    fn.source = {"backbone": name, "pretrained": pretrained, "layer": layer}  # type: ignore[attr-defined]
    return fn


def cefam_stage_fn(name: str, *, pretrained: bool | str | None = True, layers: Sequence[str] | None = None,
                   device: torch.device | str = "cpu", size: int = 224) -> Callable[[torch.Tensor], torch.Tensor]:
    """CE-FAM's translator input for ``precompute(cefam_classifier=...)``: the global average pool of each stage in
    ``layers`` (default: a CNN's feature layers, e.g. layer1..layer4; a ViT's last block) of ``load_backbone(name, pretrained)``,
    concatenated in that order, on uint8 images ``[B, 3, S, S]`` resized and normalised for the classifier →
    ``[B, Z]`` fp32. ``.source`` records classifier, pretrained, layers, widths, kind and num_prefix_tokens (what
    ``fastcbm cefam train`` and the saved model rebuild); ``size`` is the probe image's side."""
    from fastcbm.cefam.translator import pool_stages, stage_activations
    from fastcbm.models.features import normalize_for_backbone
    from fastcbm.models import load_backbone

    backbone = load_backbone(name, pretrained=pretrained, device=str(device))
    # default: every stage of a CNN; a ViT's last block (its reshaped patch tokens), as the issue describes
    layers = list(layers or (backbone.feature_layers[-1:] if backbone.kind == "vit" else backbone.feature_layers))
    modules = dict(backbone.model.named_modules())
    missing = [n for n in layers if n not in modules]
    if missing or len(set(layers)) != len(layers):
        raise InvalidArgument(f"cefam layers: {layers} must be distinct modules of {name} (its feature layers: "
                              f"{backbone.feature_layers})")
    prefix = int(getattr(backbone, "num_prefix_tokens", 1))
    dev = torch.device(device)

    def fn(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            x = normalize_for_backbone(images, backbone, dev)
            _, acts = stage_activations(backbone.model, x, layers, backbone.kind, prefix)
            return pool_stages(acts, layers).float()

    with torch.inference_mode():  # one probe image gives the stage widths for the manifest
        _, acts = stage_activations(backbone.model, normalize_for_backbone(
            torch.zeros((1, 3, size, size), dtype=torch.uint8), backbone, dev), layers, backbone.kind, prefix)
    fn.name = name  # type: ignore[attr-defined]
    fn.source = {"classifier": name, "pretrained": pretrained, "layers": layers,  # type: ignore[attr-defined]
                 "widths": [int(acts[n].shape[1]) for n in layers], "kind": backbone.kind,
                 "num_prefix_tokens": prefix}
    return fn


def _resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in table:
        raise InvalidArgument(f"dtype must be 'auto', 'bf16', 'fp16' or 'fp32', got {dtype!r}")
    return table[dtype]


class _Encoder:
    """Renders prompts and encodes them; keeps the time spent in each stage."""

    def __init__(self, model, *, grid, radius, width, centers, mean, std, device, dtype, max_encode_batch,
                 features: Callable | None, grid_hw: tuple[int, int], cefam: Callable | None = None,
                 tower: str = "eager") -> None:
        from fastcbm.prompts import render_rings

        self.render_rings = render_rings
        self.model, self.device, self.dtype, self.max_encode_batch = model, device, dtype, max_encode_batch
        self.tower_mode, self.tower = tower, None  # the PromptTower, made once the number of copies is known
        self.ring_kw = dict(grid=grid, radius=radius, width=width, centers=centers, mean=mean, std=std)
        self.features, self.grid_hw = features, grid_hw
        self.times = {"render": 0.0, "encode": 0.0, "features": 0.0, "cefam": 0.0}
        self.cefam, self.global_only = cefam, tuple(grid) == (0, 0)  # global-only: no ring prompts (CE-FAM's mode)

    def probe(self, size: int) -> dict[str, ArraySpec]:
        """Array layout of the outputs, from one plain image through the encoder (and backbone); renders one ring
        batch to validate the prompt settings."""
        img = torch.zeros((1, 3, size, size), dtype=torch.uint8, device=self.device)
        g = 0 if self.global_only else self.render_rings(img, out_dtype=torch.float32, include_plain=False,
                                                         **self.ring_kw).shape[1]
        d = getattr(getattr(self.model, "visual", None), "output_dim", None)  # open_clip towers say it
        if not isinstance(d, int):  # anything else: one forward pass (a first call can cost ~1 s on CPU)
            with torch.inference_mode():
                d = self.model.encode_image(torch.zeros((1, 3, size, size), device=self.device)).shape[-1]
        out = {PROMPT: ArraySpec("float16", (g, d)), PROMPT_NORM: ArraySpec("float32", (g,)),
               GLOBAL: ArraySpec("float16", (d,)), GLOBAL_NORM: ArraySpec("float32", ())}
        if self.features is not None:
            with torch.inference_mode():
                c = self.features(img).shape[1]
            out[FEATURES] = ArraySpec("float16", (c, *self.grid_hw))
        if self.global_only:
            del out[PROMPT], out[PROMPT_NORM]
        if self.cefam is not None:
            out[Z_CAT] = ArraySpec("float16", (int(self.cefam(img).shape[1]),))
        return out

    def _plain(self, images: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """uint8 [b, 3, S, S] → normalised [b, 1, 3, S, S] into ``out``: exactly the plain copy render_rings puts first
        (float64 arithmetic, rounded to float32, then the encoder dtype)."""
        m = torch.tensor(self.ring_kw["mean"], dtype=torch.float64, device=images.device).view(1, 3, 1, 1)
        s = torch.tensor(self.ring_kw["std"], dtype=torch.float64, device=images.device).view(1, 3, 1, 1)
        return out.copy_(((images.to(torch.float64) / 255.0 - m) / s).to(torch.float32)[:, None])

    def _tower(self, size: int):
        """The render-into-the-input-buffer + encode loop (:mod:`fastcbm.precompute.tower`), made on first use."""
        if self.tower is None:
            from fastcbm.precompute.tower import PromptTower

            if self.global_only:
                copies, render = 1, self._plain
            else:
                copies = 1 + int(self.ring_kw["grid"][0]) * int(self.ring_kw["grid"][1])

                def render(images: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
                    return self.render_rings(images, out_dtype=self.dtype, include_plain=True, out=out,
                                             **self.ring_kw)

            self.tower = PromptTower(self.model, render, copies=copies, size=size, device=self.device,
                                     dtype=self.dtype, max_encode_batch=self.max_encode_batch, mode=self.tower_mode)
        return self.tower

    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        """uint8 [b, 3, S, S] → {prompt [b,G,D] f16, prompt_norm [b,G] f32, global [b,D] f16, global_norm [b] f32,
        (features [b,C,gy,gx] f16)}."""
        b = images.shape[0]
        t0 = time.perf_counter()
        images = images.to(self.device, non_blocking=True)
        tower = self._tower(images.shape[-1])
        before = dict(tower.times)
        emb = tower(images)  # [b, 1+G, D] fp32: rendered straight into the tower's input buffer, chunk by chunk
        g1 = emb.shape[1]
        norms = emb.norm(dim=-1)
        unit = (emb / norms.clamp_min(1e-12).unsqueeze(-1)).to(torch.float16).cpu().numpy()
        norms = norms.cpu().numpy()
        t2 = time.perf_counter()
        render = tower.times["render"] - before["render"]
        self.times["render"] += render
        self.times["encode"] += t2 - t0 - render
        out = {PROMPT: unit[:, 1:], PROMPT_NORM: norms[:, 1:], GLOBAL: unit[:, 0], GLOBAL_NORM: norms[:, 0]}
        if self.global_only:
            del out[PROMPT], out[PROMPT_NORM]
        if self.features is not None:
            from fastcbm.models.features import resize_to_grid

            with torch.inference_mode():
                f = resize_to_grid(self.features(images).float(), self.grid_hw)
            out[FEATURES] = f.to(torch.float16).cpu().numpy()
            self.times["features"] += time.perf_counter() - t2
        if self.cefam is not None:
            t3 = time.perf_counter()
            out[Z_CAT] = self.cefam(images).to(torch.float16).cpu().numpy()
            self.times["cefam"] += time.perf_counter() - t3
        return out


def precompute(data: str | os.PathLike | Sequence[str], model: str | torch.nn.Module, out: str | os.PathLike, *,
               pretrained: str | None = None, model_name: str | None = None, preprocess: Any = None,
               grid: int | tuple[int, int] = 7, radius: float | None = None, width: float = 2.0,
               centers: str = "inset", batch_size: int | None = None, shard_size: int = 4096,
               device: str | torch.device = "auto", dtype: str | torch.dtype = "auto", num_workers: int | None = None,
               loader: str = "auto", max_encode_batch: int | None = None,
               features: str | Callable[[torch.Tensor], torch.Tensor] | None = None, features_name: str | None = None,
               features_pretrained: bool | str | None = True, features_layer: str | None = None,
               cefam_classifier: str | None = None, cefam_layers: Sequence[str] | None = None,
               cefam_pretrained: bool | str | None = True, engine: str = "torch", tower: str = "eager",
               verify: str = "checksum", draft: bool = False, progress: bool = True) -> CacheReader:
    """Encode every image of ``data`` with ring prompts into the cache at ``out`` and return a reader for it.

    ``data``: a directory (recursive; ImageFolder layout fine), a text file listing image paths, or a list of paths.
    ``model``: an open_clip-style model (``encode_image(x [B, 3, S, S]) -> [B, D]``; pass ``model_name`` and
    ``pretrained`` to identify it in the manifest) or a name for ``fastcbm.models.load_clip(name, pretrained)``.
    Prompts: ``grid`` (G = gy·gx rings), ``radius`` (default: ``default_ring_geometry(S)``), ``width`` (px),
    ``centers`` ("inset" | "paper"). ``dtype``: encoder precision ("auto": bf16 autocast on GPU, fp32 on CPU).
    ``features``: optional backbone whose feature maps are stored as [N, C, gy, gx] fp16 — a name for
    ``fastcbm.models.load_backbone`` (with ``features_pretrained``, ``features_layer``; see :func:`backbone_feature_fn`)
    or a callable uint8 [B,3,S,S] → [B,C,h,w]. ``cefam_classifier``: also store that classifier's pooled stages
    ``z_cat`` [N, Z] fp16 (``cefam_layers``, default its feature layers; see :func:`cefam_stage_fn`); ``grid=0``
    stores no ring prompts, only the global embedding (the cheap mode for CE-FAM). ``verify``: how finished shards are checked on resume ("checksum" or "size").
    ``engine``: what runs the image tower: "torch", or an exported graph (:mod:`fastcbm.deploy`) on "onnxruntime" /
    "tensorrt" (recorded in the manifest as ``encoder_engine``). ``tower`` (engine "torch"): "eager", or "graph"
    (captured as a CUDA graph) or "compile" (``torch.compile``) — see :mod:`fastcbm.precompute.tower`.

    Unreadable images are skipped, counted and listed in the manifest. Reopening ``out`` with other settings raises
    :class:`~fastcbm.cache.CacheMismatchError`; a full disk raises :class:`~fastcbm.cache.CacheDiskFullError`.
    """
    from fastcbm.data.folder import list_images

    if num_workers is None:  # decoding workers: up to 4, never more than the machine's cores
        num_workers = min(4, os.cpu_count() or 1)
    if verify not in ("checksum", "size"):
        raise InvalidFile(f"verify must be 'checksum' or 'size', got {verify!r}")
    if shard_size < 1:
        raise InvalidArgument(f"shard_size must be >= 1, got {shard_size}")
    dev = resolve_device(device)
    cdtype = _resolve_dtype(dtype, dev)
    batch_size = batch_size or (64 if dev.type == "cuda" else 4)
    if batch_size < 1 or (max_encode_batch is not None and max_encode_batch < 1):
        raise InvalidArgument(f"batch_size and max_encode_batch must be >= 1, got {batch_size}, {max_encode_batch}")
    from fastcbm.data.loaders import resolve_loader

    loader = resolve_loader(loader, dev)  # fail before any work
    rank, world, owns_pg = init_distributed(dev)

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
    model_name = model_name or type(model).__name__
    model = model.eval().to(dev)
    size, mean, std = encoder_input_config(model, preprocess)
    if max_encode_batch is None:
        # GPU: large batches fill the device. CPU: per-image cost grows with the batch once activations leave the
        # caches (ViT-B/16: 215 ms/img at 16, 287 at 100); ~1 M pixels per forward: 20 at 224 px, 256 at 64 px
        max_encode_batch = 1024 if dev.type == "cuda" else max(8, min(1024, (1 << 20) // (size * size)))
    from fastcbm.prompts import default_ring_geometry
    from fastcbm.prompts.reference import normalize_grid

    global_only = not isinstance(grid, bool) and grid in (0, (0, 0), [0, 0])  # no ring prompts: E0 (and z_cat)
    if global_only and features is not None:
        raise InvalidArgument("features: SALF-CBM feature maps are stored on the prompt grid; --features needs --grid >= 1")
    if cefam_layers is not None and not cefam_classifier:
        raise InvalidArgument("cefam_layers: needs cefam_classifier (--cefam-classifier NAME)")
    gy, gx = (0, 0) if global_only else normalize_grid(grid)
    if radius is None and not global_only:
        radius = default_ring_geometry(size)[0]
    feature_fn = (backbone_feature_fn(features, pretrained=features_pretrained, layer=features_layer, device=dev)
                  if isinstance(features, str) else features)
    if feature_fn is not None and features_name is None:
        features_name = features if isinstance(features, str) else getattr(feature_fn, "name", type(feature_fn).__name__)

    cefam_fn = (cefam_stage_fn(cefam_classifier, pretrained=cefam_pretrained, layers=cefam_layers, device=dev,
                               size=size) if cefam_classifier else None)
    from fastcbm.precompute.tower import check_tower_mode

    check_tower_mode(tower, dev)
    if tower != "eager" and engine != "torch":
        raise InvalidArgument(f"tower={tower!r} applies to engine 'torch' (an exported graph runs as it was built)")
    if engine != "torch":  # an exported image tower runs the encoder (fastcbm.deploy): onnxruntime or TensorRT
        from fastcbm.deploy.encoder import engine_encoder

        model = engine_encoder(model, preprocess, engine, device=dev, max_batch=max_encode_batch, dtype=cdtype,
                               model_name=model_name)
    encoder = _Encoder(model, grid=(gy, gx), radius=None if global_only else float(radius), width=float(width),
                       centers=centers, mean=mean,
                       std=std, device=dev, dtype=cdtype, max_encode_batch=max_encode_batch, features=feature_fn,
                       grid_hw=(gy, gx), cefam=cefam_fn, tower=tower)
    arrays = encoder.probe(size)  # validates the prompt settings and finds D before any work
    arrays[INPUT_INDEX] = ArraySpec("int64", ())

    files = [os.path.abspath(f) for f in list_images(data)]
    settings = {
        "model": {"name": model_name, "pretrained": pretrained},
        "prompts": {"grid": [gy, gx], "radius": None if global_only else float(radius), "width": float(width),
                    "centers": centers,
                    "image_size": size, "mean": list(mean), "std": list(std), "ring_rgb": [255, 0, 0]},
        "encoder_dtype": str(cdtype).replace("torch.", ""),
        "features": features_name,
        "features_source": getattr(feature_fn, "source", None),
        "decode": {"resize": "shorter side, bicubic", "crop": "center", "jpeg_draft": bool(draft)},
    }
    extra = {"embedding": "unit rows fp16; norms fp32 (before normalisation)", "num_prompts": gy * gx,
             "embed_dim": arrays[GLOBAL].row_shape[0]}
    if engine != "torch":  # bytes equal torch's to ~1e-5 before fp16 rounding: recorded, not a setting to match
        extra["encoder_engine"] = model.engine
    if cefam_fn is not None:  # only then: caches made without it keep their settings (and fingerprints) unchanged
        settings["cefam"] = cefam_fn.source  # type: ignore[attr-defined]
    import torch.distributed as dist

    def barrier() -> None:
        if world > 1:
            dist.barrier()

    lock = None
    try:
        if rank == 0:
            # one writer per cache folder: a second `fastcbm precompute` on it is refused while this one lives
            lock = CacheLock(out).acquire()
            cache = ShardedCache(out, settings=settings, inputs=files, arrays=arrays, shard_size=shard_size,
                                 extra=extra)
            cache.cleanup_tmp()
            pending = cache.pending_shards(checksums=verify == "checksum")
        barrier()
        if rank != 0:
            cache = ShardedCache(out, settings=settings, inputs=files, arrays=arrays, shard_size=shard_size,
                                 extra=extra, create=False)
        if world > 1:
            box = [pending if rank == 0 else None]
            dist.broadcast_object_list(box, src=0)
            pending = box[0]
        mine = pending[rank::world]
        _run_shards(cache, files, mine, encoder, size=size, batch_size=batch_size, loader=loader, device=dev,
                    num_workers=num_workers, draft=draft, progress=progress and rank == 0, rank=rank)
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
    reader = CacheReader(out)
    if len(reader) == 0:
        first = reader.skipped[0] if reader.skipped else {"path": "?", "reason": "?"}
        what = data if isinstance(data, (str, os.PathLike)) else "the given list"
        raise InvalidArgument(f"data: none of the {len(files)} inputs of {what} could be read as an image (e.g. "
                              f"{first['path']}: {first['reason']}); the cache at {out} holds 0 images")
    reader.stats = encoder.stats  # type: ignore[attr-defined]
    return reader


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


def _run_shards(cache: ShardedCache, files: list[str], shards: list[int], encoder: _Encoder, *, size: int,
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
