"""CE-FAM pipeline: z_cat in the precompute cache, the global-only mode, translator training from the cache (loss,
validation cosine, resume), model save/load and the ``fastcbm cefam train`` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")
N_SCENES = 80
FAST = {"batch_size": 16, "progress": False, "device": "cpu", "threads": 1}


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """80 exported testbed scenes: a global-only cache with the testbed CNN's z_cat, and a prompted (2×2 rings)
    cache of the first 8 without z_cat."""
    from fastcbm.data import synthetic
    from fastcbm.data.export import export_image_folder
    from fastcbm.precompute import precompute

    root = tmp_path_factory.mktemp("cefam_train")
    batch = synthetic.generate(N_SCENES, seed=synthetic.TRAINING_SEED_LIMIT + 5151)
    images = export_image_folder(batch, root / "data", masks=False)
    run = {"device": "cpu", "num_workers": 0, "progress": False, "batch_size": 16}
    cache = precompute(images, "testbed", root / "cache", grid=0, cefam_classifier="testbed", shard_size=32, **run)
    few = sorted(str(p) for p in images.rglob("*.png"))[:8]
    prompted = precompute(few, "testbed", root / "prompted", grid=2, shard_size=8, **run)
    return root, batch, cache, prompted


def _direct_z(backbone, images_uint8: torch.Tensor) -> torch.Tensor:
    from fastcbm.cefam import pool_stages, stage_activations
    from fastcbm.models.features import normalize_for_backbone

    with torch.no_grad():
        x = normalize_for_backbone(images_uint8, backbone, torch.device("cpu"))
        _, acts = stage_activations(backbone.model, x, backbone.feature_layers, backbone.kind)
        return pool_stages(acts, backbone.feature_layers)


def test_cached_z_cat_equals_pool_stages(caches):
    from fastcbm.data.export import scene_index
    from fastcbm.models import load_backbone

    _, batch, cache, _ = caches
    backbone = load_backbone("testbed")
    order = torch.tensor([scene_index(f) for f in cache.files])
    want = _direct_z(backbone, batch.images[order])
    got = cache.z_cat().float()
    assert got.shape == want.shape == (N_SCENES, 16 + 32 + 48 + 64)
    assert_close(got, want, atol=1e-3, rtol=1e-3, what="cached z_cat")  # fp16 storage
    src = cache.settings["cefam"]
    assert src == {"classifier": "testbed", "pretrained": True, "layers": ["layer1", "layer2", "layer3", "layer4"],
                   "widths": [16, 32, 48, 64], "kind": "cnn", "num_prefix_tokens": 1}


def test_global_only_cache(caches):
    """--grid 0: no prompt arrays, the same global embeddings as a prompted run; SALF-CBM refuses it."""
    from fastcbm.salf.train import train_salf_from_cache

    root, _, cache, prompted = caches
    assert set(cache.arrays) == {"global", "global_norm", "z_cat", "input_index"}
    assert cache.num_prompts == 0 and cache.dim == prompted.dim
    assert cache.settings["prompts"]["grid"] == [0, 0]
    rows = {f: i for i, f in enumerate(cache.files)}
    idx = [rows[f] for f in prompted.files]
    assert torch.equal(cache.global_embeddings(idx), prompted.global_embeddings())
    assert torch.equal(cache.global_norms(idx), prompted.global_norms())
    with pytest.raises(ValueError, match="global embeddings only"):
        cache.prompt_embeddings(slice(0, 2))
    with pytest.raises(ValueError, match="SALF-CBM needs ring prompts"):
        train_salf_from_cache(cache.root, ["red"], progress=False, device="cpu")
    from fastcbm.salf.data import CacheData

    with pytest.raises(ValueError, match="SALF-CBM needs ring prompts"):
        CacheData(cache, torch.zeros(len(cache), dtype=torch.long))
    from fastcbm.cache import write_similarities

    with pytest.raises(ValueError, match="global embeddings only"):
        write_similarities(cache, torch.randn(3, cache.dim), root / "P")
    assert not (root / "P").exists()
    with pytest.raises(ValueError, match="--grid >= 1"):
        from fastcbm.precompute import precompute

        precompute([], "testbed", root / "never", grid=0, features="testbed", progress=False, device="cpu")


def _trivial_cos(cache, train_rows, val_rows) -> float:
    """Validation cosine of the best constant guess (the mean training embedding)."""
    y = cache.global_embeddings(scaled=True)
    mean = y[train_rows].mean(0, keepdim=True)
    return float(torch.nn.functional.cosine_similarity(y[val_rows], mean, dim=-1).mean())


def test_training_learns_the_clip_embedding(caches, tmp_path):
    from fastcbm.data.split import split_rows

    _, _, cache, _ = caches
    model, rep = train_translator_run(cache, tmp_path / "m", max_epochs=25, concepts=["red", "circle", "striped"])
    hist = rep["epochs"]
    assert rep["images"] == {"train": 72, "val": 8} and rep["concepts"] == 3
    assert hist[-1]["train_mse"] < 0.6 * hist[0]["train_mse"]
    assert all(r["val_sim"] > 0 for r in hist)
    tr, va = split_rows(len(cache), 0.1, 0)
    assert rep["best"]["val_cos"] > max(0.7, _trivial_cos(cache, tr, va) + 0.05)
    # the returned model holds the best epoch's weights: its validation cosine is the reported one
    with torch.no_grad():
        h = model.translator(cache.z_cat(va).float())
    cos = torch.nn.functional.cosine_similarity(h, cache.global_embeddings(va, scaled=True), dim=-1).mean()
    assert abs(float(cos) - rep["best"]["val_cos"]) < 1e-5
    saved = json.loads((tmp_path / "m" / "train_report.json").read_text())
    assert len(saved["epochs"]) == rep["epochs_run"] == 25 and saved["best_epoch"] == rep["best_epoch"]
    assert not (tmp_path / "m" / "checkpoint.safetensors").exists()


def test_standardized_training_folds_into_a_raw_z_translator(caches, tmp_path):
    """standardize=True trains on (z − μ)/σ and folds μ, σ into the first layer: the saved model takes raw z_cat and
    reproduces the reported validation cosine; the folded layer equals the standardised one exactly."""
    from fastcbm.cefam.model import load_cefam
    from fastcbm.cefam.train import _column_stats, _fold_standardization, _Rows
    from fastcbm.cefam.translator import Translator
    from fastcbm.data.split import split_rows

    _, _, cache, _ = caches
    _, rep = train_translator_run(cache, tmp_path / "m", max_epochs=25, standardize=True)
    assert rep["standardize"] is True and rep["config"]["standardize"] is True
    tr, va = split_rows(len(cache), 0.1, 0)
    assert rep["best"]["val_cos"] > max(0.7, _trivial_cos(cache, tr, va) + 0.05)
    z = cache.z_cat(va).float()
    with torch.no_grad():
        h = load_cefam(tmp_path / "m").translator(z)
    cos = torch.nn.functional.cosine_similarity(h, cache.global_embeddings(va, scaled=True), dim=-1).mean()
    assert abs(float(cos) - rep["best"]["val_cos"]) < 1e-5
    mu, sigma = _column_stats(_Rows(cache, None, torch.device("cpu")), tr.numpy())
    assert_close(mu, cache.z_cat(tr).float().mean(0), atol=1e-5, rtol=1e-5, what="column means")
    torch.manual_seed(0)
    t = Translator(z.shape[1], cache.dim)
    with torch.no_grad():
        want = t((z - mu) / sigma)
        _fold_standardization(t, mu, sigma)
        assert_close(t(z), want, atol=1e-4, rtol=1e-4, what="folded translator")

    def stop(epoch, _row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # a default run's checkpoint is not resumed by a standardised one
        train_translator_run(cache, tmp_path / "c", max_epochs=2, on_epoch=stop)
    with pytest.raises(ValueError, match="other training settings"):
        train_translator_run(cache, tmp_path / "c", max_epochs=2, standardize=True)


def train_translator_run(cache, out, **kw):
    from fastcbm.cefam import train_translator

    return train_translator(cache.root, out, **{**FAST, **kw})


def test_resume_after_interruption_equals_an_uninterrupted_run(caches, tmp_path):
    _, _, cache, _ = caches
    kw = {"max_epochs": 5, "plateau_patience": 0, "early_stop": 3}  # the schedule's state crosses the interruption
    ref, ref_rep = train_translator_run(cache, tmp_path / "ref", **kw)

    def stop(epoch, _row):
        if epoch == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_translator_run(cache, tmp_path / "cut", on_epoch=stop, **kw)
    assert (tmp_path / "cut" / "checkpoint.safetensors").exists() and not (tmp_path / "cut" / "config.json").exists()
    got, rep = train_translator_run(cache, tmp_path / "cut", **kw)
    assert rep["resumed_from"] == [3]
    for k, v in ref.translator.state_dict().items():
        assert torch.equal(got.translator.state_dict()[k], v), k
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in ref_rep["epochs"]]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in rep["epochs"]] == strip
    assert rep["stopped"] == ref_rep["stopped"]


def test_save_load_round_trip_and_layer_subset(caches, tmp_path):
    from fastcbm.cefam import CEFAM, load_cefam
    from fastcbm.data.export import scene_index

    _, batch, cache, _ = caches
    model, _ = train_translator_run(cache, tmp_path / "m", max_epochs=1, layers="layer4,layer2")
    assert model.config.layers == ["layer4", "layer2"] and model.config.widths == [64, 32]
    assert model.config.in_features == 96 and model.config.embed_dim == cache.dim
    loaded = load_cefam(tmp_path / "m")
    assert isinstance(loaded, CEFAM) and loaded.config == model.config
    x = (batch.images[:3].float() / 255 - 0.5) / 0.25  # the testbed CNN's normalisation
    with torch.no_grad():
        assert torch.equal(loaded.embed(x), model.embed(x))
        # the model's z_cat is the cached columns of layer4 then layer2
        order = [scene_index(f) for f in cache.files]
        x0 = (batch.images[order[:3]].float() / 255 - 0.5) / 0.25
        cached = cache.z_cat(slice(0, 3)).float()
        assert_close(loaded.z_cat(x0), torch.cat([cached[:, 96:160], cached[:, 16:48]], 1), atol=1e-3, rtol=1e-3,
                     what="z_cat of a layer subset")
        t = torch.randn(4, cache.dim)
        s = loaded.concept_scores(x, t)
        h = torch.nn.functional.normalize(loaded.embed(x), dim=-1)
        assert_close(s, loaded.config.logit_scale * h @ torch.nn.functional.normalize(t, dim=-1).T,
                     atol=1e-4, rtol=1e-5, what="s·cos")
    with pytest.raises(FileNotFoundError, match="not a saved CE-FAM model"):
        load_cefam(tmp_path)
    # with the classifier's own weights stored (e.g. a fine-tuned or randomly initialised classifier)
    with torch.no_grad():
        model.classifier.layer4.conv1.weight.mul_(1.5)
    model.save(tmp_path / "with_classifier", include_backbone=True)
    again = load_cefam(tmp_path / "with_classifier")
    with torch.no_grad():
        assert torch.equal(again.embed(x), model.embed(x)) and not torch.equal(again.embed(x), loaded.embed(x))


def test_cli_train_and_errors(caches, tmp_path, capsys):
    from fastcbm.cli import main

    _, _, cache, prompted = caches
    out = tmp_path / "m"
    base = ["cefam", "train", "--cache", str(cache.root), "--out", str(out), "--max-epochs", "1", "--batch-size",
            "32", "--no-progress", "--device", "cpu"]

    def err(argv) -> str:
        assert main(argv) == 2
        return capsys.readouterr().err

    assert "--cache" in err(base[:3] + [str(tmp_path / "nope")] + base[4:])
    assert "no CE-FAM stage activations" in err(base[:3] + [str(prompted.root)] + base[4:])
    assert "classifier" in err(base + ["--classifier", "testbed-vit"])
    assert "layers" in err(base + ["--layers", "layer1,layer9"])
    assert "--concepts" in err(base + ["--concepts", str(tmp_path / "none.txt")])
    assert not out.exists()  # nothing half-written
    assert main(base) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["epochs"] == 1 and printed["layers"] == ["layer1", "layer2", "layer3", "layer4"]
    assert "--overwrite" in err(base)
    assert main(base + ["--overwrite"]) == 0
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("not ours")
    assert "not empty" in err(base[:5] + [str(tmp_path / "other")] + base[6:])
    with pytest.raises(SystemExit):
        main(["cefam", "train", "-h"])
    help_text = capsys.readouterr().out
    for opt in ("--plateau-patience", "--lam-sim", "--concepts", "--warmup", "--overwrite"):
        assert opt in help_text


def test_checkpoint_from_other_settings_is_refused(caches, tmp_path):
    _, _, cache, _ = caches

    def stop(epoch, _row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_translator_run(cache, tmp_path / "m", max_epochs=2, on_epoch=stop)
    with pytest.raises(ValueError, match="other training settings"):
        train_translator_run(cache, tmp_path / "m", max_epochs=2, lr=0.05)
    with pytest.raises(FileExistsError, match="unfinished"):
        train_translator_run(cache, tmp_path / "m", max_epochs=2, resume=False)
    _, rep = train_translator_run(cache, tmp_path / "m", max_epochs=2)
    assert rep["resumed_from"] == [1] and rep["epochs_run"] == 2


def test_warmup_raises_the_rate_to_its_peak(caches):
    _, _, cache, _ = caches
    _, rep = train_translator_run(cache, None, max_epochs=3, warmup=True, warmup_epochs=2)
    lrs = [r["lr"] for r in rep["epochs"]]  # the rate of each epoch's last step
    assert lrs[0] == pytest.approx(0.15) and lrs[1] == pytest.approx(0.2) and lrs[2] == pytest.approx(0.2)


def test_training_decodes_no_image(caches, monkeypatch):
    """The translator trains from the cached arrays alone: decoding or loading an image would fail here."""
    import PIL.Image

    import fastcbm.data.folder as folder

    def boom(*_a, **_k):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(folder, "decode_image", boom)
    monkeypatch.setattr(PIL.Image, "open", boom)
    _, _, cache, _ = caches
    _, rep = train_translator_run(cache, None, max_epochs=1)
    assert rep["epochs_run"] == 1


def test_bad_arguments(caches):
    _, _, cache, _ = caches
    with pytest.raises(ValueError, match="lr"):
        train_translator_run(cache, None, lr=0)
    with pytest.raises(ValueError, match="val_fraction"):
        train_translator_run(cache, None, val_fraction=1.5)
    with pytest.raises(ValueError, match="empty"):
        train_translator_run(cache, None, concepts=[])
    assert np.isfinite(cache.z_cat().float().numpy()).all()


def test_cli_precompute_global_only_with_a_vit_classifier(caches, tmp_path, capsys):
    """fastcbm precompute --no-prompts --cefam-classifier testbed-vit: z_cat = the last block's pooled patch tokens."""
    from fastcbm.cache import CacheReader
    from fastcbm.cli import main
    from fastcbm.data.export import scene_index
    from fastcbm.models import load_backbone

    root, batch, _, prompted = caches
    listing = tmp_path / "few.txt"
    listing.write_text("\n".join(prompted.files[:4]) + "\n")
    base = ["precompute", "--data", str(listing), "--model", "testbed", "--out", str(tmp_path / "c"), "--device",
            "cpu", "--num-workers", "0", "--no-progress"]
    assert main(base + ["--cefam-layers", "blocks.3"]) == 2
    assert "--cefam-layers needs --cefam-classifier" in capsys.readouterr().err
    assert main(base + ["--grid", "0", "--features", "testbed"]) == 2
    assert "--grid >= 1" in capsys.readouterr().err
    assert main(base + ["--no-prompts", "--cefam-classifier", "testbed-vit"]) == 0
    reader = CacheReader(tmp_path / "c")
    assert reader.settings["cefam"]["layers"] == ["blocks.3"] and reader.settings["cefam"]["kind"] == "vit"
    vit = load_backbone("testbed-vit")
    order = torch.tensor([scene_index(f) for f in reader.files])
    from fastcbm.cefam import pool_stages, stage_activations
    from fastcbm.models.features import normalize_for_backbone

    with torch.no_grad():
        x = normalize_for_backbone(batch.images[order], vit, torch.device("cpu"))
        want = pool_stages(stage_activations(vit.model, x, ["blocks.3"], "vit")[1], ["blocks.3"])
    assert_close(reader.z_cat().float(), want, atol=2e-3, rtol=2e-3, what="ViT z_cat")
