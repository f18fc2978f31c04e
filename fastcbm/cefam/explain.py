"""Explain images with a CE-FAM model: the top concepts by concept score, each with its region at the stage chosen by
the layer association, the association scores and the concept's contribution to the predicted class.

One gradient pass per batch serves everything (:func:`fastcbm.cefam.regions.concept_grads` over the whole concept
set: the association's softmax needs all of it); the regions and contributions are computed only for the top concepts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from fastcbm.errors import InvalidArgument, InvalidFile, MissingFile

TOP_K = 8  # the authors explain the top-8 predicted concepts


@dataclass
class ConceptExplanation:
    """One concept of an explanation: ``score`` S_t = s·cos(h, t) + b, the chosen ``layer`` (association argmax),
    ``association`` per stage, ``contribution`` to the predicted class (relative-drop AUC)."""
    concept: str
    score: float
    layer: str
    association: dict[str, float]
    contribution: float


@dataclass
class CEFAMExplanation:
    """Explanation of one image. ``regions``: float ``[k, H, W]`` raw maps at the chosen stage, bilinear-resized to
    the input's size (not normalised), in the order of ``concepts``."""
    predicted: int
    class_name: str | None
    probabilities: torch.Tensor
    concepts: list[ConceptExplanation] = field(default_factory=list)
    regions: torch.Tensor | None = None

    def to_json(self) -> dict:
        p = float(self.probabilities[self.predicted])
        return {"predicted": self.class_name or self.predicted, "probability": round(p, 4),
                "concepts": [{"concept": c.concept, "score": round(c.score, 4), "layer": c.layer,
                              "contribution": round(c.contribution, 4),
                              "association": {k: round(v, 4) for k, v in c.association.items()}}
                             for c in self.concepts]}


def explain(model, images: torch.Tensor, text_emb: torch.Tensor, concepts: Sequence[str], *, top_k: int = TOP_K,
            association_variant: str = "official", contribution_variant: str = "official",
            drop_negative: bool = False, method: str = "batched", assoc_top_k: int = 20) -> list[CEFAMExplanation]:
    """Explain normalised ``images [B, 3, S, S]`` with a :class:`~fastcbm.cefam.model.CEFAM`.

    ``text_emb [T, D]``: the concept set's embeddings (``concepts``: their names). ``top_k``: concepts per image
    (highest concept scores). ``drop_negative``: clamp negative contributions to 0 (the authors' default; off here so
    a user sees concepts that speak against the class).
    """
    from fastcbm.cam import fuse
    from fastcbm.cefam.association import association_scores, concept_contributions
    from fastcbm.cefam.regions import ConceptGrads, concept_grads

    if len(concepts) == 0 or text_emb.shape[0] == 0:
        raise InvalidArgument("the concept list is empty: give at least one concept")
    if text_emb.dim() != 2 or text_emb.shape[0] != len(concepts):
        raise InvalidArgument(f"text_emb must be [T, D] with T = {len(concepts)} concepts, got shape {tuple(text_emb.shape)}")
    if top_k < 1:
        raise InvalidArgument(f"top_k must be >= 1, got {top_k}")
    c, layers = model.config, model.layers
    common = {"logit_scale": c.logit_scale, "bias": c.bias, "kind": c.kind, "num_prefix_tokens": c.num_prefix_tokens}
    text_emb = text_emb.to(device=images.device, dtype=images.dtype)
    grads = concept_grads(model.classifier, model.translator, images, text_emb, layers, method=method, **common)
    assoc = association_scores(model.classifier, model.translator, images, text_emb, layers, top_k=assoc_top_k,
                               variant=association_variant, method=method, grads=grads, **common)  # [B, T, L]
    with torch.no_grad():
        scores = model.scores_from_embedding(grads.h, text_emb)  # [B, T]
        probs = grads.logits.softmax(dim=-1)
    k = min(top_k, text_emb.shape[0])
    top = scores.topk(k, dim=1).indices  # [B, k]
    sub = torch.unique(top)  # the batch's union: contributions / regions only for these
    col = {int(t): j for j, t in enumerate(sub.tolist())}
    chosen_all = assoc.argmax(-1)  # [B, T]
    sub_grads = ConceptGrads({n: grads.betas[n][:, sub] for n in layers}, grads.maps, grads.z, grads.h, grads.logits,
                             grads.order, grads.layers)
    contrib = concept_contributions(model.classifier, model.translator, images, text_emb[sub], layers,
                                    chosen_all[:, sub], top_k=assoc_top_k, variant=contribution_variant,
                                    drop_negative=drop_negative, method=method, grads=sub_grads, **common)
    size = tuple(images.shape[-2:])
    with torch.no_grad():
        maps = {n: fuse(grads.betas[n][:, sub].contiguous(), grads.maps[n], size=size) for n in layers}
    names = list(getattr(model.config, "class_names", []) or [])
    out = []
    for b in range(images.shape[0]):
        pred = int(probs[b].argmax())
        items, regions = [], []
        for t in top[b].tolist():
            li = int(chosen_all[b, t])
            items.append(ConceptExplanation(
                concept=str(concepts[t]), score=float(scores[b, t]), layer=layers[li],
                association={n: float(assoc[b, t, i]) for i, n in enumerate(layers)},
                contribution=float(contrib[b, col[t]])))
            regions.append(maps[layers[li]][b, col[t]])
        out.append(CEFAMExplanation(pred, names[pred] if pred < len(names) else None, probs[b].detach().cpu(),
                                    items, torch.stack(regions).detach().cpu()))
    return out


