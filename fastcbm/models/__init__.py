"""String-keyed model factories shared by every method.

- ``load_clip(name, pretrained=None) -> (model, preprocess, tokenizer)`` the way open_clip returns them;
  ``"testbed"`` is the bundled tiny CLIP trained on the synthetic testbed, any other name goes to open_clip.
- ``load_backbone(name, pretrained=None) -> Backbone``: ``"testbed"`` (tiny ResNet-like CNN, layer1..layer4) and
  ``"testbed-vit"`` (tiny timm ViT) are bundled; torchvision names (``resnet18``, ``resnet50``, ...) and timm names
  work too. ``pretrained=None`` gives random init; a pretrained request that cannot be fetched (offline) raises a
  :class:`~fastcbm.errors.WeightsUnavailableError` naming the weights.

Register more with :func:`register_clip` / :func:`register_backbone`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from fastcbm.errors import InvalidFile
from fastcbm.models.inputs import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD  # noqa: F401


@dataclass
class Backbone:
    """A classifier and what the explanation methods need to know about it.

    ``model(x [N, 3, S, S]) -> logits [N, K]`` on inputs normalised with ``mean``/``std`` at ``input_size``;
    ``feature_layers``: module names whose outputs are feature maps (CNN ``[N, C, h, w]``; ViT tokens
    ``[N, P + h·w, C]`` with ``num_prefix_tokens`` = P), shallow to deep.
    """

    model: nn.Module
    preprocess: Callable | None
    kind: str  # "cnn" | "vit"
    feature_layers: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    num_prefix_tokens: int = 1
    name: str = ""


_CLIP_LOADERS: dict[str, Callable] = {}
_BACKBONE_LOADERS: dict[str, Callable] = {}


def register_clip(name: str, loader: Callable) -> None:
    """Register ``loader(pretrained) -> (model, preprocess, tokenizer)`` under ``name``."""
    _CLIP_LOADERS[name] = loader


def register_backbone(name: str, loader: Callable) -> None:
    """Register ``loader(pretrained) -> Backbone`` under ``name``."""
    _BACKBONE_LOADERS[name] = loader


_CLIP_FOLDER_LOADERS: dict[str, Callable | str] = {}


def register_clip_folder(format_name: str, loader: Callable | str) -> None:
    """Register ``loader(path) -> (model, preprocess, tokenizer)`` for CLIP model folders whose ``config.json`` says
    ``"format": format_name`` (a method's fine-tuned CLIP, e.g. DEAL's output). ``loader`` may be a
    ``"module:function"`` string, imported on first use, so registering costs nothing and this module imports no
    method package."""
    _CLIP_FOLDER_LOADERS[format_name] = loader


def _clip_folder_loader(path: str) -> Callable | None:
    """The registered loader of the CLIP model folder ``path``, or None when ``path`` is not a folder with a
    ``config.json`` (then the name goes to open_clip). A folder of an unregistered format is refused in one line."""
    import importlib
    import json

    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return None
    try:
        with open(cfg, encoding="utf-8") as fh:
            fmt = json.load(fh).get("format")
    except (OSError, ValueError, AttributeError) as exc:
        raise InvalidFile(f"model: {cfg} is not a readable model config ({type(exc).__name__})") from None
    loader = _CLIP_FOLDER_LOADERS.get(fmt)
    if loader is None:
        raise InvalidFile(f"model: {path} holds a {fmt!r} folder, not a CLIP model folder (known formats: "
                          f"{sorted(_CLIP_FOLDER_LOADERS)})")
    if isinstance(loader, str):
        module, _, attr = loader.partition(":")
        loader = _CLIP_FOLDER_LOADERS[fmt] = getattr(importlib.import_module(module), attr)
    return loader


def load_clip(name: str = "testbed", pretrained: str | None = None, device: str = "cpu"):
    """``(model, preprocess, tokenizer)`` for a CLIP model; ``model.encode_image`` / ``encode_text`` as open_clip.

    ``name``: a registered name (the bundled ``"testbed"``), a CLIP model folder of a registered format (a ``fastcbm
    deal train`` output; :func:`register_clip_folder`), or an open_clip model name."""
    folder_loader = None if name in _CLIP_LOADERS else _clip_folder_loader(str(name))
    if name in _CLIP_LOADERS:
        model, preprocess, tokenizer = _CLIP_LOADERS[name](pretrained)
    elif folder_loader is not None:
        model, preprocess, tokenizer = folder_loader(name)
    else:
        from fastcbm.models.external import load_open_clip

        model, preprocess, tokenizer = load_open_clip(name, pretrained)
    # how to rebuild this model: precompute(model=<this object>) records it, so fastcbm train can load the text tower
    model.fastcbm_source = {"name": name, "pretrained": pretrained}
    return model.to(device).eval(), preprocess, tokenizer


def load_backbone(name: str = "testbed", pretrained: bool | str | None = None, device: str = "cpu") -> Backbone:
    """A :class:`Backbone` by name (bundled testbed models, torchvision or timm names). Without ``pretrained`` a
    torchvision / timm model gets a random init seeded with 0, the same at every call."""
    if name in _BACKBONE_LOADERS:
        backbone = _BACKBONE_LOADERS[name](pretrained)
    else:
        import torch

        from fastcbm.models.external import load_external_backbone

        if pretrained:
            backbone = load_external_backbone(name, pretrained)
        else:
            # a random init is seeded (seed 0, global RNG left as it was): precompute stores a random backbone's
            # features and train / explain rebuild that backbone by name, so every rebuild must give the same weights
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                backbone = load_external_backbone(name, pretrained)
    backbone.model = backbone.model.to(device).eval()
    return backbone


def available_models() -> dict[str, list[str]]:
    return {"clip": sorted(_CLIP_LOADERS), "backbone": sorted(_BACKBONE_LOADERS)}


from fastcbm.models import testbed as _testbed  # noqa: E402  (registers the bundled models)

_testbed.register()
# DEAL's fine-tuned CLIP folders, by name: fastcbm.deal is imported only when such a folder is loaded
register_clip_folder("fastcbm-deal", "fastcbm.deal.train:load_deal_clip")

__all__ = ["Backbone", "CLIP_MEAN", "CLIP_STD", "IMAGENET_MEAN", "IMAGENET_STD", "available_models", "load_backbone", "load_clip",
           "register_backbone", "register_clip", "register_clip_folder"]
