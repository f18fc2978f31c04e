"""``fastcbm demo`` (= ``fastcbm salf demo``): SALF-CBM end to end on the synthetic testbed with the bundled tiny
models.

generate scenes → ImageFolder export → precompute (ring-prompt embeddings + backbone grid features, sharded cache) →
``train_salf_from_cache``, the code path of ``fastcbm salf train`` (concept filtering, bottleneck streamed from the cache
with the fused cubic-cosine loss, sparse head) → test accuracy vs the backbone, zero-shot segmentation vs Grad-CAM →
HTML report → one JSON summary line. Everything is seeded; evaluation scenes use seeds the testbed models never saw.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastcbm.errors import InvalidArgument

log = logging.getLogger("fastcbm.salf.demo")


@dataclass
class DemoConfig:
    out: Path = Path("fastcbm_out/demo")
    n_train: int = 600
    n_val: int = 150
    n_test: int = 150
    grid: int = 7
    seed: int = 0
    report_images: int = 12
    device: str = "cpu"
    progress: bool = True


def _split_seed(seed: int, split: str) -> int:
    from fastcbm.data.synthetic import TRAINING_SEED_LIMIT

    return TRAINING_SEED_LIMIT + 1000 * seed + {"train": 1, "val": 2, "test": 3}[split]


def _class_object_masks(batch) -> torch.Tensor:
    """Ground-truth foreground for zero-shot segmentation: the pixels of the object that defines the class."""
    from fastcbm.data import synthetic

    pairs = synthetic.class_concepts()  # [(shape, colour)] per class
    masks = torch.zeros(len(batch), *batch.images.shape[-2:], dtype=torch.bool)
    for i, objs in enumerate(batch.objects):
        shape, color = pairs[int(batch.labels[i])]
        for slot, obj in enumerate(objs):
            if obj.shape == shape and obj.color == color:
                masks[i] |= batch.object_masks[i, slot]
    return masks


def check_grid(grid: int, size: int) -> None:
    """``--grid`` must be 1..32 rings per axis and the rings (radius 32·S/224) must fit an ``size``-px image; checked
    before any work."""
    from fastcbm.prompts import MAX_GRID, default_ring_geometry, ring_centers

    if isinstance(grid, bool) or not isinstance(grid, int) or not 1 <= grid <= MAX_GRID:
        raise InvalidArgument(f"--grid must be an integer from 1 to {MAX_GRID} (rings per axis), got {grid}")
    radius = default_ring_geometry(size)[0]
    try:
        ring_centers(size, grid, radius)
    except ValueError as exc:
        raise InvalidArgument(f"--grid {grid}: rings of radius {radius:.1f} px do not fit the {size}-px testbed image "
                              f"({exc})") from None


def run_demo(cfg: DemoConfig) -> dict:
    """Run the demo into ``cfg.out``; on failure, remove what this run created there (no half-written folder)."""
    import shutil

    out = Path(cfg.out)
    existed = out.exists()
    before = set(out.rglob("*")) if existed else set()
    try:
        return _run_demo(cfg)
    except BaseException:
        if not existed:
            shutil.rmtree(out, ignore_errors=True)
        elif out.exists():
            created = sorted(set(out.rglob("*")) - before, key=lambda p: len(p.parts))
            for p in created:  # top-most new paths first; their children go with them
                if p.exists():
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        raise


def _run_demo(cfg: DemoConfig) -> dict:
    from fastcbm import metrics
    from fastcbm.data import synthetic
    from fastcbm.data.export import export_image_folder
    from fastcbm.cam.gradcam import grad_cam
    from fastcbm.models import load_backbone, load_clip
    from fastcbm.models.inputs import encoder_input_config
    from fastcbm.precompute import precompute
    from fastcbm.salf.report import write_salf_report
    from fastcbm.salf import explain as ex
    from fastcbm.models.features import normalize_for_backbone
    from fastcbm.salf.train import TrainConfig, train_salf_from_cache

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    clip, clip_preprocess, _ = load_clip("testbed")
    check_grid(cfg.grid, encoder_input_config(clip, clip_preprocess)[0])  # before any work
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)

    # 1. data: fresh seeds, exported as an ImageFolder so the real loading code runs
    t0 = time.perf_counter()
    splits = {name: synthetic.generate(n, _split_seed(cfg.seed, name))
              for name, n in (("train", cfg.n_train), ("val", cfg.n_val), ("test", cfg.n_test))}
    # one folder per (split, size, seed): a rerun with other sizes must never mix in files of an earlier run
    tags = {name: f"{name}-n{len(batch)}-seed{cfg.seed}" for name, batch in splits.items()}
    folders = {name: export_image_folder(batch, out / "data" / tags[name]) for name, batch in splits.items()}
    timings["data"] = time.perf_counter() - t0

    # 2. precompute: ring-prompt embeddings and the backbone's grid features into the sharded caches, then
    # 3. train exactly as `fastcbm salf train` does on user data: labels from the export's labels.csv, concepts filtered,
    #    bottleneck batches streamed from the cache, sparse head
    backbone = load_backbone("testbed")
    class_names = synthetic.class_names()
    t0 = time.perf_counter()
    caches = {name: precompute(folders[name], clip.to(device), out / "cache" / f"{tags[name]}-grid{cfg.grid}-testbed",
                               model_name="testbed", preprocess=clip_preprocess, grid=cfg.grid, device=device,
                               num_workers=0, features="testbed", progress=cfg.progress)
              for name in ("train", "val")}
    timings["precompute"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    # exactly `fastcbm salf train`'s defaults (TrainConfig): the demo has no settings of its own
    train_config = TrainConfig(seed=cfg.seed)
    train_config.fit.bottleneck.seed = cfg.seed
    model, train_report = train_salf_from_cache(
        caches["train"].root, synthetic.concept_names(), out / "model", val_cache=caches["val"].root,
        labels=folders["train"].parent / "labels.csv", val_labels=folders["val"].parent / "labels.csv",
        class_names=class_names, config=train_config, device=device, progress=cfg.progress, overwrite=True)
    timings["fit"] = time.perf_counter() - t0
    te_img, te_lab = splits["test"].images, splits["test"].labels

    # 4. evaluation on fresh scenes
    t0 = time.perf_counter()
    x = normalize_for_backbone(te_img, backbone, device)
    with torch.no_grad():
        salf_pred = model(x).argmax(1).cpu()
        backbone_pred = backbone.model.to(device)(x).argmax(1).cpu()
    masks = _class_object_masks(splits["test"])
    salf_heat = ex.class_heatmap(model, x).cpu()
    cam = grad_cam(backbone.model, x, backbone.feature_layers[-1], kind=backbone.kind,
                   size=tuple(masks.shape[-2:])).cpu()
    seg_salf = metrics.segmentation_scores(salf_heat, masks)
    seg_cam = metrics.segmentation_scores(cam, masks)
    timings["evaluate"] = time.perf_counter() - t0

    # 5. report
    n_rep = min(cfg.report_images, len(te_img))
    explanations = ex.explain(model, x[:n_rep], top_k=5)
    summary = {
        "salf_accuracy": float((salf_pred == te_lab).float().mean()),
        "backbone_accuracy": float((backbone_pred == te_lab).float().mean()),
        "concepts_candidates": train_report["concepts"]["candidates"],
        "concepts_after_filter": train_report["concepts"]["after_filter"],
        "concepts_kept": len(model.config.concepts),
        "nonzero_weights_per_class": train_report["nonzero_weights_per_class"],
        "segmentation_salf": {k: round(v, 4) for k, v in seg_salf.items()},
        "segmentation_gradcam": {k: round(v, 4) for k, v in seg_cam.items()},
        "images": {**train_report["images"], "test": len(te_img)},
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    report_path = write_salf_report(
        out / "report.html", images=te_img[:n_rep], explanations=explanations, rules=ex.decision_rules(model),
        summary=summary, class_names=class_names, labels=te_lab[:n_rep],
        segmentation={"images": te_img[:n_rep], "masks": masks[:n_rep], "salf": salf_heat[:n_rep],
                      "gradcam": cam[:n_rep]},
    )
    summary["report"] = str(report_path)
    summary["model"] = str(out / "model")
    summary["seconds"]["total"] = round(time.perf_counter() - t_start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("concept filter: %s", train_report["concepts"]["filter"])
    return summary
