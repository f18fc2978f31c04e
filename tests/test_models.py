"""Model factories: bundled testbed models, real names through torchvision / timm / open_clip, offline errors."""

from __future__ import annotations

import pytest
import torch

from fastcbm.models.features import extract_feature_maps
from fastcbm.models import Backbone, available_models, load_backbone, load_clip
from fastcbm.models import testbed as T


pytestmark = pytest.mark.usefixtures("one_thread")


def test_registry_lists_the_bundled_models():
    models = available_models()
    assert "testbed" in models["clip"] and {"testbed", "testbed-vit"} <= set(models["backbone"])


def test_testbed_clip_is_an_open_clip_model():
    model, preprocess, tokenizer = load_clip("testbed")
    from PIL import Image

    x = preprocess(Image.new("RGB", (80, 70), (10, 200, 30)))
    assert x.shape == (3, T.IMAGE_SIZE, T.IMAGE_SIZE)
    tokens = tokenizer(["a photo of a blue circle", "zebra"])
    assert tokens.shape == (2, T.CONTEXT_LENGTH) and tokens.dtype == torch.long
    assert tokens[1, 1] == T.VOCAB.index("<unk>")  # unknown words map to <unk>
    img = model.encode_image(x[None], normalize=True)
    txt = model.encode_text(tokens, normalize=True)
    assert img.shape == (1, 128) and txt.shape == (2, 128)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(1))
    assert model.visual.preprocess_cfg["size"] == (T.IMAGE_SIZE, T.IMAGE_SIZE)


def test_tokenizer_truncates_and_keeps_eot():
    tok = T.WordTokenizer()
    ids = tok(" ".join(["blue"] * 100))
    assert ids.shape == (1, T.CONTEXT_LENGTH) and ids[0, -1] == T.VOCAB.index("<eot>")
    assert int(ids.argmax()) == T.CONTEXT_LENGTH - 1  # open_clip pools at the largest id


@pytest.mark.parametrize("name,kind,layers", [("testbed", "cnn", 4), ("testbed-vit", "vit", 4)])
def test_testbed_backbones(name, kind, layers):
    bb = load_backbone(name)
    assert isinstance(bb, Backbone) and bb.kind == kind and len(bb.feature_layers) == layers
    x = torch.randn(2, 3, bb.input_size, bb.input_size)
    assert bb.model(x).shape == (2, len(bb.class_names))
    fmap = extract_feature_maps(bb.model, x, bb.feature_layers[-1], kind=bb.kind, grid=(7, 7))
    assert fmap.shape[0] == 2 and fmap.shape[-2:] == (7, 7)
    if kind == "cnn":
        assert bb.feature_layers == ["layer1", "layer2", "layer3", "layer4"]


def test_torchvision_name_random_init():
    bb = load_backbone("resnet18", pretrained=None)
    assert bb.kind == "cnn" and bb.feature_layers[-1] == "layer4" and bb.num_classes == 1000


def test_torchvision_pretrained_offline_error_names_the_weights(monkeypatch):
    import torch.hub

    def offline(*args, **kwargs):
        raise OSError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match=r"could not fetch the pretrained weights torchvision resnet18.*resnet18"):
        load_backbone("resnet18", pretrained=True)


def test_open_clip_pretrained_offline_error(monkeypatch):
    from fastcbm.compat import import_open_clip

    open_clip = import_open_clip()

    def offline(*args, **kwargs):
        raise RuntimeError("Failed to download (network unreachable)")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", offline)
    with pytest.raises(RuntimeError, match=r"could not fetch the pretrained weights open_clip 'ViT-B-16'.*openai"):
        load_clip("ViT-B-16", pretrained="openai")


def test_unknown_names_are_value_errors():
    with pytest.raises(ValueError, match="unknown CLIP model 'nope'"):
        load_clip("nope")
    with pytest.raises(ValueError, match="unknown backbone 'nope'"):
        load_backbone("nope")


def test_missing_bundled_weights_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="fastcbm testbed train-cnn"):
        T.load_weights(T.TinyResNet(), "cnn", tmp_path / "missing.safetensors")


def test_random_init_backbones_are_the_same_at_every_rebuild():
    """precompute stores a random backbone's features; train/explain rebuild it by name: the weights must agree,
    and the caller's random stream is left alone."""
    import torch

    from fastcbm.models import load_backbone

    before = torch.random.get_rng_state()
    a = load_backbone("resnet18", pretrained=None).model.state_dict()
    b = load_backbone("resnet18", pretrained=False).model.state_dict()
    assert torch.equal(torch.random.get_rng_state(), before)
    for k in a:
        assert torch.equal(a[k], b[k]), k
