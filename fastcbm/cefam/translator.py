"""CE-FAM's translator: an MLP from a classifier's pooled stage activations z_cat to CLIP's image-embedding space,
and the concept score it is explained with.

Facts from the authors' released code (docs/design.md §3): hidden layers 2048→1024 when z_cat has more than 1,024 values
(ResNet-50: 3,840), else 1024→1024; tanh after each hidden layer, none after the last; the target is the
*un-normalised* CLIP image embedding; the concept score is S_t = s·cos(h, t) + b (s = CLIP's logit scale, 100; b = 0
for CLIP, SigLIP's bias otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastcbm.models.features import FeatureHooks, as_feature_map
from fastcbm.errors import InvalidArgument


def default_hidden(in_features: int) -> tuple[int, ...]:
    """The released code's hidden widths: (2048, 1024) for inputs wider than 1,024 values, else (1024, 1024)."""
    return (2048, 1024) if in_features > 1024 else (1024, 1024)


class Translator(nn.Module):
    """MLP ``z_cat [B, Z] -> h [B, D]`` with tanh after each hidden layer and a linear output.

    ``first`` is the first ``nn.Linear`` and ``rest`` everything after it (starting with its tanh), so
    ``forward(z) == rest(first(z))``: the association op edits the first layer's pre-activation with rank-1 updates.
    """

    def __init__(self, in_features: int, out_features: int, hidden: Sequence[int] | None = None):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise InvalidArgument(f"Translator widths must be >= 1, got in={in_features}, out={out_features}")
        hidden = tuple(default_hidden(in_features) if hidden is None else hidden)
        if not hidden or any(int(h) < 1 for h in hidden):
            raise InvalidArgument(f"hidden must be one or more widths >= 1, got {hidden}")
        self.in_features, self.out_features, self.hidden = int(in_features), int(out_features), hidden
        widths = [self.in_features, *hidden]
        self.first = nn.Linear(widths[0], widths[1])
        layers: list[nn.Module] = [nn.Tanh()]
        for a, b in zip(widths[1:-1], widths[2:]):
            layers += [nn.Linear(a, b), nn.Tanh()]
        layers.append(nn.Linear(widths[-1], out_features))
        self.rest = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[-1] != self.in_features:
            raise InvalidArgument(f"translator expects z_cat with {self.in_features} values per image, got shape "
                                  f"{tuple(z.shape)}")
        return self.rest(self.first(z))


def concept_scores(h: torch.Tensor, text_emb: torch.Tensor, logit_scale: float = 100.0,
                   bias: float = 0.0) -> torch.Tensor:
    """S = s·cos(h, t) + b: ``h [B, D]``, ``text_emb [T, D]`` (any norm) → ``[B, T]``."""
    if text_emb.dim() != 2 or text_emb.shape[1] != h.shape[-1]:
        raise InvalidArgument(f"text embeddings must be [T, {h.shape[-1]}] (the translator's output width), got shape "
                              f"{tuple(text_emb.shape)}")
    return logit_scale * F.normalize(h, dim=-1) @ F.normalize(text_emb, dim=-1).T + bias


def stage_activations(model: nn.Module, images: torch.Tensor, layers: Sequence[str], kind: str = "cnn",
                      num_prefix_tokens: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run ``model`` on normalised ``images [B, 3, S, S]``; return ``(logits, {layer: A_l [B, C_l, h_l, w_l]})``
    (ViT tokens reshaped to maps). Gradients flow when the caller enables them."""
    if not layers:
        raise InvalidArgument("layers must name at least one stage")
    with FeatureHooks(model, list(layers)) as hooks:
        logits = model(images)
    return logits, {n: as_feature_map(hooks.outputs[n], kind, num_prefix_tokens) for n in layers}


def pool_stages(acts: dict[str, torch.Tensor], layers: Sequence[str]) -> torch.Tensor:
    """z_cat ``[B, Σ C_l]``: the global average pool of each stage, concatenated in the order of ``layers``."""
    return torch.cat([acts[n].mean(dim=(2, 3)) for n in layers], dim=1)
