"""The precompute job end to end on a tiny random open_clip model: cache contents, resume, damage, refusal,
full disk, bad images, torchrun, CLI."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastcbm.cache import CacheDiskFullError, CacheMismatchError, CacheReader
from fastcbm.data.loaders import dali_available
from fastcbm.cache import store as store_mod
from fastcbm.data.folder import BadImageError, decode_image, list_images
from tests.conftest import assert_close

REPO = Path(__file__).resolve().parents[1]
RING = dict(grid=3, radius=5.0, width=2.0)  # G = 9 rings on 32 px images
RUN = dict(RING, batch_size=3, shard_size=4, num_workers=0, progress=False, model_name="tiny", device="cpu")


def ensure_prompts_api() -> None:
    """Stand-in for ``fastcbm.prompts.render_rings`` until that module's public API lands (same signature, built on
    its reference implementation)."""
    import fastcbm.prompts as P

    if hasattr(P, "render_rings") and hasattr(P, "default_ring_geometry"):
        return
    from fastcbm.prompts import reference as R

    def render_rings(images, grid=(7, 7), radius=32, width=2, centers="inset", mean=R.CLIP_MEAN, std=R.CLIP_STD,
                     out_dtype=torch.float32, include_plain=True):
        plan = R.make_plan(images.shape[-1], grid, radius, width, centers, mean, std, include_plain)
        return R.render_rings_reference(images, plan, mean, std, out_dtype)

    P.render_rings, P.default_ring_geometry = render_rings, R.default_ring_geometry
    P.CLIP_MEAN, P.CLIP_STD = R.CLIP_MEAN, R.CLIP_STD


ensure_prompts_api()


def tiny_clip(seed: int = 0) -> torch.nn.Module:
    from fastcbm.compat import import_open_clip

    oc = import_open_clip()
    torch.manual_seed(seed)
    return oc.model.CLIP(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
                         text_cfg=dict(context_length=16, vocab_size=1000, width=64, heads=2, layers=2)).eval()


def make_images(root: Path) -> dict[str, str]:
    """12 usable images (ImageFolder layout, assorted sizes/modes/formats) and 3 bad ones; returns name → kind."""
    from PIL import Image

    rng = np.random.default_rng(0)
    kinds = {}
    for i in range(8):
        d = root / f"class{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(rng.integers(0, 256, (30 + 7 * i, 45 - 2 * i, 3), dtype=np.uint8))
        name = f"class{i % 2}/img{i}.{'jpg' if i % 3 == 0 else 'png'}"
        img.save(root / name)
        kinds[name] = "rgb"
    px = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)
    Image.fromarray(px[..., 0]).save(root / "gray.png")
    Image.fromarray(px).convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray(np.concatenate([px, px[..., :1]], -1), "RGBA").save(root / "rgba.png")
    Image.fromarray(px).convert("P", palette=Image.ADAPTIVE).save(root / "palette.png")
    kinds.update({"gray.png": "gray", "cmyk.jpg": "cmyk", "rgba.png": "rgba", "palette.png": "palette"})
    Image.fromarray(px[:5, :5]).save(root / "tiny.png")
    (root / "notes.jpg").write_text("this is text, not a JPEG")
    buf = root / "truncated.jpg"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, quality=95)
    buf.write_bytes(buf.read_bytes()[:600])
    kinds.update({"tiny.png": "bad", "notes.jpg": "bad", "truncated.jpg": "bad"})
    return kinds


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    make_images(root)
    return root


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_clip()


@pytest.fixture(scope="module")
def reference(images, model, tmp_path_factory) -> Path:
    from fastcbm.precompute import precompute

    out = tmp_path_factory.mktemp("ref") / "cache"
    precompute(images, model, out, **RUN)
    return out


def cache_bytes(root: Path) -> dict[str, bytes]:
    """Every file of a cache (shards and manifest) → content."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_cache_contents(reference, images, model):
    from fastcbm.models.inputs import encoder_input_config
    from fastcbm.prompts import render_rings

    r = CacheReader(reference)
    m = r.manifest
    assert (m["num_inputs"], m["num_images"], m["num_skipped"], len(m["shards"])) == (15, 12, 3, 4)
    assert sorted(Path(s["path"]).name for s in r.skipped) == ["notes.jpg", "tiny.png", "truncated.jpg"]
    reasons = {Path(s["path"]).name: s["reason"] for s in r.skipped}
    assert "too small" in reasons["tiny.png"] and "not an image" in reasons["notes.jpg"]
    assert "corrupt" in reasons["truncated.jpg"]
    assert m["settings"]["prompts"]["grid"] == [3, 3] and m["settings"]["model"]["name"] == "tiny"
    assert m["inputs"] == [os.path.abspath(f) for f in list_images(images)]
    e, e0 = r.prompt_embeddings(dtype=torch.float32), r.global_embeddings(dtype=torch.float32)
    assert e.shape == (12, 9, 32) and e0.shape == (12, 32) and r.prompt_embeddings().dtype == torch.float16
    assert_close(e.norm(dim=-1), torch.ones(12, 9), atol=2e-3, rtol=0, what="unit prompt rows")
    assert_close(e0.norm(dim=-1), torch.ones(12), atol=2e-3, rtol=0, what="unit global rows")
    # the definition: decode, render, encode one image at a time
    size, mean, std = encoder_input_config(model)
    imgs = torch.stack([decode_image(f, size) for f in r.files])
    x = render_rings(imgs, grid=(3, 3), radius=5.0, width=2.0, centers="inset", mean=mean, std=std,
                     out_dtype=torch.float32, include_plain=True)
    with torch.no_grad():
        want = torch.stack([model.encode_image(xi) for xi in x])  # [12, 10, 32]
    assert_close(r.global_norms(), want[:, 0].norm(dim=-1), atol=1e-4, rtol=1e-4, what="global norms")
    assert_close(r.prompt_norms(), want[:, 1:].norm(dim=-1), atol=1e-4, rtol=1e-4, what="prompt norms")
    assert_close(e, torch.nn.functional.normalize(want[:, 1:], dim=-1), atol=1e-3, rtol=0, what="prompt emb")
    assert_close(r.prompt_embeddings(scaled=True), want[:, 1:], atol=3e-3, rtol=1e-3, what="scaled")
    assert r.verify() == []


