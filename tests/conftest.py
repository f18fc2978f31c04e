"""Test configuration shared by the whole suite.

Triton has no CPU driver: its kernels run here in the numpy interpreter, which must be switched on before triton is
first imported. Without a GPU we set it; on a GPU machine we leave it off so the compiled kernels are tested.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastcbm.backends import DEFAULT_VARIANT, backend_problem, implemented  # noqa: E402
from fastcbm.utils import torch_threads  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of many small tensor ops: one torch thread (fast on a shared 2-core box, deterministic).
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    with torch_threads(1):
        yield


def devices_under_test() -> list[str]:
    """Devices to run op tests on: always CPU, plus CUDA when present."""
    return ["cpu", "cuda"] if HAS_CUDA else ["cpu"]


def runnable_backends(op: str, variant: str = DEFAULT_VARIANT, device: str = "cpu") -> list[str]:
    """The backends the op registry lists for ``op``/``variant`` that can run on ``device`` here (for parametrize)."""
    dev = torch.device(device)
    return [b for b in implemented(op, variant) if backend_problem(b, dev) is None]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, what: str = "") -> None:
    """torch.testing.assert_close with a message that names the worst mismatch and where it is."""
    actual = actual.detach().cpu().double()
    expected = expected.detach().cpu().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if actual.numel() == 0:
        return
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    excess = err - bound
    worst = int(torch.argmax(excess))
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), actual.shape))
    assert bool((excess <= 0).all()), (
        f"{what}: {int((excess > 0).sum())}/{actual.numel()} elements out of tolerance (atol={atol}, rtol={rtol}); "
        f"worst at {idx}: got {actual.flatten()[worst].item():.9g}, expected {expected.flatten()[worst].item():.9g}, "
        f"|diff|={err.flatten()[worst].item():.3g}"
    )
