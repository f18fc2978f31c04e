"""A trained CE-FAM model: a frozen classifier (:class:`fastcbm.models.Backbone`) whose pooled stages feed a
:class:`~fastcbm.cefam.translator.Translator` into CLIP's image-embedding space. Saved as ``config.json`` (everything
but tensors) + ``translator.safetensors``; the classifier is rebuilt by name (its weights are stored only if asked).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fastcbm.cefam.translator import Translator, concept_scores, pool_stages, stage_activations
from fastcbm.configs import JsonConfig
from fastcbm.errors import InvalidArgument, InvalidFile, MissingFile

FORMAT = "fastcbm.cefam"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
TRANSLATOR_FILE = "translator.safetensors"
BACKBONE_FILE = "classifier.safetensors"


@dataclass
class CEFAMConfig(JsonConfig):
    """Everything needed to rebuild a CE-FAM model besides its tensors.

    ``layers``: the classifier stages whose global average pools are concatenated (in this order) into
    ``z_cat [B, in_features]``; ``widths``: their channel counts (``sum(widths) == in_features``).
    ``embed_dim``: D of the CLIP space; concept score S = ``logit_scale``·cos(h, t) + ``bias``.
    """

    classifier: str = "testbed"
    classifier_pretrained: bool | str | None = None
    layers: list[str] = field(default_factory=list)
    clip_model: str = "testbed"
    clip_pretrained: str | None = None
    embed_dim: int = 0
    in_features: int = 0
    hidden: list[int] = field(default_factory=list)
    logit_scale: float = 100.0
    bias: float = 0.0
    kind: str = "cnn"
    num_prefix_tokens: int = 1
    class_names: list[str] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)



class CEFAM(nn.Module):
    """Classifier + translator. ``images [B, 3, S, S]`` are normalised for the classifier (``backbone.mean/std`` at
    ``backbone.input_size``; e.g. ``backbone.preprocess(pil)``).

    Attributes: ``backbone`` (:class:`fastcbm.models.Backbone`, frozen, eval mode), ``translator``
    (:class:`Translator`), ``config`` (:class:`CEFAMConfig`). Gradients flow through every method when the caller
    enables them (the region ops need them); wrap calls in ``torch.no_grad()`` otherwise.
    """

    def __init__(self, backbone, translator: Translator, config: CEFAMConfig):
        super().__init__()
        if not config.layers:
            raise InvalidArgument("CE-FAM config: layers must name at least one classifier stage")
        if translator.in_features != config.in_features or translator.out_features != config.embed_dim:
            raise InvalidArgument(f"translator maps {translator.in_features} → {translator.out_features} values but the "
                                  f"config says in_features={config.in_features}, embed_dim={config.embed_dim}")
        if config.widths and sum(config.widths) != config.in_features:
            raise InvalidArgument(f"CE-FAM config: stage widths {config.widths} sum to {sum(config.widths)}, not "
                                  f"in_features={config.in_features}")
        self.backbone = backbone
        backbone.model.eval().requires_grad_(False)
        self.classifier = backbone.model  # registered as a sub-module so .to(device) moves it
        self.translator = translator
        self.config = config

    # -- forward pieces -------------------------------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        return list(self.config.layers)

    def stages(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(logits [B, K], {layer: A_l [B, C_l, h_l, w_l]})`` of the classifier."""
        return stage_activations(self.classifier, images, self.layers, self.config.kind, self.config.num_prefix_tokens)

    def z_cat(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled stages concatenated in the order of ``config.layers``: ``[B, Z]``."""
        _, acts = self.stages(images)
        z = pool_stages(acts, self.layers)
        if z.shape[1] != self.config.in_features:
            raise InvalidArgument(f"classifier stages {self.layers} give {z.shape[1]} pooled values per image but the "
                                  f"translator expects {self.config.in_features}")
        return z

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Translator output ``h [B, D]`` (approximates the un-normalised CLIP image embedding)."""
        return self.translator(self.z_cat(images))

    def scores_from_embedding(self, h: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """S = s·cos(h, t) + b for ``h [B, D]`` and ``text_emb [T, D]`` → ``[B, T]``."""
        return concept_scores(h, text_emb, self.config.logit_scale, self.config.bias)

    def concept_scores(self, images: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Concept scores ``[B, T]`` of ``images`` for text embeddings ``text_emb [T, D]`` (any norm)."""
        return self.scores_from_embedding(self.embed(images), text_emb)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(images)

    # -- persistence ----------------------------------------------------------------------------------------------
    def save(self, path: str | Path, include_backbone: bool = False) -> None:
        """Write ``path/config.json`` and ``path/translator.safetensors`` (and ``classifier.safetensors`` when
        ``include_backbone``; by default the classifier is rebuilt from its name, which keeps files small)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.translator.state_dict().items()},
                  str(path / TRANSLATOR_FILE))
        if include_backbone:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.classifier.state_dict().items()},
                      str(path / BACKBONE_FILE))
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "include_backbone": bool(include_backbone),
                "config": self.config.to_json()}
        (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, path: str | Path, backbone=None, map_location: str = "cpu") -> CEFAM:
        """Load a model saved with :meth:`save`. The classifier is rebuilt with
        ``fastcbm.models.load_backbone(config.classifier, config.classifier_pretrained)`` unless ``backbone`` (a
        :class:`~fastcbm.models.Backbone`) is given."""
        from safetensors.torch import load_file

        path = Path(path)
        meta = _read_meta(path)
        config = CEFAMConfig.from_json(meta["config"])
        if backbone is None:
            from fastcbm.models import load_backbone

            backbone = load_backbone(config.classifier, pretrained=config.classifier_pretrained, device=map_location)
        if meta.get("include_backbone"):
            backbone.model.load_state_dict(load_file(str(path / BACKBONE_FILE), device=map_location))
        missing = [n for n in config.layers if n not in dict(backbone.model.named_modules())]
        if missing:
            raise InvalidFile(f"{path}: the classifier {config.classifier!r} has no stages {missing} (it has feature "
                              f"layers {list(backbone.feature_layers)})")
        translator = Translator(config.in_features, config.embed_dim, config.hidden)
        translator.load_state_dict(load_file(str(path / TRANSLATOR_FILE), device=map_location))
        return cls(backbone, translator.to(map_location).eval(), config)


def _read_meta(path: Path) -> dict:
    """The validated ``config.json`` of a saved CE-FAM directory (its tensor file must exist too)."""
    cfg_file, tensor_file = path / CONFIG_FILE, path / TRANSLATOR_FILE
    for f in (cfg_file, tensor_file):
        if not f.is_file():
            raise MissingFile(f"{f} not found: {path} is not a saved CE-FAM model directory "
                              "(fastcbm cefam train --out DIR writes one)")
    try:
        meta = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise InvalidFile(f"{cfg_file}: invalid JSON ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise InvalidFile(f"{cfg_file}: not a CE-FAM model config (format={meta.get('format')!r})")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise InvalidFile(f"{cfg_file}: format version {meta['version']} is newer than this fastcbm supports")
    return meta


def read_config(path: str | Path) -> CEFAMConfig:
    """The :class:`CEFAMConfig` of a saved model, without loading any weights."""
    return CEFAMConfig.from_json(_read_meta(Path(path))["config"])


def load_cefam(path: str | Path, backbone=None, map_location: str = "cpu") -> CEFAM:
    """Shorthand for :meth:`CEFAM.load`."""
    return CEFAM.load(path, backbone=backbone, map_location=map_location)
