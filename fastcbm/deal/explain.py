"""Differentiable concept explanations of a CLIP image tower (DEAL, docs/design.md §3 "DEAL, with gradients that actually
flow").

For image b and text k the score is s_bk = cos(e_b, t_bk) with e_b the image embedding. The K+1 texts of an image (row
0 the category, rows 1..K its concepts) differ only in t, so the tower runs ONCE per image: we keep the last stage's
activation A (ResNet towers: ``visual.layer4``) or the last block's attention probabilities A (ViT towers) with their
graph, and compute the K+1 vector-Jacobian products ∂s_k/∂A through the head only (attention pool / last block + pool),
batched with ``torch.autograd.grad(..., is_grads_batched=True, create_graph=True)``. With ``create_graph=True`` the
maps are differentiable functions of the tower's weights, so regularisers on them train the tower — unlike the authors'
released code, which detaches the gradients (``detach=True`` here reproduces that: the maps then carry no graph).

- ResNet (open_clip ``ModifiedResNet``, e.g. the bundled testbed CLIP): Grad-CAM on ``layer4`` (``layer="layer4"``,
  the default, as published): map_k = ReLU(Σ_c α_kc A_c), α_kc = spatial mean of ∂s_k/∂A_c. Shape ``[B, K+1, h, w]``
  at layer4's resolution. ``layer="layer3"``: the same Grad-CAM on ``layer3`` (a 2× finer grid); the K+1 gradients
  then run through ``layer4`` and the attention pool (batched VJPs, ``create_graph`` as ever; no closed form).
- ViT (open_clip ``VisionTransformer``): the last block's attention is recomputed explicitly from its weights
  (``nn.MultiheadAttention`` is called with ``need_weights=False``); relevance R = mean_heads ReLU(∂s_k/∂A ⊙ A) and the
  map is R's CLS row over the patch tokens, as ``[h, w]`` (the patch grid).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastcbm.errors import InvalidArgument
from fastcbm.cam import fuse, minmax_normalize
from fastcbm.concepts.encode import encode_texts

MODES = ("auto", "fast", "batched", "expand", "loop")
RESNET_LAYERS = ("layer4", "layer3")  # the ResNet stage Grad-CAM explains (ViT towers: always the last block)


def tower_kind(model: nn.Module) -> str:
    """``"resnet"`` or ``"vit"`` for an open_clip CLIP's image tower; ValueError for anything else."""
    visual = getattr(model, "visual", None)
    if visual is not None and all(hasattr(visual, a) for a in ("stem", "layer4", "attnpool")):
        return "resnet"
    if visual is not None and hasattr(visual, "transformer") and hasattr(visual, "_embeds"):
        return "vit"
    raise InvalidArgument(f"model: DEAL explanations need an open_clip CLIP with a ModifiedResNet or VisionTransformer "
                          f"image tower, got {type(visual).__name__ if visual is not None else type(model).__name__}")


# ---- towers split at the explained activation --------------------------------------------------------------------
def resnet_trunk(visual: nn.Module, images: torch.Tensor, layer: str = "layer4") -> torch.Tensor:
    """``layer4`` (or ``layer3``) output ``[B, C, h, w]`` of an open_clip ModifiedResNet."""
    x = visual.stem(images.to(visual.conv1.weight.dtype))
    x = visual.layer3(visual.layer2(visual.layer1(x)))
    return x if layer == "layer3" else visual.layer4(x)


def check_layer(kind: str, layer: str) -> None:
    if layer not in RESNET_LAYERS:
        raise InvalidArgument(f"explain layer must be one of {RESNET_LAYERS}, got {layer!r}")
    if kind == "vit" and layer != "layer4":
        raise InvalidArgument(f"explain layer {layer!r} applies to ResNet image towers only (a ViT tower is explained at "
                              "its last block); use the default 'layer4'")


