"""Issue 14 items 2-4: finished caches are read checked, shards carry their own settings (a resume never mixes
settings, even without a manifest), one writer per cache, cleanup removes only dead writers' temp files, disk-full
leaves no manifest temp file, and NaN/inf never reaches a consumer silently. Kill/resume with real SIGKILLs in
subprocesses at chosen moments."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fastcbm.cache import (
    CacheCorruptError,
    CacheDiskFullError,
    CacheLock,
    CacheLockedError,
    CacheMismatchError,
    CacheReader,
    write_similarities,
)
from fastcbm.cache import store as store_mod
from fastcbm.precompute import precompute
from tests.reliability_helpers import RUN, FakeCLIP, flip_byte, make_images, snapshot

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("imgs"), 6)


@pytest.fixture(scope="module")
def clean(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "c"
    precompute(str(images), FakeCLIP(), out, **RUN)
    return out, snapshot(out)


def _copy(src: Path, dst: Path) -> Path:
    for rel, data in snapshot(src).items():
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (dst / rel).write_bytes(data)
    return dst


def _rewrite_with_valid_checksums(cache: Path, shard: int, name: str, array: np.ndarray) -> None:
    """Store ``array`` in a shard as a writer would (valid sha256 everywhere): what an old fastcbm that stored an
    encoder's NaN would have left."""
    f = cache / "shards" / f"{shard:05d}" / f"{name}.npy"
    np.save(f, array)
    sha, size = store_mod.file_sha256(f), f.stat().st_size
    meta = json.loads((cache / "manifest.json").read_text())
    meta["shards"][shard]["files"][name].update({"sha256": sha, "bytes": size})
    store_mod.atomic_write_json(cache / "manifest.json", meta, checksum=True)


# -- readers check what they open ---------------------------------------------------------------------------------
def test_nan_with_valid_checksum_is_caught_where_consumed(clean, tmp_path):
    """The issue's case: one fp16 value set to NaN → `fastcbm similarities` wrote 21 NaNs with exit 0."""
    c = _copy(clean[0], tmp_path / "c")
    e = np.load(c / "shards" / "00001" / "prompt.npy")
    e[1, 2, 3] = np.nan
    _rewrite_with_valid_checksums(c, 1, "prompt", e)
    reader = CacheReader(c)
    with pytest.raises(CacheCorruptError) as ei:
        write_similarities(reader, torch.randn(3, 8), tmp_path / "P")
    msg = str(ei.value)
    assert "\n" not in msg and "shard 1" in msg and "prompt.npy" in msg and "row 3" in msg and "NaN/inf" in msg
    assert reader.manifest["inputs"][3] in msg  # the input image is named
    assert any("NaN/inf" in p for p in CacheReader(c).verify())


def test_flipped_byte_truncated_npy_and_manifest_are_named(clean, tmp_path):
    c = _copy(clean[0], tmp_path / "c")
    flip_byte(c / "shards" / "00002" / "global.npy", -3)
    with pytest.raises(CacheCorruptError, match=r"shard 2 file shards/00002/global.npy fails its sha256"):
        CacheReader(c).global_embeddings()
    assert CacheReader(c, verify="size").global_embeddings().shape == (6, 8)  # size-only mode: opt-out, not default
    f = c / "shards" / "00000" / "prompt.npy"
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(CacheCorruptError, match=r"shard 0 file shards/00000/prompt.npy has \d+ bytes, the manifest "
                                                r"records \d+ \(truncated"):
        CacheReader(c, verify="size").prompt_embeddings()
    m = c / "manifest.json"
    m.write_bytes(m.read_bytes()[:-40])
    with pytest.raises(CacheCorruptError, match=r"manifest .*manifest.json is damaged or truncated") as ei:
        CacheReader(c)
    assert "\n" not in str(ei.value)


