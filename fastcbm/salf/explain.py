"""SALF-CBM explanations: concept contributions, concept heatmaps, "Explain Anything" region queries, local
interventions and global decision rules. All functions take a :class:`~fastcbm.salf.model.SALFCBM` and images
``[N, 3, S, S]`` normalised for its backbone."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastcbm.salf.model import SALFCBM
from fastcbm.errors import InvalidArgument


def upsample(maps: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """``[N, M, Gy, Gx]`` → ``[N, M, H, W]`` by bilinear upsampling (align_corners=False)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    return F.interpolate(maps.float(), size=size, mode="bilinear", align_corners=False)


def contributions(model: SALFCBM, concepts: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Contribution of each concept to the logit of ``target``: ``W[target, m]·c*[m]`` → ``[N, M]``."""
    return model.head_weight[target] * concepts


@dataclass
class Explanation:
    """One image's explanation. ``heatmaps [k, H, W]`` are the top-k concepts' maps at image resolution."""

    predicted: int
    class_name: str | None
    probabilities: torch.Tensor  # [K]
    contributions: torch.Tensor  # [M] for the predicted (or requested) class
    top_concepts: list[tuple[str, float, float]]  # (name, contribution, standardised activation)
    top_indices: torch.Tensor  # [k]
    heatmaps: torch.Tensor  # [k, H, W]


@torch.no_grad()
def explain(model: SALFCBM, images: torch.Tensor, top_k: int = 5, target: torch.Tensor | None = None) -> list[Explanation]:
    """Predict and explain each image: top-k concepts by contribution to the predicted class (or ``target``),
    with their heatmaps upsampled to the image size."""
    if images.dim() == 3:
        images = images.unsqueeze(0)
    maps = model.concept_maps(images)
    concepts = model.concepts_from_maps(maps)
    logits = model.classify(concepts)
    pred = logits.argmax(dim=1) if target is None else torch.as_tensor(target, device=logits.device).expand(len(images))
    contrib = contributions(model, concepts, pred)
    k = min(top_k, contrib.shape[1])
    top = contrib.topk(k, dim=1).indices
    up = upsample(maps.gather(1, top[:, :, None, None].expand(-1, -1, *maps.shape[-2:])), images.shape[-2:])
    names, classes = model.config.concepts, model.config.class_names
    out = []
    for i in range(len(images)):
        y = int(pred[i])
        out.append(Explanation(
            predicted=y,
            class_name=classes[y] if classes else None,
            probabilities=torch.softmax(logits[i], 0).cpu(),
            contributions=contrib[i].cpu(),
            top_concepts=[(names[j], float(contrib[i, j]), float(concepts[i, j])) for j in top[i].tolist()],
            top_indices=top[i].cpu(),
            heatmaps=up[i].cpu(),
        ))
    return out


@torch.no_grad()
def class_heatmap(model: SALFCBM, images: torch.Tensor, target: torch.Tensor | None = None,
                  positive: bool = True) -> torch.Tensor:
    """Where the evidence for a class is: Σ_m W[y, m]/σ_m · map_m, upsampled to the image → ``[N, H, W]``.

    With mean pooling its spatial mean is the target logit up to a constant (the logit's spatial decomposition).
    ``positive`` keeps only positive evidence (ReLU), as Grad-CAM does; this is the map used for zero-shot
    segmentation."""
    maps = model.concept_maps(images)
    if target is None:
        target = model.classify(model.concepts_from_maps(maps)).argmax(dim=1)
    w = model.head_weight[target] / model.concept_std  # [N, M]
    heat = upsample(torch.einsum("nm,nmhw->nhw", w, maps)[:, None], images.shape[-2:])[:, 0]
    return heat.clamp(min=0) if positive else heat


def _region_mask(region, size: tuple[int, int], device) -> torch.Tensor:
    h, w = size
    if isinstance(region, torch.Tensor):
        if region.dtype != torch.bool or tuple(region.shape) != (h, w):
            raise InvalidArgument(f"region mask must be bool [{h}, {w}], got {region.dtype} {tuple(region.shape)}")
        mask = region.to(device)
    elif len(region) == 2:  # point (y, x)
        y, x = (int(v) for v in region)
        if not (0 <= y < h and 0 <= x < w):
            raise InvalidArgument(f"region point {region} is outside the {h}×{w} image")
        mask = torch.zeros(h, w, dtype=torch.bool, device=device)
        mask[y, x] = True
    elif len(region) == 4:  # box (y0, x0, y1, x1), end-exclusive
        y0, x0, y1, x1 = (int(v) for v in region)
        y0, x0, y1, x1 = max(y0, 0), max(x0, 0), min(y1, h), min(x1, w)
        if y1 <= y0 or x1 <= x0:
            raise InvalidArgument(f"region box {region} is empty inside the {h}×{w} image")
        mask = torch.zeros(h, w, dtype=torch.bool, device=device)
        mask[y0:y1, x0:x1] = True
    else:
        raise InvalidArgument("region must be a point (y, x), a box (y0, x0, y1, x1) or a bool mask [H, W]")
    if not bool(mask.any()):
        raise InvalidArgument("region mask is empty")
    return mask


@torch.no_grad()
def explain_region(model: SALFCBM, image: torch.Tensor, region, top_k: int = 5) -> list[tuple[str, float]]:
    """"Explain Anything": the top-k concepts inside a point, box or mask of one image ``[3, H, W]``.

    Score = the upsampled concept map averaged over the region, standardised with the training statistics of the
    pooled activation so concepts are comparable."""
    if image.dim() == 4:
        if image.shape[0] != 1:
            raise InvalidArgument("explain_region takes one image")
        image = image[0]
    mask = _region_mask(region, tuple(image.shape[-2:]), image.device)
    up = upsample(model.concept_maps(image[None]), image.shape[-2:])[0]  # [M, H, W]
    scores = (up[:, mask].mean(dim=1) - model.concept_mean) / model.concept_std
    k = min(top_k, scores.numel())
    top = scores.topk(k)
    return [(model.config.concepts[i], float(s)) for s, i in zip(top.values.tolist(), top.indices.tolist())]


def _concept_index(model: SALFCBM, concept: int | str) -> int:
    if isinstance(concept, str):
        try:
            return model.config.concepts.index(concept)
        except ValueError:
            raise InvalidArgument(f"concept {concept!r} is not in the model's {len(model.config.concepts)} concepts") from None
    if not 0 <= concept < len(model.config.concepts):
        raise InvalidArgument(f"concept index {concept} out of range [0, {len(model.config.concepts)})")
    return int(concept)


@torch.no_grad()
def intervene(model: SALFCBM, images: torch.Tensor, concept: int | str, beta: float,
              mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Local intervention ``c[m] += β·mask`` on the concept map, then re-classify.

    ``mask``: bool/float ``[H, W]`` at image resolution (area-averaged down to the grid) or ``[Gy, Gx]``; None
    edits every cell. Returns ``(logits_before, logits_after)``, each ``[N, K]``."""
    m = _concept_index(model, concept)
    maps = model.concept_maps(images)
    gy, gx = maps.shape[-2:]
    if mask is None:
        grid_mask = torch.ones(gy, gx, device=maps.device)
    else:
        mask = mask.to(maps.device).float()
        if mask.dim() != 2:
            raise InvalidArgument(f"mask must be [H, W] or [Gy, Gx], got shape {tuple(mask.shape)}")
        grid_mask = mask if tuple(mask.shape) == (gy, gx) else F.adaptive_avg_pool2d(mask[None, None], (gy, gx))[0, 0]
    before = model.classify(model.concepts_from_maps(maps))
    edited = maps.clone()
    edited[:, m] += beta * grid_mask
    after = model.classify(model.concepts_from_maps(edited))
    return before, after


def decision_rules(model: SALFCBM, top: int | None = None) -> dict[str, list[tuple[str, float]]]:
    """Global rules: for each class, its non-zero head weights as (concept, weight), largest |weight| first."""
    rules = {}
    classes = model.config.class_names or [str(i) for i in range(model.head_weight.shape[0])]
    for k, name in enumerate(classes):
        w = model.head_weight[k]
        nz = torch.nonzero(w).flatten()
        order = nz[w[nz].abs().argsort(descending=True)]
        if top is not None:
            order = order[:top]
        rules[name] = [(model.config.concepts[i], float(w[i])) for i in order.tolist()]
    return rules


__all__ = ["Explanation", "class_heatmap", "contributions", "decision_rules", "explain", "explain_region",
           "intervene", "upsample"]
