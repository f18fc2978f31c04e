"""``fastcbm demo``: SALF-CBM end to end on the synthetic testbed with the bundled tiny models.

generate scenes → ImageFolder export → ring-prompt precompute (cache) → concept filtering → bottleneck (fused
cubic-cosine) → sparse head → test accuracy vs the backbone, zero-shot segmentation vs Grad-CAM → HTML report →
one JSON summary line. Everything is seeded; evaluation scenes use seeds the testbed models never saw.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("fastcbm.demo")


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


def run_demo(cfg: DemoConfig) -> dict:
    from fastcbm import metrics
    from fastcbm.concepts import encode_texts, filter_concepts
    from fastcbm.data import synthetic
    from fastcbm.data.export import export_image_folder
    from fastcbm.gradcam import grad_cam
    from fastcbm.models import load_backbone, load_clip
    from fastcbm.precompute import precompute
    from fastcbm.report import write_salf_report
    from fastcbm.salf import explain as ex
    from fastcbm.salf.bottleneck import BottleneckConfig
    from fastcbm.salf.model import SALFConfig
    from fastcbm.salf.pipeline import SALFFitConfig, fit_salf, normalize_for_backbone

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
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

    # 2. models and concepts
    clip, clip_preprocess, tokenizer = load_clip("testbed")
    clip = clip.to(device).eval()
    backbone = load_backbone("testbed")
    class_names = synthetic.class_names()
    text_encoder = lambda texts: encode_texts(clip, tokenizer, texts, device=device)  # noqa: E731
    t0 = time.perf_counter()
    caches = {name: precompute(folders[name], clip, out / "cache" / f"{tags[name]}-grid{cfg.grid}", model_name="testbed",
                               preprocess=clip_preprocess, grid=cfg.grid, device=device, num_workers=0,
                               progress=cfg.progress)
              for name in splits}
    timings["precompute"] = time.perf_counter() - t0
    train_global = caches["train"].global_embeddings()
    # Testbed classes are conjunctions of two concepts ("blue circle"), so every concept is close to some class name:
    # the class-name stage of the label-free filter would remove exactly the concepts the rules use. The tiny text
    # tower also packs its embeddings tightly, hence the higher concept-concept cut-off.
    kept, filter_report = filter_concepts(synthetic.concept_names(), class_names, text_encoder,
                                          class_sim_cutoff=None, concept_sim_cutoff=0.98,
                                          image_embeddings=train_global)
    concepts = list(kept)
    text_emb = text_encoder(concepts)

    def split_tensors(name: str):
        batch, cache = splits[name], caches[name]
        order = _cache_order(cache, folders[name])
        return batch.images[order], batch.labels[order], cache.prompt_embeddings(), order

    tr_img, tr_lab, tr_emb, _ = split_tensors("train")
    va_img, va_lab, va_emb, _ = split_tensors("val")
    te_img, te_lab, _, te_order = split_tensors("test")

    # 3. fit
    t0 = time.perf_counter()
    config = SALFConfig(backbone="testbed", clip="testbed", grid=(cfg.grid, cfg.grid), concepts=concepts,
                        class_names=class_names)
    fit = SALFFitConfig(bottleneck=BottleneckConfig(lr=1e-3, max_steps=400, eval_every=10, patience=8,
                                                    interpretability_cutoff=0.2, seed=cfg.seed),
                        head_options={"n_lambdas": 20, "max_epochs": 40})
    model, fit_report = fit_salf(backbone=backbone, config=config, train=(tr_img, tr_lab, tr_emb),
                                 val=(va_img, va_lab, va_emb), text_emb=text_emb, fit=fit, device=device,
                                 progress=cfg.progress)
    timings["fit"] = time.perf_counter() - t0
    model.save(out / "model")

    # 4. evaluation on fresh scenes
    t0 = time.perf_counter()
    x = normalize_for_backbone(te_img, backbone, device)
    with torch.no_grad():
        salf_pred = model(x).argmax(1).cpu()
        backbone_pred = backbone.model.to(device)(x).argmax(1).cpu()
    masks = _class_object_masks(splits["test"])[te_order]
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
        "concepts_candidates": len(synthetic.concept_names()),
        "concepts_after_filter": len(concepts),
        "concepts_kept": len(model.config.concepts),
        "nonzero_weights_per_class": round(fit_report.nnz_per_class, 2),
        "segmentation_salf": {k: round(v, 4) for k, v in seg_salf.items()},
        "segmentation_gradcam": {k: round(v, 4) for k, v in seg_cam.items()},
        "images": {"train": len(tr_img), "val": len(va_img), "test": len(te_img)},
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
    log.info("concept filter: %s", filter_report)
    return summary


def _cache_order(cache, folder: Path) -> torch.Tensor:
    """Row r of the cache holds the scene exported as index order[r] (the export names files by index)."""
    from fastcbm.data.export import scene_index

    order = torch.tensor([scene_index(f) for f in cache.files], dtype=torch.long)
    if cache.skipped:
        raise ValueError(f"{len(cache.skipped)} exported images in {folder} could not be read back")
    return order