def resolve_concepts(model, concepts_file: str | os.PathLike | None, templates: Sequence[str] | None = None
                     ) -> tuple[list[str], list[str]]:
    """``(names, texts to embed)``: from ``concepts_file`` (:func:`fastcbm.concepts.load_concepts`) with
    ``templates`` (default ``"{}"``), else the testbed vocabulary with the testbed CLIP's caption forms when the model's
    classifier is a bundled testbed one."""
    from fastcbm.cefam.datasets import TESTBED_TEMPLATES, concept_texts

    if concepts_file is not None:
        from fastcbm.concepts import load_concepts

        names = list(load_concepts(concepts_file).names)
        if not names:
            raise InvalidArgument(f"concepts file {concepts_file} lists no concepts")
        tmpl = list(templates or ["{}"])
        if len(tmpl) != 1:
            raise InvalidArgument("give one --template for the explanation's concepts")
        return names, [tmpl[0].format(n) for n in names]
    if str(model.config.classifier).startswith("testbed"):
        from fastcbm.data import synthetic as S

        vocab = S.vocabulary()
        names = [n for n, _ in vocab]
        return names, concept_texts(names, [t for _, t in vocab], TESTBED_TEMPLATES)
    raise InvalidArgument("--concepts FILE is needed (one concept per line): the model's classifier "
                          f"{model.config.classifier!r} has no built-in concept list")


def overlay_png(path: str | os.PathLike, image: torch.Tensor, explanation: CEFAMExplanation) -> Path:
    """One PNG: the image, then each top concept's region overlaid on it (min-max normalised, jet), left to right."""
    import numpy as np
    from PIL import Image

    from fastcbm.html import overlay, to_hwc

    img = image.detach().cpu().numpy()
    hwc = to_hwc(img)
    tiles = [hwc] + [overlay(hwc, r.numpy()) for r in explanation.regions]
    strip = np.concatenate(tiles, axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(strip).save(path)
    return path


def prepare_image(path: str | os.PathLike, backbone) -> tuple[torch.Tensor, torch.Tensor]:
    """An image file → ``(uint8 [3, S, S] as the classifier sees it, normalised [1, 3, S, S])``."""
    from fastcbm.data.folder import BadImageError, decode_image

    try:
        image = decode_image(path, int(backbone.input_size))
    except BadImageError as exc:
        raise InvalidFile(f"image {path}: {exc}") from None
    from fastcbm.models.inputs import normalize_uint8

    return image, normalize_uint8(image[None], backbone.mean, backbone.std)


def explain_file(model_dir, image_path, *, concepts_file=None, templates=None, top_k: int = TOP_K,
                 html: str | os.PathLike | None = None, png: str | os.PathLike | None = None,
                 drop_negative: bool = False) -> dict:
    """``fastcbm explain --method cefam``: load the model and its CLIP, explain one image, write the optional
    HTML page / PNG overlay, return the JSON result."""
    from fastcbm.cefam.model import load_cefam
    from fastcbm.concepts import encode_texts
    from fastcbm.models import load_clip

    image_path = Path(image_path)
    if not image_path.is_file():
        raise MissingFile(f"image {image_path} not found")
    model = load_cefam(model_dir)
    names, texts = resolve_concepts(model, concepts_file, templates)
    clip_model, _, tokenizer = load_clip(model.config.clip_model, model.config.clip_pretrained)
    text_emb = encode_texts(clip_model, tokenizer, texts, progress=False)
    if text_emb.shape[1] != model.config.embed_dim:
        raise InvalidArgument(f"CLIP {model.config.clip_model!r} gives {text_emb.shape[1]}-d text embeddings but the "
                              f"translator outputs {model.config.embed_dim}")
    image, x = prepare_image(image_path, model.backbone)
    (e,) = explain(model, x, text_emb, names, top_k=top_k, drop_negative=drop_negative)
    result = {"image": str(image_path), **e.to_json()}
    if png:
        result["png"] = str(overlay_png(png, image, e))
    if html:
        from fastcbm.cefam.report import write_cefam_report

        result["html"] = str(write_cefam_report(html, images=image[None], explanations=[e],
                                                summary={"image": str(image_path), "model": str(model_dir)},
                                                class_names=model.config.class_names))
    return result


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[N, h, w]`` → ``[N, *size]`` bilinear (align_corners=False)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


__all__ = ["TOP_K", "CEFAMExplanation", "ConceptExplanation", "explain", "explain_file", "overlay_png",
           "prepare_image", "resolve_concepts", "upsample"]
