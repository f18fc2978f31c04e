"""What precompute stores beside the CLIP embeddings: a backbone's feature maps on the prompt grid (SALF-CBM) and a
classifier's pooled stages ``z_cat`` (CE-FAM's translator input). Each source is a callable on uint8 images that
carries ``.name`` and ``.source`` (what training and the saved model rebuild it from)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fastcbm.errors import InvalidArgument


def backbone_feature_fn(name: str, *, pretrained: bool | str | None = True, layer: str | None = None,
                        device: torch.device | str = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """A backbone for ``precompute(features=...)``: layer ``layer`` (default: the last feature layer) of
    ``fastcbm.models.load_backbone(name, pretrained)`` on uint8 images ``[B, 3, S, S]``, resized to the backbone's
    input size and normalised with its mean/std exactly as SALF-CBM training and inference do → ``[B, C, h, w]``.
    The function carries ``.name`` and ``.source`` (backbone, pretrained, layer: what ``fastcbm train`` rebuilds)."""
    from fastcbm.models.features import extract_feature_maps, normalize_for_backbone
    from fastcbm.models import load_backbone

    backbone = load_backbone(name, pretrained=pretrained, device=str(device))
    layer = layer or backbone.feature_layers[-1]
    from fastcbm.models.features import split_layer

    if split_layer(layer)[0] not in dict(backbone.model.named_modules()):  # "blocks.11+cls": ViT patch + CLS tokens
        raise InvalidArgument(f"features layer: {name} has no module {layer!r} (feature layers: {backbone.feature_layers})")
    prefix = int(getattr(backbone, "num_prefix_tokens", 1))
    dev = torch.device(device)

    def fn(images: torch.Tensor) -> torch.Tensor:
        x = normalize_for_backbone(images, backbone, dev)
        return extract_feature_maps(backbone.model, x, layer, kind=backbone.kind, num_prefix_tokens=prefix)

    fn.name = name  # type: ignore[attr-defined]
    fn.source = {"backbone": name, "pretrained": pretrained, "layer": layer}  # type: ignore[attr-defined]
    return fn


def cefam_stage_fn(name: str, *, pretrained: bool | str | None = True, layers: Sequence[str] | None = None,
                   device: torch.device | str = "cpu", size: int = 224) -> Callable[[torch.Tensor], torch.Tensor]:
    """CE-FAM's translator input for ``precompute(cefam_classifier=...)``: the global average pool of each stage in
    ``layers`` (default: a CNN's feature layers, e.g. layer1..layer4; a ViT's last block) of ``load_backbone(name, pretrained)``,
    concatenated in that order, on uint8 images ``[B, 3, S, S]`` resized and normalised for the classifier →
    ``[B, Z]`` fp32. ``.source`` records classifier, pretrained, layers, widths, kind and num_prefix_tokens (what
    ``fastcbm cefam train`` and the saved model rebuild); ``size`` is the probe image's side."""
    from fastcbm.cefam.translator import pool_stages, stage_activations
    from fastcbm.models.features import normalize_for_backbone
    from fastcbm.models import load_backbone

    backbone = load_backbone(name, pretrained=pretrained, device=str(device))
    # default: every stage of a CNN; a ViT's last block (its reshaped patch tokens), as the issue describes
    layers = list(layers or (backbone.feature_layers[-1:] if backbone.kind == "vit" else backbone.feature_layers))
    modules = dict(backbone.model.named_modules())
    missing = [n for n in layers if n not in modules]
    if missing or len(set(layers)) != len(layers):
        raise InvalidArgument(f"cefam layers: {layers} must be distinct modules of {name} (its feature layers: "
                              f"{backbone.feature_layers})")
    prefix = int(getattr(backbone, "num_prefix_tokens", 1))
    dev = torch.device(device)

    def fn(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            x = normalize_for_backbone(images, backbone, dev)
            _, acts = stage_activations(backbone.model, x, layers, backbone.kind, prefix)
            return pool_stages(acts, layers).float()

    with torch.inference_mode():  # one probe image gives the stage widths for the manifest
        _, acts = stage_activations(backbone.model, normalize_for_backbone(
            torch.zeros((1, 3, size, size), dtype=torch.uint8), backbone, dev), layers, backbone.kind, prefix)
    fn.name = name  # type: ignore[attr-defined]
    fn.source = {"classifier": name, "pretrained": pretrained, "layers": layers,  # type: ignore[attr-defined]
                 "widths": [int(acts[n].shape[1]) for n in layers], "kind": backbone.kind,
                 "num_prefix_tokens": prefix}
    return fn
