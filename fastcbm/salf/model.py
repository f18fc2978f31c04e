"""The trained SALF-CBM classifier: frozen backbone → grid-resized feature maps → concept maps (1×1 conv) → pooled
concepts → standardised → sparse linear head. Saved as safetensors (tensors) + JSON (everything else)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastcbm.models.features import FeatureHooks, as_feature_map, resize_to_grid
from fastcbm.heads import LinearHead, pool_concept_maps
from fastcbm.configs import JsonConfig
from fastcbm.errors import InvalidArgument, InvalidFile, MissingFile, OutputExists

FORMAT_VERSION = 1


@dataclass
class SALFConfig(JsonConfig):
    """Everything needed to rebuild a SALF-CBM besides its tensors."""

    backbone: str = "testbed"
    backbone_pretrained: bool | str | None = None
    feature_layer: str | None = None  # default: the backbone's last feature layer
    clip: str = "testbed"
    clip_pretrained: str | None = None
    grid: tuple[int, int] = (7, 7)
    radius: float | None = None  # None: the default geometry for the CLIP input size
    width: float = 2.0
    centers: str = "inset"
    pooling: str = "mean"  # "mean" | "softmax"
    softmax_temperature: float = 1.0
    concepts: list[str] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)



class SALFCBM(nn.Module):
    """A spatially-aware label-free concept bottleneck model.

    ``images [N, 3, S, S]`` are normalised for the backbone. ``concept_maps`` → ``[N, M, Gy, Gx]``,
    ``concepts`` → standardised pooled activations ``[N, M]``, ``forward`` → logits ``[N, K]``.
    """

    def __init__(self, backbone: nn.Module, kind: str, config: SALFConfig, weight: torch.Tensor, head: LinearHead,
                 num_prefix_tokens: int = 1):
        super().__init__()
        m = weight.shape[0]
        if len(config.concepts) != m:
            raise InvalidArgument(f"{len(config.concepts)} concept names for a bottleneck with {m} concepts")
        if head.num_features != m:
            raise InvalidArgument(f"head takes {head.num_features} concepts, the bottleneck has {m}")
        if config.class_names and len(config.class_names) != head.num_classes:
            raise InvalidArgument(f"{len(config.class_names)} class names for a head with {head.num_classes} classes")
        self.backbone = backbone.eval().requires_grad_(False)
        self.kind = kind
        self.config = config
        self.num_prefix_tokens = num_prefix_tokens
        self.register_buffer("weight", weight.detach().float().clone())  # bottleneck W_c [M, C]
        self.head = head.requires_grad_(False)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.head.weight

    @property
    def concept_mean(self) -> torch.Tensor:
        return self.head.standardizer.mean

    @property
    def concept_std(self) -> torch.Tensor:
        return self.head.standardizer.std

    # -- forward pieces -------------------------------------------------------------------------------------------
    @property
    def layer(self) -> str:
        assert self.config.feature_layer is not None
        return self.config.feature_layer

    def feature_maps(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, C, Gy, Gx]`` backbone maps resized to the prompt grid."""
        with FeatureHooks(self.backbone, [self.layer]) as hooks:
            self.backbone(images)
        fmap = as_feature_map(hooks.outputs[self.layer], self.kind, self.num_prefix_tokens)
        return resize_to_grid(fmap.float(), self.config.grid)

    def maps_from_features(self, feature_maps: torch.Tensor) -> torch.Tensor:
        return torch.einsum("mc,nchw->nmhw", self.weight, feature_maps.float())

    def concept_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Concept maps ``[N, M, Gy, Gx]`` (raw bottleneck outputs, before pooling/standardisation)."""
        return self.maps_from_features(self.feature_maps(images))

    def standardize(self, pooled: torch.Tensor) -> torch.Tensor:
        return (pooled - self.concept_mean) / self.concept_std

    def concepts_from_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """Standardised pooled concept activations ``c* [N, M]``."""
        return self.standardize(pool_concept_maps(maps, self.config.pooling, self.config.softmax_temperature))

    def classify(self, concepts: torch.Tensor) -> torch.Tensor:
        """Standardised concepts ``[N, M]`` → logits ``[N, K]``."""
        return F.linear(concepts, self.head.weight, self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(self.concepts_from_maps(self.concept_maps(images)))

    # -- persistence ----------------------------------------------------------------------------------------------
    def save(self, path: str | Path, include_backbone: bool = False) -> None:
        """Write ``path/model.safetensors`` and ``path/config.json`` (backbone weights only if asked: by default it
        is rebuilt from its name, which keeps files small). ``config.json`` records the sha256 and size of the tensor
        file, checked by :meth:`load`; both files get the same permissions (0644 under the usual umask)."""
        from safetensors.torch import save_file

        from fastcbm.files import canonical_sha256, file_sha256

        path = Path(path)
        if path.exists() and not path.is_dir():
            raise OutputExists(f"out: {path} is an existing file, not a folder for the model")
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()
                   if include_backbone or not k.startswith("backbone.")}
        tensor_file = path / "model.safetensors"
        save_file(tensors, str(tensor_file))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tensor_file, 0o666 & ~umask)  # safetensors writes through a private temp file (0600)
        meta = {"format": "fastcbm.salf", "version": FORMAT_VERSION, "kind": self.kind,
                "num_prefix_tokens": self.num_prefix_tokens, "include_backbone": include_backbone,
                "tensors": {"file": tensor_file.name, "sha256": file_sha256(tensor_file),
                            "bytes": tensor_file.stat().st_size},
                "config": self.config.to_json()}
        meta["checksum"] = canonical_sha256(meta)  # config.json checks itself too (concept/class names, ...)
        (path / "config.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, path: str | Path, backbone: nn.Module | None = None, map_location: str = "cpu") -> SALFCBM:
        """Load a model saved with :meth:`save`. The backbone is rebuilt by name unless given. Every problem with the
        files (checksum, damaged safetensors, unknown version, missing keys or tensors) is a one-line ValueError."""
        path = Path(path)
        meta = _read_meta(path)
        cfg_file = path / "config.json"
        try:
            config = SALFConfig.from_json(meta["config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidFile(f"{cfg_file}: the 'config' entry is missing or invalid ({type(exc).__name__}: {exc})"
                              ) from None
        tensors = _load_tensors(path, meta, map_location)
        missing = sorted({"weight", "head.weight", "head.bias", "head.standardizer.mean", "head.standardizer.std"}
                         - set(tensors))
        if missing:
            raise InvalidFile(f"{path / 'model.safetensors'}: tensors {missing} are missing (not a complete SALF-CBM)")
        if backbone is None:
            from fastcbm.models import load_backbone

            backbone = load_backbone(config.backbone, pretrained=config.backbone_pretrained).model
        try:
            if meta.get("include_backbone"):
                backbone.load_state_dict({k[len("backbone."):]: v for k, v in tensors.items()
                                          if k.startswith("backbone.")})
            head = LinearHead.from_state_dict({k[len("head."):]: v for k, v in tensors.items()
                                               if k.startswith("head.")})
            return cls(backbone, meta["kind"], config, tensors["weight"], head, meta.get("num_prefix_tokens", 1))
        except (RuntimeError, ValueError, KeyError) as exc:
            raise InvalidFile(f"{path}: the saved tensors do not fit the saved config "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]})") from None


def _load_tensors(path: Path, meta: dict, map_location: str) -> dict[str, torch.Tensor]:
    """The tensors of ``model.safetensors`` after checking its recorded size and sha256 (models saved before the
    checksum existed are loaded unchecked)."""
    from safetensors.torch import load_file

    from fastcbm.files import file_sha256

    tensor_file = path / "model.safetensors"
    rec = meta.get("tensors")
    if rec is not None:
        if not isinstance(rec, dict) or not {"sha256", "bytes"} <= set(rec):
            raise InvalidFile(f"{path / 'config.json'}: the 'tensors' entry is damaged ({rec!r})")
        size = tensor_file.stat().st_size
        if size != rec["bytes"]:
            raise InvalidFile(f"{tensor_file}: {size} bytes, config.json records {rec['bytes']} (truncated or replaced)")
        if file_sha256(tensor_file) != rec["sha256"]:
            raise InvalidFile(f"{tensor_file} fails the sha256 checksum recorded in config.json (damaged or modified)")
    try:
        return load_file(str(tensor_file), device=map_location)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError, OSError, ...
        raise InvalidFile(f"{tensor_file} is not a readable safetensors file ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200] if str(exc) else 'no detail'})") from None


def _read_meta(path: Path) -> dict:
    """The validated ``config.json`` of a saved SALF-CBM directory (both of its files must exist)."""
    cfg_file, tensor_file = path / "config.json", path / "model.safetensors"
    for f in (cfg_file, tensor_file):
        if not f.is_file():
            raise MissingFile(f"{f} not found: not a saved SALF-CBM directory")
    try:
        meta = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise InvalidFile(f"{cfg_file}: invalid JSON ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise InvalidFile(f"{cfg_file}: not a text file ({exc.reason})") from None
    if not isinstance(meta, dict) or meta.get("format") != "fastcbm.salf":
        fmt = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise InvalidFile(f"{cfg_file}: not a SALF-CBM config (format={fmt!r})")
    if "checksum" in meta:
        from fastcbm.files import canonical_sha256

        if meta["checksum"] != canonical_sha256({k: v for k, v in meta.items() if k != "checksum"}):
            raise InvalidFile(f"{cfg_file} fails its checksum (edited or damaged)")
    version = meta.get("version")
    if type(version) is not int:  # "1", null, 1.0, true: not a version this code wrote
        raise InvalidFile(f"{cfg_file}: 'version' must be an integer, got {version!r}")
    if version > FORMAT_VERSION or version < 1:
        raise InvalidFile(f"{cfg_file}: format version {version} is not supported by this fastcbm (it reads 1 to "
                          f"{FORMAT_VERSION})")
    if meta.get("kind") not in ("cnn", "vit"):
        raise InvalidFile(f"{cfg_file}: 'kind' must be 'cnn' or 'vit', got {meta.get('kind')!r}")
    return meta


def read_config(path: str | Path) -> SALFConfig:
    """The :class:`SALFConfig` of a saved model, without loading any weights (e.g. to build its backbone once)."""
    return SALFConfig.from_json(_read_meta(Path(path))["config"])
