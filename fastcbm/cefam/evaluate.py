"""CE-FAM concept-localisation evaluation (the paper's Tables 1–2) with the CLIP-Dissect baseline on the same data.

For each image, its present concepts (the dataset's (concept, mask) pairs): CE-FAM's raw regions at every stage
(:func:`fastcbm.cefam.regions.concept_regions`, all present concepts of a batch of images at once) and the layer
association (:func:`fastcbm.cefam.association.association_scores`, softmax over the whole concept set). Two readings:

- ``association_top1`` (paper Table 2): the region of the stage with the highest association score;
- ``oracle_best_layer`` (paper Table 1, an **oracle**: it looks at the ground truth): for each metric, the best of the
  stage candidates.

Metrics (:mod:`fastcbm.metrics`, maps resized to the mask): NRA ``official`` (the authors' code) and ``paper``, EPG,
hit rate (NRA official > 0.5). As published, NRA/EPG average only the pairs *with a map* (not all zero); the hit rate
counts every pair (a pair without a map is a miss). Per concept type (object, part, color, material — whatever types
the data has), then the unweighted mean over types.

CLIP-Dissect (:mod:`fastcbm.cefam.clip_dissect`): soft-WPMI neuron labels from a probe pass (classifier stage
activations + CLIP image embeddings) over the evaluated images, or over ``EvalConfig.probe`` (the testbed evaluations
use :data:`TESTBED_PROBE_SCENES` separate fresh scenes); each concept's region = its best neuron's activation map.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from fastcbm.cefam.datasets import Record, concept_texts
from fastcbm.errors import InvalidArgument

log = logging.getLogger("fastcbm.cefam.evaluate")

# CLIP-Dissect labels a neuron by its top_k = 100 most-activating probe images out of a large probe set (its authors
# probe ImageNet val / Broden). On the testbed, probing the 40-200 evaluated scenes would put most of them into every
# neuron's top 100, which makes soft-WPMI degenerate and the chosen neuron vary with the scenes: the testbed
# evaluations probe this many separate fresh scenes instead (docs/cefam_testbed.md). 0: probe the evaluated scenes.
TESTBED_PROBE_SCENES = 2000


def testbed_probe(n: int = TESTBED_PROBE_SCENES):
    """``n`` fresh testbed scenes for CLIP-Dissect's probe pass, disjoint from the demo's and the CLI's test scenes
    (None for ``n = 0``: the evaluated scenes are probed)."""
    from fastcbm.cefam.datasets import TestbedDataset
    from fastcbm.data.synthetic import TRAINING_SEED_LIMIT

    if n < 0:
        raise InvalidArgument(f"the probe set size must be >= 0, got {n}")
    return TestbedDataset(n, seed=TRAINING_SEED_LIMIT + 777_000) if n else None


ORACLE_NOTE = ("oracle_best_layer is an oracle (paper Table 1): for each pair and metric it takes the best of the "
               "stage candidates, using the ground-truth mask; association_top1 (paper Table 2) is what a user gets")


@dataclass
class EvalConfig:
    """Options of :func:`evaluate_cefam`. ``batch_size``: images per region / association call; ``method``: the
    region op's ``"batched"`` (default) or ``"loop"`` reference; ``association_variant``: ``"official"`` | ``"paper"``;
    ``top_k``: channels masked by the association; ``baseline``: also run CLIP-Dissect; ``wpmi_top_k``: probe images
    per neuron for soft-WPMI (capped at the number of images); ``backend``: metrics backend."""
    batch_size: int = 16
    method: str = "batched"
    association_variant: str = "official"
    top_k: int = 20
    baseline: bool = True
    wpmi_top_k: int = 100
    backend: str = "auto"
    progress: bool = True
    device: str = "cpu"
    keep_pairs: bool = False  # also return every pair's per-stage scores (``pair_scores``)
    probe: object | None = None  # CLIP-Dissect's probe images (a dataset reader); None: the evaluated images


# ---------------------------------------------------------------------------------------------------- input helpers
def group_images(records: Iterable[Record], batch_size: int) -> Iterator[list[list[Record]]]:
    """Consecutive records of one image (same ``key``) form an image; ``batch_size`` images form a batch."""
    batch: list[list[Record]] = []
    current: list[Record] = []
    for rec in records:
        if current and rec.key != current[0].key:
            batch.append(current)
            current = []
            if len(batch) == batch_size:
                yield batch
                batch = []
        current.append(rec)
    if current:
        batch.append(current)
    if batch:
        yield batch


def to_input(images: Sequence[torch.Tensor], size: int, mean, std, device) -> torch.Tensor:
    """uint8 ``[3, H, W]`` images → normalised ``[B, 3, size, size]`` (whole image resized, bilinear: no crop, so
    the masks stay aligned with the maps)."""
    from fastcbm.models.inputs import normalize_uint8

    return torch.cat([normalize_uint8(im[None], mean, std, device=device, size=size) for im in images])


def clip_input_config(clip_model, preprocess=None) -> tuple[int, tuple, tuple]:
    """``(size, mean, std)`` of a CLIP image tower (fastcbm.precompute's reading of open_clip's preprocess)."""
    from fastcbm.models.inputs import encoder_input_config

    return encoder_input_config(clip_model, preprocess)


def concept_set(dataset, text_emb: torch.Tensor | None = None) -> tuple[list[str], list[str], dict[str, int]]:
    """``(names, types, index)`` of the dataset's concept set (its ``concepts`` / ``types``)."""
    names, types = list(dataset.concepts), list(dataset.types)
    if not names:
        raise InvalidArgument("the concept list is empty: nothing to evaluate")
    if text_emb is not None and text_emb.shape[0] != len(names):
        raise InvalidArgument(f"text_emb has {text_emb.shape[0]} rows but the dataset has {len(names)} concepts")
    return names, types, {n: i for i, n in enumerate(names)}


