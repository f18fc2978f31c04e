"""CLIP-Dissect (Oikarinen & Weng, ICLR 2023) as the CE-FAM evaluation's baseline: label every neuron (channel) of the
classifier's stages with a concept by soft-WPMI, then use the activation map of the neuron labelled with a concept as
that concept's region.

Soft-WPMI, as in the authors' ``similarity.soft_wpmi`` (defaults top_k = 100, a = 10, λ = 1, p from 0.998 down to
0.97): with the probe set's CLIP image–concept cosines ``C [N, T]`` and the neurons' spatially averaged activations
``A [N, K]``, ``P = softmax(a·C)`` over concepts; for neuron k take its top_k probe images (by activation, descending)
``i_1..i_top_k`` with weights ``p_j = p_start − (j−1)/top_k·(p_start − p_end)``;
``log p(t | k) = Σ_j log(1 + p_j·(P[i_j, t] − 1) + 1e-7)``; ``log p(t) = logsumexp_k log p(t | k) − log K``;
``wpmi[k, t] = log p(t | k) − λ·log p(t)``. A neuron's label is its argmax over concepts; the neuron used for a
concept's region is the argmax over all neurons of all stages of ``wpmi[:, t]`` (so every concept gets one, also when
no neuron's own label is that concept; the neurons of all stages are scored together, log p(t) running over all of
them, so that scores compare across stages). The region is that channel's activation map at its stage's resolution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fastcbm.errors import InvalidArgument

# the authors' soft_wpmi defaults
TOP_K = 100
ALPHA = 10.0
LAM = 1.0
P_START, P_END = 0.998, 0.97
MIN_PROB = 1e-7


def soft_wpmi(clip_sims: torch.Tensor, activations: torch.Tensor, *, top_k: int = TOP_K, a: float = ALPHA,
              lam: float = LAM, p_start: float = P_START, p_end: float = P_END, min_prob: float = MIN_PROB,
              chunk: int = 256) -> torch.Tensor:
    """Soft-WPMI ``[K, T]`` of each neuron (column of ``activations [N, K]``) with each concept (column of
    ``clip_sims [N, T]``, CLIP image–text cosines of the same N probe images). ``top_k`` is capped at N."""
    if clip_sims.dim() != 2 or activations.dim() != 2 or clip_sims.shape[0] != activations.shape[0]:
        raise InvalidArgument(f"clip_sims [N, T] and activations [N, K] must share N, got {tuple(clip_sims.shape)} and "
                              f"{tuple(activations.shape)}")
    n = clip_sims.shape[0]
    if n < 1 or clip_sims.shape[1] < 1 or activations.shape[1] < 1:
        raise InvalidArgument("soft_wpmi needs at least one probe image, one concept and one neuron")
    k = min(int(top_k), n)
    probs = torch.softmax(a * clip_sims.double(), dim=1)  # [N, T]
    inds = torch.topk(activations.double(), k=k, dim=0).indices  # [k, K], descending activation
    # the authors' weights use the nominal top_k in the denominator; with a capped k the ramp is the same per rank
    p = (p_start - torch.arange(k, dtype=torch.float64) / top_k * (p_start - p_end)).view(k, 1, 1)
    out = []
    for s in range(0, activations.shape[1], chunk):  # [k, chunk, T] at a time
        g = probs[inds[:, s:s + chunk]]
        out.append(torch.log(1 + p * (g - 1) + min_prob).sum(0))
    log_p_given = torch.cat(out)  # [K, T]
    log_p = torch.logsumexp(log_p_given, dim=0, keepdim=True) - math.log(log_p_given.shape[0])
    return log_p_given - lam * log_p


@dataclass
class Dissection:
    """Result of :func:`dissect`. ``scores``: per stage ``[C_l, T]`` soft-WPMI; ``labels``: per stage ``[C_l]`` each
    neuron's concept index; ``neuron``: per concept ``(stage, channel)`` used as its region; ``score``: ``[T]``."""
    layers: list[str]
    scores: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]
    neuron: list[tuple[str, int]]
    score: torch.Tensor

    def summary(self, concepts: Sequence[str]) -> dict:
        return {c: {"layer": layer, "channel": ch, "wpmi": round(float(s), 4)}
                for c, (layer, ch), s in zip(concepts, self.neuron, self.score.tolist())}


def dissect(pooled: dict[str, torch.Tensor], clip_image_emb: torch.Tensor, text_emb: torch.Tensor,
            layers: Sequence[str] | None = None, **wpmi_options) -> Dissection:
    """Label the neurons of ``layers`` (default: all of ``pooled``).

    Args:
        pooled: per stage the probe images' spatially averaged activations ``[N, C_l]``.
        clip_image_emb: ``[N, D]`` CLIP image embeddings of the same probe images (any norm).
        text_emb: ``[T, D]`` concept text embeddings (any norm).
    """
    layers = list(pooled) if layers is None else list(layers)
    if not layers:
        raise InvalidArgument("dissect needs at least one stage")
    if text_emb.dim() != 2 or text_emb.shape[0] < 1:
        raise InvalidArgument(f"text_emb must be [T, D] with T >= 1 concepts, got shape {tuple(text_emb.shape)}")
    if clip_image_emb.dim() != 2 or clip_image_emb.shape[1] != text_emb.shape[1]:
        raise InvalidArgument(f"clip_image_emb must be [N, {text_emb.shape[1]}], got shape {tuple(clip_image_emb.shape)}")
    img = torch.nn.functional.normalize(clip_image_emb.double(), dim=-1)
    txt = torch.nn.functional.normalize(text_emb.double(), dim=-1)
    sims = img @ txt.T
    # all stages' neurons scored jointly: log p(t) runs over every neuron, so scores compare across stages (with one
    # stage this is the authors' per-layer computation)
    stacked = soft_wpmi(sims, torch.cat([pooled[layer] for layer in layers], dim=1), **wpmi_options)  # [Σ C_l, T]
    offsets = [0]
    for layer in layers:
        offsets.append(offsets[-1] + pooled[layer].shape[1])
    scores = {layer: stacked[offsets[i]:offsets[i + 1]] for i, layer in enumerate(layers)}
    labels = {layer: s.argmax(1) for layer, s in scores.items()}
    best = stacked.argmax(0)
    neuron = []
    for j in best.tolist():
        li = max(i for i in range(len(layers)) if offsets[i] <= j)
        neuron.append((layers[li], j - offsets[li]))
    return Dissection(layers, scores, labels, neuron, stacked.max(0).values)


def neuron_maps(acts: dict[str, torch.Tensor], dissection: Dissection, image_idx: torch.Tensor,
                concept_idx: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The regions of pairs ``(image_idx[p], concept_idx[p])``: per stage ``(pair positions [P_l], maps [P_l, h, w])``
    from ``acts`` (per stage ``[B, C_l, h_l, w_l]``)."""
    out: dict[str, tuple[list[int], list[torch.Tensor]]] = {}
    for p, (b, t) in enumerate(zip(image_idx.tolist(), concept_idx.tolist())):
        layer, ch = dissection.neuron[t]
        pos, maps = out.setdefault(layer, ([], []))
        pos.append(p)
        maps.append(acts[layer][b, ch])
    return {layer: (torch.tensor(pos, dtype=torch.long), torch.stack(maps)) for layer, (pos, maps) in out.items()}


__all__ = ["Dissection", "dissect", "neuron_maps", "soft_wpmi"]