def test_edited_manifest_fails_its_checksum(clean, tmp_path):
    c = _copy(clean[0], tmp_path / "c")
    meta = json.loads((c / "manifest.json").read_text())
    meta["inputs"][0], meta["inputs"][1] = meta["inputs"][1], meta["inputs"][0]  # valid JSON, wrong row → file map
    (c / "manifest.json").write_text(json.dumps(meta))
    with pytest.raises(CacheCorruptError, match="fails its checksum"):
        CacheReader(c)


def test_nan_rows_from_the_encoder_are_never_stored(images, tmp_path):
    bright = make_images(tmp_path / "imgs", 4, bright=(2,))
    r = precompute(str(bright), FakeCLIP(nan_over=0.5), tmp_path / "c", **RUN)
    assert len(r) == 3 and [s["reason"] for s in r.skipped] == [
        "non-finite embedding or features (NaN/inf) from the encoder"]
    assert bool(torch.isfinite(r.prompt_embeddings(dtype=torch.float32)).all())


# -- per-shard settings: resume never mixes ------------------------------------------------------------------------
def test_other_settings_after_deleting_the_manifest_are_refused(clean, images, tmp_path):
    """The issue's case (grid 7 → delete manifest → grid 5 gave a mixed cache with verify() == [])."""
    c = _copy(clean[0], tmp_path / "c")
    for k in (1, 2):  # as if killed after shard 0
        shutil.rmtree(c / "shards" / f"{k:05d}")
    (c / "manifest.json").unlink()
    with pytest.raises(CacheMismatchError, match=r"shard 0 was made with other settings .*settings.prompts.grid: "
                                                  r"cache has \[2, 2\], requested \[3, 3\]"):
        precompute(str(images), FakeCLIP(), c, **{**RUN, "grid": 3})
    assert not (c / "manifest.json").exists()  # refused before claiming the folder
    with pytest.raises(CacheMismatchError, match="shard 0 was made from other input files"):
        precompute(str(images / "b"), FakeCLIP(), c, **RUN)
    precompute(str(images), FakeCLIP(), c, **RUN)  # the original settings resume, byte-identical
    assert snapshot(c) == clean[1]


def test_verify_compares_each_shards_settings(clean, tmp_path):
    c = _copy(clean[0], tmp_path / "c")
    meta = json.loads((c / "manifest.json").read_text())
    meta["settings"]["prompts"]["radius"] = 9.0
    store_mod.atomic_write_json(c / "manifest.json", meta, checksum=True)
    problems = CacheReader(c).verify(checksums=False)
    assert len(problems) == 6 and "made with other settings" in problems[0]


# -- one writer; cleanup of dead writers only; disk full -----------------------------------------------------------
def test_second_writer_is_refused_and_a_dead_holder_releases(clean, images, tmp_path):
    c = tmp_path / "c"
    with CacheLock(c), pytest.raises(CacheLockedError, match=rf"another fastcbm precompute \(pid {os.getpid()} on host"):
        precompute(str(images), FakeCLIP(), c, **RUN)
    assert not (c / ".lock").exists()
    # a holder in another process, then SIGKILLed: the kernel drops its flock, the next writer proceeds
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({str(c / '.lock')!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b"otherhost 4242 2026-01-01T00:00:00Z\\n")
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CacheLockedError, match="pid 4242 on host otherhost"):
            CacheLock(c).acquire()
    finally:
        holder.kill()
        holder.wait()
    precompute(str(images), FakeCLIP(), c, **RUN)
    assert snapshot(c) == clean[1]


def test_cleanup_keeps_live_and_foreign_writers_temp_files(clean, tmp_path):
    c = _copy(clean[0], tmp_path / "c")
    sd = c / "shards"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    from fastcbm.files import _hostname

    host = _hostname()
    live = sd / f"00001.tmp-{host}-{os.getppid()}"  # a live process (our parent) may be writing it
    gone = sd / f"00002.tmp-{host}-{dead_pid}"
    legacy = sd / f"00000.tmp-{dead_pid}"  # names of older fastcbm versions: pid only
    foreign = sd / f"00001.tmp-someotherhost-{dead_pid}"  # cannot check another host's pid: keep
    mtmp = c / f"manifest.json.tmp-{host}-{dead_pid}"
    for d in (live, gone, legacy, foreign):
        d.mkdir()
        (d / "prompt.npy").write_bytes(b"partial")
    mtmp.write_text("{")
    cache = store_mod.ShardedCache(c, settings=json.loads((c / "manifest.json").read_text())["settings"],
                                   inputs=CacheReader(c).manifest["inputs"], arrays=CacheReader(c).arrays,
                                   shard_size=2)
    removed = cache.cleanup_tmp()
    assert sorted(p.name for p in removed) == sorted([gone.name, legacy.name, mtmp.name])
    assert live.exists() and foreign.exists() and not gone.exists() and not mtmp.exists()


