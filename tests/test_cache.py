"""The sharded prompt-embedding cache (store + reader + similarities), without any model: fast."""

from __future__ import annotations

import errno
import json
import logging

import numpy as np
import pytest
import torch

from fastcbm.cache import (ArraySpec, CacheDiskFullError, CacheIncompleteError, CacheMismatchError, CacheReader,
                           ShardedCache, load_similarities, prompt_similarities, write_similarities)
from fastcbm.cache import store as store_mod
from tests.conftest import assert_close

G, D = 4, 8
SETTINGS = {"model": {"name": "m", "pretrained": None}, "prompts": {"grid": [2, 2], "radius": 3.0}}
ARRAYS = {"prompt": ArraySpec("float16", (G, D)), "prompt_norm": ArraySpec("float32", (G,)),
          "global": ArraySpec("float16", (D,)), "global_norm": ArraySpec("float32", ()),
          "input_index": ArraySpec("int64", ()), "features": ArraySpec("float16", (3, 2, 2))}


def _rows_for(k: int, lo: int, hi: int, skip: set[int]) -> dict[str, np.ndarray]:
    """Deterministic content for the inputs [lo, hi) minus ``skip``."""
    idx = np.array([i for i in range(lo, hi) if i not in skip], dtype=np.int64)
    rng = np.random.default_rng(1000 + k)
    e = rng.standard_normal((len(idx), G + 1, D)).astype(np.float32)
    n = np.linalg.norm(e, axis=-1)
    u = (e / n[..., None]).astype(np.float16)
    return {"prompt": u[:, 1:], "prompt_norm": n[:, 1:], "global": u[:, 0], "global_norm": n[:, 0],
            "input_index": idx, "features": rng.standard_normal((len(idx), 3, 2, 2)).astype(np.float16)}


def _make(root, n_inputs=11, shard_size=4, skip=frozenset({2, 5, 6, 7}), **kw) -> ShardedCache:
    inputs = [f"/data/img{i:03d}.jpg" for i in range(n_inputs)]
    cache = ShardedCache(root, settings=kw.pop("settings", SETTINGS), inputs=inputs, arrays=kw.pop("arrays", ARRAYS),
                         shard_size=shard_size, **kw)
    return cache


def _fill(cache: ShardedCache, skip=frozenset({2, 5, 6, 7}), shards=None):
    for k in (range(cache.num_shards) if shards is None else shards):
        lo, hi = cache.shard_range(k)
        cache.write_shard(k, _rows_for(k, lo, hi, set(skip)),
                          [{"index": i, "path": cache.inputs[i], "reason": "bad"} for i in range(lo, hi) if i in skip])


@pytest.fixture
def cache_dir(tmp_path):
    cache = _make(tmp_path / "c")
    _fill(cache)  # shard 1 = inputs 4..7 with 5, 6, 7 skipped: 1 row; a fully skipped shard is tested below
    cache.finalize()
    return tmp_path / "c"


def _expected(n_inputs=11, shard_size=4, skip=frozenset({2, 5, 6, 7})):
    parts = [_rows_for(k, lo, min(lo + shard_size, n_inputs), set(skip))
             for k, lo in enumerate(range(0, n_inputs, shard_size))]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def test_reader_rows_in_input_order(cache_dir):
    r = CacheReader(cache_dir)
    exp = _expected()
    assert len(r) == 7 and r.num_prompts == G and r.dim == D
    assert r.input_index.tolist() == [0, 1, 3, 4, 8, 9, 10]
    assert r.files == [f"/data/img{i:03d}.jpg" for i in (0, 1, 3, 4, 8, 9, 10)]
    assert sorted(s["index"] for s in r.skipped) == [2, 5, 6, 7]
    assert np.array_equal(r.prompt_embeddings().numpy(), exp["prompt"])
    assert np.array_equal(r.global_embeddings().numpy(), exp["global"])
    assert np.array_equal(r.features().numpy(), exp["features"])
    assert_close(r.prompt_embeddings(scaled=True), torch.from_numpy(exp["prompt"]).float()
                 * torch.from_numpy(exp["prompt_norm"])[..., None], atol=0, rtol=0, what="scaled")
    assert_close(r.global_norms(), torch.from_numpy(exp["global_norm"]), atol=0, rtol=0, what="norms")
    assert r.verify() == []


@pytest.mark.parametrize("rows", [slice(2, 6), slice(0, 1), slice(5, 7), slice(3, 3), slice(None, None, 2), 4, -1,
                                  [6, 0, 3, 3], np.array([5, 1]), torch.tensor([2, 4])])
def test_reader_row_selection(cache_dir, rows):
    r = CacheReader(cache_dir)
    exp = _expected()
    sel = rows if not isinstance(rows, int) else slice(rows % 7, rows % 7 + 1)
    sel = sel.numpy() if isinstance(sel, torch.Tensor) else sel
    assert np.array_equal(r.prompt_embeddings(rows).numpy(), exp["prompt"][sel])
    assert np.array_equal(r.array("prompt_norm", rows), exp["prompt_norm"][sel])


