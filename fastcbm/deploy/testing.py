"""Randomly initialised SALF-CBMs for deployment benchmarks and checks (latency does not depend on training)."""

from __future__ import annotations

import torch

# (backbone name, input size, concepts M, classes K): ResNet-50 with an ImageNet-sized head
BENCH_MODELS = {
    "testbed": ("testbed", 64, 64, 10),
    "resnet50": ("resnet50", 224, 512, 1000),
}


def random_salf(backbone_name: str, m: int, k: int, *, grid: tuple[int, int] = (7, 7), seed: int = 0,
                head_density: float = 0.05):
    """``(SALFCBM, Backbone)``: random bottleneck ``[M, C]`` and a sparse random head ``[K, M]`` (``head_density``
    non-zeros, like a trained sparse head) on ``load_backbone(backbone_name)`` with random init."""
    from fastcbm.models.features import extract_feature_maps
    from fastcbm.heads import LinearHead
    from fastcbm.models import load_backbone
    from fastcbm.salf.model import SALFCBM, SALFConfig

    torch.manual_seed(seed)
    bb = load_backbone(backbone_name)
    layer = bb.feature_layers[-1]
    with torch.no_grad():
        c = extract_feature_maps(bb.model, torch.zeros(1, 3, bb.input_size, bb.input_size), layer, kind=bb.kind,
                                 num_prefix_tokens=bb.num_prefix_tokens).shape[1]
    head = LinearHead(m, k)
    with torch.no_grad():
        head.weight.normal_().mul_((torch.rand(k, m) < head_density).float())
        head.standardizer.std.uniform_(0.5, 2.0)
    cfg = SALFConfig(backbone=backbone_name, grid=grid, feature_layer=layer, concepts=[f"c{i}" for i in range(m)],
                     class_names=[f"k{i}" for i in range(k)])
    return SALFCBM(bb.model, bb.kind, cfg, torch.randn(m, c) * 0.02, head), bb
