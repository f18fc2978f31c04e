"""Ring prompts: geometry against a naive PIL drawing, every backend against the reference, and the input checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from fastcbm import _ext
from fastcbm.backends import BackendUnavailableError
from fastcbm.prompts import (
    CLIP_MEAN,
    CLIP_STD,
    OP,
    default_ring_geometry,
    render_rings,
    ring_centers,
    ring_masks,
)
from tests.conftest import assert_close, devices_under_test, runnable_backends

HALF_TOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}  # relative rounding of the output type (values |v| ≲ 2.2)

# (device, backend) pairs that can run here; reference included as a sanity baseline.
DEVICE_BACKENDS = [
    pytest.param(dev, b, marks=[pytest.mark.gpu] if dev == "cuda" else [], id=f"{dev}-{b}")
    for dev in devices_under_test()
    for b in runnable_backends(OP, device=dev)
]


def _images(b: int, s: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, s, s), generator=g, dtype=torch.uint8)


def _naive_ring(size: int, cy: float, cx: float, r: float, w: float) -> np.ndarray:
    """The rule, literally: PIL ``point`` on every pixel with |sqrt(dx² + dy²) − r| ≤ w/2 (box-limited loop)."""
    im = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(im)
    reach = r + w / 2 + 1
    for y in range(max(0, math.floor(cy - reach)), min(size, math.ceil(cy + reach) + 1)):
        for x in range(max(0, math.floor(cx - reach)), min(size, math.ceil(cx + reach) + 1)):
            if abs(math.sqrt((x - cx) ** 2 + (y - cy) ** 2) - r) <= w / 2:
                draw.point((x, y), fill=255)
    return np.asarray(im) > 0


@pytest.mark.parametrize(
    "size,grid,radius,width,mode",
    [
        (16, (2, 2), 3, 1, "inset"),
        (23, (3, 2), 4.5, 2, "paper"),
        (32, 3, 5, 2, "inset"),
        (33, (1, 3), 7.25, 1.5, "paper"),
        (31, 2, 1, 4, "inset"),  # r < w/2: filled disks
        (224, 7, 32, 2, "inset"),
        (224, 7, 32, 2, "paper"),
    ],
)
def test_ring_masks_match_naive_pil_points(size, grid, radius, width, mode):
    masks = ring_masks(size, grid, radius, width, mode).numpy()
    cents = ring_centers(size, grid, radius, mode).tolist()
    assert masks.shape == (len(cents), size, size) and masks.dtype == np.bool_
    for g, (cy, cx) in enumerate(cents):
        expected = _naive_ring(size, cy, cx, float(radius), float(width))
        diff = int((masks[g] ^ expected).sum())
        assert diff == 0, f"ring {g} at ({cy}, {cx}): {diff} px differ"


def test_boundary_pixels_count_as_on_ring():
    # Integer centre, r = 3, w = 2: pixels at distance exactly 2 and 4 are on the ring, 1.99.. and 4.12 are not.
    m = ring_masks(9, 1, 3, 2, centers=torch.tensor([[4.0, 4.0]]))[0]
    assert m[4, 6] and m[4, 8] and m[0, 4] and not m[4, 4] and not m[3, 0] and not m[4, 5]


def test_compare_with_pil_ellipse_outline():
    # Informational: PIL's ellipse(outline, width) rasterises differently (bounding-box convention, its own edge
    # rule). Measured: IoU 0.57 at the 224 defaults (412 px ours vs 388 px PIL); every PIL pixel lies within 1 px of
    # our ring, so the two are the same ring up to a one-pixel shift of the edge.
    size, r, w = 224, 32, 2
    ours = ring_masks(size, 1, r, w)[0].numpy()
    cy, cx = ring_centers(size, 1, r)[0].tolist()
    im = Image.new("1", (size, size))
    R = r + w / 2
    ImageDraw.Draw(im).ellipse([cx - R, cy - R, cx + R, cy + R], outline=1, width=w)
    pil = np.asarray(im)
    iou = (pil & ours).sum() / (pil | ours).sum()
    assert 0.4 < iou < 1.0, iou
    near = torch.nn.functional.max_pool2d(torch.from_numpy(ours).float()[None, None], 3, 1, 1)[0, 0].numpy() > 0
    assert (pil & ~near).sum() == 0


def test_render_matches_pil_red_drawing():
    # End to end: draw the rings in red with PIL on the decoded image, normalise with torch, compare.
    imgs = _images(2, 23, seed=3)
    out = render_rings(imgs, grid=(2, 2), radius=4, width=2, centers="paper", include_plain=True, backend="cpu")
    cents = ring_centers(23, (2, 2), 4, "paper").tolist()
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float64)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=torch.float64)[:, None, None]
    for b in range(2):
        base = Image.fromarray(imgs[b].permute(1, 2, 0).numpy())
        for k in range(5):
            im = base.copy()
            if k > 0:
                ring = _naive_ring(23, *cents[k - 1], 4.0, 2.0)
                ImageDraw.Draw(im).point([(int(x), int(y)) for y, x in zip(*np.nonzero(ring))], fill=(255, 0, 0))
            t = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).double() / 255.0
            assert_close(out[b, k], (t - mean) / std, atol=1e-6, rtol=1e-6, what=f"image {b} slot {k}")


CASES = [
    # B, S, grid, radius, width, centers, include_plain
    (1, 16, 1, 3, 2, "inset", False),
    (2, 23, (3, 2), 4.5, 1.5, "paper", True),
    (1, 32, 2, 6, 2, "inset", True),
    (3, 17, (1, 2), 2.5, 3, "inset", False),
    (2, 16, 2, 1, 4, "paper", False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-S{c[1]}-g{c[2]}-{c[5]}-plain{int(c[6])}")
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_backends_match_reference(device, backend, case, dtype):
    B, S, grid, r, w, mode, plain = case
    imgs = _images(B, S, seed=S).to(device)
    kw = dict(grid=grid, radius=r, width=w, centers=mode, out_dtype=dtype, include_plain=plain)
    ref = render_rings(imgs.cpu(), backend="reference", **kw)
    out = render_rings(imgs, backend=backend, **kw)
    assert out.dtype == dtype and out.device.type == device and out.is_contiguous()
    assert out.shape == (B, ref.shape[1], 3, S, S)
    out = out.cpu()
    if dtype == torch.float32:
        assert_close(out, ref, atol=1e-6, rtol=0, what=backend)
    if backend in ("reference", "cpu", "cuda") or dtype != torch.bfloat16:
        # Same float32 table, RNE rounding: bit-identical (the Triton interpreter truncates to bfloat16).
        assert torch.equal(out.view(torch.int16 if dtype != torch.float32 else torch.int32),
                           ref.view(torch.int16 if dtype != torch.float32 else torch.int32)), backend
    else:
        assert_close(out, ref, atol=0, rtol=HALF_TOL[dtype], what=backend)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_noncontiguous_explicit_centers_and_no_normalisation(device, backend):
    base = _images(2, 20, seed=7).to(device)
    imgs = base.permute(0, 1, 3, 2)[:, [2, 0, 1]]  # transposed and channel-shuffled: not contiguous
    assert not imgs.is_contiguous()
    cents = torch.tensor([[0.0, 0.0], [9.5, 3.25], [19.0, 22.0]], dtype=torch.float64)  # last centre off the image
    kw = dict(radius=3.5, width=1, centers=cents, mean=None, std=None, include_plain=True)
    ref = render_rings(imgs.cpu().contiguous(), backend="reference", **kw)
    out = render_rings(imgs, backend=backend, **kw).cpu()
    assert out.shape == (2, 4, 3, 20, 20)
    assert torch.equal(out, ref)
    # mean/std None: values are pixel/255, rings pure red (1, 0, 0).
    assert torch.equal(out[:, 0], imgs.cpu().double().div(255).float())
    on = ring_masks(20, radius=3.5, width=1, centers=cents)
    assert on.any(dim=(1, 2)).all()
    red = out[:, 1:].permute(0, 2, 1, 3, 4)[:, :, on]  # [B, 3, n_on]
    assert (red[:, 0] == 1).all() and (red[:, 1:] == 0).all()


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_include_plain_and_empty_batch(device, backend):
    imgs = _images(1, 19, seed=1).to(device)
    kw = dict(grid=2, radius=4, backend=backend)
    with_plain = render_rings(imgs, include_plain=True, **kw).cpu()
    without = render_rings(imgs, **kw).cpu()
    assert torch.equal(with_plain[:, 1:], without)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float64)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=torch.float64)[:, None, None]
    plain = ((imgs.cpu().double() / 255.0 - mean) / std).float()
    assert torch.equal(with_plain[:, 0], plain)
    empty = render_rings(imgs[:0], include_plain=True, **kw)
    assert empty.shape == (0, 5, 3, 19, 19)


@pytest.mark.gpu
def test_cuda_default_geometry_matches_reference():
    imgs = _images(3, 224, seed=11).cuda()
    ref = render_rings(imgs.cpu(), backend="reference", out_dtype=torch.bfloat16, include_plain=True)
    for backend in [b for b in runnable_backends(OP, device="cuda") if b in ("cuda", "triton")]:
        out = render_rings(imgs, backend=backend, out_dtype=torch.bfloat16, include_plain=True).cpu()
        assert torch.equal(out.view(torch.int16), ref.view(torch.int16)), backend


def test_cpp_rounding_matches_torch():
    ext = _ext.cpu_ext()
    if ext is None:
        pytest.skip("C++ extension not built")
    g = torch.Generator().manual_seed(0)
    x = torch.cat([
        torch.randn(20000, generator=g) * torch.exp2(torch.randint(-30, 20, (20000,), generator=g).float()),
        torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e-8, 2.0**-24, 2.0**-25, 3 * 2.0**-26,
                      math.inf, -math.inf, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 3.4e38]),
        torch.randint(-(2**31), 2**31 - 1, (20000,), generator=g, dtype=torch.int32).view(torch.float32),
    ])
    x = x[torch.isfinite(x) | torch.isinf(x)]  # NaN payloads differ legitimately; checked separately below
    for dtype, bf16 in ((torch.float16, False), (torch.bfloat16, True)):
        got = torch.from_numpy(ext.prompts_round_to_16(x.numpy(), bf16).view(np.int16))
        assert torch.equal(got, x.to(dtype).view(torch.int16)), dtype
        nan = torch.from_numpy(ext.prompts_round_to_16(np.array([np.nan], np.float32), bf16).view(np.int16))
        assert nan.view(dtype).isnan().all()


def test_centers_geometry_and_defaults():
    assert default_ring_geometry(224) == (32.0, 2.0)
    assert default_ring_geometry(336) == (48.0, 2.0)
    assert default_ring_geometry(288)[0] == pytest.approx(32 * 288 / 224)
    c = ring_centers(224)
    assert c.shape == (49, 2) and c.dtype == torch.float32
    lin = torch.linspace(32, 223 - 32, 7)
    assert_close(c[:, 0], lin.repeat_interleave(7), atol=1e-5, rtol=0, what="inset y")
    assert_close(c[:, 1], lin.repeat(7), atol=1e-5, rtol=0, what="inset x")
    p = ring_centers(224, (7, 7), 32, "paper")
    assert p[:7, 1].tolist() == [37.0 * k for k in range(7)] and (p[:7, 0] == 0).all()  # g = row·Gx + col
    rect = ring_centers(30, (2, 3), 4)
    assert rect.shape == (6, 2) and rect[:3, 0].tolist() == [4.0] * 3 and rect[3, 0] == 25.0
    assert ring_centers(31, 1, 5).tolist() == [[15.0, 15.0]]  # a single ring is centred
    assert ring_centers(31, 1, 5, "paper").tolist() == [[0.0, 0.0]]
    m = ring_masks(224)
    assert m.shape == (49, 224, 224) and m.dtype == torch.bool
    assert torch.equal(ring_masks(64, radius=9), ring_masks(64, (7, 7), 9, 2, "inset"))
    # radius=None takes the size-scaled default.
    imgs = _images(1, 112, seed=2)
    assert torch.equal(render_rings(imgs, grid=2, radius=None, backend="reference"),
                       render_rings(imgs, grid=2, radius=16.0, backend="reference"))


def _bad(match, images=None, **kw):
    images = _images(1, 16) if images is None else images
    kw.setdefault("radius", 3)
    with pytest.raises(ValueError, match=match):
        render_rings(images, **kw)


def test_value_errors():
    _bad("images must be uint8", images=torch.zeros(1, 3, 16, 16))
    _bad("images must be a torch.Tensor", images=np.zeros((1, 3, 16, 16), np.uint8))
    _bad("rank 3", images=torch.zeros(3, 16, 16, dtype=torch.uint8))
    _bad("3 channels", images=torch.zeros(1, 4, 16, 16, dtype=torch.uint8))
    _bad("square", images=torch.zeros(1, 3, 16, 17, dtype=torch.uint8))
    _bad("grid must be >= 1", grid=0)
    _bad("grid must be >= 1", grid=(3, 0))
    _bad("grid must be an int or a pair", grid=(1, 2, 3))
    _bad("grid must be an int or a pair", grid=2.5)
    _bad("radius must be a positive", radius=0)
    _bad("radius must be a positive", radius=-1.5)
    _bad("radius must be a positive", radius=float("nan"))
    _bad("width must be a positive", width=0)
    _bad("too large for centers='inset'", radius=8)  # 2r = 16 > S−1 = 15
    _bad("centers must be one of", centers="middle")
    _bad("centers tensor must be a float tensor", centers=torch.zeros(3, 3))
    _bad("centers tensor must be a float tensor", centers=torch.zeros(3, 2, dtype=torch.long))
    _bad("centers tensor must be a float tensor", centers=torch.zeros(0, 2))
    _bad("centers tensor must contain only finite", centers=torch.tensor([[1.0, math.nan]]))
    _bad("mean must have 3 values", mean=(0.5, 0.5))
    _bad("std must have 3 values", std=(0.5,) * 4)
    _bad("std must not contain 0", std=(0.5, 0.0, 0.5))
    _bad("mean must be a sequence", mean=0.5)
    _bad("out_dtype must be one of", out_dtype=torch.float64)
    _bad("backend='fast'", backend="fast")
    with pytest.raises(ValueError, match="size must be a positive int"):
        ring_masks(0)
    with pytest.raises(ValueError, match="too large"):
        ring_centers(10, 2, 5)


def test_paper_mode_allows_large_radius_and_clipping():
    out = render_rings(_images(1, 16), grid=2, radius=8, centers="paper", backend="reference")
    assert out.shape == (1, 4, 3, 16, 16)


def test_unavailable_backend_errors():
    with pytest.raises(BackendUnavailableError, match="render_rings: backend 'cuda' cannot run"):
        render_rings(_images(1, 16), radius=3, backend="cuda")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_render_into_a_given_buffer(device, backend, dtype):
    """out=: the encoder's input buffer is written in place (reused across batches: stale values are overwritten)."""
    imgs = _images(2, 21, seed=5).to(device)
    want = render_rings(imgs, grid=2, radius=4, out_dtype=dtype, include_plain=True, backend="reference")
    buf = torch.full((2, 5, 3, 21, 21), float("nan"), dtype=dtype, device=device)
    got = render_rings(imgs, grid=2, radius=4, out_dtype=dtype, include_plain=True, backend=backend, out=buf)
    assert got is buf
    if backend == "triton" and dtype == torch.bfloat16 and device == "cpu":  # the interpreter truncates to bf16
        assert_close(buf.cpu(), want, atol=0, rtol=HALF_TOL[dtype], what=backend)
    else:
        assert torch.equal(buf.cpu().view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           want.cpu().view(torch.int16 if dtype == torch.bfloat16 else torch.int32))


@pytest.mark.parametrize("bad, match", [
    (lambda: torch.empty(2, 4, 3, 21, 21), r"shape \[2, 5, 3, 21, 21\]"),
    (lambda: torch.empty(2, 5, 3, 21, 21, dtype=torch.float16), "float32"),
    (lambda: torch.empty(2, 5, 3, 21, 42)[..., ::2], "not contiguous"),
    (lambda: "buffer", "must be a torch.Tensor"),
])
def test_bad_out_buffer(bad, match):
    from fastcbm.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match=match):
        render_rings(_images(2, 21), grid=2, radius=4, include_plain=True, out=bad())
