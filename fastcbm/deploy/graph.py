"""The modules that become deployment graphs: a SALF-CBM that predicts *and* explains in one forward pass, and a CLIP
image tower. Both take raw pixels (normalisation is inside the graph, so a client sends what it decoded).

Input conventions (``input_dtype``):

- ``"uint8"``: pixels 0..255, ``[N, 3, S, S]``;
- ``"float32"``: pixels scaled to 0..1 (torchvision ``ToTensor``), ``[N, 3, S, S]``;
- ``"normalized"``: float already normalised with the model's mean/std (what ``fastcbm precompute`` renders).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastcbm.models.features import FeatureHooks, as_feature_map, resize_to_grid
from fastcbm.heads import pool_concept_maps
from fastcbm.errors import InvalidArgument

INPUT_DTYPES = ("uint8", "float32", "normalized")
SALF_OUTPUTS = ("logits", "concepts", "concept_maps", "contributions")


class PixelNormalize(nn.Module):
    """Raw pixels → the model's normalised float input. uint8 folds the 1/255 into the affine map (one mul-add)."""

    def __init__(self, input_dtype: str, mean, std, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        if input_dtype not in INPUT_DTYPES:
            raise InvalidArgument(f"input_dtype must be one of {INPUT_DTYPES}, got {input_dtype!r}")
        self.input_dtype = input_dtype
        self.compute_dtype = compute_dtype
        scale = 255.0 if input_dtype == "uint8" else 1.0
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        # x_norm = (x/scale − mean)/std = x·a + b
        self.register_buffer("a", 1.0 / (scale * std_t))
        self.register_buffer("b", -mean_t / std_t)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if self.input_dtype != "normalized":
            x = x * self.a + self.b
        return x.to(self.compute_dtype)


class ExplainedSALF(nn.Module):
    """A :class:`~fastcbm.salf.model.SALFCBM` as one graph: raw pixels ``[N, 3, S, S]`` →
    ``logits [N, K]``, ``concepts [N, M]`` (standardised pooled activations), ``concept_maps [N, M, Gy, Gx]`` (raw
    bottleneck maps) and ``contributions [N, M]`` (W[ŷ, m]·c*[m] for the predicted class ŷ), in the order of
    ``outputs`` (any subset of :data:`SALF_OUTPUTS`; ``("logits",)`` is the bare classifier, for cost comparisons).

    ``precision="fp16"`` runs the backbone and bottleneck in half precision (a reduced-precision graph for a strongly
    typed TensorRT engine); pooling, standardisation and the head stay in fp32 and every output is fp32.
    """

    def __init__(self, model, *, mean, std, input_dtype: str = "uint8", precision: str = "fp32",
                 outputs: tuple[str, ...] = SALF_OUTPUTS):
        super().__init__()
        bad = [o for o in outputs if o not in SALF_OUTPUTS]
        if bad or not outputs:
            raise InvalidArgument(f"outputs must be a non-empty subset of {SALF_OUTPUTS}, got {outputs}")
        if precision not in ("fp32", "fp16"):
            raise InvalidArgument(f"precision must be 'fp32' or 'fp16', got {precision!r}")
        self.dtype = torch.float16 if precision == "fp16" else torch.float32
        self.outputs = tuple(outputs)
        self.normalize = PixelNormalize(input_dtype, mean, std, self.dtype)
        self.backbone = model.backbone
        self.kind, self.layer, self.num_prefix_tokens = model.kind, model.layer, model.num_prefix_tokens
        self.grid = tuple(model.config.grid)
        self.pooling, self.temperature = model.config.pooling, model.config.softmax_temperature
        self.register_buffer("weight", model.weight.detach().float().clone())  # [M, C]
        self.register_buffer("head_weight", model.head_weight.detach().float().clone())  # [K, M]
        self.register_buffer("head_bias", model.head.bias.detach().float().clone())  # [K]
        self.register_buffer("concept_mean", model.concept_mean.detach().float().clone())  # [M]
        self.register_buffer("concept_std", model.concept_std.detach().float().clone())  # [M]
        if self.dtype != torch.float32:
            self.backbone = _half_copy(self.backbone)

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C, Gy, Gx]`` feature maps of the normalised input (in the graph's compute dtype)."""
        with FeatureHooks(self.backbone, [self.layer]) as hooks:
            self.backbone(x)  # layers after the feature layer are dead code: the exporter drops them
        fmap = as_feature_map(hooks.outputs[self.layer], self.kind, self.num_prefix_tokens)
        return resize_to_grid(fmap, self.grid)

    def forward(self, images: torch.Tensor):
        x = self.normalize(images)
        fmap = self.feature_maps(x)
        # the 1×1 bottleneck as a convolution: one Conv node, which every runtime fuses well (an Einsum may not)
        maps = F.conv2d(fmap, self.weight.to(fmap.dtype)[:, :, None, None]).float()  # [N, M, Gy, Gx]
        pooled = pool_concept_maps(maps, self.pooling, self.temperature)
        concepts = (pooled - self.concept_mean) / self.concept_std
        logits = F.linear(concepts, self.head_weight, self.head_bias)
        out = {"logits": logits, "concepts": concepts, "concept_maps": maps}
        if "contributions" in self.outputs:
            pred = logits.argmax(dim=1)
            out["contributions"] = self.head_weight[pred] * concepts
        return tuple(out[name] for name in self.outputs)


class ClipImageTower(nn.Module):
    """``model.encode_image`` of a CLIP model as a graph: pixels ``[N, 3, S, S]`` → ``embedding [N, D]`` (fp32,
    not normalised, exactly what ``encode_image`` returns)."""

    def __init__(self, clip_model, *, mean, std, input_dtype: str = "normalized", precision: str = "fp32"):
        super().__init__()
        if precision not in ("fp32", "fp16"):
            raise InvalidArgument(f"precision must be 'fp32' or 'fp16', got {precision!r}")
        self.dtype = torch.float16 if precision == "fp16" else torch.float32
        self.normalize = PixelNormalize(input_dtype, mean, std, self.dtype)
        visual = getattr(clip_model, "visual", None)
        if visual is None:
            raise InvalidArgument(f"model: {type(clip_model).__name__} has no .visual image tower")
        self.visual = _half_copy(visual) if self.dtype != torch.float32 else visual
        self.outputs = ("embedding",)

    def forward(self, images: torch.Tensor):
        return (self.visual(self.normalize(images)).float(),)


def _half_copy(module: nn.Module) -> nn.Module:
    """A half-precision copy (the caller's module keeps its fp32 weights). Normalisation layers stay fp32-accurate
    enough in fp16 for inference; LayerNorm is computed by TensorRT in fp32 internally when the ONNX asks for it."""
    import copy

    return copy.deepcopy(module).half()
