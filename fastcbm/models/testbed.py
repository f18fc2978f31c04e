"""The bundled testbed models: a tiny CLIP, a tiny ResNet-like CNN and a tiny ViT, trained on the synthetic scenes of
:mod:`fastcbm.data.synthetic` (see ``MODEL_CARD.md`` next to this file; training: ``fastcbm testbed train-*``).

All three take 64×64 images normalised with mean 0.5 / std 0.25 per channel.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastcbm.data import synthetic as S
from fastcbm.errors import MissingFile

IMAGE_SIZE = S.TESTBED_IMAGE_SIZE
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
WEIGHTS = {"clip": "testbed_clip.safetensors", "cnn": "testbed_cnn.safetensors", "vit": "testbed_vit.safetensors"}

# ---- tokenizer -------------------------------------------------------------------------------------------------
SPECIAL = ["<pad>", "<sot>", "<unk>"]
WORDS = sorted(set(
    "a photo of an object with and on in red ring background the something".split()
    + list(S.SHAPES) + list(S.COLORS) + list(S.TEXTURES) + list(S.PARTS) + list(S.BACKGROUNDS)
))
VOCAB = SPECIAL + WORDS + ["<eot>"]  # <eot> has the largest id: open_clip pools the text tower at argmax(token id)
CONTEXT_LENGTH = 24


class WordTokenizer:
    """Word-level tokenizer over the testbed vocabulary, called like open_clip's: ``tokenizer(texts) -> [B, ctx]``.

    Commas and full stops separate words (DEAL's captions read "blue circle. It may contain ..."); unknown words map
    to ``<unk>``; texts longer than the context are truncated (``<eot>`` is kept)."""

    def __init__(self, vocab: list[str] = VOCAB, context_length: int = CONTEXT_LENGTH):
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.context_length = context_length

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        ctx = context_length or self.context_length
        out = torch.zeros(len(texts), ctx, dtype=torch.long)
        unk = self.index["<unk>"]
        for i, text in enumerate(texts):
            ids = [self.index.get(w, unk) for w in text.lower().replace(",", " ").replace(".", " ").split()][: ctx - 2]
            ids = [self.index["<sot>"], *ids, self.index["<eot>"]]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


# ---- models ----------------------------------------------------------------------------------------------------
def make_clip() -> nn.Module:
    """The testbed CLIP architecture: an open_clip ``CLIP`` with a small ModifiedResNet image tower (the shapes and
    textures are a few pixels wide: a convolutional tower resolves them at a fraction of a patch-8 ViT's cost) and a
    2-layer text tower."""
    from fastcbm.compat import import_open_clip

    import_open_clip()
    from open_clip.model import CLIP

    model = CLIP(embed_dim=128,
                 vision_cfg=dict(image_size=IMAGE_SIZE, layers=(1, 1, 1, 1), width=16),
                 text_cfg=dict(context_length=CONTEXT_LENGTH, vocab_size=len(VOCAB), width=96, heads=4, layers=2))
    # what open_clip stores for its own models; fastcbm.precompute reads it
    model.visual.preprocess_cfg = {"size": (IMAGE_SIZE, IMAGE_SIZE), "mean": MEAN, "std": STD,
                                   "interpolation": "bicubic", "resize_mode": "shortest"}
    model.visual.image_mean, model.visual.image_std = MEAN, STD
    return model


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.down is None else self.down(x)))


class TinyResNet(nn.Module):
    """ResNet-like CNN with four stages ``layer1..layer4`` (64×64 input, stride-2 stem → 4×4 ``layer4`` maps)."""

    def __init__(self, num_classes: int = len(S.class_names()), widths: tuple[int, ...] = (16, 32, 48, 64)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.layer1 = _Block(widths[0], widths[0], 1)
        self.layer2 = _Block(widths[0], widths[1], 2)
        self.layer3 = _Block(widths[1], widths[2], 2)
        self.layer4 = _Block(widths[2], widths[3], 2)
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(x.mean(dim=(2, 3)))


def make_vit(num_classes: int = len(S.class_names())) -> nn.Module:
    """A tiny timm VisionTransformer: 8×8 tokens + class token, width 128, 4 blocks, with a convolutional stem
    (three stride-2 3×3 convs) in place of the linear patch projection — a plain patch-8 ViT does not learn the rule
    task from 8k scenes, an early-convolution ViT does (Xiao et al., 2021). Tokens, blocks and heads are timm's."""
    from fastcbm.compat import import_timm

    timm = import_timm()
    from timm.layers import PatchEmbed

    class ConvStemPatchEmbed(PatchEmbed):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            dim = self.proj.out_channels
            self.proj = nn.Sequential(
                nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                nn.Conv2d(32, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                nn.Conv2d(64, dim, 3, 2, 1))

    return timm.models.vision_transformer.VisionTransformer(
        img_size=IMAGE_SIZE, patch_size=8, embed_dim=128, depth=4, num_heads=4, num_classes=num_classes, mlp_ratio=3.0,
        embed_layer=ConvStemPatchEmbed)


def normalize(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, 3, 64, 64]`` → the testbed models' input."""
    from fastcbm.models.inputs import normalize_uint8

    return normalize_uint8(images_uint8, MEAN, STD)


def preprocess_pil(image) -> torch.Tensor:
    """PIL image → normalised ``[3, 64, 64]`` (shorter side resized bicubically, centre crop), like open_clip's."""
    from fastcbm.data.folder import resize_center_crop

    return normalize(resize_center_crop(image, IMAGE_SIZE)[None])[0]


# ---- weights -----------------------------------------------------------------------------------------------------
def weights_path(kind: str) -> Path:
    return Path(str(resources.files("fastcbm.models") / "weights" / WEIGHTS[kind]))


def load_weights(model: nn.Module, kind: str, path: str | Path | None = None) -> nn.Module:
    """Load fp16 safetensors weights (the bundled ones unless ``path`` is given) into ``model`` as fp32."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else weights_path(kind)
    if not path.is_file():
        raise MissingFile(f"bundled testbed weights {path} are missing; rebuild them with "
                          f"`fastcbm testbed train-{kind}` or reinstall fastcbm")
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    model.load_state_dict(state)
    return model.eval()


def save_weights(model: nn.Module, path: str | Path) -> None:
    """fp16 safetensors (floating tensors halved; integer buffers such as BatchNorm counters kept)."""
    from safetensors.torch import save_file

    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))


def _load_clip(pretrained):
    return load_weights(make_clip(), "clip"), preprocess_pil, WordTokenizer()


def _backbone(kind: str, pretrained: bool | str | None = None):
    """The bundled trained backbone; ``pretrained=False`` (``--features-random-init``) asks for a random init, seeded
    (seed 0) so that every place that rebuilds the backbone by name — precompute, training, explain — gets the same
    weights (the global RNG is left as it was)."""
    from fastcbm.models import Backbone

    def build(make, name):
        if pretrained is False:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                return make().eval()
        return load_weights(make(), name)

    if kind == "cnn":
        model, layers, vit = build(TinyResNet, "cnn"), ["layer1", "layer2", "layer3", "layer4"], False
    else:
        model, vit = build(make_vit, "vit"), True
        layers = [f"blocks.{i}" for i in range(len(model.blocks))]
    return Backbone(model=model, preprocess=preprocess_pil, kind="vit" if vit else "cnn", feature_layers=layers,
                    mean=MEAN, std=STD, input_size=IMAGE_SIZE, num_classes=len(S.class_names()),
                    class_names=S.class_names(), num_prefix_tokens=1, name="testbed-vit" if vit else "testbed")


def register() -> None:
    from fastcbm.models import register_backbone, register_clip

    register_clip("testbed", _load_clip)
    register_backbone("testbed", lambda pretrained: _backbone("cnn", pretrained))
    register_backbone("testbed-vit", lambda pretrained: _backbone("vit", pretrained))