def test_resume_after_kill_is_byte_identical(reference, images, model, tmp_path, monkeypatch):
    from fastcbm.precompute import precompute

    real, calls = store_mod._write_array, {"n": 0}

    def killed(path, array):
        calls["n"] += 1
        if calls["n"] == 5 * 2 + 3:  # 5 arrays per shard: dies inside shard 2
            raise KeyboardInterrupt("simulated kill")
        return real(path, array)

    monkeypatch.setattr(store_mod, "_write_array", killed)
    with pytest.raises(KeyboardInterrupt):
        precompute(images, model, tmp_path / "c", **RUN)
    assert sorted(p.name for p in (tmp_path / "c" / "shards").iterdir()) == ["00000", "00001"]
    monkeypatch.setattr(store_mod, "_write_array", real)
    r = precompute(images, model, tmp_path / "c", **RUN)
    assert r.stats["shards"] == 2  # finished shards were not recomputed
    assert cache_bytes(tmp_path / "c") == cache_bytes(reference)


def test_damaged_shard_is_recomputed(reference, images, model, tmp_path, caplog):
    from fastcbm.precompute import precompute

    shutil.copytree(reference, tmp_path / "c")
    f = tmp_path / "c" / "shards" / "00001" / "prompt.npy"
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0xFF
    f.write_bytes(bytes(b))
    with caplog.at_level(logging.WARNING, logger="fastcbm.cache"):
        r = precompute(images, model, tmp_path / "c", **RUN)
    assert "shard 1 is damaged" in caplog.text and r.stats["shards"] == 1
    assert cache_bytes(tmp_path / "c") == cache_bytes(reference)
    r = precompute(images, model, tmp_path / "c", **RUN)  # intact: nothing to do
    assert r.stats["shards"] == 0


