"""Pure-PyTorch definition of the cubic-cosine loss (label-free CBM "cos cubed" similarity).

This file is the definition every fast backend is tested against: it materialises q and p and lets autograd do the
gradient. Epsilon semantics (shared by every backend): each cubed, centred column ``u`` is divided by ``‖u‖ + eps``
with ``eps = EPS = 1e-12``, so ``cos = ⟨u, v⟩ / ((‖u‖ + eps)·(‖v‖ + eps))``; a constant column gives ``u = 0`` and
therefore a cosine of 0 with finite (zero) gradients.
"""

from __future__ import annotations

import torch

from fastcbm.errors import InvalidArgument

EPS = 1e-12
"""Added to each column's L2 norm before dividing (``x / (‖x‖ + EPS)``), in every backend."""


def _centre_cube_normalise(x: torch.Tensor, eps: float) -> torch.Tensor:
    """[B, K] -> [B, K]: subtract the column mean over the batch, cube, divide by (column L2 norm + eps)."""
    x = x - x.mean(dim=0, keepdim=True)
    x = x**3
    return x / (torch.linalg.vector_norm(x, dim=0, keepdim=True) + eps)


def cubic_cosine_similarity(q: torch.Tensor, p: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Per-column cubic cosine similarity of outputs ``q`` [B, K] and targets ``p`` [B, K] -> [K].

    Each column is centred over the batch, cubed elementwise and L2-normalised over the batch; the result is the
    per-column dot product. Needs B >= 2 (centring one sample leaves nothing).
    """
    if q.dim() != 2 or p.dim() != 2:
        raise InvalidArgument(f"q and p must be [B, K]; got q {tuple(q.shape)}, p {tuple(p.shape)}")
    if q.shape != p.shape:
        raise InvalidArgument(f"p must have the shape of q {tuple(q.shape)}; got {tuple(p.shape)}")
    if q.shape[0] < 2:
        raise InvalidArgument(f"q: need a batch of at least 2 samples to centre over, got B={q.shape[0]}")
    return (_centre_cube_normalise(q, eps) * _centre_cube_normalise(p, eps)).sum(dim=0)


def cubic_cosine_loss_dense(q: torch.Tensor, p: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Loss on materialised outputs ``q`` [B, K] and targets ``p`` [B, K]: ``-mean_k cos_k`` (a scalar)."""
    return -cubic_cosine_similarity(q, p, eps).mean()


def salf_outputs_targets(
    weight: torch.Tensor, features: torch.Tensor, prompt_emb: torch.Tensor, text_emb: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """SALF-CBM outputs and targets, materialised, both [B, M·L] with column index ``m·L + l``.

    q[b, m, l] = Σ_c weight[m, c]·features[b, c, l];  p[b, m, l] = Σ_d prompt_emb[b, l, d]·text_emb[m, d].
    """
    q = torch.einsum("mc,bcl->bml", weight, features)
    p = torch.einsum("bld,md->bml", prompt_emb, text_emb)
    return q.reshape(q.shape[0], -1), p.reshape(p.shape[0], -1)


def cubic_cosine_loss_reference(
    weight: torch.Tensor,
    features: torch.Tensor,
    prompt_emb: torch.Tensor,
    text_emb: torch.Tensor,
    eps: float = EPS,
) -> torch.Tensor:
    """The SALF-CBM cubic-cosine loss by definition (materialises [B, M·L] tensors; autograd gives gradients).

    weight [M, C], features [B, C, L], prompt_emb [B, L, D], text_emb [M, D] -> scalar.
    """
    q, p = salf_outputs_targets(weight, features, prompt_emb, text_emb)
    return cubic_cosine_loss_dense(q, p, eps)
