"""Training SALF-CBM from a precompute cache: streamed data sources, `fastcbm train`, labels, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastcbm.data.labels import csv_labels, folder_labels
from fastcbm.data.split import split_rows, subset_rows
from fastcbm.salf.data import CacheData, TensorData, batches
from tests.conftest import assert_close

GRID = 7


@pytest.fixture(scope="module")
def testbed_cache(tmp_path_factory):
    """240 exported testbed scenes, precomputed with the bundled CLIP and the testbed CNN's features."""
    from fastcbm.data import synthetic
    from fastcbm.data.export import export_image_folder
    from fastcbm.precompute import precompute

    root = tmp_path_factory.mktemp("salf_train")
    batch = synthetic.generate(240, seed=synthetic.TRAINING_SEED_LIMIT + 4242)
    images = export_image_folder(batch, root / "data", masks=False)
    cache = precompute(images, "testbed", root / "cache", grid=GRID, device="cpu", num_workers=0,
                       features="testbed", progress=False, shard_size=64)
    return root, batch, images, cache


def test_cached_features_equal_the_in_memory_path(testbed_cache):
    """precompute --features stores what fit_salf computes from the images (up to fp16 storage)."""
    from fastcbm.data.export import scene_index
    from fastcbm.models import load_backbone
    from fastcbm.salf.pipeline import backbone_grid_features

    _, batch, _, cache = testbed_cache
    order = torch.tensor([scene_index(f) for f in cache.files[:40]])
    want = backbone_grid_features(load_backbone("testbed"), batch.images[order], (GRID, GRID), progress=False)
    data = CacheData(cache, torch.zeros(len(cache), dtype=torch.long))
    got = data.features(torch.arange(40)).float()
    assert got.shape == want.shape == (40, 64, GRID * GRID)
    assert_close(got, want, atol=2e-2, rtol=2e-3, what="cached features")
    assert cache.settings["features_source"] == {"backbone": "testbed", "pretrained": True, "layer": "layer4"}


@pytest.mark.parametrize("rows", [[5, 0, 3, 3], [100], list(range(63, 70))])  # unsorted, repeats, across shards
def test_cache_data_rows_match_the_reader(testbed_cache, rows):
    _, _, _, cache = testbed_cache
    split = torch.arange(10, 200)
    data = CacheData(cache, torch.arange(len(cache)), split)
    r = torch.tensor(rows)
    cache_rows = split[r]
    assert torch.equal(data.features(r), cache.features(cache_rows).flatten(2))
    assert torch.equal(data.prompt_emb(r), cache.prompt_embeddings(cache_rows))
    assert torch.equal(data.labels[r], cache_rows)


def test_streamed_bottleneck_equals_in_memory(testbed_cache):
    from fastcbm.salf.bottleneck import BottleneckConfig, train_bottleneck, train_bottleneck_on

    _, _, _, cache = testbed_cache
    tr, va = split_rows(len(cache), 0.25, seed=1)
    labels = torch.zeros(len(cache), dtype=torch.long)
    f_all, e_all = cache.features().flatten(2), cache.prompt_embeddings()
    text = torch.nn.functional.normalize(torch.randn(9, cache.dim, generator=torch.Generator().manual_seed(0)), dim=1)
    cfg = BottleneckConfig(batch_size=64, max_steps=12, eval_every=4, patience=10, interpretability_cutoff=-1.0)
    streamed = train_bottleneck_on(CacheData(cache, labels, tr), CacheData(cache, labels, va), text, cfg,
                                   progress=False)
    memory = train_bottleneck(f_all[tr], e_all[tr], text, f_all[va], e_all[va], cfg, progress=False)
    assert [h["step"] for h in streamed.history] == [0, 4, 8, 12]
    assert_close(streamed.weight, memory.weight, atol=1e-6, rtol=1e-5, what="bottleneck weight")
    assert_close(streamed.val_similarity, memory.val_similarity, atol=1e-6, rtol=1e-5, what="val similarity")


def test_batches_prefetch_keeps_order():
    f = torch.randn(20, 3, 4)
    e = torch.randn(20, 4, 5)
    data = TensorData(f, e)
    steps = [torch.tensor([3, 1]), torch.tensor([0]), torch.arange(20)]
    for prefetch in (True, False):
        got = list(batches(data, iter(steps), torch.device("cpu"), prefetch=prefetch))
        assert len(got) == 3
        for (fb, eb), r in zip(got, steps):
            assert torch.equal(fb, f[r]) and torch.equal(eb, e[r])