def test_other_settings_are_refused(reference, images, model, tmp_path):
    from fastcbm.precompute import precompute

    shutil.copytree(reference, tmp_path / "c")
    with pytest.raises(CacheMismatchError) as ei:
        precompute(images, model, tmp_path / "c", **{**RUN, "grid": 2, "model_name": "other", "centers": "paper"})
    msg = str(ei.value)
    for field in ("settings.prompts.grid", "settings.prompts.centers", "settings.model.name"):
        assert field in msg
    with pytest.raises(CacheMismatchError, match="inputs"):
        precompute(sorted(map(str, images.rglob("*.png"))), model, tmp_path / "c", **RUN)
    assert cache_bytes(tmp_path / "c") == cache_bytes(reference)  # untouched


def test_disk_full_fails_clearly_and_resumes(reference, images, model, tmp_path, monkeypatch):
    from fastcbm.precompute import precompute

    real, calls = store_mod._write_array, {"n": 0}

    def full(path, array):
        calls["n"] += 1
        if calls["n"] > 5 * 2 + 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, array)

    monkeypatch.setattr(store_mod, "_write_array", full)
    with pytest.raises(CacheDiskFullError, match=str(tmp_path / "c")) as ei:
        precompute(images, model, tmp_path / "c", **RUN)
    assert "2 finished shard(s) stay valid" in str(ei.value)
    monkeypatch.setattr(store_mod, "_write_array", real)
    r = precompute(images, model, tmp_path / "c", **RUN)
    assert r.stats["shards"] == 2
    assert cache_bytes(tmp_path / "c") == cache_bytes(reference)


@pytest.mark.parametrize("kind", ["gray", "gray16", "cmyk", "rgba", "palette", "wide", "tall", "exact"])
@pytest.mark.parametrize("size", [8, 31])
def test_decode_converts_modes(tmp_path, kind, size):
    from PIL import Image

    rng = np.random.default_rng(1)
    shape = {"wide": (20, 53, 3), "tall": (61, 17, 3), "exact": (size, size, 3)}.get(kind, (40, 36, 3))
    px = rng.integers(0, 256, shape, dtype=np.uint8)
    img = {"gray": lambda: Image.fromarray(px[..., 0]),
           "gray16": lambda: Image.fromarray(px[..., 0].astype(np.uint16) * 257), "cmyk": lambda: Image.fromarray(px).convert("CMYK"),
           "rgba": lambda: Image.fromarray(np.concatenate([px, px[..., :1]], -1), "RGBA"),
           "palette": lambda: Image.fromarray(px).convert("P", palette=Image.ADAPTIVE)}.get(
        kind, lambda: Image.fromarray(px))()
    path = tmp_path / f"x.{'jpg' if kind == 'cmyk' else 'png'}"
    img.save(path)
    out = decode_image(path, size)
    assert out.shape == (3, size, size) and out.dtype == torch.uint8
    if kind == "exact":
        assert torch.equal(out, torch.from_numpy(px).permute(2, 0, 1))
    if kind in ("gray", "gray16"):
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    if kind == "gray16":  # 16-bit values scaled to 8 bits (not clipped): same as the 8-bit image
        Image.fromarray(px[..., 0]).save(tmp_path / "g8.png")
        assert torch.equal(out, decode_image(tmp_path / "g8.png", size))


@pytest.mark.parametrize("bad,reason", [("tiny", "too small"), ("text", "not an image"), ("truncated", "corrupt"),
                                        ("missing", "not found"), ("empty", "not an image")])
def test_decode_bad_images(tmp_path, bad, reason):
    from PIL import Image

    path = tmp_path / "x.jpg"
    if bad == "tiny":
        Image.fromarray(np.zeros((7, 40, 3), np.uint8)).save(path)
    elif bad == "text":
        path.write_text("hello")
    elif bad == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[:500])
    elif bad == "empty":
        path.write_bytes(b"")
    with pytest.raises(BadImageError, match=reason):
        decode_image(path, 16)


def test_list_images(tmp_path, images):
    files = list_images(images)
    assert len(files) == 15 and files == sorted(files, key=lambda f: Path(f).relative_to(images).as_posix())
    lst = tmp_path / "list.txt"
    lst.write_text(f"# comment\n{files[3]}\n\n{os.path.relpath(files[0], tmp_path)}\n")
    assert [os.path.abspath(f) for f in list_images(lst)] == [files[3], files[0]]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        list_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        list_images(tmp_path / "nothing")


