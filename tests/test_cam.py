"""fastcbm.cam.fuse: every runnable backend against the pure-torch reference (and the reference against a loop)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastcbm.backends import BackendUnavailableError
from fastcbm.cam import OP, fuse, fuse_reference
from tests.conftest import HAS_CUDA, assert_close, runnable_backends

pytestmark = pytest.mark.usefixtures("one_thread")
BACKENDS = runnable_backends(OP, "forward")
TOL = {torch.float32: {"atol": 2e-6, "rtol": 2e-6}, torch.float16: {"atol": 2e-3, "rtol": 2e-3},
       torch.bfloat16: {"atol": 1e-2, "rtol": 1e-2}}


def inputs(b: int, t: int, c: int, h: int, w: int, dtype=torch.float32, contiguous: bool = True, seed: int = 0,
           device: str = "cpu"):
    gen = torch.Generator().manual_seed(seed)
    weights = torch.randn(b, t, c, generator=gen)
    acts = torch.randn(b, c, h, w, generator=gen)
    if not contiguous:  # strided views: weights transposed in memory, acts channels-last-like
        weights = torch.randn(b, c, t, generator=gen).transpose(1, 2)
        acts = torch.randn(b, h, w, c, generator=gen).permute(0, 3, 1, 2)
    return weights.to(device, dtype), acts.to(device, dtype)


# (shape (B, T, C, h, w), size, normalize, contiguous): odd sizes, size 1, up/down/anisotropic resizes, strided views
CASES = [
    ((1, 1, 1, 1, 1), None, True, True),
    ((1, 1, 1, 1, 1), (5, 3), False, False),
    ((2, 3, 5, 7, 6), None, False, False),
    ((2, 3, 5, 7, 6), (1, 1), True, True),
    ((2, 3, 5, 7, 6), (17, 23), True, False),
    ((2, 3, 5, 7, 6), (17, 23), False, True),
    ((1, 4, 3, 1, 9), (5, 3), True, False),
    ((1, 4, 3, 1, 9), (2, 40), False, True),
    ((2, 5, 16, 3, 3), (2, 40), True, True),
    ((2, 5, 16, 3, 3), None, True, False),
]


def loop_oracle(weights, acts, size, normalize):
    """Map by map, in float64: ReLU(Σ_c w_c A_c) → F.interpolate → min-max (constant map → 0)."""
    b, t, _ = weights.shape
    out = []
    for i in range(b):
        for j in range(t):
            m = torch.relu((weights[i, j, :, None, None].double() * acts[i].double()).sum(0))
            if size is not None:
                m = F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
            if normalize:
                span = m.max() - m.min()
                m = (m - m.min()) / span if span > 0 else torch.zeros_like(m)
            out.append(m)
    return torch.stack(out).reshape(b, t, *out[0].shape)


@pytest.mark.parametrize("shape, size, normalize, _contiguous", CASES)
def test_reference_matches_loop(shape, size, normalize, _contiguous):
    weights, acts = inputs(*shape, seed=sum(shape))
    assert_close(fuse_reference(weights, acts, size, normalize), loop_oracle(weights, acts, size, normalize),
                 atol=1e-5, rtol=1e-5, what="reference vs loop")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, size, normalize, contiguous", CASES)
def test_backends_match_reference_fp32(backend, shape, size, normalize, contiguous):
    weights, acts = inputs(*shape, contiguous=contiguous, seed=len(shape) + shape[1])
    got = fuse(weights, acts, size=size, normalize=normalize, backend=backend)
    assert got.dtype == torch.float32 and got.shape == (shape[0], shape[1], *(size or shape[3:]))
    assert_close(got, fuse_reference(weights, acts, size, normalize), **TOL[torch.float32], what=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("size, normalize", [(None, False), ((9, 11), True)])
def test_backends_half_precision(backend, dtype, size, normalize):
    weights, acts = inputs(2, 3, 6, 5, 4, dtype=dtype)
    got = fuse(weights, acts, size=size, normalize=normalize, backend=backend)
    assert got.dtype == dtype
    expected = fuse_reference(weights.float(), acts.float(), size, normalize)  # same rounded inputs, fp32 math
    assert_close(got, expected, **TOL[dtype], what=f"{backend} {dtype}")


def test_all_zero_map_stays_zero_and_normalized_range():
    weights, acts = inputs(1, 3, 4, 6, 6)
    weights[0, 1] = -weights[0, 1].abs()
    acts = acts.abs()  # concept 1: Σ w·A < 0 everywhere → all zero after the ReLU
    for backend in BACKENDS:
        out = fuse(weights, acts, size=(12, 12), normalize=True, backend=backend)
        assert torch.all(out[0, 1] == 0), backend
        for j in (0, 2):
            if out[0, j].max() > 0:
                assert out[0, j].min() == 0 and abs(out[0, j].max().item() - 1) < 1e-6, backend


def test_reference_is_differentiable_and_auto_uses_it_for_grad():
    weights, acts = inputs(2, 3, 4, 5, 5, dtype=torch.float64)
    weights.requires_grad_(True)
    acts.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w, a: fuse(w, a, size=(7, 6), normalize=True), (weights, acts))
    w32, a32 = inputs(1, 2, 3, 4, 4)
    w32.requires_grad_(True)
    out = fuse(w32, a32, size=(6, 6))  # auto: reference because a gradient is needed
    out.sum().backward()
    assert w32.grad is not None and w32.grad.abs().sum() > 0


def test_compiled_backends_refuse_grad():
    for backend in [b for b in BACKENDS if b != "reference"]:
        weights, acts = inputs(1, 2, 3, 4, 4)
        weights.requires_grad_(True)
        with pytest.raises(BackendUnavailableError, match=f"no '{backend}' implementation.*forward-only"):
            fuse(weights, acts, backend=backend)


@pytest.mark.parametrize("bad, match", [
    (lambda w, a: (w[0], a), "weights must be"),
    (lambda w, a: (w, a[0]), "acts must be"),
    (lambda w, a: (w[:, :, :2], a), "do not match"),
    (lambda w, a: (w, a.double()), "one float dtype"),
    (lambda w, a: (w.long(), a.long()), "one float dtype"),
])
def test_bad_inputs(bad, match):
    weights, acts = inputs(2, 3, 4, 5, 5)
    with pytest.raises(ValueError, match=match):
        fuse(*bad(weights, acts))


@pytest.mark.parametrize("size", [(0, 3), (3,), "ab", 5])
def test_bad_size(size):
    weights, acts = inputs(1, 2, 3, 4, 4)
    with pytest.raises(ValueError, match="size must be"):
        fuse(weights, acts, size=size)


def test_unknown_or_missing_backend():
    weights, acts = inputs(1, 2, 3, 4, 4)
    with pytest.raises(ValueError, match="backend"):
        fuse(weights, acts, backend="nope")
    if not HAS_CUDA:
        with pytest.raises(BackendUnavailableError):
            fuse(weights, acts, backend="cuda")


def test_empty_concepts():
    weights, acts = inputs(2, 0, 3, 4, 4)
    for backend in BACKENDS:
        assert fuse(weights, acts, size=(5, 5), backend=backend).shape == (2, 0, 5, 5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("normalize", [False, True])
def test_gpu_backends(backend, normalize):
    weights, acts = inputs(3, 37, 64, 7, 7, device="cuda")
    got = fuse(weights, acts, size=(224, 224), normalize=normalize, backend=backend)
    expected = fuse_reference(weights.double(), acts.double(), (224, 224), normalize)
    assert_close(got, expected, atol=1e-4, rtol=1e-4, what=backend)  # TF32 may be on for the GEMM
    half = fuse(weights.half(), acts.half(), size=(33, 17), normalize=normalize, backend=backend)
    assert_close(half, fuse_reference(weights.half().float(), acts.half().float(), (33, 17), normalize),
                 atol=3e-3, rtol=3e-3, what=f"{backend} fp16")
