"""SALF-CBM as a user meets it (issue 13): defaults, API fixes, evaluate / bulk explain, gtsegs_ijcv.mat, label-free
CBM filter fidelity, messages."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastcbm.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
GRID = 3


# ------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A SALF-CBM with random bottleneck/head weights on the testbed CNN (plumbing tests need no training), 36
    exported testbed scenes and their precompute cache (features included)."""
    from fastcbm.data import synthetic
    from fastcbm.data.export import export_image_folder
    from fastcbm.heads import LinearHead, Standardizer
    from fastcbm.models import load_backbone
    from fastcbm.precompute import precompute
    from fastcbm.salf.model import SALFCBM, SALFConfig

    root = tmp_path_factory.mktemp("salf_user")
    batch = synthetic.generate(36, seed=synthetic.TRAINING_SEED_LIMIT + 777)
    images = export_image_folder(batch, root / "data", masks=False)
    cache = precompute(images, "testbed", root / "cache", grid=GRID, device="cpu", num_workers=0, features="testbed",
                       progress=False)
    backbone = load_backbone("testbed")
    g = torch.Generator().manual_seed(0)
    m = 5
    channels = cache.settings.get("features_shape", None)
    channels = int(cache.features(torch.arange(1)).shape[1]) if channels is None else channels[0]
    head = LinearHead(m, 12, Standardizer(m))
    with torch.no_grad():
        head.weight.copy_(torch.randn(12, m, generator=g) * (torch.rand(12, m, generator=g) < 0.6))
        head.bias.copy_(torch.randn(12, generator=g))
    config = SALFConfig(backbone="testbed", feature_layer="layer4", grid=(GRID, GRID), concepts=[f"c{i}" for i in
                        range(m)], class_names=synthetic.class_names())
    model = SALFCBM(backbone.model, backbone.kind, config, torch.randn(m, channels, generator=g) * 0.1, head)
    model.save(root / "model")
    return root, images, cache, model, backbone


# ------------------------------------------------------------------------------------------------------- defaults
def test_humanized_class_names():
    from fastcbm.salf.train import humanize_class_name, humanize_class_names

    assert humanize_class_name("blue_circle") == "blue circle"
    assert humanize_class_name("golden-retriever__dog") == "golden retriever dog"
    assert humanize_class_names(["a_b", "a b", "c_d"]) == ["a_b", "a b", "c d"]  # collisions keep folder names


def test_cli_defaults_come_from_train_config():
    from fastcbm.cli import build_parser
    from fastcbm.salf.train import TrainConfig

    d = TrainConfig()
    args = build_parser().parse_args(["salf", "train", "--cache", "c", "--concepts", "x", "--out", "o"])
    assert args.class_sim_cutoff == d.filter.class_sim_cutoff and args.concept_sim_cutoff == d.filter.concept_sim_cutoff
    assert args.steps == d.fit.bottleneck.max_steps and args.lr == d.fit.bottleneck.lr
    assert args.interpretability_cutoff == d.fit.bottleneck.interpretability_cutoff
    assert args.target_nnz_per_class == d.fit.stop_nnz_per_class and args.alpha == d.fit.head_alpha


def test_fista_path_converges_and_matches_saga():
    from fastcbm.heads import (
        Standardizer,
        elastic_net_objective,
        fit_elastic_net_path,
        lambda_max,
    )

    g = torch.Generator().manual_seed(3)
    X = torch.randn(240, 10, generator=g)
    y = (X @ torch.randn(5, 10, generator=g).T + torch.randn(240, 5, generator=g)).argmax(1)
    X = Standardizer.fit(X).transform(X)
    lam = lambda_max(X, y, 5, 0.99) * 0.05
    lams = np.geomspace(lambda_max(X, y, 5, 0.99), lam, 6).tolist()
    fista = fit_elastic_net_path(X, y, 5, lambdas=lams, solver="fista", progress=False)
    saga = fit_elastic_net_path(X.double(), y, 5, lambdas=lams, solver="saga", max_epochs=3000, tol=1e-7,
                                batch_size=32, progress=False)
    assert fista.info["solver"] == "fista" and fista.info["unconverged"] == 0
    a = elastic_net_objective(X, y, fista[-1].weight, fista[-1].bias, lam, 0.99)
    b = elastic_net_objective(X, y, saga[-1].weight, saga[-1].bias, lam, 0.99)
    assert a <= b * (1 + 1e-3), (a, b)
    # the nnz target stops the path early
    short = fit_elastic_net_path(X, y, 5, n_lambdas=30, stop_nnz_per_class=2, progress=False)
    assert len(short) < 30 and short[-1].mean_nnz_per_class > 2 >= short[-2].mean_nnz_per_class
    with pytest.raises(ValueError, match="solver"):
        fit_elastic_net_path(X, y, 5, solver="newton")