def test_workers_and_features_give_same_embeddings(reference, images, model, tmp_path):
    from fastcbm.precompute import precompute

    torch.manual_seed(1)
    conv = torch.nn.Conv2d(3, 6, 4, stride=4)  # [B, 6, 8, 8] from 32 px

    def backbone(x: torch.Tensor) -> torch.Tensor:
        return conv(x.float() / 255.0)

    r = precompute(images, model, tmp_path / "c", **{**RUN, "num_workers": 2}, features=backbone,
                   features_name="conv4")
    ref = CacheReader(reference)
    assert torch.equal(r.prompt_embeddings(), ref.prompt_embeddings())
    f = r.features(dtype=torch.float32)
    assert f.shape == (12, 6, 3, 3) and r.settings["features"] == "conv4"
    imgs = torch.stack([decode_image(p, 32) for p in r.files[:2]])
    with torch.no_grad():
        want = torch.nn.functional.interpolate(backbone(imgs), size=(3, 3), mode="bilinear", align_corners=False)
    assert_close(f[:2], want, atol=2e-3, rtol=2e-3, what="features")


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")
def test_dali_loader_on_cpu_matches_pil(images, model, reference, tmp_path):
    """DALI's CPU decoder (the GPU pipeline with device="cpu"): same rows and skipped files as PIL on the awkward
    inputs (grayscale, CMYK, palette, RGBA, truncated, tiny, not an image); on smooth photos-like images the pixels
    match to within a grey level on average (same geometry; only the cubic kernels differ)."""
    from PIL import Image

    from fastcbm.data.loaders import dali_loader, torch_loader
    from fastcbm.precompute import precompute

    files = list_images(images)
    plan = [list(range(k, min(k + 4, len(files)))) for k in range(0, len(files), 4)]
    for d, t in zip(dali_loader(files, 32, plan, device_id=None, num_threads=1),
                    torch_loader(files, 32, plan, num_workers=0)):
        assert d.indices == t.indices and d.ok == t.ok and [i for i, _ in d.skipped] == [i for i, _ in t.skipped]
        assert d.images.shape == t.images.shape and d.images.dtype == torch.uint8
    rng = np.random.default_rng(1)
    smooth = []
    for i, (h, w, mode) in enumerate([(375, 500, "RGB"), (500, 375, "CMYK"), (90, 70, "L"), (64, 64, "RGB")]):
        coarse = rng.integers(0, 256, (h // 48 + 2, w // 48 + 2, 3), dtype=np.uint8)
        path = tmp_path / f"smooth{i}.{'png' if mode == 'L' else 'jpg'}"
        Image.fromarray(coarse).resize((w, h), Image.BICUBIC).convert(mode).save(path, quality=95)
        smooth.append(str(path))
    (d,), (t,) = (dali_loader(smooth, 32, [[0, 1, 2, 3]], device_id=None),
                  torch_loader(smooth, 32, [[0, 1, 2, 3]], num_workers=0))
    per_image = (d.images.float() - t.images.float()).abs().mean(dim=(1, 2, 3))
    assert float(per_image.max()) < 1.0, f"mean |DALI - PIL| per image: {per_image.tolist()}"
    r = precompute(images, model, tmp_path / "dali", **RUN, loader="dali")
    ref = CacheReader(reference)
    assert r.files == ref.files and [s["path"] for s in r.skipped] == [s["path"] for s in ref.skipped]
    norms = r.prompt_embeddings(dtype=torch.float32).norm(dim=-1)
    assert_close(norms, torch.ones_like(norms), atol=2e-3, rtol=0, what="unit rows")


def test_bad_arguments(images, model, tmp_path):
    from fastcbm.precompute import precompute

    with pytest.raises(ValueError, match="verify"):
        precompute(images, model, tmp_path / "c", **RUN, verify="maybe")
    with pytest.raises(ValueError, match="dtype"):
        precompute(images, model, tmp_path / "c", **{**RUN, "dtype": "int8"})
    if not dali_available():
        with pytest.raises(ValueError, match="loader"):
            precompute(images, model, tmp_path / "c", **RUN, loader="dali")
    with pytest.raises(ValueError, match="loader"):
        precompute(images, model, tmp_path / "c", **RUN, loader="fast")
    assert not (tmp_path / "c").exists()  # refused before anything was written
    with pytest.raises(ValueError, match="radius"):
        precompute(images, model, tmp_path / "c", **{**RUN, "radius": 20.0})


def test_encoder_input_config(model):
    from fastcbm.models.inputs import encoder_input_config

    assert encoder_input_config(model)[0] == 32
    tv = pytest.importorskip("fastcbm.compat").import_torchvision()
    pre = tv.transforms.Compose([tv.transforms.Resize(48), tv.transforms.CenterCrop(48),
                                 tv.transforms.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))])
    assert encoder_input_config(model, pre) == (48, (0.5,) * 3, (0.25,) * 3)
    model.visual.preprocess_cfg = {"size": (40, 40), "mean": (0.1, 0.2, 0.3), "std": (1.0, 1.0, 1.0)}
    try:
        assert encoder_input_config(model, pre) == (40, (0.1, 0.2, 0.3), (1.0, 1.0, 1.0))
    finally:
        del model.visual.preprocess_cfg


