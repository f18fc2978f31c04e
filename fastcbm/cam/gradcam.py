"""Grad-CAM (Selvaraju et al.): the baseline SALF-CBM's heatmaps are compared with, and the per-concept regions of
CE-FAM build on it. Reference implementation: one backward pass per batch of targets."""

from __future__ import annotations

import torch
from torch import nn

from fastcbm.cam.ops import fuse
from fastcbm.models.features import FeatureHooks, as_feature_map


def grad_cam(
    model: nn.Module,
    images: torch.Tensor,
    layer: str,
    target: torch.Tensor | None = None,
    kind: str = "cnn",
    num_prefix_tokens: int = 1,
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Grad-CAM maps ``[N, h, w]`` (or ``[N, *size]`` upsampled bilinearly) for ``target`` classes (default: the
    predicted ones): ReLU(Σ_k α_k A_k) with α_k the spatial mean of ∂logit/∂A_k at layer ``layer``."""
    was_training = model.training
    model.eval()
    try:
        # the input requires grad so the hooked activation has a graph even when the model's parameters are frozen
        with torch.enable_grad(), FeatureHooks(model, [layer]) as hooks:
            logits = model(images.detach().requires_grad_(True))
            act = hooks.outputs[layer]
            act = act[0] if isinstance(act, (tuple, list)) else act
            if target is None:
                target = logits.argmax(dim=1)
            score = logits.gather(1, torch.as_tensor(target, device=logits.device).view(-1, 1)).sum()
            (grad,) = torch.autograd.grad(score, act)
        fmap = as_feature_map(act.detach(), kind, num_prefix_tokens)
        gmap = as_feature_map(grad, kind, num_prefix_tokens)
        weights = gmap.mean(dim=(2, 3))[:, None]  # α [N, 1, C]: the spatial mean of the gradient
    finally:
        model.train(was_training)
    return fuse(weights, fmap, size=size)[:, 0]  # ReLU(Σ_k α_k A_k), resized bilinearly: the cam op