def test_split_and_subset_rows():
    tr, va = split_rows(100, 0.2, seed=3)
    assert len(va) == 20 and len(tr) == 80 and set(tr.tolist()) | set(va.tolist()) == set(range(100))
    assert torch.equal(split_rows(100, 0.2, seed=3)[1], va)
    assert torch.equal(subset_rows(5, 10, 0), torch.arange(5))
    s = subset_rows(1000, 10, 0)
    assert len(s) == 10 and bool((s[1:] > s[:-1]).all())
    with pytest.raises(ValueError, match="val_fraction"):
        split_rows(100, 1.5)
    with pytest.raises(ValueError, match="fewer than 2"):
        split_rows(3, 0.1)


def test_folder_and_csv_labels(tmp_path):
    files = [str(tmp_path / c / f"{i}.png") for i, c in enumerate(["cat", "dog", "cat", "ant"])]
    y, names = folder_labels(files)
    assert names == ["ant", "cat", "dog"] and y.tolist() == [1, 2, 1, 0]
    with pytest.raises(ValueError, match="not classes"):
        folder_labels(files, ["cat", "dog"])
    (tmp_path / "labels.csv").write_text("file,label,class\ncat/0.png,7,feline\ndog/1.png,8,canine\n"
                                         "cat/2.png,7,feline\n3.png,9,insect\n")
    y, names = csv_labels(tmp_path / "labels.csv", files)
    assert names == ["feline", "canine", "insect"] and y.tolist() == [0, 1, 0, 2]
    y, names = csv_labels(tmp_path / "labels.csv", files, ["insect", "feline", "canine", "bird"])
    assert names == ["insect", "feline", "canine", "bird"] and y.tolist() == [1, 2, 1, 0]
    with pytest.raises(ValueError, match="'insect', which is not among the classes"):
        csv_labels(tmp_path / "labels.csv", files, ["feline", "canine"])
    (tmp_path / "plain.tsv").write_text("cat/0.png\ta\ndog/1.png\tb\n")
    with pytest.raises(ValueError, match="no label for .*2.png"):
        csv_labels(tmp_path / "plain.tsv", files)
    with pytest.raises(FileNotFoundError):
        csv_labels(tmp_path / "missing.csv", files)


def test_cache_data_rejects_bad_input(testbed_cache, tmp_path):
    from fastcbm.precompute import precompute

    root, _, images, cache = testbed_cache
    with pytest.raises(ValueError, match="one per cache row"):
        CacheData(cache, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="rows must be"):
        CacheData(cache, torch.zeros(len(cache), dtype=torch.long), [0, len(cache)])
    files = sorted(str(p) for p in images.rglob("*.png"))[:4]
    plain = precompute(files, "testbed", tmp_path / "plain", grid=GRID, device="cpu", num_workers=0, progress=False)
    with pytest.raises(ValueError, match="no backbone features"):
        CacheData(plain, torch.zeros(4, dtype=torch.long))