_CHILD = """
import sys, torch
sys.path.insert(0, {repo!r})
torch.set_num_threads(1)
from tests.test_precompute import tiny_clip, RUN
from fastcbm.precompute import precompute
precompute({images!r}, tiny_clip(), {out!r}, **RUN)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_equal_one(images, model, tmp_path):
    from fastcbm.precompute import precompute

    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(repo=str(REPO), images=str(images), out=str(tmp_path / "dist")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                           f"--master_port={_free_port()}", str(script)], env=env, cwd=str(REPO),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same kernels as the children, so the bytes can match exactly
    try:
        one = precompute(images, model, tmp_path / "one", **RUN)
    finally:
        torch.set_num_threads(threads)
    two = CacheReader(tmp_path / "dist")
    assert two.files == one.files and two.skipped == one.skipped
    assert_close(two.prompt_embeddings(), one.prompt_embeddings(), atol=1e-3, rtol=0, what="E (2 ranks vs 1)")
    assert_close(two.global_norms(), one.global_norms(), atol=1e-5, rtol=1e-5, what="norms (2 ranks vs 1)")
    assert cache_bytes(tmp_path / "dist") == cache_bytes(tmp_path / "one")  # in fact bit-identical


def _fake_models(monkeypatch, model):
    def tokenizer(texts):
        return torch.tensor([[(sum(map(ord, t)) * (j + 1)) % 997 + 1 for j in range(16)] for t in texts])

    import fastcbm.models

    # only the CLIP is faked: --features backbones are real (random-init) models
    monkeypatch.setattr(fastcbm.models, "load_clip", lambda name, pretrained=None, device="cpu": (model, None, tokenizer))
    return tokenizer


def test_cli_precompute_and_similarities(images, model, reference, tmp_path, monkeypatch, capsys):
    from fastcbm.cache import load_similarities
    from fastcbm.cli import main

    tokenizer = _fake_models(monkeypatch, model)
    out = tmp_path / "c"
    argv = ["precompute", "--data", str(images), "--model", "tiny", "--out", str(out), "--grid", "3", "--radius",
            "5", "--batch-size", "3", "--shard-size", "4", "--num-workers", "0", "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    assert "12 images x 9 prompts x 32 dims (3 skipped)" in capsys.readouterr().out
    assert cache_bytes(out) == cache_bytes(reference)
    (tmp_path / "concepts.txt").write_text("red fur\n# comment\nwheel\n\nred fur\nsky\n")
    assert main(["similarities", "--cache", str(out), "--concepts", str(tmp_path / "concepts.txt"), "--model", "tiny",
                 "--out", str(tmp_path / "P"), "--chunk", "5", "--dtype", "float32"]) == 0
    index = json.loads((tmp_path / "P" / "index.json").read_text())
    assert index["concepts"] == ["red fur", "wheel", "sky"] and len(index["chunks"]) == 3
    with torch.no_grad():  # independent of fastcbm's text encoder: the definition, one unit embedding per concept
        t = torch.nn.functional.normalize(model.encode_text(tokenizer(index["concepts"])).float(), dim=-1)
    want = torch.einsum("ngd,md->ngm", CacheReader(out).prompt_embeddings(dtype=torch.float32), t)
    assert_close(torch.from_numpy(load_similarities(tmp_path / "P")), want, atol=1e-5, rtol=1e-5, what="P file")
    assert main(["similarities", "--cache", str(out), "--concepts", str(tmp_path / "concepts.txt"), "--model",
                 "other", "--out", str(tmp_path / "Q")]) == 2
    assert "the cache was made with model 'tiny'" in capsys.readouterr().err
    assert main([a if a != "3" else "2" for a in argv]) == 2  # --grid 2 (and --batch-size 2)
    assert "settings.prompts.grid" in capsys.readouterr().err


def test_cli_features_backbone(images, model, tmp_path, monkeypatch):
    from fastcbm.cli import main

    _fake_models(monkeypatch, model)
    assert main(["precompute", "--data", str(images), "--model", "tiny", "--out", str(tmp_path / "c"), "--grid", "3",
                 "--radius", "5", "--shard-size", "8", "--num-workers", "0", "--device", "cpu", "--no-progress",
                 "--features", "resnet18", "--features-random-init"]) == 0
    r = CacheReader(tmp_path / "c")
    assert r.features().shape == (12, 512, 3, 3) and r.features().dtype == torch.float16
    assert r.settings["features"] == "resnet18"
    assert r.settings["features_source"] == {"backbone": "resnet18", "pretrained": False, "layer": "layer4"}


def test_precompute_config_is_the_one_source_of_defaults():
    """`fastcbm precompute`'s options default to PrecomputeConfig's fields; an unknown setting is refused."""
    from fastcbm.cli import build_parser
    from fastcbm.errors import InvalidArgument
    from fastcbm.precompute import PrecomputeConfig

    d = PrecomputeConfig()
    args = build_parser().parse_args(["precompute", "--data", "x", "--model", "m", "--out", "o"])
    for name in ("grid", "radius", "width", "centers", "batch_size", "max_encode_batch", "shard_size", "device",
                 "dtype", "loader", "num_workers", "verify", "engine"):
        assert getattr(args, name) == getattr(d, name), name
    assert args.jpeg_draft == d.draft and args.features == d.features and args.cefam_classifier == d.cefam_classifier
    with pytest.raises(InvalidArgument, match=r"unknown setting\(s\) \['gird'\]"):
        PrecomputeConfig.from_settings(gird=3)
    with pytest.raises(InvalidArgument, match="--features needs --grid >= 1"):
        PrecomputeConfig.from_settings(grid=0, features="testbed").validate()
    assert PrecomputeConfig.from_settings(cefam_layers=["layer4"]).cefam_layers == ("layer4",)


@pytest.mark.parametrize("grid", [33, 100, (7, 40)])
def test_a_grid_too_large_is_refused_before_any_work(grid, tmp_path, capsys):
    """--grid 100 ran for over 10 minutes at 2.7 GB (10,000 tower passes per image) before being killed."""
    from fastcbm.errors import InvalidArgument
    from fastcbm.precompute import PrecomputeConfig, precompute

    with pytest.raises(InvalidArgument, match="--grid must be 0 .no prompts. or 1 to 32 rings per axis"):
        PrecomputeConfig.from_settings(grid=grid).validate()
    if isinstance(grid, int):
        from fastcbm.cli import main

        assert main(["precompute", "--data", str(tmp_path), "--model", "testbed", "--out", str(tmp_path / "c"),
                     "--grid", str(grid)]) == 2
        assert "1 to 32 rings per axis" in capsys.readouterr().err and not (tmp_path / "c").exists()
    with pytest.raises(InvalidArgument, match="rings per axis"):
        precompute(str(tmp_path), "testbed", tmp_path / "d", grid=grid)