# --------------------------------------------------------------------------------------------------- Python API
def test_import_fastcbm_makes_torchvision_importable():
    code = "import fastcbm, torchvision, torchvision.transforms; print(torchvision.__spec__.name)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0 and r.stdout.strip() == "torchvision", r.stderr[-2000:]


def test_render_rings_default_radius_scales_with_the_image():
    from fastcbm.prompts import default_ring_geometry, render_rings, ring_masks

    imgs = torch.zeros(1, 3, 64, 64, dtype=torch.uint8)
    assert torch.equal(render_rings(imgs, grid=3, backend="reference"),
                       render_rings(imgs, grid=3, radius=default_ring_geometry(64)[0], backend="reference"))
    assert torch.equal(ring_masks(64, 3), ring_masks(64, 3, radius=32 * 64 / 224))


def test_precompute_records_the_load_clip_name_of_a_model_object(tmp_path, tiny):
    from fastcbm.models import load_clip
    from fastcbm.precompute import precompute

    _, images, _, _, _ = tiny
    clip, preprocess, _ = load_clip("testbed")
    files = sorted(map(str, images.rglob("*.png")))[:4]
    r = precompute(files, clip, tmp_path / "c", preprocess=preprocess, grid=2, device="cpu", num_workers=0,
                   progress=False)
    assert r.settings["model"]["name"] == "testbed"