def test_disk_full_writing_the_final_manifest_leaves_no_temp_file(images, tmp_path, monkeypatch):
    real = store_mod.os.replace

    def full(src, dst):
        if Path(dst).name == "manifest.json" and (Path(dst).parent / "shards" / "00002").exists():
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(store_mod.os, "replace", full)
    with pytest.raises(CacheDiskFullError, match="while writing the manifest"):
        precompute(str(images), FakeCLIP(), tmp_path / "c", **RUN)
    assert not list((tmp_path / "c").glob("*manifest.json*.tmp-*"))
    assert not (tmp_path / "c" / ".lock").exists()


# -- SIGKILL at chosen moments, then resume ------------------------------------------------------------------------
_CHILD = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads(1)
from fastcbm.cache import store
from fastcbm.precompute import precompute
from tests.reliability_helpers import RUN, FakeCLIP
moment, count = {moment!r}, {{"n": 0}}
if moment == "mid_shard":  # after the first array file of shard 1 is in its temp directory
    real = store._write_array
    def hook(path, array):
        out = real(path, array)
        count["n"] += 1
        if count["n"] == 6:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    store._write_array = hook
else:  # "mid_manifest": the final manifest's temp file is written, not yet renamed
    real = store.os.replace
    def hook(src, dst):
        if os.path.basename(dst) == "manifest.json" and os.path.isdir(os.path.join(os.path.dirname(dst), "shards", "00002")):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst)
    store.os.replace = hook
precompute({images!r}, FakeCLIP(), {out!r}, **RUN)
"""


@pytest.mark.parametrize("moment", ["mid_shard", "mid_manifest"])
def test_sigkill_then_resume_is_byte_identical(clean, images, tmp_path, moment):
    out = tmp_path / "c"
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(repo=str(REPO), moment=moment, images=str(images), out=str(out)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    left = sorted(p.name for p in list((out / "shards").iterdir()) + list(out.glob("*manifest.json*.tmp-*")))
    if moment == "mid_shard":
        assert any(".tmp-" in n for n in left) and "00000" in left and "00001" not in left
        # the killed run's manifest still says unfinished; change the settings now → refused, nothing mixed
        with pytest.raises(CacheMismatchError):
            precompute(str(images), FakeCLIP(), out, **{**RUN, "grid": 3})
    else:
        assert any("manifest.json" in n and ".tmp-" in n for n in left)
    precompute(str(images), FakeCLIP(), out, **RUN)
    assert snapshot(out) == clean[1]


def test_nan_in_cached_features_stops_training_reads(images, tmp_path):
    """`fastcbm train` streams rows through CacheData → CacheReader: a NaN stored with a valid checksum is named."""
    from fastcbm.salf.data import CacheData

    r = precompute(str(images), FakeCLIP(), tmp_path / "c", features="testbed", **RUN)
    f = np.load(tmp_path / "c" / "shards" / "00002" / "features.npy")
    f[0, 1, 0, 0] = np.inf
    _rewrite_with_valid_checksums(tmp_path / "c", 2, "features", f)
    data = CacheData(CacheReader(tmp_path / "c"), torch.zeros(len(r), dtype=torch.long))
    assert data.features(torch.arange(4)).shape[0] == 4  # shards 0-1 are fine
    with pytest.raises(CacheCorruptError, match=r"shard 2 file shards/00002/features.npy: row 4 .* NaN/inf"):
        data.features(torch.arange(6))
