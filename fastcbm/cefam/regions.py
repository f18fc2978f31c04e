"""CE-FAM concept regions: Grad-CAM of every concept score S_t = s·cos(h, t) + b at several classifier stages.

For stage l with activations A_l ``[B, C_l, h_l, w_l]``: β_l[b, t] = spatial mean of ∂S_t/∂A_l (the gradient as a hook
on the stage output sees it: through the stage's own pooled entry in z_cat AND through the deeper stages), region =
ReLU(Σ_k β_k·A_k) at the stage's resolution, not normalised (docs/design.md §3).

Two methods give the same β (to ~1e-6 relative in fp32):

- ``"loop"`` (the reference, as the authors do it): one forward + one backward per (image, concept).
- ``"batched"``: ONE forward for the batch. The concept enters only through t, so ∂S_t/∂x = g_tᵀ·∂h/∂x with
  g_t = s·(t − ⟨ĥ,t⟩ĥ)/‖h‖. One vector-Jacobian product batched over K = min(T, D) cotangents
  (``is_grads_batched``) — the rows of eye(D) when T > D (then β_l = g·G_l/(h_l w_l), G_l = Σ_ij ∂h/∂A_l), else the
  g_t themselves — gives every stage's spatially summed gradient. The deepest stage needs no network backward at all:
  its output reaches S only through z_L = GAP(A_L), so β_L = ∂S/∂z_L/(h_L w_L), read off the gradient w.r.t. z_cat
  that the same VJP returns. All regions of a stage are then one :func:`fastcbm.cam.fuse` call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fastcbm.cam import fuse
from fastcbm.cefam.translator import Translator, concept_scores
from fastcbm.models.features import as_feature_map
from fastcbm.errors import InvalidArgument

METHODS = ("batched", "loop")
_VJP_BUDGET = 1 << 25  # elements of the largest stage gradient held per VJP chunk (128 MB in fp32)


# ---- inputs ---------------------------------------------------------------------------------------------------
def resolve_classifier(classifier, kind: str | None, num_prefix_tokens: int | None) -> tuple[nn.Module, str, int]:
    """``(module, kind, num_prefix_tokens)`` from a :class:`fastcbm.models.Backbone` or a plain ``nn.Module``
    (``kind`` defaults to ``"cnn"`` then; explicit arguments override the Backbone's)."""
    model = getattr(classifier, "model", classifier)
    if not isinstance(model, nn.Module):
        raise InvalidArgument(f"classifier must be a fastcbm Backbone or an nn.Module, got {type(classifier).__name__}")  # noqa: TRY004
    kind = kind if kind is not None else getattr(classifier, "kind", "cnn")
    if kind not in ("cnn", "vit"):
        raise InvalidArgument(f"kind must be 'cnn' or 'vit', got {kind!r}")
    prefix = num_prefix_tokens if num_prefix_tokens is not None else getattr(classifier, "num_prefix_tokens", 1)
    return model, kind, int(prefix)


def check_inputs(model: nn.Module, translator: nn.Module, images: torch.Tensor, text_emb: torch.Tensor,
                 layers: Sequence[str], method: str) -> list[str]:
    """Validate what can be checked before a forward pass; return ``layers`` as a list."""
    if method not in METHODS:
        raise InvalidArgument(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] < 1:
        raise InvalidArgument(f"images must be a normalised float tensor [B, 3, S, S] with B >= 1, got "
                              f"{getattr(images, 'shape', type(images).__name__)}")
    if isinstance(layers, str) or not layers:
        raise InvalidArgument(f"layers must be a non-empty list of stage names, got {layers!r}")
    layers = list(layers)
    if len(set(layers)) != len(layers):
        raise InvalidArgument(f"layers must be distinct, got {layers}")
    names = dict(model.named_modules())
    missing = [n for n in layers if n not in names]
    if missing:
        raise InvalidArgument(f"layers {missing} are not modules of the classifier ({type(model).__name__}); it has e.g. "
                              f"{[n for n in names if n][:12]}")
    if not isinstance(text_emb, torch.Tensor) or text_emb.dim() != 2 or text_emb.shape[0] == 0:
        raise InvalidArgument("text_emb must be a non-empty [T, D] tensor of concept embeddings (the concept list is "
                              f"empty or malformed), got {getattr(text_emb, 'shape', type(text_emb).__name__)}")
    out = getattr(translator, "out_features", None)
    if out is not None and text_emb.shape[1] != out:
        raise InvalidArgument(f"text_emb has width {text_emb.shape[1]} but the translator outputs {out} values: the text "
                              "embeddings must come from the CLIP model the translator was trained on")
    return layers


def _check_widths(translator: nn.Module, maps: dict[str, torch.Tensor], layers: list[str]) -> None:
    width = sum(maps[n].shape[1] for n in layers)
    expected = getattr(translator, "in_features", None)
    if expected is not None and expected != width:
        chans = {n: maps[n].shape[1] for n in layers}
        raise InvalidArgument(f"the translator takes {expected} inputs but the stages {chans} pool to {width} values: "
                              "pass the layers it was trained on, in the same order")


# ---- instrumented forward ---------------------------------------------------------------------------------------
class StageHooks:
    """Forward hooks on the stage modules: record each raw output and the order the stages fire in (network depth).

    A stage output that does not require grad (frozen classifier, plain input) is swapped for a leaf that does, so
    the gradients w.r.t. stage outputs exist without a backward pass down to the image. ``replace`` (name → fn) lets
    a caller substitute a stage's output (used by the contribution op to mask channels)."""

    def __init__(self, model: nn.Module, layers: Sequence[str], track_grad: bool = True,
                 replace: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None):
        modules = dict(model.named_modules())
        self._modules = [(n, modules[n]) for n in layers]
        self._track, self._replace = track_grad, replace or {}
        self._handles: list = []
        self.outputs: dict[str, torch.Tensor] = {}
        self.order: list[str] = []

    def __enter__(self) -> StageHooks:  # noqa: PYI034
        for name, module in self._modules:
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            if isinstance(output, (tuple, list)):
                raise InvalidArgument(f"stage {name!r} returns a {type(output).__name__}; CE-FAM needs stages that "  # noqa: TRY004
                                      "output one tensor")
            if name in self._replace:
                output = self._replace[name](output)
            if self._track and torch.is_grad_enabled() and not output.requires_grad:
                output = output.detach().requires_grad_(True)
            if name not in self.outputs:
                self.order.append(name)
            self.outputs[name] = output
            return output

        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class eval_mode:
    """Context manager: modules in eval mode (BatchNorm statistics must not couple the images), restored after."""

    def __init__(self, *modules: nn.Module):
        self._modules = modules
        self._states: list[bool] = []

    def __enter__(self):
        self._states = [m.training for m in self._modules]
        for m in self._modules:
            m.eval()

    def __exit__(self, *exc):
        for m, s in zip(self._modules, self._states):
            m.train(s)


@dataclass
class StageForward:
    """One instrumented forward pass: logits ``[B, K]``, raw stage outputs, maps ``[B, C_l, h_l, w_l]``, pooled
    ``z [B, Z]``, translator output ``h [B, D]``, the stages in firing (depth) order."""

    logits: torch.Tensor
    outputs: dict[str, torch.Tensor]
    maps: dict[str, torch.Tensor]
    z: torch.Tensor
    h: torch.Tensor
    order: list[str]


def stage_forward(model: nn.Module, translator: nn.Module, images: torch.Tensor, layers: list[str], kind: str,
                  prefix: int) -> StageForward:
    with StageHooks(model, layers) as hooks:
        logits = model(images)
    if set(hooks.order) != set(layers):
        raise InvalidArgument(f"stages {sorted(set(layers) - set(hooks.order))} did not run in the classifier's forward")
    maps = {n: as_feature_map(hooks.outputs[n], kind, prefix) for n in layers}
    _check_widths(translator, maps, layers)
    z = torch.cat([maps[n].mean(dim=(2, 3)) for n in layers], dim=1)
    return StageForward(logits, dict(hooks.outputs), maps, z, translator(z), list(hooks.order))


def score_directions(h: torch.Tensor, text_emb: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """g ``[B, T, D]``: ∂S_t/∂h = s·(t̂ − ⟨ĥ, t̂⟩ĥ)/‖h‖ for the cosine score S_t = s·cos(h, t) + b."""
    norm = h.norm(dim=-1, keepdim=True)  # [B, 1]
    hn = h / norm
    tn = F.normalize(text_emb.to(h.dtype), dim=-1)
    cos = hn @ tn.T  # [B, T]
    return logit_scale * (tn[None] - cos[..., None] * hn[:, None]) / norm[..., None]


# ---- channel weights β ------------------------------------------------------------------------------------------
@dataclass
class ConceptGrads:
    """β per stage ``{layer: [B, T, C_l]}`` plus the detached forward they were taken at (maps, z, h, logits, order)."""

    betas: dict[str, torch.Tensor]
    maps: dict[str, torch.Tensor]
    z: torch.Tensor
    h: torch.Tensor
    logits: torch.Tensor
    order: list[str]
    layers: list[str]


def _spatial_sum(grad: torch.Tensor, kind: str, prefix: int) -> torch.Tensor:
    """Σ over space of a batched stage gradient ``[K, B, ...]`` → ``[K, B, C]`` (ViT: over the patch tokens only)."""
    if grad.dim() == 5:
        return grad.sum(dim=(3, 4))
    if grad.dim() == 4 and kind == "vit":
        return grad[:, :, prefix:].sum(dim=2)
    raise InvalidArgument(f"stage gradient of shape {tuple(grad.shape[1:])} is not a feature map (kind={kind!r})")


def _betas_batched(model, translator, images, text_emb, layers, kind, prefix, logit_scale, chunk,
                   progress) -> ConceptGrads:
    fw = stage_forward(model, translator, images, layers, kind, prefix)
    b, d = fw.h.shape
    t = text_emb.shape[0]
    g = score_directions(fw.h.detach(), text_emb, logit_scale)  # [B, T, D]
    deepest = fw.order[-1]
    inner = [n for n in fw.order[:-1]]  # stages whose gradient needs the network backward
    use_eye = t > d  # K = min(T, D) cotangents
    k_total = d if use_eye else t
    per = max(1, max([b * fw.maps[n][0].numel() for n in inner], default=1))
    chunk = chunk or max(1, min(k_total, _VJP_BUDGET // per))
    sums = {n: [] for n in inner}
    gz = []
    eye = torch.eye(d, dtype=fw.h.dtype, device=fw.h.device)
    targets = [fw.z] + [fw.outputs[n] for n in inner]
    for c0 in tqdm(range(0, k_total, chunk), desc="concept gradients", disable=not progress, leave=False):
        c1 = min(k_total, c0 + chunk)
        cot = eye[c0:c1, None, :].expand(c1 - c0, b, d) if use_eye else g[:, c0:c1].transpose(0, 1)
        grads = torch.autograd.grad(fw.h, targets, cot.contiguous(), retain_graph=c1 < k_total,
                                    is_grads_batched=True, allow_unused=True)
        gz.append(grads[0])  # [k, B, Z]
        for n, gr in zip(inner, grads[1:]):
            sums[n].append(_spatial_sum(gr, kind, prefix))
    gz_all = torch.cat(gz)  # [K, B, Z]
    betas: dict[str, torch.Tensor] = {}
    offsets, o = {}, 0
    for n in layers:
        offsets[n] = (o, o + fw.maps[n].shape[1])
        o = offsets[n][1]
    hw = {n: fw.maps[n].shape[2] * fw.maps[n].shape[3] for n in layers}

    def to_beta(x: torch.Tensor) -> torch.Tensor:  # [K, B, C] → [B, T, C]
        return torch.einsum("btd,dbc->btc", g, x) if use_eye else x.transpose(0, 1)

    a, e = offsets[deepest]
    betas[deepest] = to_beta(gz_all[..., a:e]) / hw[deepest]  # closed form: ∂S/∂z_L / (h·w)
    for n in inner:
        betas[n] = to_beta(torch.cat(sums[n])) / hw[n]
    return ConceptGrads({n: betas[n].detach() for n in layers}, {n: fw.maps[n].detach() for n in layers},
                        fw.z.detach(), fw.h.detach(), fw.logits.detach(), fw.order, layers)


def _betas_loop(model, translator, images, text_emb, layers, kind, prefix, logit_scale, bias,
                progress) -> ConceptGrads:
    b, t = images.shape[0], text_emb.shape[0]
    betas = {n: [] for n in layers}
    for i in tqdm(range(b), desc="concept gradients (loop)", disable=not progress, leave=False):
        for j in range(t):
            fw = stage_forward(model, translator, images[i:i + 1], layers, kind, prefix)
            score = concept_scores(fw.h, text_emb[j:j + 1], logit_scale, bias)[0, 0]
            grads = torch.autograd.grad(score, [fw.outputs[n] for n in layers])
            for n, gr in zip(layers, grads):
                betas[n].append(as_feature_map(gr, kind, prefix).mean(dim=(2, 3))[0])
    full = stage_forward(model, translator, images, layers, kind, prefix)  # the maps, z, h of the whole batch
    return ConceptGrads({n: torch.stack(betas[n]).reshape(b, t, -1).detach() for n in layers},
                        {n: full.maps[n].detach() for n in layers}, full.z.detach(), full.h.detach(),
                        full.logits.detach(), full.order, layers)


def concept_grads(classifier, translator: Translator | nn.Module, images: torch.Tensor, text_emb: torch.Tensor,
                  layers: Sequence[str], *, method: str = "batched", logit_scale: float = 100.0, bias: float = 0.0,
                  kind: str | None = None, num_prefix_tokens: int | None = None,
                  chunk: int | None = None, progress: bool = False) -> ConceptGrads:
    """Grad-CAM channel weights β_l ``[B, T, C_l]`` of every concept at every stage (see the module docstring),
    with the forward pass they belong to. ``chunk``: cotangents per batched VJP (default: from a memory budget);
    ``progress``: a tqdm bar over the VJP chunks (batched) or images (loop)."""
    model, kind, prefix = resolve_classifier(classifier, kind, num_prefix_tokens)
    layers = check_inputs(model, translator, images, text_emb, layers, method)
    text_emb = text_emb.to(device=images.device, dtype=images.dtype)
    with eval_mode(model, translator), torch.enable_grad():
        if method == "loop":
            return _betas_loop(model, translator, images, text_emb, layers, kind, prefix, logit_scale, bias,
                               progress)
        return _betas_batched(model, translator, images, text_emb, layers, kind, prefix, logit_scale, chunk,
                              progress)


def concept_regions(classifier, translator: Translator | nn.Module, images: torch.Tensor, text_emb: torch.Tensor,
                    layers: Sequence[str], *, method: str = "batched", logit_scale: float = 100.0, bias: float = 0.0,
                    kind: str | None = None, num_prefix_tokens: int | None = None,
                    backend: str = "auto", progress: bool = False) -> dict[str, torch.Tensor]:
    """CE-FAM regions of every concept at every stage.

    Args:
        classifier: a :class:`fastcbm.models.Backbone` (kind / prefix tokens taken from it) or a plain ``nn.Module``
            (``kind="cnn"`` unless given).
        translator: maps z_cat = the stages' pooled outputs concatenated in the order of ``layers`` to CLIP space.
        images: normalised ``[B, 3, S, S]``.
        text_emb: ``[T, D]`` concept embeddings (normalised here), T >= 1.
        layers: stage module names (ViT blocks give tokens; they are reshaped to maps).
        method: ``"batched"`` (one forward, min(T, D) batched VJPs) or ``"loop"`` (one backward per image × concept,
            the reference).
        logit_scale, bias: the concept score S = s·cos(h, t) + b.
        backend: the :func:`fastcbm.cam.fuse` backend for the final ReLU(Σβ·A).
        progress: show a tqdm bar over the gradient work.

    Returns:
        ``{layer: [B, T, h_l, w_l]}`` raw ReLU(Σ_k β_k A_k) maps (not resized, not normalised).
    """
    grads = concept_grads(classifier, translator, images, text_emb, layers, method=method, logit_scale=logit_scale,
                          bias=bias, kind=kind, num_prefix_tokens=num_prefix_tokens, progress=progress)
    fuse_backend = "reference" if method == "loop" else backend
    with torch.no_grad():
        return {n: fuse(grads.betas[n], grads.maps[n], backend=fuse_backend) for n in grads.layers}
