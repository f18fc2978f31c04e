"""NRA (official + paper), IoU curve, EPG and hit rate: every runnable backend vs loop oracles and the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastcbm.backends import BackendUnavailableError
from fastcbm.metrics import epg, hit_rate, iou_curve, nra
from fastcbm.metrics.baselines import (
    authors_epg,
    loop_iou_curve,
    loop_paper_nra,
    naive_official_nra,
    resized,
)
from fastcbm.metrics.ops import EPG, IOU_CURVE, NRA
from tests.conftest import assert_close, runnable_backends

BACKENDS = runnable_backends(NRA, "official")
PAPER_BACKENDS = runnable_backends(NRA, "paper")


def make_maps(kind: str, n: int, size: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    h, w = size
    if kind == "random":
        return torch.randn(n, h, w, generator=gen)
    if kind == "quantised":  # many ties
        return torch.randint(0, 4, (n, h, w), generator=gen).float() * 0.25
    if kind == "zeros":
        return torch.zeros(n, h, w)
    if kind == "blocky":  # a low-res map upsampled by repetition: ties in blocks
        low = torch.rand(n, (h + 3) // 4, (w + 3) // 4, generator=gen)
        return low.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, :h, :w].contiguous()
    raise AssertionError(kind)


def make_masks(kind: str, n: int, size: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    h, w = size
    if kind == "random":
        return torch.rand(n, h, w, generator=gen) > 0.7
    if kind == "empty":
        return torch.zeros(n, h, w, dtype=torch.bool)
    if kind == "full":
        return torch.ones(n, h, w, dtype=torch.bool)
    if kind == "pixel":
        masks = torch.zeros(n, h, w, dtype=torch.bool)
        masks[:, h // 3, w // 2] = True
        return masks
    if kind == "box":
        masks = torch.zeros(n, h, w, dtype=torch.bool)
        masks[:, h // 4 : h // 2 + 1, w // 3 : w - 1] = True
        return masks
    raise AssertionError(kind)


def oracle(fn, maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    x = resized(maps, tuple(masks.shape[-2:]))
    return torch.tensor([fn(x[i], masks[i].numpy()) for i in range(masks.shape[0])], dtype=torch.float64)


# ---- official NRA ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [(10, 10), (11, 13), (32, 31)])
@pytest.mark.parametrize("mask_kind", ["random", "empty", "full", "pixel", "box"])
@pytest.mark.parametrize("map_kind", ["random", "quantised", "zeros", "blocky"])
def test_official_nra_matches_authors_loop(backend, size, mask_kind, map_kind):
    gen = torch.Generator().manual_seed(hash((size, mask_kind, map_kind)) % 2**31)
    maps, masks = make_maps(map_kind, 3, size, gen), make_masks(mask_kind, 3, size, gen)
    got = nra(maps, masks, backend=backend)
    assert got.dtype == torch.float64 and got.shape == (3,)
    assert_close(got, oracle(naive_official_nra, maps, masks), atol=1e-6, rtol=0, what=f"official NRA {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_official_nra_resize_dtypes_noncontiguous(backend, dtype):
    gen = torch.Generator().manual_seed(3)
    maps = torch.rand(2, 7, 7, generator=gen).to(dtype).transpose(1, 2)  # non-contiguous, resized 7x7 -> 32x32
    masks = (torch.rand(2, 32, 32, generator=gen) > 0.6).transpose(1, 2)
    assert not maps.is_contiguous() and not masks.is_contiguous()
    got = nra(maps, masks, backend=backend)
    assert_close(got, oracle(naive_official_nra, maps, masks), atol=1e-6, rtol=0, what=f"resize {dtype} {backend}")


@pytest.mark.parametrize("size", [(10, 12), (17, 13), (31, 33)])
@pytest.mark.parametrize("n_maps", [1, 3])
def test_official_nra_triton(size, n_maps):
    if "triton" not in BACKENDS:
        pytest.skip("triton cannot run here")
    gen = torch.Generator().manual_seed(n_maps * 100 + size[0])
    maps = make_maps("quantised", n_maps, size, gen)
    masks = make_masks("random", n_maps, size, gen)
    masks[0] = False  # an empty mask in the batch
    got = nra(maps, masks, backend="triton")
    assert_close(got, oracle(naive_official_nra, maps, masks), atol=1e-6, rtol=0, what="official NRA triton")


def test_official_nra_degenerate_values():
    size = (10, 10)
    maps = torch.rand(3, *size)
    masks = torch.zeros(3, *size, dtype=torch.bool)
    masks[1] = True
    masks[2, 0, 0] = True
    maps[2] = 0.0
    for backend in BACKENDS:
        got = nra(maps, masks, backend=backend)
        assert got[0] == 0.0 and got[1] == 0.0, backend  # empty mask, full mask (non-positive denominator)
        # all-zero map: ties ordered by descending index, so the single pixel at index 0 comes last (not special-cased)
        assert_close(got[2:], oracle(naive_official_nra, maps[2:], masks[2:]), atol=1e-6, rtol=0, what=backend)
        assert not torch.isnan(got).any()


def test_official_nra_perfect_map_is_one():
    masks = torch.zeros(1, 20, 20, dtype=torch.bool)
    masks[0, 5:9, 3:12] = True
    got = nra(masks.float(), masks, backend="reference")
    # the authors' ideal curve uses idx (not idx+1), so a perfect map scores slightly ABOVE 1; we reproduce that
    assert 0.99 < float(got) < 1.01
    assert_close(got, oracle(naive_official_nra, masks.float(), masks), atol=1e-6, rtol=0, what="perfect map")


def test_official_nra_needs_100_pixels():
    with pytest.raises(ValueError, match="needs H\\*W >= 100"):
        nra(torch.rand(1, 9, 11), torch.ones(1, 9, 11, dtype=torch.bool))


# ---- paper NRA -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", PAPER_BACKENDS)
@pytest.mark.parametrize("size", [(1, 1), (3, 5), (10, 12), (17, 13)])
@pytest.mark.parametrize("map_kind", ["random", "quantised", "zeros"])
def test_paper_nra_matches_threshold_loop(backend, size, map_kind):
    gen = torch.Generator().manual_seed(size[0] * 7 + size[1])
    maps = make_maps(map_kind, 3, size, gen)
    masks = make_masks("random", 3, size, gen)
    masks[1] = True
    masks[2] = False
    masks[2].view(-1)[-1] = True
    got = nra(maps, masks, variant="paper", backend=backend)
    assert_close(got, oracle(loop_paper_nra, maps, masks), atol=1e-9, rtol=0, what=f"paper NRA {backend}")


def test_paper_nra_resize_and_empty_mask():
    maps = torch.rand(2, 5, 6, dtype=torch.float64)
    masks = torch.rand(2, 23, 19) > 0.5
    masks[0] = False
    for backend in PAPER_BACKENDS:
        got = nra(maps, masks, variant="paper", backend=backend)
        assert got[0] == 0.0
        assert_close(got, oracle(loop_paper_nra, maps, masks), atol=1e-9, rtol=0, what=backend)


# ---- IoU curve -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", runnable_backends(IOU_CURVE))
@pytest.mark.parametrize("size", [(1, 1), (4, 7), (13, 11)])
@pytest.mark.parametrize("map_kind", ["random", "quantised"])
def test_iou_curve_matches_loop(backend, size, map_kind):
    gen = torch.Generator().manual_seed(size[1])
    maps = make_maps(map_kind, 3, size, gen)
    masks = make_masks("random", 3, size, gen)
    masks[0] = False
    got = iou_curve(maps, masks, backend=backend)
    assert got.dtype == torch.float32 and got.shape == (3, size[0] * size[1])
    x = resized(maps, size)
    want = torch.tensor(np.stack([loop_iou_curve(x[i], masks[i].numpy()) for i in range(3)]))
    assert_close(got, want, atol=1e-6, rtol=0, what=f"iou_curve {backend}")
    assert (got[0] == 0).all()


# ---- EPG -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", runnable_backends(EPG))
@pytest.mark.parametrize("size", [(1, 1), (5, 9), (31, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_epg_matches_authors_formula(backend, size, dtype):
    gen = torch.Generator().manual_seed(size[0])
    maps = (torch.randn(4, 6, 5, generator=gen) * 3 + 2).to(dtype)  # resized to size
    maps[1] = 0.0  # all-zero map -> 0
    masks = make_masks("random", 4, size, gen)
    masks[2] = False  # empty mask -> 0
    got = epg(maps, masks, backend=backend)
    assert got.dtype == torch.float64
    assert_close(got, oracle(authors_epg, maps, masks), atol=1e-9, rtol=1e-9, what=f"epg {backend}")
    assert got[1] == 0.0 and got[2] == 0.0


def test_epg_constant_map_is_zero():
    for backend in runnable_backends(EPG):
        assert float(epg(torch.full((1, 4, 4), 3.5), torch.ones(1, 4, 4, dtype=torch.bool), backend=backend)) == 0.0


# ---- hit rate --------------------------------------------------------------------------------------------------
def test_hit_rate():
    assert hit_rate(torch.tensor([0.2, 0.5, 0.51, 0.9])) == 0.5
    assert hit_rate(np.array([0.2, 0.4]), threshold=0.3) == 0.5
    assert hit_rate([0.7]) == 1.0
    with pytest.raises(ValueError, match="non-empty"):
        hit_rate([])
    with pytest.raises(ValueError, match="NaN"):
        hit_rate([0.1, float("nan")])


# ---- validation and dispatch -----------------------------------------------------------------------------------
GOOD_MAPS = torch.rand(2, 10, 10)
GOOD_MASKS = torch.ones(2, 10, 10, dtype=torch.bool)


@pytest.mark.parametrize("fn", [nra, epg, iou_curve])
@pytest.mark.parametrize(
    "maps, masks, match",
    [
        (torch.rand(10, 10), GOOD_MASKS, r"maps must have shape \[N, h, w\], got shape \(10, 10\)"),
        (torch.randint(0, 2, (2, 10, 10)), GOOD_MASKS, "maps must be fp16/bf16/fp32/fp64.*int64"),
        (GOOD_MAPS, torch.ones(2, 10, 10), "masks must be a bool tensor.*float32"),
        (GOOD_MAPS, torch.ones(2, 1, 10, 10, dtype=torch.bool), r"masks must have shape \[N, H, W\]"),
        (GOOD_MAPS, torch.ones(3, 10, 10, dtype=torch.bool), "disagree on N"),
        (torch.rand(0, 10, 10), torch.ones(0, 10, 10, dtype=torch.bool), "maps is empty"),
        (torch.rand(2, 10, 10), torch.ones(2, 0, 10, dtype=torch.bool), "masks is empty"),
        (GOOD_MAPS.clone().index_fill_(1, torch.tensor([3]), float("nan")), GOOD_MASKS, "NaN or inf"),
        (GOOD_MAPS.clone().index_fill_(2, torch.tensor([0]), float("-inf")), GOOD_MASKS, "NaN or inf"),
        ([[0.0]], GOOD_MASKS, "must be a torch.Tensor"),
    ],
)
def test_bad_inputs_raise_value_error(fn, maps, masks, match):
    with pytest.raises(ValueError, match=match):
        fn(maps, masks)


def test_fp64_overflowing_float32_raises():
    with pytest.raises(ValueError, match="overflows float32"):
        nra(torch.full((1, 10, 10), 1e300, dtype=torch.float64), GOOD_MASKS[:1])


def test_unknown_variant_and_backends():
    with pytest.raises(ValueError, match="variant"):
        nra(GOOD_MAPS, GOOD_MASKS, variant="auc")
    with pytest.raises(ValueError, match="backend"):
        nra(GOOD_MAPS, GOOD_MASKS, backend="gpu")
    with pytest.raises(BackendUnavailableError):
        nra(GOOD_MAPS, GOOD_MASKS, backend="cuda")  # CPU tensors
    with pytest.raises(BackendUnavailableError):
        iou_curve(GOOD_MAPS, GOOD_MASKS, backend="triton")  # not implemented for this op


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("variant", ["official", "paper"])
def test_gpu_backends_match_reference(backend, variant):
    gen = torch.Generator().manual_seed(0)
    maps = make_maps("quantised", 37, (45, 53), gen)
    masks = make_masks("random", 37, (45, 53), gen)
    masks[3] = False
    want = nra(maps, masks, variant=variant, backend="reference")
    if backend not in runnable_backends(NRA, variant, "cuda"):  # the CUDA module has no paper epilogue: it must say so
        with pytest.raises(BackendUnavailableError, match=f"no '{backend}' implementation"):
            nra(maps.cuda(), masks.cuda(), variant=variant, backend=backend)
    else:
        got = nra(maps.cuda(), masks.cuda(), variant=variant, backend=backend)
        assert_close(got, want, atol=1e-9, rtol=0, what=f"{backend} {variant}")
    assert_close(epg(maps.cuda(), masks.cuda(), backend=backend), epg(maps, masks, backend="reference"),
                 atol=1e-9, rtol=1e-9, what=f"{backend} epg")


@pytest.mark.parametrize("variant", ["official", "paper"])
@pytest.mark.parametrize("map_kind", ["random", "quantised", "zeros", "blocky", "outlier"])
def test_cpu_bucketed_selection_large_maps(variant, map_kind):
    """Maps above 4096 pixels take the C++ bucketed selection path (smaller ones go straight to nth_element)."""
    if "cpu" not in BACKENDS:
        pytest.skip("C++ extension not built")
    gen = torch.Generator().manual_seed(11)
    size = (96, 97)
    if map_kind == "outlier":  # one huge value squeezes everything else into one bucket at the first level
        maps = torch.rand(2, *size, generator=gen)
        maps[:, 0, 0] = 1e30
        maps[1, 5, 5] = -1e30
    else:
        maps = make_maps(map_kind, 2, size, gen)
    maps[:, 3, :7] = -0.0  # -0.0 ties with +0.0
    maps[:, 4, :7] = 0.0
    masks = make_masks("random", 2, size, gen)
    fn = naive_official_nra if variant == "official" else loop_paper_nra
    got = nra(maps, masks, variant=variant, backend="cpu")
    assert_close(got, oracle(fn, maps, masks), atol=1e-9, rtol=0, what=f"cpu {variant} {map_kind}")
    assert_close(got, nra(maps, masks, variant=variant, backend="reference"), atol=1e-12, rtol=0, what="vs reference")


def test_large_finite_values_are_not_rejected():
    """A float32 sum that overflows must not be mistaken for inf in the input."""
    maps = torch.full((1, 10, 10), 3e38)
    maps[0, 0, 0] = 1.0
    masks = torch.zeros(1, 10, 10, dtype=torch.bool)
    masks[0, 0, 0] = True
    for backend in BACKENDS:
        assert float(epg(maps, masks, backend=backend)) == pytest.approx(0.0, abs=1e-12)
        assert_close(nra(maps, masks, backend=backend), oracle(naive_official_nra, maps, masks), atol=1e-6, rtol=0,
                     what=backend)
