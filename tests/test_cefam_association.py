"""CE-FAM association and contribution: batched (rank-1 prefix sums; one batched partial forward) equals the
step-by-step loop, and both equal an independent hand-written implementation of the authors' procedure."""

from __future__ import annotations

import pytest
import torch

from fastcbm.cefam import Translator
from fastcbm.cefam.association import (
    association_scores,
    channel_ranking,
    concept_contributions,
)
from fastcbm.cefam.regions import concept_grads
from fastcbm.cefam.translator import concept_scores, pool_stages, stage_activations
from fastcbm.models import load_backbone
from tests.conftest import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")


def setup(backbone, layers, t: int, d: int, batch: int = 2, dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    backbone.model.to(dtype)
    images = torch.randn(batch, 3, backbone.input_size, backbone.input_size, dtype=dtype)
    with torch.no_grad():
        _, acts = stage_activations(backbone.model, images[:1], layers, backbone.kind, backbone.num_prefix_tokens)
    translator = Translator(pool_stages(acts, layers).shape[1], d, (24, 20)).to(dtype)
    return images, translator, torch.randn(t, d, dtype=dtype)


@pytest.fixture(scope="module")
def cnn():
    return load_backbone("testbed")


@pytest.fixture(scope="module")
def vit():
    return load_backbone("testbed-vit")


@pytest.mark.parametrize("variant", ["official", "paper"])
def test_association_batched_equals_loop_and_hand(cnn, variant):
    layers = cnn.feature_layers
    images, translator, text = setup(cnn, layers, 5, 8)
    grads = concept_grads(cnn, translator, images, text, layers)
    batched = association_scores(cnn, translator, images, text, layers, top_k=4, variant=variant, grads=grads)
    loop = association_scores(cnn, translator, images, text, layers, top_k=4, variant=variant, grads=grads,
                              method="loop")
    assert batched.shape == (2, 5, 4)
    assert batched.abs().max() > 1e-4
    assert_close(batched, loop, atol=1e-10, rtol=1e-5, what="association batched vs loop")
    # by hand for one (image, concept, stage): layer2, channels ranked by β·z, masked with the channel mean
    i, j, stage = 1, 3, "layer2"
    a = cnn.feature_layers.index(stage)
    off = sum(grads.maps[n].shape[1] for n in layers[:a])
    c = grads.maps[stage].shape[1]
    z = grads.z[i].clone()
    order = torch.argsort(grads.betas[stage][i, j] * z[off:off + c], descending=True)[:4]
    mean = z[off:off + c].mean()

    def score(zz):
        s = concept_scores(translator(zz[None]), text)[0]
        return s.softmax(-1)[j] if variant == "official" else s[j]

    with torch.no_grad():
        p0, drops = score(z), []
        for k in order:
            z[off + k] = mean
            drops.append((p0 - score(z)) / p0)
    assert abs(batched[i, j, a].item() - torch.stack(drops).mean().item()) < 1e-9


def test_association_vit_and_top_k_clamped(vit):
    layers = ["blocks.1", "blocks.3"]
    images, translator, text = setup(vit, layers, 4, 8)
    batched = association_scores(vit, translator, images, text, layers, top_k=500)  # > 128 channels: all of them
    loop = association_scores(vit, translator, images, text, layers, top_k=500, method="loop",
                              grads=concept_grads(vit, translator, images, text, layers))
    assert_close(batched, loop, atol=1e-10, rtol=1e-5, what="vit association")


@pytest.mark.parametrize("variant, drop_negative", [("official", False), ("paper", True)])
def test_contribution_batched_equals_loop_and_hand(cnn, variant, drop_negative):
    layers = cnn.feature_layers
    images, translator, text = setup(cnn, layers, 4, 8)
    grads = concept_grads(cnn, translator, images, text, layers)
    chosen = torch.tensor([[0, 3, 1, 2], [3, 3, 2, 0]])
    kw = {"top_k": 3, "variant": variant, "drop_negative": drop_negative, "grads": grads}
    batched = concept_contributions(cnn, translator, images, text, layers, chosen, **kw)
    loop = concept_contributions(cnn, translator, images, text, layers, chosen, method="loop", **kw)
    assert batched.shape == (2, 4)
    assert batched.abs().max() > 1e-6
    assert_close(batched, loop, atol=1e-10, rtol=1e-5, what="contribution batched vs loop")
    if drop_negative:
        assert (batched >= 0).all()
    # by hand for (image 0, concept 1) at layer4 (the deepest: the tensor's global mean in both variants) and
    # (image 1, concept 2) at layer3 (official: each channel's own spatial mean)
    model = cnn.model.eval()
    for i, j in [(0, 1), (1, 2)]:
        stage = layers[int(chosen[i, j])]
        idx = channel_ranking(grads, stage, 3)[i, j]
        target = int(grads.logits[i].argmax())
        with torch.no_grad():
            p0 = model(images[i:i + 1]).softmax(-1)[0, target]
            drops = []
            module = dict(model.named_modules())[stage]
            own = variant == "official" and stage != "layer4"
            for k in range(1, 4):
                def hook(_m, _inp, out, k=k, idx=idx, own=own):
                    new = out.clone()
                    for ch in idx[:k]:
                        new[0, ch] = out[0, ch].mean() if own else out.mean()
                    return new

                handle = module.register_forward_hook(hook)
                pk = model(images[i:i + 1]).softmax(-1)[0, target]
                handle.remove()
                drops.append((p0 - pk) / p0)
        expected = torch.stack(drops).mean()
        expected = expected.clamp_min(0) if drop_negative else expected
        assert abs(batched[i, j].item() - expected.item()) < 1e-9, (i, j)


def test_contribution_vit_and_explicit_target(vit):
    layers = ["blocks.1", "blocks.3"]
    images, translator, text = setup(vit, layers, 3, 8)
    chosen = torch.tensor([[0, 1, 0], [0, 0, 1]])
    target = torch.tensor([2, 5])
    batched = concept_contributions(vit, translator, images, text, layers, chosen, target=target, top_k=4)
    loop = concept_contributions(vit, translator, images, text, layers, chosen, target=target, top_k=4,
                                 method="loop")
    assert batched[:, 0].abs().max() > 1e-8  # masking block 1 reaches the head
    assert_close(batched, loop, atol=1e-10, rtol=1e-5, what="vit contribution")


def test_fp32_batched_close_to_loop(cnn):
    layers = ["layer3", "layer4"]
    images, translator, text = setup(cnn, layers, 3, 8, batch=1, dtype=torch.float32)
    grads = concept_grads(cnn, translator, images, text, layers)
    a = association_scores(cnn, translator, images, text, layers, top_k=5, grads=grads)
    b = association_scores(cnn, translator, images, text, layers, top_k=5, grads=grads, method="loop")
    assert_close(a, b, atol=1e-4 * b.abs().max().item(), rtol=1e-3, what="fp32 association")
    cnn.model.double()


def test_bad_inputs(cnn):
    layers = cnn.feature_layers
    images, translator, text = setup(cnn, layers, 3, 8, batch=2)
    chosen = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="chosen must be"):
        concept_contributions(cnn, translator, images, text, layers, chosen[:, :2])
    with pytest.raises(ValueError, match="chosen must be"):
        concept_contributions(cnn, translator, images, text, layers, chosen + 4)
    with pytest.raises(ValueError, match="target must be"):
        concept_contributions(cnn, translator, images, text, layers, chosen, target=torch.tensor([0, 99]))
    with pytest.raises(ValueError, match="variant"):
        association_scores(cnn, translator, images, text, layers, variant="x")
    with pytest.raises(ValueError, match="top_k"):
        association_scores(cnn, translator, images, text, layers, top_k=0)
    with pytest.raises(ValueError, match="translator outputs"):
        association_scores(cnn, translator, images, torch.randn(3, 5, dtype=torch.float64), layers)
    with pytest.raises(ValueError, match="empty"):
        association_scores(cnn, translator, images, text[:0], layers)
    with pytest.raises(ValueError, match="not modules"):
        association_scores(cnn, translator, images, text, ["layer1", "nope"])
    with pytest.raises(ValueError, match="translator takes"):
        association_scores(cnn, translator, images, text, ["layer1"])


