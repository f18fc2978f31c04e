"""Issue 14 item 5: a saved SALF-CBM checks itself on load (tensor checksum in config.json, config checksum, damaged
safetensors, bad versions, missing keys → one clear line) and is written with the permissions of config.json."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from fastcbm.heads import LinearHead
from fastcbm.models import load_backbone
from fastcbm.salf.model import SALFCBM, SALFConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    bb = load_backbone("testbed")
    torch.manual_seed(0)
    m, k, c = 3, 2, 64
    head = LinearHead(m, k)
    with torch.no_grad():
        head.weight.normal_()
        head.bias.normal_()
    cfg = SALFConfig(feature_layer="layer4", grid=(3, 3), concepts=["a", "b", "c"], class_names=["x", "y"])
    model = SALFCBM(bb.model, "cnn", cfg, torch.randn(m, c), head)
    root = tmp_path_factory.mktemp("model") / "m"
    model.save(root)
    x = torch.randn(2, 3, 64, 64)
    return root, bb.model, model(x), x


def _copy(saved, tmp_path):
    root = saved[0]
    dst = tmp_path / "m"
    dst.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        (dst / f).write_bytes((root / f).read_bytes())
    return dst


def test_round_trip_and_permissions(saved):
    root, backbone, logits, x = saved
    torch.testing.assert_close(SALFCBM.load(root, backbone=backbone)(x), logits)
    meta = json.loads((root / "config.json").read_text())
    assert len(meta["tensors"]["sha256"]) == 64 and meta["tensors"]["bytes"] == (root / "model.safetensors").stat().st_size
    mode = {f: stat.S_IMODE((root / f).stat().st_mode) for f in ("config.json", "model.safetensors")}
    assert mode["model.safetensors"] == mode["config.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert mode["model.safetensors"] == 0o666 & ~umask


def test_flipped_byte_in_tensors_is_refused(saved, tmp_path):
    """The issue's case: one flipped byte changed a prediction with exit 0."""
    root = _copy(saved, tmp_path)
    b = bytearray((root / "model.safetensors").read_bytes())
    b[-5] ^= 0x10  # inside the last tensor's data
    (root / "model.safetensors").write_bytes(bytes(b))
    with pytest.raises(ValueError, match="fails the sha256 checksum recorded in config.json") as ei:
        SALFCBM.load(root, backbone=saved[1])
    assert "\n" not in str(ei.value)


def _meta_edit(root, fn, *, fix_checksum=True):
    from fastcbm.files import canonical_sha256

    meta = json.loads((root / "config.json").read_text())
    fn(meta)
    if fix_checksum:
        meta["checksum"] = canonical_sha256({k: v for k, v in meta.items() if k != "checksum"})
    (root / "config.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.__setitem__("version", "1"), "'version' must be an integer, got '1'"),
    (lambda m: m.__setitem__("version", None), "'version' must be an integer, got None"),
    (lambda m: m.__setitem__("version", 99), "format version 99 is not supported"),
    (lambda m: m.__setitem__("kind", "rnn"), "'kind' must be"),
    (lambda m: m.pop("config"), "'config' entry is missing"),
    (lambda m: m["config"].__setitem__("bogus", 1), "'config' entry is missing or invalid"),
    (lambda m: m.__setitem__("tensors", "x"), "'tensors' entry is damaged"),
])
def test_bad_config_is_one_line(saved, tmp_path, edit, match):
    root = _copy(saved, tmp_path)
    _meta_edit(root, edit)
    with pytest.raises(ValueError, match=match) as ei:
        SALFCBM.load(root, backbone=saved[1])
    assert "\n" not in str(ei.value)


def test_edited_config_fails_its_checksum(saved, tmp_path):
    root = _copy(saved, tmp_path)
    _meta_edit(root, lambda m: m["config"].__setitem__("class_names", ["y", "x"]), fix_checksum=False)
    with pytest.raises(ValueError, match="config.json fails its checksum"):
        SALFCBM.load(root, backbone=saved[1])


def test_damaged_and_incomplete_safetensors(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    root = _copy(saved, tmp_path)
    # garbage tensor file without a recorded checksum (an older model): the safetensors error becomes one line
    _meta_edit(root, lambda m: m.pop("tensors"))
    (root / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="is not a readable safetensors file") as ei:
        SALFCBM.load(root, backbone=saved[1])
    assert "\n" not in str(ei.value)
    # a readable file missing the head: named
    t = load_file(str(saved[0] / "model.safetensors"))
    save_file({k: v for k, v in t.items() if not k.startswith("head.")}, str(root / "model.safetensors"))
    with pytest.raises(ValueError, match=r"tensors \['head.bias'.*are missing"):
        SALFCBM.load(root, backbone=saved[1])
    # truncated with the checksum recorded: the size is named
    root2 = _copy(saved, tmp_path / "t")
    (root2 / "model.safetensors").write_bytes((saved[0] / "model.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match="100 bytes, config.json records"):
        SALFCBM.load(root2, backbone=saved[1])


def test_save_into_an_existing_file_is_refused(saved, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError, match="is an existing file"):
        SALFCBM.load(saved[0], backbone=saved[1]).save(tmp_path / "f")


def test_features_random_init_really_gives_a_random_backbone(tmp_path, monkeypatch):
    """The issue's bug: --features testbed --features-random-init stored the trained backbone's features."""
    from fastcbm.cli import main
    from fastcbm.precompute import precompute
    from tests.reliability_helpers import RUN, FakeCLIP, make_images

    imgs = make_images(tmp_path / "imgs", 2)
    feats = {}
    for name, pre in (("trained", True), ("random", False), ("random2", False)):
        r = precompute(str(imgs), FakeCLIP(), tmp_path / name, features="testbed", features_pretrained=pre, **RUN)
        feats[name] = r.features(dtype=torch.float32)
        assert r.settings["features_source"]["pretrained"] is pre
    assert not torch.allclose(feats["trained"], feats["random"])
    torch.testing.assert_close(feats["random"], feats["random2"])  # seeded: training rebuilds the same backbone
    import fastcbm.precompute as P

    class Stop(Exception):
        pass

    def fake(data, model, out, config, **k):
        raise Stop(config)

    monkeypatch.setattr(P, "precompute", fake)
    with pytest.raises(Stop) as ei:
        main(["precompute", "--data", str(imgs), "--model", "testbed", "--out", str(tmp_path / "c"), "--features",
              "testbed", "--features-random-init"])
    assert ei.value.args[0].features_pretrained is False