def test_cli_train_then_explain(testbed_cache, tmp_path, capsys):
    from fastcbm.cli import main

    root, _, images, cache = testbed_cache
    out = tmp_path / "model"
    argv = ["salf", "train", "--cache", str(cache.root), "--concepts", str(root / "data" / "concepts.txt"),
            "--val-fraction", "0.25", "--class-sim-cutoff", "-1", "--concept-sim-cutoff", "0.98", "--out", str(out),
            "--lambdas", "20", "--head-epochs", "40",
            "--interpretability-cutoff", "0.1", "--steps", "150", "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["images"] == {"train": 180, "val": 60} and summary["classes"] == 12
    assert summary["val_accuracy"] > 0.5, summary  # 12 classes: chance is 0.08
    report = json.loads((out / "train_report.json").read_text())
    assert report["concepts"]["kept"] == summary["concepts"]["kept"] > 0
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["backbone"] == "testbed" and config["feature_layer"] == "layer4" and config["grid"] == [GRID, GRID]
    assert len(config["class_names"]) == 12 and config["class_names"][0] == sorted(config["class_names"])[0]

    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert main(argv) == 2  # the model is not overwritten without --overwrite
    assert "--overwrite" in capsys.readouterr().err and (out / "model.safetensors").stat().st_mtime_ns == mtime

    image = sorted(images.rglob("*.png"))[0]
    assert main(["salf", "explain", str(image), "--model", str(out), "--top-k", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["predicted"] in config["class_names"]
    assert {c["concept"] for c in result["top_concepts"]} <= set(config["concepts"])

    # the same with labels from the testbed's labels.csv (class names with spaces) and a dense head
    assert main(argv[:-7] + ["--out", str(tmp_path / "dense"), "--labels", str(root / "data" / "labels.csv"),
                             "--head", "dense", "--steps", "20", "--interpretability-cutoff", "-1", "--device", "cpu",
                             "--no-progress"]) == 0
    dense = json.loads((tmp_path / "dense" / "config.json").read_text())["config"]
    assert " " in dense["class_names"][0]
    capsys.readouterr()


def test_cli_train_errors(testbed_cache, tmp_path, capsys):
    from fastcbm.cli import main

    root, _, images, cache = testbed_cache
    base = ["salf", "train", "--cache", str(cache.root), "--concepts", str(root / "data" / "concepts.txt"), "--out",
            str(tmp_path / "m"), "--no-progress", "--device", "cpu"]
    assert main(base[:3] + [str(tmp_path / "nope")] + base[4:]) == 2
    assert "--cache" in capsys.readouterr().err
    assert main(base + ["--val-fraction", "1"]) == 2
    assert "--val-fraction" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    assert main(base[:5] + [str(tmp_path / "empty.txt")] + base[6:]) == 2
    assert "empty" in capsys.readouterr().err
    (tmp_path / "bad.csv").write_text("somewhere/else.png,cat\n")
    assert main(base + ["--labels", str(tmp_path / "bad.csv")]) == 2
    assert "no label for" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()  # nothing half-written


def test_val_cache_must_match(testbed_cache, tmp_path):
    from fastcbm.precompute import precompute
    from fastcbm.salf.train import train_salf_from_cache

    root, _, images, cache = testbed_cache
    files = sorted(str(p) for p in images.rglob("*.png"))[:6]
    other = precompute(files, "testbed", tmp_path / "other", grid=3, device="cpu", num_workers=0, features="testbed",
                       progress=False)
    with pytest.raises(ValueError, match="other prompts settings"):
        train_salf_from_cache(cache.root, ["red ring"], val_cache=other.root, progress=False)
    assert np.array_equal(other.input_index, np.arange(6))


_DDP_CHILD = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {repo!r})
torch.set_num_threads(1)
from tests.test_salf_train import ddp_problem
from fastcbm.losses import cubic_cosine_loss
from fastcbm.salf.bottleneck import train_bottleneck_on
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
W, F, E, T, train, val, cfg = ddp_problem()
w = W.clone().requires_grad_(True)
loss = cubic_cosine_loss(w, F[rank::world], E[rank::world], T, backend="cpu", process_group=dist.group.WORLD)
loss.backward()
result = train_bottleneck_on(train, val, T, cfg, progress=False, process_group=dist.group.WORLD)
if rank == 0:
    torch.save({{"loss": loss.detach(), "dW": w.grad, "weight": result.weight, "history": result.history}}, {out!r})
dist.destroy_process_group()
"""


def ddp_problem():
    """A seeded bottleneck problem shared by the torchrun children and the single-process check."""
    from fastcbm.salf.bottleneck import BottleneckConfig

    g = torch.Generator().manual_seed(7)
    n, c, cells, d, m = 48, 6, 4, 5, 3
    f = torch.randn(n, c, cells, generator=g)
    e = torch.nn.functional.normalize(torch.randn(n, cells, d, generator=g), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=-1)
    w = torch.randn(m, c, generator=g)
    cfg = BottleneckConfig(batch_size=21, max_steps=15, eval_every=5, patience=10, interpretability_cutoff=-1.0,
                           backend="cpu", lr=1e-2)
    return w, f, e, t, TensorData(f[:36], e[:36]), TensorData(f[36:], e[36:]), cfg


def test_torchrun_two_processes_train_the_bottleneck_like_one(tmp_path):
    """Data-parallel bottleneck (2 gloo processes, each with its share of every batch) == one process."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from fastcbm.losses import cubic_cosine_loss
    from fastcbm.salf.bottleneck import train_bottleneck_on

    repo = Path(__file__).resolve().parents[1]
    script = tmp_path / "child.py"
    script.write_text(_DDP_CHILD.format(repo=str(repo), out=str(tmp_path / "rank0.pt")))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                           f"--master_port={port}", str(script)], env=env, cwd=str(repo), capture_output=True,
                          text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = torch.load(tmp_path / "rank0.pt")
    w, f, e, t, train, val, cfg = ddp_problem()
    w = w.clone().requires_grad_(True)
    loss = cubic_cosine_loss(w, f, e, t, backend="cpu")
    loss.backward()
    assert_close(got["loss"], loss.detach(), atol=1e-6, rtol=1e-5, what="loss (2 ranks vs 1)")
    assert_close(got["dW"], w.grad, atol=1e-6, rtol=1e-4, what="dW (2 ranks vs 1)")
    one = train_bottleneck_on(train, val, t, cfg, progress=False)
    assert [h["step"] for h in got["history"]] == [h["step"] for h in one.history]
    assert_close(got["weight"], one.weight, atol=1e-5, rtol=1e-4, what="trained W (2 ranks vs 1)")


def test_cli_train_under_torchrun_equals_one_process(testbed_cache, tmp_path):
    """`torchrun --nproc_per_node=2 -m fastcbm.cli train ...` (gloo on CPU): rank 0 writes the same model."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    from fastcbm.cli import main

    root, _, _, cache = testbed_cache
    args = ["salf", "train", "--cache", str(cache.root), "--concepts", str(root / "data" / "concepts.txt"),
            "--val-fraction", "0.25", "--class-sim-cutoff", "-1", "--concept-sim-cutoff", "0.98",
            "--interpretability-cutoff", "0.1", "--steps", "30", "--batch-size", "101", "--lambdas", "12",
            "--head-epochs", "30", "--device", "cpu", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                           f"--master_port={port}", "-m", "fastcbm.cli", *args, "--out", str(tmp_path / "two")],
                          env=env, cwd=str(repo), capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])  # one summary line (rank 0)
    assert summary["images"] == {"train": 180, "val": 60}
    one = json.loads((tmp_path / "one" / "train_report.json").read_text())
    two = json.loads((tmp_path / "two" / "train_report.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1
    assert [h["step"] for h in two["bottleneck"]["history"]] == [h["step"] for h in one["bottleneck"]["history"]]
    w1, w2 = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("one", "two"))
    assert w1.keys() == w2.keys()
    assert_close(w2["weight"], w1["weight"], atol=1e-4, rtol=1e-3, what="bottleneck W (2 ranks vs 1)")


@pytest.mark.parametrize("bad, match", [
    ({"features": torch.zeros(6, 4)}, "training features must be \\[N, C, L\\]"),
    ({"prompt_emb": torch.zeros(6, 3, 5)}, "training prompt embeddings must be \\[N=6, L=2, D\\]"),
    ({"val_prompt_emb": torch.zeros(5, 2, 5)}, "validation prompt embeddings must be \\[N=4, L=2, D\\]"),
    ({"text_emb": torch.zeros(3, 7)}, "text_emb must be \\[M, D=5\\]"),
    ({"features": torch.zeros(1, 4, 2), "prompt_emb": torch.zeros(1, 2, 5)}, "training: need at least 2 samples"),
    ({"val_features": torch.zeros(4, 3, 2)}, "validation rows are \\[C=3, L=2\\], training \\[C=4, L=2\\]"),
])
def test_train_bottleneck_rejects_bad_input(bad, match):
    from fastcbm.salf.bottleneck import BottleneckConfig, train_bottleneck

    args = {"features": torch.randn(6, 4, 2), "prompt_emb": torch.randn(6, 2, 5), "text_emb": torch.randn(3, 5),
            "val_features": torch.randn(4, 4, 2), "val_prompt_emb": torch.randn(4, 2, 5)}
    with pytest.raises(ValueError, match=match):
        train_bottleneck(**{**args, **bad}, config=BottleneckConfig(max_steps=1), progress=False)