def encode_concepts(clip_model, tokenizer, dataset, *, progress: bool = False) -> torch.Tensor:
    """Unit text embeddings ``[T, D]`` of the dataset's concepts with its prompt templates."""
    from fastcbm.concepts import encode_texts

    names, types, _ = concept_set(dataset)
    texts = concept_texts(names, types, getattr(dataset, "templates", None))
    return encode_texts(clip_model, tokenizer, texts, progress=progress)


# -------------------------------------------------------------------------------------------------------- metrics
class _PairScores:
    """Per-pair metric rows for one method: ``[P, L]`` (L candidates; 1 for single-map methods)."""

    def __init__(self):
        self.nra: list[torch.Tensor] = []
        self.nra_paper: list[torch.Tensor] = []
        self.epg: list[torch.Tensor] = []
        self.has: list[torch.Tensor] = []

    def add(self, nra, nra_paper, epg, has):
        self.nra.append(nra)
        self.nra_paper.append(nra_paper)
        self.epg.append(epg)
        self.has.append(has)

    def cat(self) -> dict[str, torch.Tensor]:
        return {k: torch.cat(getattr(self, k)) for k in ("nra", "nra_paper", "epg", "has")}


def map_metrics(maps: torch.Tensor, masks: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, ...]:
    """``(nra official, nra paper, epg, has_map)`` each ``[P]`` for maps ``[P, h, w]`` and masks ``[P, H, W]``."""
    from fastcbm import metrics

    maps = maps.detach().float().cpu()
    masks = masks.cpu()
    has = maps.flatten(1).amax(1) > 0
    return (metrics.nra(maps, masks, "official", backend=backend), metrics.nra(maps, masks, "paper", backend=backend),
            metrics.epg(maps, masks, backend=backend), has)


def _score_maps(maps: list[torch.Tensor], masks: list[torch.Tensor], backend: str) -> tuple[torch.Tensor, ...]:
    """Metrics of pair ``p``'s map ``maps[p] [h, w]`` (maps may differ in resolution) against ``masks[p]``."""
    n = len(maps)
    out = [torch.zeros(n, dtype=torch.float64) for _ in range(3)] + [torch.zeros(n, dtype=torch.bool)]
    groups: dict[tuple, list[int]] = {}
    for p, (m, k) in enumerate(zip(maps, masks)):
        groups.setdefault((tuple(m.shape), tuple(k.shape)), []).append(p)
    for idx in groups.values():
        res = map_metrics(torch.stack([maps[p] for p in idx]), torch.stack([masks[p] for p in idx]), backend)
        ii = torch.tensor(idx)
        for o, r in zip(out, res):
            o[ii] = r.to(o.dtype)
    return tuple(out)


