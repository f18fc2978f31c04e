"""Issue 14: a property test of the cache. Any interleaving of interruptions (mid-shard, between shards), SIGKILL
leftovers (temp shards and manifests of dead writers, a stale lock file), byte flips, truncations, deleted files,
reads and resumes ends either byte-identical to an uninterrupted run or in a clear refusal — never in a silently
different cache, and a read never returns different numbers. Runs in-process with a tiny stand-in encoder (real
SIGKILLs are in test_reliability_cache.py)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fastcbm.cache import (
    CacheCorruptError,
    CacheIncompleteError,
    CacheMismatchError,
    CacheReader,
)
from fastcbm.cache import store as store_mod
from fastcbm import files as files_mod
from fastcbm.precompute import precompute
from tests.reliability_helpers import RUN, FakeCLIP, flip_byte, make_images, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")
DEAD_PID = 4194305  # above the largest pid_max Linux allows: never a live process
REFUSALS = (CacheMismatchError, CacheCorruptError)


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("prop")
    images = make_images(root / "imgs", 6)
    ref = root / "ref"
    r = precompute(str(images), FakeCLIP(), ref, **RUN)
    arrays = {name: r.array(name).copy() for name in r.arrays}
    return root, images, snapshot(ref), arrays


ops = st.one_of(
    st.tuples(st.just("interrupt"), st.integers(0, 17)),  # after this many array files (6 per shard, 3 shards)
    st.tuples(st.just("leftovers"), st.integers(0, 2)),
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(0, 100_000), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000), st.floats(0.0, 0.99)),
    st.tuples(st.just("delete"), st.integers(0, 10_000)),
    st.tuples(st.just("read"),),
    st.tuples(st.just("resume"),),
)


def _files(out):
    return sorted(p for p in out.rglob("*") if p.is_file())


def _run(images, out, monkeypatch, fail_after=None):
    real = store_mod._write_array
    count = {"n": 0}

    def hook(path, array):
        if fail_after is not None and count["n"] >= fail_after:
            raise Interrupted("interrupted")
        count["n"] += 1
        return real(path, array)

    with monkeypatch.context() as m:
        m.setattr(store_mod, "_write_array", hook)
        precompute(str(images), FakeCLIP(), out, **RUN)


@settings(max_examples=14, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          derandomize=True)
@given(seq=st.lists(ops, min_size=1, max_size=5))
@example(seq=[("interrupt", 5), ("flip", 1, 60, 0)])  # a flipped .npy header byte: numpy raised SyntaxError
def test_any_interleaving_ends_identical_or_refused(world, seq, monkeypatch):
    root, images, clean, arrays = world
    out = root / "work"
    shutil.rmtree(out, ignore_errors=True)
    damaged = False  # flips/truncations/deletions may justify a refusal; kills and resumes alone never do
    for op in [*seq, ("resume",)]:
        kind = op[0]
        if kind == "interrupt":
            try:
                _run(images, out, monkeypatch, fail_after=op[1])
            except Interrupted:
                pass
            except REFUSALS:
                assert damaged
                return
        elif kind == "leftovers":  # what a SIGKILL leaves: a temp shard, a temp manifest, a stale lock file
            host = files_mod._hostname()
            d = out / "shards" / f"{op[1]:05d}.tmp-{host}-{DEAD_PID}"
            d.mkdir(parents=True, exist_ok=True)
            (d / "prompt.npy").write_bytes(b"\x93NUMPY partial")
            (out / f"manifest.json.tmp-{host}-{DEAD_PID}").write_text('{"format": "fastcbm-pro')
            (out / ".lock").write_text(f"{host} {DEAD_PID} 2026-01-01T00:00:00Z\n")
        elif kind in ("flip", "truncate", "delete"):
            files = _files(out)
            if not files:
                continue
            f = files[op[1] % len(files)]
            damaged = True
            if kind == "flip":
                flip_byte(f, op[2], op[3])
            elif kind == "truncate":
                f.write_bytes(f.read_bytes()[:int(f.stat().st_size * op[2])])
            else:
                f.unlink()
        elif kind == "read":  # a reader either refuses or returns exactly the clean numbers
            try:
                r = CacheReader(out)
                got = {name: r.array(name).copy() for name in r.arrays}
            except (*REFUSALS, CacheIncompleteError, FileNotFoundError):
                continue
            assert got.keys() == arrays.keys()
            for name in arrays:
                np.testing.assert_array_equal(got[name], arrays[name], err_msg=name)
        else:
            try:
                _run(images, out, monkeypatch)
            except REFUSALS as exc:
                assert damaged, f"refused without any damage: {exc}"
                assert str(out) in str(exc) or "cache" in str(exc)
                return
            assert snapshot(out) == clean
