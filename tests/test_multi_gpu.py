"""Several GPUs, for real: every compiled backend of every op on tensors of cuda:1 while cuda:0 is the current device
matches the CPU reference, leaves its output on cuda:1 and does not change the current device. Needs two GPUs
(bench/gpu_check.sh runs it; tests/test_device_guards.py checks the same structure without a GPU)."""

from __future__ import annotations

import pytest
import torch

from fastcbm import backends
from tests.conftest import assert_close

pytestmark = pytest.mark.gpu
TWO_GPUS = torch.cuda.is_available() and torch.cuda.device_count() >= 2
needs_two = pytest.mark.skipif(not TWO_GPUS, reason="needs a second GPU (cuda:1)")
DEV = torch.device("cuda", 1)


def _runnable(op: str, variant: str = "default") -> list[str]:
    return [b for b in backends.implemented(op, variant) if b in ("triton", "cuda")
            and backends.backend_problem(b, DEV) is None] if TWO_GPUS else []


def _on_gpu1(fn):
    """Run fn with cuda:0 current; check the current device afterwards."""
    torch.cuda.set_device(0)
    out = fn()
    torch.cuda.synchronize(DEV)
    assert torch.cuda.current_device() == 0, "a launcher changed the current device"
    return out


@needs_two
@pytest.mark.parametrize("backend", _runnable("prompts.render_rings"))
def test_render_rings(backend):
    from fastcbm.prompts import render_rings

    imgs = torch.randint(0, 256, (3, 3, 48, 48), dtype=torch.uint8)
    want = render_rings(imgs, grid=3, out_dtype=torch.bfloat16, include_plain=True, backend="reference")
    got = _on_gpu1(lambda: render_rings(imgs.to(DEV), grid=3, out_dtype=torch.bfloat16, include_plain=True,
                                        backend=backend))
    assert got.device == DEV and torch.equal(got.cpu().view(torch.int16), want.view(torch.int16))


@needs_two
@pytest.mark.parametrize("variant", ["official", "paper"])
def test_nra_and_epg(variant):
    from fastcbm.metrics import epg, nra

    gen = torch.Generator().manual_seed(0)
    maps, masks = torch.rand(9, 20, 23, generator=gen), torch.rand(9, 20, 23, generator=gen) > 0.6
    for backend in _runnable("metrics.nra", variant):
        got = _on_gpu1(lambda b=backend: nra(maps.to(DEV), masks.to(DEV), variant=variant, backend=b))
        assert got.device == DEV
        assert_close(got, nra(maps, masks, variant=variant, backend="reference"), atol=1e-9, rtol=0, what=backend)
    for backend in _runnable("metrics.epg"):
        got = _on_gpu1(lambda b=backend: epg(maps.to(DEV), masks.to(DEV), backend=b))
        assert_close(got, epg(maps, masks, backend="reference"), atol=1e-9, rtol=1e-9, what=backend)


@needs_two
@pytest.mark.parametrize("backend", _runnable("cam.fuse", "forward"))
def test_cam_fuse(backend):
    from fastcbm.cam import fuse, fuse_reference

    w, a = torch.randn(2, 5, 16), torch.randn(2, 16, 7, 7)
    got = _on_gpu1(lambda: fuse(w.to(DEV), a.to(DEV), size=(30, 30), normalize=True, backend=backend))
    assert got.device == DEV
    assert_close(got, fuse_reference(w.double(), a.double(), (30, 30), True), atol=1e-4, rtol=1e-4, what=backend)


@needs_two
@pytest.mark.parametrize("backend", _runnable("losses.cubic_cosine_loss"))
def test_cubic_loss_forward_backward(backend):
    from fastcbm.losses import cubic_cosine_loss

    g = torch.Generator().manual_seed(1)
    W, F = torch.randn(6, 8, generator=g) / 3, torch.randn(17, 8, 5, generator=g)
    E, T = torch.randn(17, 5, 12, generator=g), torch.randn(6, 12, generator=g)

    def run(dev, b):
        w = W.to(dev).requires_grad_(True)
        f = F.to(dev).requires_grad_(True)
        loss = cubic_cosine_loss(w, f, E.to(dev), T.to(dev), backend=b)
        loss.backward()
        return loss.detach(), w.grad, f.grad

    want = run("cpu", "reference")
    got = _on_gpu1(lambda: run(DEV, backend))
    for name, x, y in zip(("loss", "dW", "dF"), got, want):
        assert x.device == DEV
        assert_close(x, y, atol=1e-5 * float(y.abs().max() + 1e-3), rtol=1e-5, what=f"{backend} {name}")


def test_reports_why_it_skips():
    if not TWO_GPUS:
        pytest.skip(f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} GPU(s) visible: the cuda:1 "
                    "checks need two")
