"""DEAL's differentiable explanations: the recomputed heads equal open_clip's modules, batched == per-text loop, the
regularisers' gradient reaches the tower's weights (checked against finite differences in float64) and the authors'
detached form sends exactly none."""

from __future__ import annotations

import pytest
import torch

from fastcbm.concepts import tokenize_checked
from fastcbm.deal import explain as E
from tests.conftest import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vit_clip(dtype=torch.float32):
    from fastcbm.compat import import_open_clip

    import_open_clip()
    from open_clip.model import CLIP

    torch.manual_seed(0)
    model = CLIP(embed_dim=16, vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16),
                 text_cfg=dict(context_length=16, vocab_size=50, width=32, heads=2, layers=1))
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def testbed_clip():
    from fastcbm.models import load_clip

    model, _, tokenizer = load_clip("testbed")
    return model, tokenizer


def _inputs(model, B=2, T=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = model.visual.image_size if isinstance(model.visual.image_size, int) else model.visual.image_size[0]
    D = model.text_projection.shape[1] if isinstance(model.text_projection, torch.Tensor) else 16
    return (torch.randn(B, 3, S, S, generator=g, dtype=dtype), torch.randn(B, T, D, generator=g, dtype=dtype))


def test_resnet_head_equals_open_clip_attnpool(testbed_clip):
    model, _ = testbed_clip
    x, _ = _inputs(model)
    kind, act, head = E.split_tower(model, x)
    assert kind == "resnet" and act.shape[-2:] == (2, 2)
    with torch.no_grad():
        assert_close(head(act), model.encode_image(x), atol=1e-4, rtol=1e-4, what="resnet head")
        assert_close(head(act), model.visual.attnpool(act), atol=1e-4, rtol=1e-4, what="attnpool")


def test_vit_last_block_recompute_equals_module():
    model = tiny_vit_clip(torch.float64)
    x, _ = _inputs(model, dtype=torch.float64)
    kind, probs, head = E.split_tower(model, x)
    assert kind == "vit" and probs.shape == (2, 2, 17, 17)
    assert_close(probs.sum(-1), torch.ones(2, 2, 17), atol=1e-12, rtol=0, what="rows sum to one")
    # the module's own attention weights (need_weights=True, averaged over heads) equal ours
    tokens = E.vit_trunk(model.visual, x)
    blk = model.visual.transformer.resblocks[-1]
    h = blk.ln_1(tokens)
    _, w = blk.attn(h, h, h, need_weights=True, average_attn_weights=False)
    assert_close(probs, w, atol=1e-12, rtol=0, what="attention probabilities")
    assert_close(head(probs), model.encode_image(x), atol=1e-10, rtol=0, what="vit head")


@pytest.mark.parametrize("tower", ["resnet", "vit"])
@pytest.mark.parametrize("mode", ["fast", "batched", "expand"])
def test_batched_equals_per_text_loop(tower, mode, testbed_clip):
    model = testbed_clip[0] if tower == "resnet" else tiny_vit_clip()
    x, t = _inputs(model, B=3, T=5)
    ref = E.explanations(model, x, t, mode="loop", normalize=False)
    got = E.explanations(model, x, t, mode=mode, normalize=False)
    assert ref.shape == (3, 5, 2, 2) if tower == "resnet" else (3, 5, 4, 4)
    assert float(ref.detach().abs().max()) > 0
    assert_close(got, ref, atol=1e-6, rtol=1e-4, what=f"{tower} {mode} maps")
    # and their gradients w.r.t. the weights (second order through the head)
    _assert_same_weight_grads(model, got, ref, what=f"{tower} {mode} grads")


def _assert_same_weight_grads(model, got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """The image tower's weight gradients of Σ got² and Σ ref² agree. fp32, different summation orders: tolerance on
    the scale of each tensor, floored at the global scale because attnpool.k_proj.bias has an exactly-zero true
    gradient (softmax shift invariance) and only rounding noise."""
    p = list(model.visual.parameters())
    g_ref = torch.autograd.grad((ref ** 2).sum(), p, allow_unused=True)
    g_got = torch.autograd.grad((got ** 2).sum(), p, allow_unused=True)
    scale = max(float(b.abs().max()) for b in g_ref if b is not None)
    for a, b in zip(g_got, g_ref):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(a, b, atol=max(1e-3 * float(b.abs().max()), 1e-4 * scale), rtol=1e-2, what=what)


@pytest.mark.parametrize("mode", ["auto", "batched", "expand"])
def test_resnet_layer3_batched_equals_loop_with_grads(mode, testbed_clip):
    """``layer="layer3"``: Grad-CAM on layer3 (4×4 on the testbed), its K+1 gradients through layer4 and the pool as
    batched VJPs (create_graph); equal to one backward per text, maps and their second-order weight gradients."""
    model = testbed_clip[0]
    x, t = _inputs(model, B=3, T=5)
    kind, act, head = E.split_tower(model, x, "layer3")
    assert act.shape[-2:] == (4, 4)
    with torch.no_grad():
        assert_close(head(act), model.encode_image(x), atol=1e-4, rtol=1e-4, what="layer3 head")
    ref = E.explanations(model, x, t, mode="loop", normalize=False, layer="layer3")
    got, emb = E.explanations(model, x, t, mode=mode, normalize=False, layer="layer3", return_embedding=True)
    assert ref.shape == (3, 5, 4, 4) and float(ref.detach().abs().max()) > 0
    assert_close(got, ref, atol=1e-6, rtol=1e-4, what=f"layer3 {mode} maps")
    with torch.no_grad():
        assert_close(emb, model.encode_image(x), atol=1e-4, rtol=1e-4, what="layer3 embedding")
    # Grad-CAM by hand: α = spatial mean of ∂s_k/∂A3 from plain autograd on the whole tower
    a3 = E.resnet_trunk(model.visual, x, "layer3").detach().requires_grad_(True)
    e = E.resnet_head(model.visual.attnpool, model.visual.layer4(a3))
    s = torch.einsum("bd,btd->bt", torch.nn.functional.normalize(e, dim=-1), torch.nn.functional.normalize(t, dim=-1))
    alpha = torch.stack([torch.autograd.grad(s[:, k].sum(), a3, retain_graph=True)[0].mean((-2, -1))
                         for k in range(5)], 1)
    hand = torch.relu(torch.einsum("btc,bchw->bthw", alpha, a3))
    assert_close(got.detach(), hand, atol=1e-6, rtol=1e-4, what="layer3 Grad-CAM by hand")
    _assert_same_weight_grads(model, got, ref, what="layer3 grads")
    with pytest.raises(ValueError, match="needs layer='layer4'"):
        E.explanations(model, x, t, mode="fast", layer="layer3")
    with pytest.raises(ValueError, match="explain layer must be"):
        E.explanations(model, x, t, layer="layer2")
    with pytest.raises(ValueError, match="ResNet image towers only"):
        E.explanations(tiny_vit_clip(), *_inputs(tiny_vit_clip()), layer="layer3")


def test_fast_path_returns_the_towers_embedding_and_falls_back_for_avg_pool(testbed_clip):
    for model in (testbed_clip[0], tiny_vit_clip()):
        x, t = _inputs(model)
        _, emb = E.explanations(model, x, t, return_embedding=True)
        with torch.no_grad():
            assert_close(emb, model.encode_image(x), atol=1e-4, rtol=1e-4, what="embedding")
    model = tiny_vit_clip()
    model.visual.pool_type = "avg"  # the embedding then reads every token: "auto" takes the batched autograd path
    x, t = _inputs(model)
    assert_close(E.explanations(model, x, t), E.explanations(model, x, t, mode="loop"), atol=1e-6, rtol=1e-4,
                 what="avg-pool ViT")
    with pytest.raises(ValueError, match="CLS pooling"):
        E.explanations(model, x, t, mode="fast")


def test_maps_are_min_max_normalised(testbed_clip):
    model = testbed_clip[0]
    x, t = _inputs(model)
    maps = E.explanations(model, x, t)
    flat = maps.detach().flatten(2)
    assert float(flat.min()) >= 0 and float(flat.max()) <= 1
    nonconst = flat.amax(-1) > 0
    assert bool(nonconst.any())
    assert_close(flat.amax(-1)[nonconst], torch.ones(int(nonconst.sum())), atol=1e-4, rtol=0,
                 what="max = 1 (less the +1e-8)")


def _reg(maps):
    # a regulariser shaped like DEAL's: products between concept maps + squared difference to the category map
    c = maps[:, 1:]
    sep = (c.unsqueeze(1) * c.unsqueeze(2)).sum()
    con = ((c.sum(1) - maps[:, 0]) ** 2).sum()
    return sep + 0.5 * con


def _fd_check(model, x, t, names, normalize, **kw):
    params = dict(model.named_parameters())
    loss = _reg(E.explanations(model, x, t, normalize=normalize, **kw))
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    g = torch.Generator().manual_seed(1)
    for name, grad in zip(names, grads):
        assert float(grad.abs().max()) > 0, f"{name}: no gradient"
        p = params[name]
        for _ in range(2):
            idx = int(torch.randint(p.numel(), (1,), generator=g))
            flat = p.data.view(-1)
            old = float(flat[idx])
            eps = 1e-6
            with torch.no_grad():
                flat[idx] = old + eps
                up = float(_reg(E.explanations(model, x, t, normalize=normalize, create_graph=False, **kw)))
                flat[idx] = old - eps
                dn = float(_reg(E.explanations(model, x, t, normalize=normalize, create_graph=False, **kw)))
                flat[idx] = old
            fd = (up - dn) / (2 * eps)
            got = float(grad.reshape(-1)[idx])
            assert abs(fd - got) <= 1e-5 + 1e-4 * abs(fd), (name, idx, fd, got)


def test_gradient_reaches_resnet_weights_matches_finite_differences():
    from fastcbm.models import load_clip

    model = load_clip("testbed")[0].double()
    x, t = _inputs(model, dtype=torch.float64)
    _fd_check(model, x, t, ["visual.layer1.0.conv1.weight", "visual.layer4.0.conv3.weight",
                            "visual.attnpool.q_proj.weight"], normalize=True)


def test_gradient_reaches_resnet_layer3_weights_matches_finite_differences():
    from fastcbm.models import load_clip

    model = load_clip("testbed")[0].double()
    x, t = _inputs(model, dtype=torch.float64)
    _fd_check(model, x, t, ["visual.layer1.0.conv1.weight", "visual.layer4.0.conv3.weight",
                            "visual.attnpool.q_proj.weight"], normalize=True, layer="layer3")


def test_gradient_reaches_vit_weights_matches_finite_differences():
    model = tiny_vit_clip(torch.float64)
    x, t = _inputs(model, dtype=torch.float64)
    _fd_check(model, x, t, ["visual.conv1.weight", "visual.transformer.resblocks.1.attn.in_proj_weight",
                            "visual.transformer.resblocks.1.mlp.c_fc.weight"], normalize=True)


@pytest.mark.parametrize("tower", ["resnet", "vit"])
def test_detached_form_sends_exactly_zero_gradient(tower, testbed_clip):
    model = testbed_clip[0] if tower == "resnet" else tiny_vit_clip()
    x, t = _inputs(model)
    params = list(model.visual.parameters())
    ours = torch.autograd.grad(_reg(E.explanations(model, x, t)), params, allow_unused=True)
    assert any(g is not None and float(g.abs().max()) > 0 for g in ours)
    detached = E.explanations(model, x, t, detach=True)
    assert not detached.requires_grad  # no graph at all: the regulariser cannot reach any weight
    # inside a loss that does train the tower, the detached regulariser adds exactly zero gradient
    emb = model.encode_image(x)
    base = emb.pow(2).sum()
    g_base = torch.autograd.grad(base, params, allow_unused=True, retain_graph=True)
    g_both = torch.autograd.grad(base + _reg(detached), params, allow_unused=True)
    for a, b in zip(g_base, g_both):
        assert (a is None and b is None) or torch.equal(a, b)


def test_bad_inputs(testbed_clip):
    model = testbed_clip[0]
    x, t = _inputs(model)
    with pytest.raises(ValueError, match="text_emb must be"):
        E.explanations(model, x, t[:1])
    with pytest.raises(ValueError, match="images must be"):
        E.explanations(model, x[:, :2], t)
    with pytest.raises(ValueError, match="mode must be"):
        E.explanations(model, x, t, mode="quick")
    with pytest.raises(ValueError, match="open_clip CLIP"):
        E.explanations(torch.nn.Linear(2, 2), x, t)


def test_encode_texts_and_length_check(testbed_clip):
    model, tok = testbed_clip
    emb = E.encode_text_rows(model, tok, [["blue circle", "blue", "circle"], ["green square", "green", "blue"]])
    assert emb.shape == (2, 3, 128)
    assert_close(emb.norm(dim=-1), torch.ones(2, 3), atol=1e-5, rtol=0, what="unit")
    assert_close(emb[0, 1], emb[1, 2], atol=0, rtol=0, what="same text, same row")
    fits = " ".join(["blue"] * (tok.context_length - 2))
    tokenize_checked(tok, [fits])  # exactly fills the context
    with pytest.raises(ValueError, match="text too long"):
        E.encode_text_rows(model, tok, [[fits + " circle"]])
    with pytest.raises(ValueError, match="same number of texts"):
        E.encode_text_rows(model, tok, [["a", "b"], ["a"]])