def test_reader_bad_rows_and_names(cache_dir):
    r = CacheReader(cache_dir)
    with pytest.raises(IndexError, match="rows"):
        r.prompt_embeddings(7)
    with pytest.raises(IndexError, match="rows"):
        r.prompt_embeddings([0, 9])
    with pytest.raises(ValueError, match="rows"):
        r.prompt_embeddings(np.array([0.5]))
    with pytest.raises(ValueError, match="name"):
        r.array("nope")
    with pytest.raises(ValueError, match="batch_size"):
        next(r.iter_batches(0))


def test_iter_batches_cover_everything(cache_dir):
    r = CacheReader(cache_dir)
    exp = _expected()
    got = list(r.iter_batches(3, arrays=("prompt", "global_norm", "input_index"), dtype=torch.float32))
    assert [b["rows"] for b in got] == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert got[0]["prompt"].dtype == torch.float32 and got[0]["input_index"].dtype == torch.int64
    assert np.array_equal(torch.cat([b["prompt"] for b in got]).numpy(), exp["prompt"].astype(np.float32))


def test_fully_skipped_shard_and_single_input(tmp_path):
    cache = _make(tmp_path / "c", n_inputs=9, shard_size=3)
    skip = {3, 4, 5}
    _fill(cache, skip=skip)
    cache.finalize()
    r = CacheReader(tmp_path / "c")
    exp = _expected(9, 3, skip)
    assert len(r) == 6 and r.input_index.tolist() == [0, 1, 2, 6, 7, 8]
    assert np.array_equal(r.prompt_embeddings(slice(1, 5)).numpy(), exp["prompt"][1:5])
    assert np.array_equal(r.prompt_embeddings([2, 3]).numpy(), exp["prompt"][[2, 3]])
    one = _make(tmp_path / "one", n_inputs=1, shard_size=5)
    _fill(one, skip=set())
    one.finalize()
    assert len(CacheReader(tmp_path / "one")) == 1


def test_unfinished_cache_is_refused(tmp_path):
    cache = _make(tmp_path / "c")
    _fill(cache, shards=[0, 2])
    with pytest.raises(CacheIncompleteError, match="shards \\[1\\] missing"):
        cache.finalize()
    with pytest.raises(CacheIncompleteError, match="unfinished"):
        CacheReader(tmp_path / "c")
    with pytest.raises(FileNotFoundError):
        CacheReader(tmp_path / "nothing")


def test_reopen_with_other_settings_is_refused(cache_dir):
    _make(cache_dir)  # same settings: fine
    other = json.loads(json.dumps(SETTINGS))
    other["model"]["pretrained"] = "laion2b"
    other["prompts"]["radius"] = 4.0
    with pytest.raises(CacheMismatchError) as ei:
        _make(cache_dir, settings=other)
    msg = str(ei.value)
    assert "settings.model.pretrained" in msg and "settings.prompts.radius" in msg and "refusing to mix" in msg
    assert "settings.prompts.grid" not in msg
    with pytest.raises(CacheMismatchError, match="shard_size"):
        _make(cache_dir, shard_size=5)
    with pytest.raises(CacheMismatchError, match="inputs: cache has 11 files, requested 12"):
        _make(cache_dir, n_inputs=12)
    with pytest.raises(CacheMismatchError, match="arrays.features"):
        _make(cache_dir, arrays={k: v for k, v in ARRAYS.items() if k != "features"})


def test_write_shard_validates_arrays(tmp_path):
    cache = _make(tmp_path / "c")
    good = _rows_for(0, 0, 4, set())
    with pytest.raises(ValueError, match="expected names"):
        cache.write_shard(0, {k: v for k, v in good.items() if k != "features"})
    with pytest.raises(ValueError, match=r"arrays\['prompt'\]"):
        cache.write_shard(0, {**good, "prompt": good["prompt"].astype(np.float32)})
    with pytest.raises(ValueError, match="same number of rows"):
        cache.write_shard(0, {**good, "global": good["global"][:2]})
    with pytest.raises(ValueError, match="shard_size"):
        _make(tmp_path / "d", shard_size=0)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "meta"])