def summarize(types: Sequence[str], nra: torch.Tensor, nra_paper: torch.Tensor, epg: torch.Tensor,
              has: torch.Tensor) -> dict:
    """Per concept type and mean over types: NRA / NRA (paper) / EPG over pairs with a map, hit rate over all."""
    per_type: dict[str, dict] = {}
    for t in sorted(set(types), key=lambda s: (["object", "part", "color", "material"] + [s]).index(s)):
        sel = torch.tensor([x == t for x in types])
        with_map = sel & has
        n_map = int(with_map.sum())
        per_type[t] = {
            "nra": float(nra[with_map].mean()) if n_map else 0.0,
            "nra_paper": float(nra_paper[with_map].mean()) if n_map else 0.0,
            "epg": float(epg[with_map].mean()) if n_map else 0.0,
            "hit_rate": float(((nra > 0.5) & has)[sel].double().mean()),
            "pairs": int(sel.sum()), "pairs_with_map": n_map,
        }
    keys = ("nra", "nra_paper", "epg", "hit_rate")
    mean = {k: (sum(v[k] for v in per_type.values()) / len(per_type) if per_type else 0.0) for k in keys}
    return {"per_type": _rounded(per_type), "mean": _rounded(mean)}


def _rounded(d):
    if isinstance(d, dict):
        return {k: _rounded(v) for k, v in d.items()}
    return round(d, 4) if isinstance(d, float) else d


# -------------------------------------------------------------------------------------------------------- the loop
def _probe(model, clip_model, clip_cfg, dataset, cfg: EvalConfig) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """CLIP-Dissect's probe pass: pooled stage activations ``[N, C_l]`` and CLIP image embeddings ``[N, D]``."""
    bb = model.backbone
    pooled: dict[str, list[torch.Tensor]] = {layer: [] for layer in model.layers}
    embs = []
    n_img = len(dataset) if hasattr(dataset, "__len__") else None
    with torch.no_grad(), tqdm(total=n_img, desc="CLIP-Dissect probe", disable=not cfg.progress, leave=False) as bar:
        for batch in group_images(dataset, cfg.batch_size):
            images = [recs[0].image for recs in batch]
            _, acts = model.stages(to_input(images, bb.input_size, bb.mean, bb.std, cfg.device))
            for layer in model.layers:
                pooled[layer].append(acts[layer].mean(dim=(2, 3)).cpu())
            xc = to_input(images, clip_cfg[0], clip_cfg[1], clip_cfg[2], cfg.device)
            embs.append(clip_model.encode_image(xc).float().cpu())
            bar.update(len(batch))
    if not embs:
        raise InvalidArgument("CLIP-Dissect's probe set holds no images (EvalConfig.probe or the evaluated dataset)")
    return {k: torch.cat(v) for k, v in pooled.items()}, torch.cat(embs)


