"""DEAL's objective on explanation maps ``[B, K+1, h, w]`` (row 0 the category, rows 1..K the concepts).

``form="code"`` (default, the authors' released code; docs/design.md §3):
  separation  = Σ_{i>j} Σ_pixels ĝ_i·ĝ_j over the concept maps, averaged over the batch;
  consistency = Σ_pixels (Σ_k ĝ_k − ĝ_category)², divided by the batch size (a sum, not a mean);
  sparsity    = Σ_k Σ_pixels |ĝ_k|, averaged over the batch (λ 5e-4; not in the paper).
``form="paper"``: the paper writes both as L1 distances: separation = −Σ_{i>j} ‖ĝ_i − ĝ_j‖₁ (minimising it pushes
concept maps apart), consistency = ‖ĝ_category − mean_k ĝ_k‖₁; both averaged over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastcbm.errors import InvalidArgument

LOSS_FORMS = ("code", "paper")


def _check(maps: torch.Tensor, form: str) -> None:
    if maps.dim() != 4 or maps.shape[1] < 2:
        raise InvalidArgument(f"maps must be [B, K+1, h, w] with K >= 1, got {tuple(maps.shape)}")
    if form not in LOSS_FORMS:
        raise InvalidArgument(f"loss form must be one of {LOSS_FORMS}, got {form!r}")


def separation(maps: torch.Tensor, form: str = "code") -> torch.Tensor:
    """Scalar; see the module docstring."""
    _check(maps, form)
    c = maps[:, 1:].flatten(2)  # [B, K, P]
    if form == "code":
        # Σ_{i>j} c_i c_j = ((Σ_i c_i)² − Σ_i c_i²) / 2, per pixel: O(K) instead of O(K²)
        pair = (c.sum(1) ** 2 - (c ** 2).sum(1)) / 2
        return pair.sum(-1).mean()
    d = (c.unsqueeze(1) - c.unsqueeze(2)).abs().sum(-1)  # [B, K, K], symmetric, zero diagonal
    return -(d.sum((1, 2)) / 2).mean()


def consistency(maps: torch.Tensor, form: str = "code") -> torch.Tensor:
    """Scalar; see the module docstring."""
    _check(maps, form)
    cat, c = maps[:, 0].flatten(1), maps[:, 1:].flatten(2)
    if form == "code":
        return ((c.sum(1) - cat) ** 2).sum() / maps.shape[0]
    return (cat - c.mean(1)).abs().sum(-1).mean()


def sparsity(maps: torch.Tensor) -> torch.Tensor:
    """Σ_k Σ_pixels |ĝ_k| over the concept maps, averaged over the batch."""
    _check(maps, "code")
    return maps[:, 1:].abs().flatten(1).sum(-1).mean()


def info_nce(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP's loss) of matching rows: ``[B, D]`` × ``[B, D]`` (any norm), ``logit_scale`` the
    multiplier (already exponentiated)."""
    if image_emb.shape != text_emb.shape or image_emb.dim() != 2:
        raise InvalidArgument(f"image_emb and text_emb must both be [B, D], got {tuple(image_emb.shape)} and "
                              f"{tuple(text_emb.shape)}")
    dtype = torch.promote_types(image_emb.dtype, torch.float32)
    logits = logit_scale * F.normalize(image_emb.to(dtype), dim=-1) @ F.normalize(text_emb.to(dtype), dim=-1).T
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def deal_loss(maps: torch.Tensor | None, image_emb: torch.Tensor, caption_emb: torch.Tensor,
              logit_scale: torch.Tensor | float, *, lambda_sep: float = 0.1, lambda_con: float = 0.01,
              lambda_spa: float = 5e-4, form: str = "code") -> dict[str, torch.Tensor]:
    """``{"loss", "contrastive", "separation", "consistency", "sparsity"}``: loss = InfoNCE + λ_sep·R_sep +
    λ_con·R_con + λ_spa·R_spa. ``maps=None`` (plain fine-tuning): the regulariser terms are zero."""
    out = {"contrastive": info_nce(image_emb, caption_emb, logit_scale)}
    if maps is None:
        zero = out["contrastive"].new_zeros(())
        out.update(separation=zero, consistency=zero, sparsity=zero)
        out["loss"] = out["contrastive"]
        return out
    out["separation"] = separation(maps, form)
    out["consistency"] = consistency(maps, form)
    out["sparsity"] = sparsity(maps)
    out["loss"] = (out["contrastive"] + lambda_sep * out["separation"] + lambda_con * out["consistency"]
                   + lambda_spa * out["sparsity"])
    return out
