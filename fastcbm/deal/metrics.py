"""DEAL's explanation metrics, done right (pure PyTorch, batched).

- **Disentanglability** (paper Table 2; the authors' ``exp_disentanglability`` notebook): the separation of each image's
  K concept maps, each min-max normalised (+1e-8) at the explanation's own resolution,
  R_sep = Σ_{i>j} Σ_pixels ĝ_i·ĝ_j, averaged over images; metric = σ(10·(0.2 − R̄_sep/100)) (at most σ(2) ≈ 0.881,
  reached when no two concept maps overlap). The raw mean separation is reported next to it: the sigmoid saturates.
- **Localizability** (paper Table 4; the authors' ``exp_localizability`` notebook): concept-level insertion. The canvas
  is the image blurred by a 0.5× bilinear downsample and a bilinear upsample back; the concept map (bicubic-upsampled to
  the image) ranks the pixels; at step t of T the top ⌊t/T·H·W⌋ pixels are copied from the image into the canvas, in
  **all three channels** (the notebook indexes the flattened C·H·W tensor with H·W ranks, so it copies red values
  only). Score s = cosine(image embedding, the concept's text embedding); fidelity = mean over the T = 5 steps of
  clamp(|s_t − s_blur| / |s_orig − s_blur|, 0, 1). **Each image is paired with its own K maps and texts**
  (``repeat_interleave`` order; the notebook uses ``images.repeat(K, ...)`` against maps ordered image-major, so
  most triples mix one image with another image's maps). Pairs with s_orig = s_blur (no signal to normalise) are
  skipped and counted (the notebook skips whole NaN batches). Also the insertion-curve AUC: the same normalised
  change at ``curve_steps`` + 1 evenly spaced fractions 0…1, trapezoid rule.
- **Accuracy with concepts** (paper eq. 6, Menon & Vondrick's classification by description): the class score is the
  mean cosine of the image to the class's descriptor sentences "{class}, which has {descriptor}."; reported next to
  plain zero-shot accuracy ("a photo of a {class}.") computed with the same model.
- **Part / region mIoU** of concept maps against ground-truth concept masks: each map upsampled bilinearly, min-max
  normalised, foreground where it exceeds its own mean (the zero-shot segmentation protocol of
  :mod:`fastcbm.metrics.segmentation`); intersections and unions accumulated per concept over the set; mIoU = mean
  over concepts of the foreground IoU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import torch
import torch.nn.functional as F

from fastcbm.errors import InvalidArgument

EPS = 1e-8  # the authors' min-max epsilon


# ---- disentanglability ---------------------------------------------------------------------------------------------
def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Per-map min-max normalisation over the last two axes, ``(g − min) / (max − min + 1e-8)`` (the authors' form)."""
    from fastcbm.cam.reference import minmax_normalize

    return minmax_normalize(maps, eps=EPS)


def separation_per_image(concept_maps: torch.Tensor) -> torch.Tensor:
    """``[B, K, h, w]`` concept maps (category map excluded) → float64 ``[B]``: Σ_{i>j} Σ_pixels ĝ_i·ĝ_j.

    Uses Σ_{i>j} a_i·a_j = ((Σ_i a_i)² − Σ_i a_i²) / 2 per pixel: O(K) instead of O(K²) products.
    """
    if concept_maps.dim() != 4:
        raise InvalidArgument(f"concept_maps must have shape [B, K, h, w], got {tuple(concept_maps.shape)}")
    g = normalize_maps(concept_maps.detach().to(torch.float64))
    total = g.sum(dim=1)
    return ((total * total - (g * g).sum(dim=1)) / 2).sum(dim=(-2, -1))


def disentanglability_from_separation(mean_separation: float, k: float = 10.0, m: float = 0.2) -> float:
    """The authors' ``sigmoid_metric``: σ(k·(m − R̄_sep/100))."""
    return 1.0 / (1.0 + math.exp(-k * (m - mean_separation / 100.0)))


def disentanglability(concept_maps: torch.Tensor) -> dict[str, float]:
    """``{"disentanglability", "mean_separation"}`` of ``[B, K, h, w]`` concept maps (each image's K concepts)."""
    sep = separation_per_image(concept_maps)
    mean = float(sep.mean())
    return {"disentanglability": disentanglability_from_separation(mean), "mean_separation": mean}


