"""CE-FAM concept regions: the batched method (one forward, min(T, D) batched VJPs, closed-form deepest stage) equals
one backward per (image, concept), on the testbed CNN, random torchvision ResNets and the testbed ViT."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastcbm.cefam import Translator, concept_regions
from fastcbm.cefam.regions import concept_grads
from fastcbm.cefam.translator import pool_stages, stage_activations
from fastcbm.models import load_backbone
from tests.conftest import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")


def setup(backbone, layers, t: int, d: int, size: int, batch: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    images = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        _, acts = stage_activations(backbone.model, images[:1], layers, backbone.kind, backbone.num_prefix_tokens)
    translator = Translator(pool_stages(acts, layers).shape[1], d, (24, 20))
    return images, translator, torch.randn(t, d)


def rel_close(got: dict, ref: dict, what: str, rel: float = 1e-5) -> None:
    for n, expected in ref.items():
        scale = expected.abs().max().item()
        assert scale > 0, f"{what} {n}: reference is all zero, the test would prove nothing"
        assert_close(got[n], expected, atol=rel * scale, rtol=rel, what=f"{what} {n}")


@pytest.fixture(scope="module")
def testbed():
    return load_backbone("testbed")


# T < D (the T score directions are the cotangents) and T > D (eye(D) cotangents, then β = g·G)
@pytest.mark.parametrize("t, d", [(3, 16), (20, 8)])
def test_batched_equals_loop_testbed_cnn(testbed, t, d):
    layers = testbed.feature_layers
    images, translator, text = setup(testbed, layers, t, d, testbed.input_size)
    batched = concept_regions(testbed, translator, images, text, layers, logit_scale=50.0, bias=0.3)
    loop = concept_regions(testbed, translator, images, text, layers, method="loop", logit_scale=50.0, bias=0.3)
    for n in layers:
        assert batched[n].shape == (2, t, *loop[n].shape[2:])
    rel_close(batched, loop, "regions")
    grads_b = concept_grads(testbed, translator, images, text, layers)
    grads_l = concept_grads(testbed, translator, images, text, layers, method="loop")
    rel_close(grads_b.betas, grads_l.betas, "beta")


def test_layer_order_and_subset(testbed):
    """z_cat in the order given (deepest first, as the released code concatenates), two stages only."""
    layers = ["layer4", "layer2"]
    images, translator, text = setup(testbed, layers, 4, 8, testbed.input_size, batch=1)
    rel_close(concept_regions(testbed, translator, images, text, layers),
              concept_regions(testbed, translator, images, text, layers, method="loop"), "regions")


def test_single_stage_closed_form_only(testbed):
    layers = ["layer4"]
    images, translator, text = setup(testbed, layers, 5, 8, testbed.input_size, batch=1)
    rel_close(concept_regions(testbed, translator, images, text, layers),
              concept_regions(testbed, translator, images, text, layers, method="loop"), "regions")


def test_region_is_gradcam_of_the_concept_score(testbed):
    """One concept, by hand: β = spatial mean of ∂S/∂A at layer3 (autograd through everything), ReLU(Σβ·A)."""
    layers = testbed.feature_layers
    images, translator, text = setup(testbed, layers, 2, 8, testbed.input_size, batch=1)
    model = testbed.model.eval()
    with torch.enable_grad():
        _, acts = stage_activations(model, images.requires_grad_(True), layers)
        h = translator(pool_stages(acts, layers))
        score = 100.0 * torch.cosine_similarity(h, text[1:2], dim=-1).sum()
        (grad,) = torch.autograd.grad(score, acts["layer3"])
    expected = torch.relu((grad.mean(dim=(2, 3))[:, :, None, None] * acts["layer3"]).sum(1)).detach()
    got = concept_regions(testbed, translator, images.detach(), text, layers)["layer3"][:, 1]
    assert_close(got, expected, atol=1e-5 * expected.abs().max().item(), rtol=1e-5, what="hand Grad-CAM")


@pytest.mark.parametrize("name, size, t", [("resnet18", 64, 12), ("resnet50", 64, 3)])
def test_batched_equals_loop_torchvision(name, size, t):
    backbone = load_backbone(name)  # random init
    layers = backbone.feature_layers
    images, translator, text = setup(backbone, layers, t, 8, size, batch=1)
    rel_close(concept_regions(backbone, translator, images, text, layers),
              concept_regions(backbone, translator, images, text, layers, method="loop"), name)


def test_batched_equals_loop_testbed_vit():
    backbone = load_backbone("testbed-vit")
    layers = ["blocks.1", "blocks.3"]
    images, translator, text = setup(backbone, layers, 6, 8, backbone.input_size)
    batched = concept_regions(backbone, translator, images, text, layers)
    assert batched["blocks.1"].shape == (2, 6, 8, 8)
    rel_close(batched, concept_regions(backbone, translator, images, text, layers, method="loop"), "vit")


def test_plain_module_and_train_mode_restored(testbed):
    model = testbed.model.train()
    layers = ["layer2", "layer4"]
    images, translator, text = setup(testbed, layers, 3, 8, testbed.input_size)
    translator.train()
    out = concept_regions(model, translator, images, text, layers)  # a plain nn.Module: kind="cnn"
    assert model.training and translator.training
    model.eval()
    rel_close(out, concept_regions(testbed, translator, images, text, layers, method="loop"), "plain module")


def test_bad_inputs(testbed):
    layers = testbed.feature_layers
    images, translator, text = setup(testbed, layers, 3, 8, testbed.input_size, batch=1)
    with pytest.raises(ValueError, match="translator outputs 8"):
        concept_regions(testbed, translator, images, torch.randn(3, 7), layers)
    with pytest.raises(ValueError, match="not modules of the classifier"):
        concept_regions(testbed, translator, images, text, ["layer2", "layer9"])
    with pytest.raises(ValueError, match="translator takes"):
        concept_regions(testbed, translator, images, text, ["layer1", "layer2"])
    with pytest.raises(ValueError, match="empty"):
        concept_regions(testbed, translator, images, torch.zeros(0, 8), layers)
    with pytest.raises(ValueError, match="method"):
        concept_regions(testbed, translator, images, text, layers, method="fast")
    with pytest.raises(ValueError, match="non-empty list"):
        concept_regions(testbed, translator, images, text, [])
    with pytest.raises(ValueError, match="classifier must be"):
        concept_regions(object(), translator, images, text, layers)
    assert isinstance(testbed.model, nn.Module)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_batched_equals_cpu_loop(backend):
    """On a GPU: batched regions with the CUDA / Triton fuse epilogue equal the CPU loop reference."""
    backbone = load_backbone("testbed")
    layers = backbone.feature_layers
    images, translator, text = setup(backbone, layers, 40, 16, backbone.input_size)
    loop = concept_regions(backbone, translator, images, text, layers, method="loop")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    backbone.model.cuda()
    got = concept_regions(backbone, translator.cuda(), images.cuda(), text.cuda(), layers, backend=backend)
    rel_close({n: v.cpu() for n, v in got.items()}, loop, f"gpu {backend}", rel=1e-4)