@pytest.mark.gpu
def test_gpu_batched_equals_cpu_loop():
    backbone = load_backbone("testbed")
    layers = backbone.feature_layers
    images, translator, text = setup(backbone, layers, 6, 8)
    chosen = torch.tensor([[0, 1, 2, 3, 3, 0], [2, 3, 1, 0, 0, 1]])
    assoc = association_scores(backbone, translator, images, text, layers, top_k=4, method="loop")
    contrib = concept_contributions(backbone, translator, images, text, layers, chosen, top_k=4, method="loop")
    backbone.model.cuda()
    args = (backbone, translator.cuda(), images.cuda(), text.cuda(), layers)
    assert_close(association_scores(*args, top_k=4).cpu(), assoc, atol=1e-9, rtol=1e-6, what="gpu association")
    assert_close(concept_contributions(*args, chosen.cuda(), top_k=4).cpu(), contrib, atol=1e-9, rtol=1e-6,
                 what="gpu contribution")


def test_contribution_batched_refuses_fixed_batch_models():
    """A model whose batch size cannot change after the stage: a clear error pointing to method='loop'."""

    class FixedBatch(torch.nn.Module):
        def forward(self, x):
            return x.reshape(1, -1)[:, :5]  # folds every copy into one row

    model = torch.nn.Sequential()
    model.add_module("stage", torch.nn.Conv2d(3, 4, 3, padding=1))
    model.add_module("head", FixedBatch())
    model = model.double()
    images = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    translator = Translator(4, 8, (6,)).double()
    text = torch.randn(2, 8, dtype=torch.float64)
    chosen = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="method='loop'"):
        concept_contributions(model, translator, images, text, ["stage"], chosen, top_k=2)
    loop = concept_contributions(model, translator, images, text, ["stage"], chosen, top_k=2, method="loop")
    assert loop.shape == (1, 2) and torch.isfinite(loop).all()
