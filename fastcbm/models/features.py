"""Backbone feature maps for concept bottlenecks: hooks on named layers, ViT tokens as maps, resizing to the grid.

Shared by SALF-CBM (last stage, resized to the prompt grid), CE-FAM (several stages) and the Grad-CAM baseline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastcbm.errors import InvalidArgument


def tokens_to_map(tokens: torch.Tensor, num_prefix_tokens: int = 1) -> torch.Tensor:
    """ViT tokens ``[N, P + h*w, C]`` → feature map ``[N, C, h, w]`` (drops the ``P`` class/register tokens)."""
    if tokens.dim() != 3:
        raise InvalidArgument(f"tokens must be [N, tokens, C], got shape {tuple(tokens.shape)}")
    patches = tokens[:, num_prefix_tokens:]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise InvalidArgument(
                 f"cannot reshape {patches.shape[1]} patch tokens (after dropping {num_prefix_tokens} prefix tokens) "
                 "into a square map"
             )
    return patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], side, side)


def as_feature_map(output: torch.Tensor | tuple, kind: str, num_prefix_tokens: int = 1) -> torch.Tensor:
    """A hooked layer's output as ``[N, C, h, w]`` (CNN maps as they are; ViT tokens reshaped)."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if output.dim() == 4:
        return output
    if output.dim() == 3 and kind == "vit":
        return tokens_to_map(output, num_prefix_tokens)
    raise InvalidArgument(f"layer output of shape {tuple(output.shape)} is not a feature map (kind={kind!r})")


CLS_SUFFIX = "+cls"


def split_layer(name: str) -> tuple[str, bool]:
    """``"blocks.11+cls"`` → ``("blocks.11", True)``: the module name and whether the class token is concatenated."""
    return (name[: -len(CLS_SUFFIX)], True) if name.endswith(CLS_SUFFIX) else (name, False)


def concat_cls(tokens: torch.Tensor) -> torch.Tensor:
    """ViT tokens ``[N, T, C]`` → ``[N, T, 2C]``: every token followed by the class token (token 0) on the channel
    axis — the SALF-CBM appendix's ViT variant (patch tokens + CLS concatenated on channels)."""
    if tokens.dim() != 3:
        raise InvalidArgument(f"'{CLS_SUFFIX}' needs ViT tokens [N, T, C], got shape {tuple(tokens.shape)}")
    return torch.cat([tokens, tokens[:, :1].expand_as(tokens)], dim=-1)


class FeatureHooks:
    """Context manager recording the outputs of named sub-modules during a forward pass.

    ``hooks.outputs[name]`` holds the raw output (gradients flow through it when the forward pass has them). A name
    ending in ``"+cls"`` (e.g. ``"blocks.11+cls"``) hooks that ViT block and records its tokens with the class token
    concatenated on channels (:func:`concat_cls`), so such a layer name works wherever a layer name does (precompute
    ``--features-layer``, training, the saved model).
    """

    def __init__(self, model: nn.Module, layer_names: Sequence[str]):
        modules = dict(model.named_modules())
        missing = [n for n in layer_names if split_layer(n)[0] not in modules]
        if missing:
            raise InvalidArgument(f"layers {missing} not found in {type(model).__name__}; it has e.g. "
                                  f"{[n for n in modules if n][:12]}")
        self._modules = [(n, modules[split_layer(n)[0]]) for n in layer_names]
        self._handles: list = []
        self.outputs: dict[str, torch.Tensor] = {}

    def __enter__(self) -> FeatureHooks:
        for name, module in self._modules:
            self._handles.append(module.register_forward_hook(self._make_hook(name)))
        return self

    def _make_hook(self, name: str):
        with_cls = split_layer(name)[1]

        def hook(_module, _inputs, output):
            if with_cls:
                output = concat_cls(output[0] if isinstance(output, (tuple, list)) else output)
            self.outputs[name] = output

        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def resize_to_grid(feature_maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``[N, C, h, w]`` → ``[N, C, Gy, Gx]`` by bilinear resizing (align_corners=False), as SALF-CBM does."""
    if feature_maps.dim() != 4:
        raise InvalidArgument(f"feature_maps must be [N, C, h, w], got shape {tuple(feature_maps.shape)}")
    if tuple(feature_maps.shape[-2:]) == tuple(grid):
        return feature_maps
    return F.interpolate(feature_maps, size=tuple(grid), mode="bilinear", align_corners=False)


@torch.no_grad()
def extract_feature_maps(
    model: nn.Module,
    images: torch.Tensor,
    layer: str,
    kind: str = "cnn",
    grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Run ``model`` on normalised ``images [N, 3, S, S]`` and return layer ``layer`` as ``[N, C, h, w]``
    (or ``[N, C, Gy, Gx]`` when ``grid`` is given)."""
    with FeatureHooks(model, [layer]) as hooks:
        model(images)
    fmap = as_feature_map(hooks.outputs[layer], kind, num_prefix_tokens)
    return resize_to_grid(fmap.float(), grid) if grid is not None else fmap


def normalize_for_backbone(images: torch.Tensor, backbone, device: torch.device) -> torch.Tensor:
    """uint8 ``[N, 3, S, S]`` → float ``[N, 3, S', S']`` resized to the backbone's input size and normalised."""
    from fastcbm.models.inputs import normalize_uint8

    size = int(getattr(backbone, "input_size", images.shape[-1]) or images.shape[-1])
    return normalize_uint8(images, backbone.mean, backbone.std, device=device, size=size)
