"""CE-FAM association (which stage explains a concept) and contribution (how much a concept drives the class score).

Both rank the channels of a stage l by the signed β_k·z_k (β from :func:`fastcbm.cefam.regions.concept_grads`, z_k the
pooled activation) and mask the top K cumulatively; each step k = 1..K scores p_k, and the result is
Σ_k (p₀ − p_k)/p₀ / K (docs/design.md §3, as the authors' released code does it unless ``variant="paper"``):

- association: channels replaced in the translator input z_cat by the scalar mean m_l of z^l over channels; p = the
  softmax over the whole concept set of the scaled logits S (official) or S_t itself (paper);
- contribution: channels masked in the classifier at the concept's chosen stage — official: a channel by its own
  spatial mean at stages other than the deepest, by the tensor's global scalar mean at the deepest; paper: by m^l
  (= the global mean) everywhere — p = the softmax probability of the target class.

``method="batched"``: association steps are rank-1 updates of the translator's first pre-activation
(W₁[:, k]·(m − z_k)), so all K steps come from one prefix sum and one batched ``translator.rest``; contribution steps run
as one batched partial forward (a forward hook on the stage returns the [steps, ...] masked tensor, so the deeper layers
run on all steps at once — fine for sequential CNNs and ViTs; models whose batch size cannot change mid-network get a
clear error pointing to ``method="loop"``). ``method="loop"``: one full forward per step, the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastcbm.cefam.regions import (
    ConceptGrads,
    StageHooks,
    check_inputs,
    concept_grads,
    eval_mode,
    resolve_classifier,
)
from fastcbm.cefam.translator import concept_scores
from fastcbm.errors import InvalidArgument

VARIANTS = ("official", "paper")
_STEP_BUDGET = 1 << 24  # elements per batched association chunk (64 MB in fp32)
_CONTRIB_BUDGET = 1 << 25  # stage-output elements per batched contribution forward (e.g. 41 ResNet-50 layer1 copies)


def _check_common(top_k: int, variant: str) -> None:
    if variant not in VARIANTS:
        raise InvalidArgument(f"variant must be one of {VARIANTS}, got {variant!r}")
    if not isinstance(top_k, int) or top_k < 1:
        raise InvalidArgument(f"top_k must be an integer >= 1, got {top_k!r}")


def _slices(grads: ConceptGrads) -> dict[str, tuple[int, int]]:
    out, o = {}, 0
    for n in grads.layers:
        c = grads.maps[n].shape[1]
        out[n] = (o, o + c)
        o += c
    return out


def channel_ranking(grads: ConceptGrads, layer: str, top_k: int) -> torch.Tensor:
    """Indices ``[B, T, K']`` (K' = min(top_k, C_l)) of the channels of ``layer`` with the largest signed β_k·z_k,
    descending: the order channels are masked in."""
    a, e = _slices(grads)[layer]
    contrib = grads.betas[layer] * grads.z[:, None, a:e]  # [B, T, C]
    return contrib.topk(min(top_k, e - a), dim=-1, sorted=True).indices


def _relative_drop(p0: torch.Tensor, pk: torch.Tensor) -> torch.Tensor:
    """Σ_k (p₀ − p_k)/p₀ / K over the last axis of ``pk [..., K]``; ``p0 [...]``."""
    return ((p0[..., None] - pk) / p0[..., None]).mean(dim=-1)


# ---- association ---------------------------------------------------------------------------------------------------
def _step_scores(h: torch.Tensor, text_emb: torch.Tensor, concept: torch.Tensor, variant: str, logit_scale: float,
                 bias: float) -> torch.Tensor:
    """``h [..., D]`` → the score of concept ``concept [...]`` (long, broadcast against h's leading dims)."""
    if variant == "paper":  # S_t alone: no need to score the whole concept set
        t = F.normalize(text_emb, dim=-1)[concept.to(h.device)]
        return logit_scale * (F.normalize(h, dim=-1) * t).sum(-1) + bias
    s = concept_scores(h.reshape(-1, h.shape[-1]), text_emb, logit_scale, bias).reshape(*h.shape[:-1], -1)
    if variant == "official":
        s = s.softmax(dim=-1)
    return s.gather(-1, concept.to(s.device).expand(h.shape[:-1]).unsqueeze(-1)).squeeze(-1)


def _association_batched(translator, grads, text_emb, top_k, variant, logit_scale, bias) -> torch.Tensor:
    first, rest = translator.first, translator.rest
    w1 = first.weight  # [H1, Z]
    b, t = grads.betas[grads.layers[0]].shape[:2]
    a0 = first(grads.z)  # [B, H1]
    p0 = _step_scores(translator(grads.z)[:, None, :].expand(b, t, -1), text_emb, torch.arange(t), variant,
                      logit_scale, bias)  # [B, T]
    out = torch.empty(b, t, len(grads.layers), dtype=grads.z.dtype, device=grads.z.device)
    slices = _slices(grads)
    for li, n in enumerate(grads.layers):
        a, e = slices[n]
        idx = channel_ranking(grads, n, top_k)  # [B, T, K]
        k = idx.shape[-1]
        zl = grads.z[:, a:e]
        m = zl.mean(dim=1)  # [B]
        delta = m[:, None, None] - zl.gather(1, idx.reshape(b, -1)).reshape(b, t, k)  # [B, T, K]
        per = k * (w1.shape[0] + text_emb.shape[0] + text_emb.shape[1])
        chunk = max(1, _STEP_BUDGET // max(1, b * per))
        for c0 in range(0, t, chunk):
            c1 = min(t, c0 + chunk)
            cols = w1.T[a + idx[:, c0:c1]]  # [B, t', K, H1]: W1[:, k] for each masked channel
            pre = a0[:, None, None, :] + torch.cumsum(cols * delta[:, c0:c1, :, None], dim=2)  # rank-1 prefix sums
            pk = _step_scores(rest(pre), text_emb, torch.arange(c0, c1)[None, :, None], variant, logit_scale, bias)
            out[:, c0:c1, li] = _relative_drop(p0[:, c0:c1], pk)
    return out


def _association_loop(translator, grads, text_emb, top_k, variant, logit_scale, bias) -> torch.Tensor:
    b, t = grads.betas[grads.layers[0]].shape[:2]
    out = torch.empty(b, t, len(grads.layers), dtype=grads.z.dtype, device=grads.z.device)
    slices = _slices(grads)
    for li, n in enumerate(grads.layers):
        a, e = slices[n]
        idx = channel_ranking(grads, n, top_k)
        for i in range(b):
            m = grads.z[i, a:e].mean()
            for j in range(t):
                z = grads.z[i:i + 1].clone()
                p0 = _step_scores(translator(z), text_emb, torch.tensor(j), variant, logit_scale, bias)
                drops = []
                for c in idx[i, j].tolist():
                    z[0, a + c] = m
                    pk = _step_scores(translator(z), text_emb, torch.tensor(j), variant, logit_scale, bias)
                    drops.append((p0 - pk) / p0)
                out[i, j, li] = torch.cat(drops).mean()
    return out


def association_scores(classifier, translator: nn.Module, images: torch.Tensor, text_emb: torch.Tensor,
                       layers: Sequence[str], *, top_k: int = 20, variant: str = "official",
                       logit_scale: float = 100.0, bias: float = 0.0, method: str = "batched",
                       kind: str | None = None, num_prefix_tokens: int | None = None,
                       grads: ConceptGrads | None = None) -> torch.Tensor:
    """Layer association of every concept: ``[B, T, L]`` (L in the order of ``layers``; chosen stage = argmax).

    Args: as :func:`fastcbm.cefam.regions.concept_regions`, plus ``top_k`` channels masked (at most C_l),
    ``variant`` (``"official"``: softmax over the concept set of the scaled logits; ``"paper"``: S_t), and
    ``grads``: a :class:`ConceptGrads` already computed for these inputs (skips the gradient pass).
    """
    _check_common(top_k, variant)
    model, kind, prefix = resolve_classifier(classifier, kind, num_prefix_tokens)
    layers = check_inputs(model, translator, images, text_emb, layers, method)
    if grads is None:
        grads = concept_grads(classifier, translator, images, text_emb, layers, method=method,
                              logit_scale=logit_scale, bias=bias, kind=kind, num_prefix_tokens=prefix)
    text_emb = text_emb.to(device=grads.z.device, dtype=grads.z.dtype)
    run = _association_loop if method == "loop" else _association_batched
    with eval_mode(translator), torch.no_grad():
        return run(translator, grads, text_emb, top_k, variant, logit_scale, bias)


# ---- contribution --------------------------------------------------------------------------------------------------
def _fill_values(out: torch.Tensor, kind: str, prefix: int, per_channel: bool) -> torch.Tensor:
    """The replacement value of each channel of one stage output (batch 1): its spatial mean (``per_channel``) or the
    tensor's global scalar mean, as ``[C]``."""
    patches = out[0, prefix:] if kind == "vit" and out.dim() == 3 else out[0].flatten(1).T  # [hw, C]
    means = patches.mean(dim=0)
    return means if per_channel else means.mean().expand_as(means)


def _masked(out: torch.Tensor, masks: torch.Tensor, fill: torch.Tensor, kind: str, prefix: int) -> torch.Tensor:
    """Stage output of one image ``out [1, ...]`` with channel masks ``masks [n, C]`` (bool) → ``[n, ...]``."""
    if kind == "vit" and out.dim() == 3:
        patches = torch.where(masks[:, None, :], fill, out[:, prefix:])  # [n, hw, C]
        return torch.cat([out[:, :prefix].expand(masks.shape[0], -1, -1), patches], dim=1)
    return torch.where(masks[:, :, None, None], fill[:, None, None], out)


def _probs(model: nn.Module, image: torch.Tensor, layer: str, masks: torch.Tensor, kind: str, prefix: int,
           per_channel: bool, target: int) -> torch.Tensor:
    """Target-class softmax probability of the classifier with ``masks [n, C]`` applied at ``layer``: ``[n]``."""
    n = masks.shape[0]

    def replace(out: torch.Tensor) -> torch.Tensor:
        return _masked(out, masks, _fill_values(out, kind, prefix, per_channel), kind, prefix)

    try:
        with StageHooks(model, [layer], track_grad=False, replace={layer: replace}):
            logits = model(image)
    except RuntimeError as exc:
        raise InvalidArgument(f"the classifier cannot run a batch of masked copies from stage {layer!r} ({exc}); use "
                              "method='loop'") from exc
    if logits.dim() != 2 or logits.shape[0] != n:
        raise InvalidArgument(f"the classifier's batch size cannot change at stage {layer!r} (got logits of shape "
                              f"{tuple(logits.shape)} for {n} masked copies); use method='loop'")
    return logits.softmax(dim=-1)[:, target]


def concept_contributions(classifier, translator: nn.Module, images: torch.Tensor, text_emb: torch.Tensor,
                          layers: Sequence[str], chosen: torch.Tensor, *, target: torch.Tensor | None = None,
                          top_k: int = 20, variant: str = "official", drop_negative: bool = False,
                          logit_scale: float = 100.0, bias: float = 0.0, method: str = "batched",
                          kind: str | None = None, num_prefix_tokens: int | None = None,
                          grads: ConceptGrads | None = None) -> torch.Tensor:
    """Contribution of every concept to the target class: ``[B, T]``.

    Args: as :func:`association_scores`, plus ``chosen [B, T]`` (long, index into ``layers``: each concept's stage,
    e.g. the association argmax), ``target [B]`` (default: the predicted class), ``drop_negative`` (clamp negative
    contributions to 0, the authors' default).
    """
    _check_common(top_k, variant)
    model, kind, prefix = resolve_classifier(classifier, kind, num_prefix_tokens)
    layers = check_inputs(model, translator, images, text_emb, layers, method)
    b, t = images.shape[0], text_emb.shape[0]
    chosen = torch.as_tensor(chosen)
    if chosen.shape != (b, t) or chosen.dtype not in (torch.int64, torch.int32) or \
            (chosen.numel() and (chosen.min() < 0 or chosen.max() >= len(layers))):
        raise InvalidArgument(f"chosen must be an integer tensor [B, T] = [{b}, {t}] of stage indices in [0, {len(layers)})"
                              f", got {chosen.dtype} {tuple(chosen.shape)}")
    if grads is None:
        grads = concept_grads(classifier, translator, images, text_emb, layers, method=method,
                              logit_scale=logit_scale, bias=bias, kind=kind, num_prefix_tokens=prefix)
    n_classes = grads.logits.shape[1]
    target = grads.logits.argmax(dim=1) if target is None else torch.as_tensor(target).to(grads.logits.device)
    if target.shape != (b,) or target.is_floating_point() or (target.min() < 0 or target.max() >= n_classes):
        raise InvalidArgument(f"target must be [B] = [{b}] class indices in [0, {n_classes}), got {tuple(target.shape)}")
    ranks = {n: channel_ranking(grads, n, top_k) for n in layers}
    deepest = grads.order[-1]
    out = torch.empty(b, t, dtype=grads.z.dtype, device=grads.z.device)
    with eval_mode(model), torch.no_grad():
        for i in range(b):
            image = images[i:i + 1]
            p0 = model(image).softmax(dim=-1)[0, int(target[i])]
            for li, n in enumerate(layers):
                ts = (chosen[i] == li).nonzero().flatten()
                if ts.numel() == 0:
                    continue
                c = grads.maps[n].shape[1]
                idx = ranks[n][i, ts]  # [t', K]
                k = idx.shape[-1]
                # cumulative masks: step s masks idx[:, :s+1]
                masks = torch.cumsum(F.one_hot(idx, c), dim=1) > 0  # [t', K, C]
                per_channel = variant == "official" and n != deepest
                flat = masks.reshape(-1, c)
                if method == "loop":
                    pk = torch.cat([_probs(model, image, n, flat[s:s + 1], kind, prefix, per_channel, int(target[i]))
                                    for s in range(flat.shape[0])])
                else:
                    chunk = max(1, _CONTRIB_BUDGET // max(1, grads.maps[n][0].numel()))
                    pk = torch.cat([_probs(model, image, n, flat[s:s + chunk], kind, prefix, per_channel,
                                           int(target[i])) for s in range(0, flat.shape[0], chunk)])
                out[i, ts] = _relative_drop(p0, pk.reshape(-1, k))
    return out.clamp_min(0) if drop_negative else out
