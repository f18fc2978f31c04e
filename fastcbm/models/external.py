"""Real models through open_clip, torchvision and timm, with clear errors when weights cannot be fetched."""

from __future__ import annotations

from fastcbm.models import IMAGENET_MEAN, IMAGENET_STD, Backbone
from fastcbm.errors import InvalidArgument

_DOWNLOAD_ERRORS = (OSError, RuntimeError, ConnectionError, ValueError)


def _offline_error(what: str, exc: Exception) -> RuntimeError:
    from fastcbm.compat import WeightsUnavailableError

    first = (str(exc).splitlines() or [""])[0][:200]
    return WeightsUnavailableError(
        f"could not fetch the pretrained weights {what} ({type(exc).__name__}: {first}); this machine may be "
        "offline. Ways out: put the weights in the local cache (~/.cache/huggingface or ~/.cache/torch/hub/"
        "checkpoints) and set HF_HUB_OFFLINE=1, or use the bundled models (fastcbm precompute --model testbed "
        "--features testbed), or leave out --pretrained (random init; pretrained=None in Python)"
    )


def load_open_clip(name: str, pretrained: str | None):
    from fastcbm.compat import import_open_clip

    open_clip = import_open_clip()
    if name not in open_clip.list_models():
        raise InvalidArgument(f"unknown CLIP model {name!r}; open_clip knows e.g. {open_clip.list_models()[:8]} "
                              "and fastcbm bundles 'testbed'")
    from fastcbm.compat import quiet_downloads

    try:
        with quiet_downloads():
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    except _DOWNLOAD_ERRORS as exc:
        if pretrained:
            raise _offline_error(f"open_clip {name!r} pretrained={pretrained!r}", exc) from None
        raise
    return model, preprocess, open_clip.get_tokenizer(name)


def _torchvision_backbone(name: str, pretrained) -> Backbone | None:
    from fastcbm.compat import import_torchvision

    tv = import_torchvision()
    models = tv.models
    if name not in models.list_models(module=models):
        return None
    weights = None
    if pretrained:
        weights = "DEFAULT" if pretrained is True else pretrained
    from fastcbm.compat import quiet_downloads

    try:
        with quiet_downloads():
            model = models.get_model(name, weights=weights)
    except _DOWNLOAD_ERRORS as exc:
        if weights is not None:
            url = getattr(models.get_weight(f"{models.get_model_weights(name).__name__}.DEFAULT"), "url", "")
            raise _offline_error(f"torchvision {name} ({weights}: {url})", exc) from None
        raise
    if name.startswith(("resnet", "resnext", "wide_resnet")):
        layers = ["layer1", "layer2", "layer3", "layer4"]
    else:
        layers = [n for n, _ in model.named_children()][:-1]
    num_classes = getattr(getattr(model, "fc", None), "out_features", 1000)
    return Backbone(model=model, preprocess=None, kind="cnn", feature_layers=layers, mean=IMAGENET_MEAN,
                    std=IMAGENET_STD, input_size=224, num_classes=num_classes, name=name)


def _timm_backbone(name: str, pretrained) -> Backbone:
    from fastcbm.compat import import_timm

    timm = import_timm()

    from fastcbm.compat import quiet_downloads

    try:
        with quiet_downloads():
            model = timm.create_model(name, pretrained=bool(pretrained))
    except _DOWNLOAD_ERRORS as exc:
        if pretrained:
            raise _offline_error(f"timm {name}", exc) from None
        raise
    cfg = model.pretrained_cfg or {}
    if hasattr(model, "blocks"):
        kind, layers = "vit", [f"blocks.{i}" for i in range(len(model.blocks))]
    else:
        kind = "cnn"
        layers = [f"stages.{i}" for i in range(len(getattr(model, "stages", [])))] or ["layer1", "layer2", "layer3",
                                                                                        "layer4"]
    return Backbone(model=model, preprocess=None, kind=kind, feature_layers=layers,
                    mean=tuple(cfg.get("mean", IMAGENET_MEAN)), std=tuple(cfg.get("std", IMAGENET_STD)),
                    input_size=int(cfg.get("input_size", (3, 224, 224))[-1]), num_classes=model.num_classes,
                    num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 1)), name=name)


def load_external_backbone(name: str, pretrained) -> Backbone:
    backbone = _torchvision_backbone(name, pretrained)
    if backbone is not None:
        return backbone
    from fastcbm.compat import import_timm

    timm = import_timm()

    if not timm.list_models(name):
        raise InvalidArgument(f"unknown backbone {name!r}: not bundled ('testbed', 'testbed-vit'), not a torchvision "
                              "model and not a timm model")
    return _timm_backbone(name, pretrained)