def test_load_images_and_intervene_errors(tiny):
    from fastcbm.salf import explain as ex
    from fastcbm.salf.evaluate import load_images
    from fastcbm.salf.model import SALFCBM

    root, images, _, _, _ = tiny
    model = SALFCBM.load(root / "model")
    files = sorted(images.rglob("*.png"))[:2]
    x = load_images(files, model)
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32
    assert load_images(files[0], model).shape[0] == 1
    with pytest.raises(ValueError, match="'striped' is not in the model's 5 concepts"):
        ex.intervene(model, x, "striped", beta=2.0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_images(root / "nope.png", model)


# ----------------------------------------------------------------------------------------- evaluate and explain
def test_evaluate_cache_and_data_agree_with_the_model(tiny, capsys):
    from fastcbm.salf.evaluate import load_images

    root, images, cache, model, _ = tiny
    assert main(["salf", "evaluate", "--model", str(root / "model"), "--cache", str(cache.root), "--no-progress"]) == 0
    by_cache = json.loads(capsys.readouterr().out)
    assert main(["salf", "evaluate", "--model", str(root / "model"), "--data", str(images), "--no-progress"]) == 0
    by_data = json.loads(capsys.readouterr().out)
    files = sorted(images.rglob("*.png"))
    from fastcbm.data import synthetic

    names = synthetic.class_names()
    y = torch.tensor([names.index(p.parent.name.replace("_", " ")) for p in files])
    with torch.no_grad():
        pred = model(load_images(files, model)).argmax(1)
    assert by_data["accuracy"] == pytest.approx(float((pred == y).float().mean()), abs=1e-4)
    assert by_data["images"] == by_cache["images"] == 36
    assert abs(by_cache["accuracy"] - by_data["accuracy"]) <= 0.06  # fp16 cached features vs fresh ones
    conf = np.array(by_data["confusion"])
    assert conf.shape == (12, 12) and conf.sum() == 36 and np.trace(conf) == round(by_data["accuracy"] * 36)
    assert by_data["sparsity"]["nonzero_weights"] == int((model.head.weight != 0).sum())


def test_evaluate_with_masks_and_gtsegs(tiny, tmp_path, capsys):
    from fastcbm.data.imagenet_seg import ImageNetSegmentation, write_gtsegs

    root, images, _, _, _ = tiny
    files = sorted(images.rglob("*.png"))
    masks = tmp_path / "masks"
    for p in files[:5]:
        (masks / p.parent.name).mkdir(parents=True, exist_ok=True)
        np.save(masks / p.parent.name / f"{p.stem}.npy", np.arange(64 * 64).reshape(64, 64) % 3 == 0)
    assert main(["salf", "evaluate", "--model", str(root / "model"), "--data", str(images), "--masks", str(masks),
                 "--no-progress"]) == 0
    seg = json.loads(capsys.readouterr().out)["segmentation"]
    assert seg["images"] == 5 and seg["images_without_mask"] == 31
    assert set(seg["salf"]) == set(seg["gradcam"]) == {"pixel_accuracy", "miou", "map"}

    # gtsegs_ijcv.mat layout: /value/img and /value/gt object references (gt through a 1x1 cell)
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (40, 50, 3), dtype=np.uint8), rng.integers(0, 255, (30, 20, 3), dtype=np.uint8)]
    gts = [(rng.random((40, 50)) > 0.5).astype(np.uint8), (rng.random((30, 20)) > 0.5).astype(np.uint8)]
    mat = write_gtsegs(tmp_path / "gtsegs_ijcv.mat", imgs, gts)
    import h5py

    with h5py.File(mat, "r") as f:
        assert f["value/img"].shape == (2, 1) and f[f["value/img"][1, 0]].shape == (3, 20, 30)
        cell = f[f["value/gt"][0, 0]]
        assert cell.shape == (1, 1) and f[cell[0, 0]].shape == (50, 40)
    with ImageNetSegmentation(mat) as ds:
        img, gt = ds[1]
        assert torch.equal(img.permute(1, 2, 0), torch.from_numpy(imgs[1])) and torch.equal(gt, torch.from_numpy(gts[1] > 0))
    assert main(["salf", "evaluate", "--model", str(root / "model"), "--segmentation", str(mat), "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["images"] == 2 and 0 <= res["salf"]["miou"] <= 1 and 0 <= res["gradcam"]["pixel_accuracy"] <= 1
    assert main(["salf", "evaluate", "--model", str(root / "model"), "--segmentation", str(tmp_path / "no.mat")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bulk_explain_writes_arrays_and_one_page(tiny, tmp_path, capsys):
    root, images, _, _, _ = tiny
    out = tmp_path / "expl"
    assert main(["salf", "explain", str(images), "--model", str(root / "model"), "--out", str(out), "--top-k", "2"]) == 0
    capsys.readouterr()
    maps = np.load(out / "maps.npy")
    contrib = np.load(out / "contributions.npy")
    assert maps.shape == (36, 64, 64) and contrib.shape == (36, 5)
    assert (out / "explanations.html").stat().st_size > 1000 and (out / "explanations.safetensors").is_file()
    page = (out / "explanations.html").read_text()  # the folders (blue_circle, ...) are the model's classes: ✓ / ✗
    assert page.count("true: ") == 24 and "the folders are the model's classes" in page
    files = (out / "files.txt").read_text().splitlines()
    assert len(files) == 36
    # the format `fastcbm metrics` reads
    np.save(tmp_path / "masks.npy", np.ones((36, 64, 64), bool))
    assert main(["metrics", "--maps", str(out / "maps.npy"), "--masks", str(tmp_path / "masks.npy"), "--json"]) == 0


# ------------------------------------------------------------------------------------ label-free CBM filtering
def _toy_encoder(vectors: dict[str, list[float]]):
    def enc(texts):
        return torch.tensor([vectors[t] for t in texts], dtype=torch.float32)

    return enc


def test_filter_text_matches_total_similarity_rule_and_presets():
    from fastcbm.concepts import PRESENCE_CUTOFFS, filter_concepts, presence_preset

    vec = {"tiger": [1, 0, 0, 0], "A tiger": [0, 0, 1, 0], "TIGER": [0, 0, 0, 1], "stripes": [0, 1, 0, 0],
           "stripe": [0, 0.99, 0.141, 0], "orange": [0.1, 0.3, 0.3, 0.9]}
    kept, rep = filter_concepts(["A tiger", "TIGER", "stripe", "stripes", "orange"], ["tiger"], _toy_encoder(vec))
    assert rep.dropped["A tiger"][1].endswith("(text match)") and rep.dropped["TIGER"][0] == "class_similarity"
    # "stripe" is more similar to everything else than "stripes": "stripes" (the later one here) goes...
    assert kept == ["stripe", "orange"] and "'stripe'" in rep.dropped["stripes"][1]
    # ...and with the old greedy rule the later of the pair goes
    kept, _ = filter_concepts(["stripes", "stripe", "orange"], [], _toy_encoder(vec), duplicate_rule="later")
    assert kept == ["stripes", "orange"]
    # (mpnet + 3·CLIP)/4 with a sentence encoder that disagrees: the pair is no longer a duplicate
    sent = _toy_encoder({"stripes": [1, 0], "stripe": [0, 1], "orange": [1, 1]})
    kept, _ = filter_concepts(["stripes", "stripe", "orange"], [], _toy_encoder(vec), sentence_encoder=sent)
    assert kept == ["stripes", "stripe", "orange"]
    from fastcbm.concepts import resolve_cutoff

    assert resolve_cutoff("auto", "class_sim_cutoff", "ViT-B-16") == 0.85
    assert resolve_cutoff("auto", "concept_sim_cutoff", "ViT-B-16") == 0.9
    assert resolve_cutoff("auto", "class_sim_cutoff", "testbed") is None  # the testbed CLIP's own calibration
    assert resolve_cutoff(0.7, "class_sim_cutoff", "testbed") == 0.7 and resolve_cutoff(None, "x", None) is None
    assert PRESENCE_CUTOFFS["cub"] == 0.26 and presence_preset("ImageNet") == 0.28 and presence_preset("default") == 0.25
    with pytest.raises(ValueError, match="presets"):
        presence_preset("coco")


def test_bottleneck_first_stop_option():
    from fastcbm.cli import build_parser

    args = build_parser().parse_args(["salf", "train", "--cache", "c", "--concepts", "x", "--out", "o", "--bottleneck-stop",
                                      "first", "-vv"])
    assert args.bottleneck_stop == "first" and args.sub_verbose == 2
    from fastcbm.salf.bottleneck import BottleneckConfig

    lf = BottleneckConfig.label_free_stop(lr=0.01)
    assert (lf.eval_every, lf.patience, lf.lr) == (50, 1, 0.01)


# ------------------------------------------------------------------------------------------------------ messages
def test_offline_weights_fail_in_one_line(monkeypatch, capsys, tmp_path):
    import open_clip

    def offline(*a, **k):
        raise RuntimeError("Cannot reach https://huggingface.co: network unreachable\nretry 1\nretry 2")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", offline)
    (tmp_path / "img").mkdir()
    assert main(["precompute", "--data", str(tmp_path / "img"), "--model", "ViT-B-16", "--pretrained", "openai",
                 "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--model testbed" in err and "Traceback" not in err


def test_demo_grid_is_checked_before_any_work(tmp_path, capsys):
    for grid in ("0", "33"):
        assert main(["demo", "--out", str(tmp_path / "d"), "--grid", grid]) == 2
        assert "--grid must be an integer from 1 to 32" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_every_option_has_help():
    from fastcbm.cli import build_parser

    from fastcbm.commands import walk

    missing = []
    for path, parser, children in walk(build_parser()):
        if children is None and path[0] in ("salf", "cefam", "deal", "demo"):
            for action in parser._actions:
                if action.help is None and action.dest != "help":
                    missing.append(f"{' '.join(path)} {action.option_strings or action.dest}")
    assert not missing, missing


def test_vit_patch_plus_cls_layer_end_to_end():
    """'blocks.N+cls': the ViT appendix variant, patch tokens with the CLS token concatenated on channels."""
    from fastcbm.models.features import (
        FeatureHooks,
        concat_cls,
        extract_feature_maps,
        tokens_to_map,
    )
    from fastcbm.models import load_backbone
    from fastcbm.precompute import backbone_feature_fn

    vit = load_backbone("testbed-vit")
    layer = vit.feature_layers[-1]
    x = torch.randn(2, 3, vit.input_size, vit.input_size)
    plain = extract_feature_maps(vit.model, x, layer, kind="vit", num_prefix_tokens=vit.num_prefix_tokens)
    both = extract_feature_maps(vit.model, x, layer + "+cls", kind="vit", num_prefix_tokens=vit.num_prefix_tokens)
    c = plain.shape[1]
    assert both.shape == (2, 2 * c, *plain.shape[-2:])
    assert torch.equal(both[:, :c], plain)
    with FeatureHooks(vit.model, [layer]) as hooks:
        vit.model(x)
    cls = hooks.outputs[layer][:, 0]  # [2, C]
    assert torch.allclose(both[:, c:], cls[:, :, None, None].expand_as(plain))
    assert torch.equal(tokens_to_map(concat_cls(hooks.outputs[layer]), vit.num_prefix_tokens), both)
    fn = backbone_feature_fn("testbed-vit", pretrained=None, layer=layer + "+cls")
    assert fn(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape[1] == 2 * c and fn.source["layer"].endswith("+cls")


def test_report_separates_absent_evidence_and_flattens_the_summary(tmp_path):
    from fastcbm.salf.report import write_salf_report
    from fastcbm.salf.explain import Explanation

    e = Explanation(predicted=0, class_name="cat", probabilities=torch.tensor([0.7, 0.3]),
                    contributions=torch.tensor([0.5, 0.4, -0.2]),
                    top_concepts=[("whiskers", 0.5, 1.2), ("stripes", 0.4, -0.9), ("engine", -0.2, 0.3)],
                    top_indices=torch.tensor([0, 1, 2]), heatmaps=torch.rand(3, 16, 16))
    path = write_salf_report(tmp_path / "r.html", images=torch.zeros(1, 3, 16, 16, dtype=torch.uint8),
                             explanations=[e], rules={"cat": [("whiskers", 1.0)], "dog": []},
                             summary={"salf_accuracy": 0.91234, "segmentation": {"miou": 0.374, "map": 0.9}},
                             class_names=["cat", "dog"])
    html = path.read_text()
    assert "evidence from absent concepts" in html and "no stripes" in html and "evidence against" in html
    assert html.index("evidence from present concepts") < html.index("whiskers</td>")
    assert "segmentation · miou" in html and "{&#x27;miou" not in html and "{'miou" not in html


def test_failed_demo_leaves_no_half_folder(tmp_path, monkeypatch):
    import fastcbm.precompute as pc
    from fastcbm.salf.demo import DemoConfig, run_demo

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(pc, "precompute", boom)
    cfg = {"n_train": 10, "n_val": 10, "n_test": 10, "progress": False}
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_demo(DemoConfig(out=tmp_path / "d", **cfg))
    assert not (tmp_path / "d").exists()
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "keep.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_demo(DemoConfig(out=tmp_path / "e", **cfg))
    assert [p.name for p in (tmp_path / "e").iterdir()] == ["keep.txt"]


def test_train_verify_option_reaches_the_cache_readers(monkeypatch, tmp_path):
    """`fastcbm train --verify size` opens the caches without the once-per-file sha256 / NaN read."""
    import fastcbm.cache as cache_mod
    from fastcbm.cli import build_parser

    args = build_parser().parse_args(["salf", "train", "--cache", "c", "--concepts", "k.txt", "--out", str(tmp_path / "m"),
                                      "--verify", "size"])
    assert args.verify == "size"
    seen = []

    class Spy:
        def __init__(self, root, *, verify="checksum"):
            seen.append(verify)
            raise RuntimeError("stop here")

    monkeypatch.setattr(cache_mod, "CacheReader", Spy)
    from fastcbm.salf.train import train_salf_from_cache

    with pytest.raises(RuntimeError, match="stop here"):
        train_salf_from_cache(tmp_path / "cache", ["red"], None, verify="size")
    assert seen == ["size"]
