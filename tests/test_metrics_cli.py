"""``fastcbm metrics`` on saved arrays."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from fastcbm.cli import main
from fastcbm.metrics import epg, hit_rate, nra


@pytest.fixture
def arrays():
    gen = torch.Generator().manual_seed(0)
    maps = torch.rand(4, 6, 6, generator=gen)
    masks = torch.rand(4, 12, 12, generator=gen) > 0.6
    return maps, masks


def test_npy_json_and_csv(tmp_path, arrays, capsys):
    maps, masks = arrays
    np.save(tmp_path / "maps.npy", maps.numpy())
    np.save(tmp_path / "masks.npy", masks.numpy().astype(np.uint8))  # 0/1 uint8 accepted
    out = tmp_path / "per.csv"
    rc = main(["metrics", "--maps", str(tmp_path / "maps.npy"), "--masks", str(tmp_path / "masks.npy"), "--json",
               "--out", str(out)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    want = nra(maps, masks)
    assert summary["nra"] == pytest.approx(float(want.mean()), abs=1e-12)
    assert summary["epg"] == pytest.approx(float(epg(maps, masks).mean()), abs=1e-12)
    assert summary["hit_rate"] == hit_rate(want)
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 4 and float(rows[2]["nra"]) == pytest.approx(float(want[2]), abs=1e-9)


@pytest.mark.parametrize("fmt", ["npz", "pt"])
def test_npz_pt_paper_text(tmp_path, arrays, capsys, fmt):
    maps, masks = arrays
    if fmt == "npz":
        np.savez(tmp_path / "a.npz", maps=maps.numpy(), masks=masks.numpy())
        paths = [str(tmp_path / "a.npz")] * 2
    else:
        torch.save(maps, tmp_path / "maps.pt")
        torch.save({"masks": masks}, tmp_path / "masks.pt")
        paths = [str(tmp_path / "maps.pt"), str(tmp_path / "masks.pt")]
    assert main(["metrics", "--maps", paths[0], "--masks", paths[1], "--variant", "paper"]) == 0
    text = capsys.readouterr().out
    assert f"{float(nra(maps, masks, variant='paper').mean()):.6f}" in text and "hit rate" in text


def test_bad_files(tmp_path, arrays, capsys):
    maps, masks = arrays
    np.save(tmp_path / "maps.npy", maps.numpy())
    np.save(tmp_path / "masks2.npy", masks.numpy().astype(np.uint8) * 2)
    np.save(tmp_path / "flat.npy", maps.numpy()[0])
    np.save(tmp_path / "masks.npy", masks.numpy())
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    cases = [
        (["--maps", str(tmp_path / "missing.npy"), "--masks", str(tmp_path / "maps.npy")], "no such file"),
        (["--maps", str(tmp_path / "maps.npy"), "--masks", str(tmp_path / "masks2.npy")], "bool or 0/1"),
        (["--maps", str(tmp_path / "flat.npy"), "--masks", str(tmp_path / "masks.npy")], "must have shape"),
        (["--maps", str(tmp_path / "junk.npy"), "--masks", str(tmp_path / "masks.npy")], "could not read"),
        (["--maps", str(tmp_path / "maps.npy"), "--masks", str(tmp_path / "maps.npy")], "bool or 0/1"),
    ]
    for argv, match in cases:
        assert main(["metrics", *argv]) == 2
        assert match in capsys.readouterr().err