def vit_trunk(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Tokens entering the last block ``[B, N, W]`` (batch first) of an open_clip VisionTransformer."""
    x = visual._embeds(images)
    tr = visual.transformer
    if not tr.batch_first:
        x = x.transpose(0, 1)
    for blk in tr.resblocks[:-1]:
        x = blk(x)
    return x.transpose(0, 1) if not tr.batch_first else x


def last_block_attention(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Attention probabilities ``[B, H, N, N]`` of an open_clip ``ResidualAttentionBlock`` on batch-first ``x``
    ``[B, N, W]``, recomputed from its weights (the module itself never returns them)."""
    attn = block.attn
    if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim or hasattr(block, "ln_1_kv"):
        raise InvalidArgument("model: the ViT's last block must be open_clip's ResidualAttentionBlock (packed "
                              "nn.MultiheadAttention self-attention); custom attention blocks are not supported")
    B, N, W = x.shape
    H = attn.num_heads
    h = block.ln_1(x)
    q, k, _ = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q = q.view(B, N, H, W // H).transpose(1, 2)
    k = k.view(B, N, H, W // H).transpose(1, 2)
    return torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(W // H), dim=-1)


def _last_block_values(visual: nn.Module, x: torch.Tensor) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """``(block, attn, v [B, H, N, hd])``: the last block, its attention module and the value vectors it computes
    from the tokens entering it, ``x`` ``[B, N, W]``."""
    block = visual.transformer.resblocks[-1]
    attn = block.attn
    B, N, W = x.shape
    H = attn.num_heads
    bias = None if attn.in_proj_bias is None else attn.in_proj_bias[2 * W:]
    v = F.linear(block.ln_1(x), attn.in_proj_weight[2 * W:], bias)
    return block, attn, v.view(B, N, H, W // H).transpose(1, 2)


def vit_head(visual: nn.Module, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Image embedding ``[B, D]`` from the tokens entering the last block ``x`` ``[B, N, W]`` and that block's attention
    probabilities ``probs`` ``[B, H, N, N]``: the rest of the block, then open_clip's pool and projection."""
    block, attn, v = _last_block_values(visual, x)
    B, N, W = x.shape
    o = (probs @ v).transpose(1, 2).reshape(B, N, W)
    x = x + block.ls_1(attn.out_proj(o))
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    pooled, _ = visual._pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled


def resnet_head(pool: nn.Module, act: torch.Tensor) -> torch.Tensor:
    """open_clip ``AttentionPool2d`` on ``act`` ``[B, C, h, w]`` → ``[B, D]``, written out with plain ops: the module
    calls ``F.multi_head_attention_forward``, whose fused CPU attention kernel has no double backward (which
    ``create_graph=True`` needs). Only the mean token's query is computed: the pool returns that token alone."""
    B, C, h, w = act.shape
    H = pool.num_heads
    x = act.reshape(B, C, h * w).transpose(1, 2)  # [B, hw, C]
    x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + pool.positional_embedding.to(x.dtype)  # [B, hw+1, C]
    q = pool.q_proj(x[:, :1])  # [B, 1, C]
    k = pool.k_proj(x)
    v = pool.v_proj(x)
    hd = C // H
    q = q.view(B, 1, H, hd).transpose(1, 2)
    k = k.view(B, -1, H, hd).transpose(1, 2)
    v = v.view(B, -1, H, hd).transpose(1, 2)
    probs = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(hd), dim=-1)  # [B, H, 1, hw+1]
    o = (probs @ v).transpose(1, 2).reshape(B, C)
    return pool.c_proj(o)


def split_tower(model: nn.Module, images: torch.Tensor, layer: str = "layer4"):
    """Run the tower once up to the explained activation.

    Returns ``(kind, A, head)`` with ``A`` the explained activation (ResNet: ``layer`` output ``[B, C, h, w]``; ViT:
    last block attention ``[B, H, N, N]``) and ``head(A) -> image embedding [B, D]`` (the rest of the tower, a
    function of A only, so VJPs through it see only the last stage(s) / block)."""
    kind = tower_kind(model)
    check_layer(kind, layer)
    visual = model.visual
    if kind == "resnet":
        act = resnet_trunk(visual, images, layer)
        if layer == "layer3":
            return kind, act, (lambda a: resnet_head(visual.attnpool, visual.layer4(a)))
        return kind, act, (lambda a: resnet_head(visual.attnpool, a))
    x = vit_trunk(visual, images)
    probs = last_block_attention(visual.transformer.resblocks[-1], x)
    # "expand" mode feeds T copies of A per image (image-major): the tokens follow
    return kind, probs, (lambda p: vit_head(visual, x.repeat_interleave(p.shape[0] // x.shape[0], dim=0), p))


# ---- explanations ------------------------------------------------------------------------------------------------
def _scores(emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """cos(emb_b, t_bk): ``[B, D]`` × ``[B, T, D]`` → ``[B, T]``."""
    dtype = torch.promote_types(torch.promote_types(emb.dtype, text_emb.dtype), torch.float32)  # fp16/bf16 → fp32
    return torch.einsum("bd,btd->bt", F.normalize(emb.to(dtype), dim=-1), F.normalize(text_emb.to(dtype), dim=-1))


def score_grads(act: torch.Tensor, head, text_emb: torch.Tensor, *, create_graph: bool = True,
                mode: str = "batched", emb: torch.Tensor | None = None) -> torch.Tensor:
    """∂s_bk/∂A_b for every text: ``[B, T, *A.shape[1:]]``.

    ``mode="batched"``: one ``autograd.grad`` with T batched cotangents (vmap over the backward of the head only);
    ``"expand"``: the head runs on T views of A (still one tower pass; for heads vmap cannot batch); ``"loop"``: one
    backward per text (reference). ``emb``: ``head(act)`` when the caller already has it (batched and loop modes
    reuse it)."""
    if mode not in ("batched", "expand", "loop"):
        raise InvalidArgument(f"score_grads mode must be batched, expand or loop, got {mode!r}")
    B, T = text_emb.shape[:2]
    if mode == "expand":
        rep = act.unsqueeze(1).expand(B, T, *act.shape[1:]).reshape(B * T, *act.shape[1:])
        s = _scores(head(rep), text_emb.reshape(B * T, 1, -1))  # [B·T, 1]
        (g,) = torch.autograd.grad(s.sum(), rep, create_graph=create_graph)
        return g.view(B, T, *act.shape[1:])
    s = _scores(head(act) if emb is None else emb, text_emb)  # [B, T]
    if mode == "loop":
        grads = [torch.autograd.grad(s[:, k].sum(), act, retain_graph=True, create_graph=create_graph)[0]
                 for k in range(T)]
        return torch.stack(grads, dim=1)
    # s[b, k] depends on A[b] only, so the cotangent e_k (for every b at once) gives every image's ∂s_k/∂A_b
    eye = torch.eye(T, dtype=s.dtype, device=s.device).unsqueeze(1).expand(T, B, T)
    (g,) = torch.autograd.grad(s, act, grad_outputs=eye, is_grads_batched=True, create_graph=create_graph,
                               retain_graph=True if emb is not None else None)  # the caller still needs emb's graph
    return g.transpose(0, 1)


# ---- fast paths: the K+1 gradients without a backward through the whole head -------------------------------------
def _score_cotangents(emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """∂s_bk/∂e_b = (t̂_bk − s_bk·ê_b)/‖e_b‖ for s_bk = cos(e_b, t_bk): ``[B, T, D]``."""
    dtype = torch.promote_types(torch.promote_types(emb.dtype, text_emb.dtype), torch.float32)
    e, t = emb.to(dtype), F.normalize(text_emb.to(dtype), dim=-1)
    norm = e.norm(dim=-1, keepdim=True)  # [B, 1]
    e_hat = e / norm
    s = torch.einsum("bd,btd->bt", e_hat, t)
    return (t - s.unsqueeze(-1) * e_hat.unsqueeze(1)) / norm.unsqueeze(1)


def resnet_alpha(pool: nn.Module, act: torch.Tensor, text_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM channel weights α_btc = spatial mean of ∂s_bt/∂A_bc at ``layer4`` in closed form, and the embedding.

    Only Σ_j ∂s/∂A_j over positions is needed, and in open_clip's AttentionPool2d that sum collapses: the mean token
    x_0 = mean_j A_j (+pos) spreads its gradient evenly, so Σ_j ∂s/∂A_j = Σ_{tokens} ∂s/∂x; through the values
    Σ_j p_j = 1 leaves W_vᵀ·(∂s/∂o); through the keys the softmax gradient sums to zero; the query (mean token only)
    adds W_qᵀ·∂s/∂q. So α = (W_vᵀ·go + W_qᵀ·dq) / (h·w) with go = W_cᵀ·∂s/∂e per text: no per-position backward, and
    the result is an ordinary differentiable function of A and the weights (no double backward). Returns
    ``(alpha [B, T, C], emb [B, D])``. Equal to the autograd path (tests)."""
    B, C, h, w = act.shape
    H = pool.num_heads
    hd = C // H
    x = act.reshape(B, C, h * w).transpose(1, 2)
    x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + pool.positional_embedding.to(x.dtype)  # [B, N, C]
    N = x.shape[1]
    q = pool.q_proj(x[:, :1]).view(B, H, hd)
    k = pool.k_proj(x).view(B, N, H, hd).transpose(1, 2)  # [B, H, N, hd]
    v = pool.v_proj(x).view(B, N, H, hd).transpose(1, 2)
    scale = 1.0 / math.sqrt(hd)
    p = torch.softmax(torch.einsum("bhd,bhnd->bhn", q, k) * scale, dim=-1)  # [B, H, N]
    o = torch.einsum("bhn,bhnd->bhd", p, v).reshape(B, C)
    emb = pool.c_proj(o)
    g = _score_cotangents(emb, text_emb)  # [B, T, D]
    go = (g.to(pool.c_proj.weight.dtype) @ pool.c_proj.weight).view(B, -1, H, hd)  # ∂s/∂o per head
    gv = torch.einsum("bthd,bhnd->bthn", go, v)  # ∂s/∂p
    dl = p.unsqueeze(1) * (gv - (p.unsqueeze(1) * gv).sum(-1, keepdim=True))  # ∂s/∂logits
    dq = torch.einsum("bthn,bhnd->bthd", dl, k) * scale
    T = g.shape[1]
    total = go.reshape(B, T, C) @ pool.v_proj.weight + dq.reshape(B, T, C) @ pool.q_proj.weight
    return total / (h * w), emb


def vit_fast_applicable(visual: nn.Module) -> bool:
    """The CLS-only path needs the embedding to depend on the last block's CLS output alone (``pool_type="tok"``)."""
    return getattr(visual, "attn_pool", None) is None and getattr(visual, "pool_type", "") == "tok"


def vit_cls_grads(visual: nn.Module, x: torch.Tensor, probs: torch.Tensor, text_emb: torch.Tensor, *,
                  create_graph: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(∂s/∂A[:, :, 0, :] [B, T, H, N], emb [B, D])``: the gradient of every score w.r.t. the CLS row of the last
    block's attention, the only row the map reads. With CLS pooling the embedding depends on the block's CLS output
    only, and ∂s/∂A_{h,0,j} = (∂s/∂o_{h,0})·v_{h,j}: the T VJPs run through the CLS token's out-projection, MLP and
    projection alone (batched), not through the whole block."""
    block, attn, v = _last_block_values(visual, x)  # v [B, H, N, hd]
    B, N, W = x.shape
    H = attn.num_heads
    o0 = torch.einsum("bhn,bhnd->bhd", probs[:, :, 0], v).reshape(B, W)  # the CLS token's attention output
    x0 = x[:, 0] + block.ls_1(attn.out_proj(o0))
    x0 = x0 + block.ls_2(block.mlp(block.ln_2(x0)))
    emb = visual.ln_post(x0)
    if visual.proj is not None:
        emb = emb @ visual.proj
    s = _scores(emb, text_emb)
    T = s.shape[1]
    eye = torch.eye(T, dtype=s.dtype, device=s.device).unsqueeze(1).expand(T, B, T)
    (go,) = torch.autograd.grad(s, o0, grad_outputs=eye, is_grads_batched=True, create_graph=create_graph,
                                retain_graph=True)
    go = go.transpose(0, 1).reshape(B, T, H, W // H)
    return torch.einsum("bthd,bhnd->bthn", go, v), emb


MINMAX_EPS = 1e-8  # the authors' min-max epsilon (fastcbm.deal.metrics.EPS)


def explanations(model: nn.Module, images: torch.Tensor, text_emb: torch.Tensor, *, create_graph: bool = True,
                 normalize: bool = True, detach: bool = False, mode: str = "auto",
                 return_embedding: bool = False, layer: str = "layer4"):
    """Concept explanation maps ``[B, K+1, h, w]`` of ``model``'s image tower.

    images: normalised ``[B, 3, S, S]``; text_emb: ``[B, K+1, D]`` (row 0 the category, rows 1..K the concepts; any
    norm). ``create_graph=True`` keeps the maps differentiable w.r.t. the tower's weights (and ``text_emb``).
    ``normalize``: min-max each map (+1e-8). ``detach=True``: the authors' released form (gradient and activation
    detached): the maps carry no gradient to any weight. ``mode``: ``"auto"`` (default) takes the fast path where it
    applies (``"fast"``: ResNet :func:`resnet_alpha`, CLS-pooled ViT :func:`vit_cls_grads`), else ``"batched"``; the
    autograd modes are described at :func:`score_grads` (``"loop"`` is the reference). ``layer``: the ResNet stage
    Grad-CAM explains, ``"layer4"`` (default, as published) or ``"layer3"`` (2× finer grid; its gradients run
    through layer4 and the pool, so it has no fast path: ``"auto"`` means ``"batched"``). ``h, w``: that stage's
    resolution (ResNet) or the patch grid (ViT)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise InvalidArgument(f"images must be [B, 3, S, S], got {tuple(images.shape)}")
    if text_emb.dim() != 3 or text_emb.shape[0] != images.shape[0]:
        raise InvalidArgument(f"text_emb must be [B, K+1, D] with B = {images.shape[0]} (one row of texts per image), "
                              f"got {tuple(text_emb.shape)}")
    kind = tower_kind(model)  # a clear error for anything but an open_clip CLIP
    if mode not in MODES:
        raise InvalidArgument(f"mode must be one of {MODES}, got {mode!r}")
    visual = model.visual
    check_layer(kind, layer)
    if mode == "fast" and layer != "layer4":
        raise InvalidArgument(f"mode='fast' (closed-form Grad-CAM weights) needs layer='layer4', got {layer!r}")
    fast = mode == "fast" or (mode == "auto" and ((kind == "resnet" and layer == "layer4")
                                                  or (kind == "vit" and vit_fast_applicable(visual))))
    if mode == "auto" and not fast:
        mode = "batched"
    if fast and kind == "vit" and not vit_fast_applicable(visual):
        raise InvalidArgument("mode='fast' needs a ViT with CLS pooling (pool_type='tok', no attention pool)")
    keep = create_graph and not detach
    with torch.enable_grad():
        if not images.requires_grad and not any(p.requires_grad for p in visual.parameters()):
            # frozen tower (evaluation): A still needs a graph to differentiate the scores
            images = images.detach().requires_grad_(True)
        if fast and kind == "resnet":
            # closed form: no autograd inside, so evaluation (nothing to keep, no embedding asked) needs no graph
            with torch.set_grad_enabled(keep or return_embedding):
                act = resnet_trunk(visual, images)
                alpha, emb = resnet_alpha(visual.attnpool, act, text_emb)
            a = act.detach() if detach else act
            alpha = alpha if keep else alpha.detach()
            maps = fuse(alpha, a.to(alpha.dtype))  # Grad-CAM: ReLU(Σ_c α·A), the cam op
        elif fast:
            x = vit_trunk(visual, images)
            probs = last_block_attention(visual.transformer.resblocks[-1], x)
            g0, emb = vit_cls_grads(visual, x, probs, text_emb, create_graph=keep)
            g0 = g0 if keep else g0.detach()
            p0 = probs[:, :, 0].detach() if detach else probs[:, :, 0]
            rel = F.relu(g0 * p0.unsqueeze(1).to(g0.dtype)).mean(dim=2)  # [B, T, N]: mean over heads
            gh, gw = _grid(visual, rel.shape[-1] - 1)
            maps = rel[:, :, 1:].reshape(*rel.shape[:2], gh, gw)
        else:
            kind, act, head = split_tower(model, images, layer)
            emb = head(act) if return_embedding else None
            grads = score_grads(act, head, text_emb, create_graph=keep, mode=mode, emb=emb)
            if not keep:
                grads = grads.detach()
            a = act.detach() if detach else act
            if kind == "resnet":
                alpha = grads.mean(dim=(-2, -1))  # [B, T, C]
                maps = fuse(alpha, a.to(alpha.dtype))  # Grad-CAM: ReLU(Σ_c α·A), the cam op
            else:
                rel = F.relu(grads * a.unsqueeze(1)).mean(dim=2)  # [B, T, N, N]: mean over heads
                cls = rel[:, :, 0, 1:]  # the CLS row over the patch tokens
                gh, gw = _grid(visual, cls.shape[-1])
                maps = cls.reshape(*cls.shape[:2], gh, gw)
    maps = minmax_normalize(maps, eps=MINMAX_EPS) if normalize else maps
    return (maps, emb) if return_embedding else maps


def _grid(visual: nn.Module, n: int) -> tuple[int, int]:
    gs = getattr(visual, "grid_size", None)
    if gs is not None and gs[0] * gs[1] == n:
        return int(gs[0]), int(gs[1])
    side = round(math.sqrt(n))
    if side * side != n:
        raise InvalidArgument(f"model: cannot lay {n} patch tokens out as a grid")
    return side, side


def encode_text_rows(model: nn.Module, tokenizer, texts: Sequence[Sequence[str]], *,
                     check_length: bool = True) -> torch.Tensor:
    """Unit text embeddings ``[B, K+1, D]`` for ``texts`` (B rows of K+1 strings each; all rows the same length),
    each distinct text encoded once (:func:`fastcbm.concepts.encode_texts`; with gradients when grad mode is on).

    ``check_length``: refuse a text that does not fit the tokenizer's context (the testbed tokenizer would silently
    truncate it)."""
    rows = [list(r) for r in texts]
    if not rows:
        raise InvalidArgument("texts: empty")
    T = len(rows[0])
    if any(len(r) != T for r in rows):
        raise InvalidArgument(f"texts: every image needs the same number of texts (K+1), got lengths "
                              f"{sorted({len(r) for r in rows})}")
    flat = [t for r in rows for t in r]
    uniq = list(dict.fromkeys(flat))
    emb = encode_texts(model, tokenizer, uniq, batch_size=len(uniq), progress=False, grad=torch.is_grad_enabled(),
                       check_length=check_length)
    index = torch.tensor([uniq.index(t) for t in flat], device=emb.device) if len(uniq) != len(flat) else None
    out = emb if index is None else emb[index]
    return out.view(len(rows), T, -1)
