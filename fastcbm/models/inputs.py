"""What a model's input looks like: the normalisation constants (one copy of CLIP's and ImageNet's) and the input
space of a CLIP image tower (side, mean, std), read from the model itself."""

from __future__ import annotations

from typing import Any

import torch

from fastcbm.errors import InvalidArgument

# OpenAI CLIP's pixel statistics (open_clip's OPENAI_DATASET_MEAN / _STD): the encoders' and the ring prompts' default
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
# torchvision's ImageNet classifiers
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def encoder_input_config(model: torch.nn.Module, preprocess: Any = None) -> tuple[int, tuple, tuple]:
    """``(size, mean, std)`` of the encoder's input: ``model.visual.preprocess_cfg`` if present, else read from the
    ``preprocess`` transform (Resize/CenterCrop size, Normalize mean/std), else ``model.visual.image_size`` and CLIP
    defaults."""
    visual = getattr(model, "visual", model)
    size = mean = std = None
    cfg = getattr(visual, "preprocess_cfg", None)
    if isinstance(cfg, dict) and cfg:
        size, mean, std = cfg.get("size"), cfg.get("mean"), cfg.get("std")
    if preprocess is not None and hasattr(preprocess, "transforms"):
        for t in preprocess.transforms:
            name = type(t).__name__
            if name == "Normalize" and mean is None:
                mean, std = tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std)
            elif name in ("CenterCrop", "Resize", "RandomResizedCrop") and size is None and name != "Resize":
                size = t.size
    if size is None:
        size = getattr(visual, "image_size", None)
    if size is None:
        raise InvalidArgument("model: cannot tell the encoder's input size (no visual.preprocess_cfg, no preprocess "
                              "transform with a crop, no visual.image_size)")
    if isinstance(size, (tuple, list)):
        if len(set(int(s) for s in size)) != 1:
            raise InvalidArgument(f"model: non-square encoder input {tuple(size)} is not supported")
        size = size[0]
    mean = tuple(float(v) for v in (mean or CLIP_MEAN))
    std = tuple(float(v) for v in (std or CLIP_STD))
    return int(size), mean, std


def normalize_uint8(images: torch.Tensor, mean, std, *, device: torch.device | str | None = None,
                    size: int | None = None, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels ``[N, 3, H, W]`` → a model's normalised float input ``[N, 3, S, S]``: ``x / 255``, resized to
    ``size`` when given and different (bilinear, antialiased, align_corners=False: the whole image, no crop), then
    ``(x − mean) / std``, computed in ``compute_dtype`` (float32; precompute's plain copy uses float64 to equal the
    ring kernel's bit for bit) on ``device`` (default: the images'). The one place fastcbm turns pixels into inputs."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise InvalidArgument(f"images must be uint8 [N, 3, S, S], got {images.dtype} {tuple(images.shape)}")
    device = images.device if device is None else torch.device(device)
    x = images.to(device).to(compute_dtype).div_(255)
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        import torch.nn.functional as F

        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    m = torch.tensor(mean, dtype=compute_dtype, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=compute_dtype, device=device).view(1, 3, 1, 1)
    return (x - m) / s