# ---- localizability ------------------------------------------------------------------------------------------------
def blur(images: torch.Tensor) -> torch.Tensor:
    """The insertion canvas: 0.5× bilinear downsample, bilinear upsample back (``[N, C, H, W]``)."""
    h, w = images.shape[-2:]
    small = F.interpolate(images, scale_factor=0.5, mode="bilinear", align_corners=False)
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)


def pixel_ranks(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[N, h, w]`` maps → long ``[N, H·W]``: each pixel's rank (0 = most important) after a bicubic upsample to
    ``size`` (as the notebook); ties keep the lower flat index first (stable sort)."""
    up = maps.to(torch.float32)
    if tuple(up.shape[-2:]) != tuple(size):
        up = F.interpolate(up[:, None], size=tuple(size), mode="bicubic", align_corners=False)[:, 0]
    flat = up.reshape(up.shape[0], -1)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks


def insertion_images(images: torch.Tensor, canvas: torch.Tensor, ranks: torch.Tensor,
                     fractions: Sequence[float | Fraction]) -> torch.Tensor:
    """``[N, C, H, W]`` images and canvases, ``[N, H·W]`` ranks → ``[N, T, C, H, W]``: at fraction f the top
    ⌊f·H·W⌋ pixels come from the image, in every channel, the rest from the canvas."""
    n, _c, h, w = images.shape
    # exact floor(f·H·W): a float product can land just below an integer (0.29·100 = 28.999…)
    fr = [Fraction(f).limit_denominator(1 << 20) for f in fractions]
    counts = torch.tensor([f.numerator * h * w // f.denominator for f in fr], device=images.device)
    keep = (ranks[:, None, :] < counts[None, :, None]).view(n, len(fractions), 1, h, w)
    return torch.where(keep, images[:, None], canvas[:, None])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-6)  # the notebook's eps


@torch.no_grad()
def insertion_scores(model, images: torch.Tensor, text_emb: torch.Tensor, maps: torch.Tensor, *, steps: int = 5,
                     curve_steps: int = 20, chunk: int = 64) -> dict[str, torch.Tensor]:
    """Concept-level insertion of every (image, concept) pair.

    images: normalised ``[B, 3, H, W]`` (the encoder's input); text_emb: ``[B, K, D]`` concept text embeddings
    (row k of image b is concept k of image b); maps: ``[B, K, h, w]`` the matching concept maps. ``model`` needs
    ``encode_image``. ``chunk``: images per ``encode_image`` call. Returns ``fidelity`` and ``auc`` float ``[B, K]``
    (NaN where skipped), ``valid`` bool ``[B, K]`` (False where s_orig = s_blur), ``s_orig``/``s_blur`` ``[B, K]``.
    """
    if images.dim() != 4 or maps.dim() != 4 or text_emb.dim() != 3:
        raise InvalidArgument("insertion_scores wants images [B, 3, H, W], text_emb [B, K, D] and maps [B, K, h, w]; got "
                              f"{tuple(images.shape)}, {tuple(text_emb.shape)}, {tuple(maps.shape)}")
    b, k = maps.shape[:2]
    if images.shape[0] != b or tuple(text_emb.shape[:2]) != (b, k):
        raise InvalidArgument(f"images {tuple(images.shape)}, text_emb {tuple(text_emb.shape)} and maps "
                              f"{tuple(maps.shape)} must agree on B (and K)")
    if steps < 1 or curve_steps < 1:
        raise InvalidArgument(f"steps and curve_steps must be >= 1, got {steps}, {curve_steps}")
    h, w = images.shape[-2:]
    canvas = blur(images)

    def encode(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([model.encode_image(x[i:i + chunk]).float() for i in range(0, x.shape[0], chunk)])

    e_orig, e_blur = encode(images), encode(canvas)  # one pass per image, shared by its K concepts
    s_orig = _cosine(e_orig[:, None], text_emb)  # [B, K]
    s_blur = _cosine(e_blur[:, None], text_emb)
    # the distinct fractions below 1 (fraction 1 is the image itself: its change is exactly 1, no pass needed)
    step_fr = [Fraction(t, steps) for t in range(1, steps + 1)]
    curve_fr = [Fraction(t, curve_steps) for t in range(curve_steps + 1)]
    fracs = sorted({f for f in step_fr + curve_fr if 0 < f < 1})
    col = {f: i for i, f in enumerate(fracs)}
    n_f = len(fracs)
    # pair p = b·K + k: the image index is p // K (repeat_interleave), the map and text are row p
    img_of_pair = torch.arange(b, device=images.device).repeat_interleave(k)
    ranks = pixel_ranks(maps.reshape(b * k, *maps.shape[-2:]), (h, w))
    texts = text_emb.reshape(b * k, -1)
    s_ins = torch.empty(b * k, n_f, device=images.device)
    pairs_per_chunk = max(1, chunk // max(n_f, 1))
    for p0 in range(0, b * k if n_f else 0, pairs_per_chunk):
        sl = slice(p0, min(p0 + pairs_per_chunk, b * k))
        idx = img_of_pair[sl]
        x = insertion_images(images[idx], canvas[idx], ranks[sl], fracs)  # [P, T, 3, H, W]
        e = encode(x.reshape(-1, *x.shape[2:])).view(x.shape[0], n_f, -1)
        s_ins[sl] = _cosine(e, texts[sl, None])
    s_ins = s_ins.view(b, k, n_f)
    denom = (s_orig - s_blur).abs()
    valid = denom > 1e-6
    safe = torch.where(valid, denom, torch.ones_like(denom))

    def change(f: Fraction) -> torch.Tensor:  # clamp(|s_f - s_blur| / |s_orig - s_blur|, 0, 1), [B, K]
        if f == 0:
            return torch.zeros_like(denom)
        if f == 1:
            return torch.ones_like(denom)
        return ((s_ins[..., col[f]] - s_blur).abs() / safe).clamp(0, 1)

    fidelity = torch.stack([change(f) for f in step_fr], -1).mean(-1)
    curve = torch.stack([change(f) for f in curve_fr], -1)  # trapezoid rule over fractions 0..1
    auc = (curve[..., 1:] + curve[..., :-1]).sum(-1) / (2 * curve_steps)
    nan = torch.full_like(fidelity, float("nan"))
    return {"fidelity": torch.where(valid, fidelity, nan), "auc": torch.where(valid, auc, nan), "valid": valid,
            "s_orig": s_orig, "s_blur": s_blur}


def localizability(model, images: torch.Tensor, text_emb: torch.Tensor, maps: torch.Tensor, **kw) -> dict[str, float]:
    """``{"localizability", "insertion_auc", "pairs", "skipped"}`` over the (image, concept) pairs of one batch;
    see :func:`insertion_scores` for the arguments."""
    return summarize_insertion([insertion_scores(model, images, text_emb, maps, **kw)])


def summarize_insertion(results: Sequence[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Mean fidelity and AUC over the valid pairs of several :func:`insertion_scores` results."""
    valid = torch.cat([r["valid"].reshape(-1).cpu() for r in results])
    fid = torch.cat([r["fidelity"].reshape(-1).cpu() for r in results])[valid]
    auc = torch.cat([r["auc"].reshape(-1).cpu() for r in results])[valid]
    return {"localizability": float(fid.mean()) if fid.numel() else float("nan"),
            "insertion_auc": float(auc.mean()) if auc.numel() else float("nan"),
            "pairs": int(valid.numel()), "skipped": int((~valid).sum())}


# ---- accuracy with concepts ----------------------------------------------------------------------------------------
DESCRIPTOR_TEMPLATE = "{cls}, which has {descriptor}."
CLASS_TEMPLATE = "a photo of a {cls}."


def descriptor_sentences(class_names: Sequence[str], concepts: dict[str, Sequence[str]],
                         template: str = DESCRIPTOR_TEMPLATE) -> list[list[str]]:
    """Per class (in ``class_names`` order) its descriptor sentences, e.g. "tench, which has a long body."."""
    out = []
    for c in class_names:
        if not concepts.get(c):
            raise InvalidArgument(f"concepts: the class {c!r} has no descriptors")
        out.append([template.format(cls=c, descriptor=d) for d in concepts[c]])
    return out


@torch.no_grad()
def accuracy_with_concepts(image_emb: torch.Tensor, labels: torch.Tensor, descriptor_emb: Sequence[torch.Tensor],
                           class_emb: torch.Tensor) -> dict[str, float]:
    """Concept-based accuracy (eq. 6) and plain zero-shot accuracy from embeddings.

    image_emb ``[N, D]``; labels long ``[N]``; descriptor_emb: per class a ``[M_c, D]`` tensor (classes may have
    different numbers of descriptors); class_emb ``[C, D]``. Embeddings need not be normalised.
    """
    if len(descriptor_emb) != class_emb.shape[0]:
        raise InvalidArgument(f"descriptor_emb has {len(descriptor_emb)} classes, class_emb {class_emb.shape[0]}")
    img = F.normalize(image_emb.float(), dim=-1)
    scores = torch.stack([(img @ F.normalize(d.float(), dim=-1).T).mean(1) for d in descriptor_emb], dim=1)
    zero_shot = img @ F.normalize(class_emb.float(), dim=-1).T
    labels = labels.to(img.device)
    return {"concept_accuracy": float((scores.argmax(1) == labels).float().mean()),
            "zero_shot_accuracy": float((zero_shot.argmax(1) == labels).float().mean())}


# ---- part / region mIoU ---------------------------------------------------------------------------------------------
class PartIoU:
    """Streaming per-concept IoU of concept maps against concept masks: ``update(maps, masks, concept_ids)`` per
    batch, then ``compute()``. Foreground = normalised map > its own mean (zero-shot segmentation protocol)."""

    def __init__(self, concept_names: Sequence[str]) -> None:
        self.names = list(concept_names)
        self.inter = torch.zeros(len(self.names), dtype=torch.float64)
        self.union = torch.zeros(len(self.names), dtype=torch.float64)
        self.count = torch.zeros(len(self.names), dtype=torch.int64)

    def update(self, maps: torch.Tensor, masks: torch.Tensor, concept_ids: torch.Tensor) -> None:
        """maps float ``[N, h, w]``, masks bool ``[N, H, W]``, concept_ids long ``[N]`` (index into the names).
        Pairs whose mask is empty are ignored (the concept is not in that image)."""
        from fastcbm.metrics._common import check_maps_masks
        from fastcbm.metrics.segmentation import normalised_heatmaps

        check_maps_masks(maps, masks, maps_name="maps")
        ids = torch.as_tensor(concept_ids, dtype=torch.long).cpu()
        if ids.shape != (maps.shape[0],):
            raise InvalidArgument(f"concept_ids must have shape [{maps.shape[0]}], got {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(self.names)):
            raise InvalidArgument(f"concept_ids must be in [0, {len(self.names)}), got {ids.min()}..{ids.max()}")
        n, h, w = masks.shape
        r = normalised_heatmaps(maps, (h, w)).reshape(n, -1).to(torch.float64)
        pred = r > r.mean(1, keepdim=True)
        gt = masks.reshape(n, -1)
        keep = gt.any(1).cpu()
        inter = (pred & gt).sum(1).to(torch.float64).cpu()
        union = (pred | gt).sum(1).to(torch.float64).cpu()
        self.inter.index_add_(0, ids[keep], inter[keep])
        self.union.index_add_(0, ids[keep], union[keep])
        self.count.index_add_(0, ids[keep], torch.ones(int(keep.sum()), dtype=torch.int64))

    def compute(self) -> dict:
        """``{"part_miou", "per_concept": {name: iou}, "pairs"}`` over the concepts seen at least once."""
        seen = self.count > 0
        iou = self.inter / self.union.clamp_min(1)
        per = {self.names[i]: float(iou[i]) for i in range(len(self.names)) if seen[i]}
        return {"part_miou": float(iou[seen].mean()) if bool(seen.any()) else float("nan"), "per_concept": per,
                "pairs": int(self.count.sum())}


def part_miou(maps: torch.Tensor, masks: torch.Tensor, concept_ids: torch.Tensor,
              concept_names: Sequence[str]) -> dict:
    """One-shot :class:`PartIoU`: per-concept IoU accumulated over the pairs, mean over concepts."""
    acc = PartIoU(concept_names)
    acc.update(maps, masks, concept_ids)
    return acc.compute()