def test_damaged_shard_is_detected_and_removed(cache_dir, caplog, damage):
    cache = _make(cache_dir)
    f = cache_dir / "shards" / "00002" / "prompt.npy"
    if damage == "flip":
        b = bytearray(f.read_bytes())
        b[-3] ^= 0x40
        f.write_bytes(bytes(b))
    elif damage == "truncate":
        f.write_bytes(f.read_bytes()[:-10])
    elif damage == "delete":
        f.unlink()
    else:
        (cache_dir / "shards" / "00002" / "shard.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="fastcbm.cache"):
        assert cache.pending_shards() == [2]
    assert "shard 2 is damaged" in caplog.text
    assert not (cache_dir / "shards" / "00002").exists()
    assert cache.pending_shards() == [2]
    assert CacheReader(cache_dir).verify() != []  # the old manifest still names it: the reader notices


def test_size_only_verification_misses_a_flipped_byte_checksum_catches_it(cache_dir):
    cache = _make(cache_dir)
    f = cache_dir / "shards" / "00000" / "global.npy"
    b = bytearray(f.read_bytes())
    b[-1] ^= 1
    f.write_bytes(bytes(b))
    assert cache.pending_shards(checksums=False) == []
    assert "checksum" in CacheReader(cache_dir).verify()[0]
    assert cache.pending_shards(checksums=True) == [0]


def test_crash_mid_shard_leaves_no_visible_shard(tmp_path, monkeypatch):
    cache = _make(tmp_path / "c")
    real = store_mod._write_array
    calls = {"n": 0}

    def flaky(path, array):
        calls["n"] += 1
        if calls["n"] == len(ARRAYS) + 3:  # the 3rd array file of shard 1
            raise RuntimeError("killed")
        return real(path, array)

    monkeypatch.setattr(store_mod, "_write_array", flaky)
    with pytest.raises(RuntimeError, match="killed"):
        _fill(cache)
    assert sorted(p.name for p in (tmp_path / "c" / "shards").iterdir()) == ["00000"]  # tmp dir removed on error
    (tmp_path / "c" / "shards" / "00001.tmp-999").mkdir()  # what a SIGKILL would leave behind
    monkeypatch.setattr(store_mod, "_write_array", real)
    cache = _make(tmp_path / "c")
    cache.cleanup_tmp()
    assert cache.pending_shards() == [1, 2]
    _fill(cache, shards=[1, 2])
    cache.finalize()
    ref = _make(tmp_path / "ref")
    _fill(ref)
    ref.finalize()
    for k in range(3):
        for name in ARRAYS:
            a = (tmp_path / "c" / "shards" / f"{k:05d}" / f"{name}.npy").read_bytes()
            assert a == (tmp_path / "ref" / "shards" / f"{k:05d}" / f"{name}.npy").read_bytes()


def test_disk_full_names_the_cache_and_keeps_finished_shards(tmp_path, monkeypatch):
    cache = _make(tmp_path / "c")
    real = store_mod._write_array
    calls = {"n": 0}

    def full(path, array):
        calls["n"] += 1
        if calls["n"] > len(ARRAYS) + 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, array)

    monkeypatch.setattr(store_mod, "_write_array", full)
    with pytest.raises(CacheDiskFullError) as ei:
        _fill(cache)
    assert str(tmp_path / "c") in str(ei.value) and "resume" in str(ei.value)
    assert ei.value.errno == errno.ENOSPC
    monkeypatch.setattr(store_mod, "_write_array", real)
    assert _make(tmp_path / "c").pending_shards() == [1, 2]


@pytest.mark.parametrize("n,g,m,d", [(1, 1, 1, 8), (5, 4, 3, 8), (7, 49, 13, 8)])
def test_prompt_similarities_match_einsum(n, g, m, d):
    gen = torch.Generator().manual_seed(n * 100 + m)
    e = torch.nn.functional.normalize(torch.randn(n, g, d, generator=gen), dim=-1)
    t = torch.randn(m, d, generator=gen)[:, :].T.contiguous().T  # non-contiguous text matrix
    want = torch.einsum("ngd,md->ngm", e.double(), torch.nn.functional.normalize(t.double(), dim=-1))
    assert_close(prompt_similarities(e, t), want, atol=1e-6, rtol=1e-5, what="P")
    assert_close(prompt_similarities(e, t, normalize_text=False), torch.einsum("ngd,md->ngm", e, t),
                 atol=1e-5, rtol=1e-5, what="P raw")


def test_prompt_similarities_errors():
    with pytest.raises(ValueError, match="prompt_emb"):
        prompt_similarities(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="text_emb"):
        prompt_similarities(torch.zeros(1, 3, 4), torch.zeros(2, 5))


def test_reader_similarities_and_written_chunks(cache_dir, tmp_path):
    r = CacheReader(cache_dir)
    t = torch.randn(5, D, generator=torch.Generator().manual_seed(0))
    tn = torch.nn.functional.normalize(t, dim=-1)
    e = torch.from_numpy(_expected()["prompt"]).float()
    want = torch.einsum("ngd,md->ngm", e, tn)
    assert_close(r.similarities(t, slice(1, 6)), want[1:6], atol=1e-6, rtol=1e-5, what="on the fly")
    idx = write_similarities(r, t, tmp_path / "P", concepts=list("abcde"), chunk=3, dtype="float32")
    assert [c["rows"] for c in idx["chunks"]] == [[0, 3], [3, 6], [6, 7]]
    assert_close(torch.from_numpy(load_similarities(tmp_path / "P")), want, atol=1e-6, rtol=1e-5, what="written")
    g = np.load(tmp_path / "P" / idx["chunks"][1]["global_file"])
    e0 = torch.from_numpy(_expected()["global"]).float()
    assert_close(torch.from_numpy(g), (e0 @ tn.T)[3:6], atol=1e-6, rtol=1e-5, what="global")
    assert json.loads((tmp_path / "P" / "index.json").read_text())["concepts"] == list("abcde")
    with pytest.raises(ValueError, match="chunk"):
        write_similarities(r, t, tmp_path / "Q", chunk=0)