def evaluate_cefam(model, dataset, *, text_emb: torch.Tensor, clip_model=None, clip_preprocess=None,
                   config: EvalConfig | None = None) -> dict:
    """Evaluate a :class:`~fastcbm.cefam.model.CEFAM` on a dataset reader (:mod:`fastcbm.cefam.datasets`).

    Args:
        model: the CE-FAM model (classifier + translator).
        dataset: a re-iterable of :class:`~fastcbm.cefam.datasets.Record` with ``concepts`` / ``types`` lists (the
            concept set: the association's softmax and CLIP-Dissect's labels run over all of it).
        text_emb: ``[T, D]`` text embeddings of ``dataset.concepts`` (see :func:`encode_concepts`).
        clip_model: the CLIP model (``encode_image``) for the CLIP-Dissect probe pass; needed when
            ``config.baseline``.

    Returns:
        A JSON-ready dict: ``cefam.association_top1`` and ``cefam.oracle_best_layer`` (each ``per_type`` + ``mean``),
        ``clip_dissect`` (same), ``layer_choice`` counts, sizes, timings and the oracle note.
    """
    cfg = config or EvalConfig()
    if cfg.batch_size < 1:
        raise InvalidArgument(f"batch_size must be >= 1, got {cfg.batch_size}")
    names, _, index = concept_set(dataset, text_emb)
    from fastcbm.cam import fuse
    from fastcbm.cefam.association import association_scores
    from fastcbm.cefam.regions import concept_grads

    layers = model.layers
    c = model.config
    bb = model.backbone
    device = torch.device(cfg.device)
    text_emb = text_emb.to(device)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    dissection = None
    if cfg.baseline:
        if clip_model is None:
            raise InvalidArgument("the CLIP-Dissect baseline needs clip_model (or set baseline=False)")
        from fastcbm.cefam.clip_dissect import dissect

        probe = dataset if cfg.probe is None else cfg.probe
        pooled, clip_emb = _probe(model, clip_model, clip_input_config(clip_model, clip_preprocess), probe, cfg)
        probe_info = {"probe_images": int(clip_emb.shape[0]),
                      "probe": "the evaluated images" if cfg.probe is None else "a separate probe set"}
        dissection = dissect(pooled, clip_emb, text_emb.cpu(), layers, top_k=cfg.wpmi_top_k)
        timings["clip_dissect_probe"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    cefam_rows, base_rows = _PairScores(), _PairScores()
    chosen_all: list[torch.Tensor] = []
    assoc_all: list[torch.Tensor] = []
    z_spread: list[torch.Tensor] = []
    pair_types: list[str] = []
    pair_keys: list[str] = []
    pair_names: list[str] = []
    seen: set[int] = set()
    n_images = 0
    n_img = len(dataset) if hasattr(dataset, "__len__") else None
    with tqdm(total=n_img, desc="CE-FAM evaluation", disable=not cfg.progress) as bar:
        for batch in group_images(dataset, cfg.batch_size):
            images = [recs[0].image for recs in batch]
            x = to_input(images, bb.input_size, bb.mean, bb.std, device)
            pairs = [(b, r) for b, recs in enumerate(batch) for r in recs]
            for _, r in pairs:
                if r.concept not in index:
                    raise InvalidArgument(f"concept {r.concept!r} of {r.key} is not in the dataset's concept list")
            present = sorted({index[r.concept] for _, r in pairs})
            col = {t: j for j, t in enumerate(present)}
            img_idx = torch.tensor([b for b, _ in pairs])
            con_idx = torch.tensor([index[r.concept] for _, r in pairs])
            masks = [r.mask for _, r in pairs]
            # one gradient pass for the whole concept set (the association's softmax needs all of it); the regions
            # of the batch's present concepts are one fusion GEMM per stage from the same β
            grads = concept_grads(model.classifier, model.translator, x, text_emb, layers, method=cfg.method,
                                  logit_scale=c.logit_scale, bias=c.bias, kind=c.kind,
                                  num_prefix_tokens=c.num_prefix_tokens)
            with torch.no_grad():
                maps = {n: fuse(grads.betas[n][:, present].contiguous(), grads.maps[n]) for n in layers}
            assoc = association_scores(model.classifier, model.translator, x, text_emb, layers, top_k=cfg.top_k,
                                       variant=cfg.association_variant, logit_scale=c.logit_scale, bias=c.bias,
                                       method=cfg.method, kind=c.kind, num_prefix_tokens=c.num_prefix_tokens,
                                       grads=grads)
            chosen_all.append(assoc[img_idx, con_idx].argmax(-1).cpu())
            assoc_all.append(assoc[img_idx, con_idx].detach().cpu())
            with torch.no_grad():  # per image, the spread over channels of each pooled stage (the masking's scale)
                widths = [grads.maps[n].shape[1] for n in layers]
                z_spread.append(torch.stack([zl.std(dim=1) for zl in grads.z.split(widths, dim=1)], dim=1).cpu())
            sel_col = torch.tensor([col[int(t)] for t in con_idx])
            per_layer = [_score_maps(list(maps[layer][img_idx, sel_col].detach().cpu()), masks, cfg.backend)
                         for layer in layers]
            cefam_rows.add(*(torch.stack([pl[i] for pl in per_layer], dim=1) for i in range(4)))
            if dissection is not None:
                from fastcbm.cefam.clip_dissect import neuron_maps

                with torch.no_grad():
                    _, acts = model.stages(x)
                bmaps: list[torch.Tensor | None] = [None] * len(pairs)
                for pos, m in neuron_maps(acts, dissection, img_idx, con_idx).values():
                    for p, mm in zip(pos.tolist(), m.cpu()):
                        bmaps[p] = mm
                base_rows.add(*(r[:, None] for r in _score_maps(bmaps, masks, cfg.backend)))
            pair_types += [r.concept_type for _, r in pairs]
            pair_keys += [r.key for _, r in pairs]
            pair_names += [r.concept for _, r in pairs]
            seen.update(con_idx.tolist())
            n_images += len(batch)
            bar.update(len(batch))
    timings["cefam_and_metrics"] = time.perf_counter() - t0
    if not pair_types:
        raise InvalidArgument("the dataset yielded no (image, concept, mask) pairs")

    rows = cefam_rows.cat()
    chosen = torch.cat(chosen_all)
    pick = chosen.view(-1, 1)
    top1 = {k: v.gather(1, pick)[:, 0] for k, v in rows.items()}
    # oracle: the best candidate per metric among the stages that have a map
    has_any = rows["has"].any(1)
    masked = {k: torch.where(rows["has"], rows[k], torch.full_like(rows[k], -1.0)) for k in ("nra", "nra_paper", "epg")}
    oracle = {k: v.amax(1).clamp_min(0) for k, v in masked.items()}
    result = {
        "images": n_images,
        "pairs": len(pair_types),
        "concepts": len(names),
        "layers": list(layers),
        "note": ORACLE_NOTE,
        "cefam": {
            "association_top1": summarize(pair_types, top1["nra"], top1["nra_paper"], top1["epg"], top1["has"]),
            "oracle_best_layer": summarize(pair_types, oracle["nra"], oracle["nra_paper"], oracle["epg"], has_any),
            "layer_choice": {layer: int((chosen == i).sum()) for i, layer in enumerate(layers)},
            # each stage on its own (every pair read at that stage): where the association's choices land
            "per_layer": {layer: summarize(pair_types, rows["nra"][:, i], rows["nra_paper"][:, i], rows["epg"][:, i],
                                           rows["has"][:, i])["mean"] for i, layer in enumerate(layers)},
            "association_variant": cfg.association_variant,
            # why a stage wins: its mean association score over the pairs, and the spread over channels of its
            # pooled activations z^l (masking replaces the top channels by the channel mean, so a stage whose z^l
            # spreads wider perturbs the translator input more, whatever the concept)
            "stage_diagnostics": {layer: {"association_mean": round(float(a), 4), "z_channel_std": round(float(z), 4)}
                                  for layer, a, z in zip(layers, torch.cat(assoc_all).mean(0).tolist(),
                                                         torch.cat(z_spread).mean(0).tolist())},
        },
    }
    if dissection is not None:
        b = base_rows.cat()
        result["clip_dissect"] = summarize(pair_types, b["nra"][:, 0], b["nra_paper"][:, 0], b["epg"][:, 0],
                                           b["has"][:, 0])
        result["clip_dissect"]["neurons"] = {names[t]: {"layer": dissection.neuron[t][0],
                                                        "channel": dissection.neuron[t][1]}
                                             for t in sorted(seen)}
        result["clip_dissect"].update(probe_info)
    if cfg.keep_pairs:
        result["pair_scores"] = {"keys": pair_keys, "concepts": pair_names, "types": pair_types,
                                 "chosen": chosen.tolist(), "association": torch.cat(assoc_all).tolist(),
                                 **{k: v.tolist() for k, v in rows.items()}}
        if dissection is not None:
            result["pair_scores"]["clip_dissect"] = {k: v[:, 0].tolist() for k, v in b.items()}
    result["seconds"] = {k: round(v, 2) for k, v in timings.items()}
    result["images_per_second"] = round(n_images / max(timings["cefam_and_metrics"], 1e-9), 3)
    return result


def evaluate_model_dir(model_dir, data: str, path=None, *, config: EvalConfig | None = None, n: int | None = None,
                       seed: int | None = None, **dataset_options) -> dict:
    """Load a saved CE-FAM model and its CLIP, open ``data`` (broden | imagenet-s | testbed) and evaluate."""
    from fastcbm.cefam.datasets import open_dataset
    from fastcbm.cefam.model import load_cefam
    from fastcbm.models import load_clip

    cfg = config or EvalConfig()
    if data == "testbed":
        if n is not None:
            dataset_options["n"] = n
        if seed is not None:
            dataset_options["seed"] = seed
    dataset = open_dataset(data, path, **dataset_options)
    model = load_cefam(model_dir, map_location=cfg.device)
    clip_model, clip_pre, tokenizer = load_clip(model.config.clip_model, model.config.clip_pretrained,
                                                device=cfg.device)
    text_emb = encode_concepts(clip_model, tokenizer, dataset, progress=cfg.progress)
    if text_emb.shape[1] != model.config.embed_dim:
        raise InvalidArgument(f"the CLIP model {model.config.clip_model!r} gives {text_emb.shape[1]}-d text embeddings but "
                              f"the translator outputs {model.config.embed_dim}")
    result = evaluate_cefam(model, dataset, text_emb=text_emb, clip_model=clip_model, clip_preprocess=clip_pre,
                            config=cfg)
    result["data"] = data
    result["path"] = None if path is None else str(path)
    result["data_options"] = {k: (v if isinstance(v, (bool, int, float)) or v is None else str(v))
                              for k, v in dataset_options.items()}
    return result


__all__ = [
    "ORACLE_NOTE",
    "EvalConfig",
    "encode_concepts",
    "evaluate_cefam",
    "evaluate_model_dir",
    "testbed_probe",
    "group_images",
    "map_metrics",
    "summarize",
    "to_input",
]
