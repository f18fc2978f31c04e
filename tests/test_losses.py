"""Fused cubic-cosine loss: every runnable backend against the float64 reference (loss, dW, dF), awkward shapes,
non-contiguous inputs, zero-variance columns, errors. Triton runs in its interpreter here, so its cases are tiny."""

from __future__ import annotations

import pytest
import torch

from fastcbm.backends import BackendUnavailableError
from fastcbm.losses import (
    OP,
    cubic_cosine_loss,
    cubic_cosine_loss_reference,
    cubic_cosine_similarity,
)
from tests.conftest import assert_close, devices_under_test, runnable_backends

FAST = [b for b in runnable_backends(OP) if b != "reference"]
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def make_inputs(B, C, L, D, M, dtype=torch.float32, device="cpu", seed=0, layout="contiguous"):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(M, C, generator=g, dtype=torch.float64) / C**0.5
    F = torch.randn(B, C, L, generator=g, dtype=torch.float64).relu() + 0.1 * torch.randn(B, C, L, generator=g)
    E = torch.nn.functional.normalize(torch.randn(B, L, D, generator=g, dtype=torch.float64), dim=-1)
    T = torch.nn.functional.normalize(torch.randn(M, D, generator=g, dtype=torch.float64), dim=-1)
    W, F, E, T = (t.to(device=device, dtype=dtype) for t in (W, F, E, T))
    if layout == "noncontiguous":  # same values, strided storage
        W = W.t().contiguous().t()
        F = F.permute(2, 0, 1).contiguous().permute(1, 2, 0)
        E = torch.cat([E, E], dim=2)[:, :, :D]
        T = T.t().contiguous().t()
        assert not E.is_contiguous()
    return W, F, E, T


def loss_and_grads(backend, W, F, E, T, **kw):
    W = W.detach().clone().requires_grad_(True)
    F = F.detach().clone().requires_grad_(True)
    loss = cubic_cosine_loss(W, F, E, T, backend=backend, **kw)
    loss.backward()
    return loss.detach(), W.grad, F.grad


def expected(W, F, E, T):
    """The reference evaluated in float64 (the fp32 fused backends accumulate in fp64 and beat the fp32 reference)."""
    return loss_and_grads("reference", *(t.double() for t in (W, F, E, T)))


def check(got, want, dtype, what):
    tol = TOL[dtype]
    for name, g, w in zip(("loss", "dW", "dF"), got, want):
        # The loss is a mean of cosines of both signs; scale atol by the typical magnitude, not by the mean.
        scale = float(w.abs().max()) if name != "loss" else float(w.abs()) + 1e-3
        assert_close(g, w, rtol=tol, atol=tol * scale, what=f"{what} {name}")


SHAPES_CPU = [  # B, C, L, D, M (B=2 is degenerate for gradients: see test_batch_of_two)
    (3, 3, 1, 4, 1),
    (5, 17, 9, 16, 7),
    (37, 3, 4, 5, 2),
    (64, 32, 49, 16, 3),
    (129, 11, 2, 7, 13),
]
SHAPES_TRITON = [(3, 3, 1, 4, 1), (5, 17, 3, 16, 7), (19, 5, 2, 4, 2)]


@pytest.mark.skipif("cpu" not in FAST, reason="C++ extension not built")
@pytest.mark.parametrize("shape", SHAPES_CPU)
@pytest.mark.parametrize("batch_tile", [None, 3])
@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous"])
def test_cpu_matches_reference_fp32(shape, batch_tile, layout):
    W, F, E, T = make_inputs(*shape, layout=layout)
    got = loss_and_grads("cpu", W, F, E, T, batch_tile=batch_tile)
    check(got, expected(W, F, E, T), torch.float32, f"cpu {shape} tile={batch_tile} {layout}")


@pytest.mark.skipif("cpu" not in FAST, reason="C++ extension not built")
def test_cpu_large_batch_fp32():
    # B=4096 in fp32: fp64 centring and accumulation keep 1e-5 relative agreement with the exact (fp64) value.
    W, F, E, T = make_inputs(4096, 16, 3, 8, 5, seed=3)
    check(loss_and_grads("cpu", W, F, E, T), expected(W, F, E, T), torch.float32, "cpu B=4096")


@pytest.mark.skipif("cpu" not in FAST, reason="C++ extension not built")
def test_cpu_one_sample_tiles():
    W, F, E, T = make_inputs(11, 6, 5, 4, 3, layout="noncontiguous")
    check(loss_and_grads("cpu", W, F, E, T, batch_tile=1), expected(W, F, E, T), torch.float32, "cpu tile=1")


@pytest.mark.skipif("cpu" not in FAST, reason="C++ extension not built")
@pytest.mark.parametrize("shape", [(3, 3, 1, 4, 1), (33, 9, 5, 6, 4)])
def test_cpu_matches_reference_fp64(shape):
    W, F, E, T = make_inputs(*shape, dtype=torch.float64)
    check(loss_and_grads("cpu", W, F, E, T, batch_tile=7), expected(W, F, E, T), torch.float64, f"cpu fp64 {shape}")


@pytest.mark.skipif("triton" not in FAST, reason="triton cannot run here")
@pytest.mark.parametrize("shape", SHAPES_TRITON)
@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous"])
def test_triton_matches_reference(shape, layout):
    W, F, E, T = make_inputs(*shape, layout=layout)
    got = loss_and_grads("triton", W, F, E, T, batch_tile=4)  # several tiles, including a partial one
    check(got, expected(W, F, E, T), torch.float32, f"triton {shape} {layout}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("shape", [(300, 64, 49, 32, 50), (4, 7, 3, 5, 2), (70, 33, 5, 17, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous"])
def test_gpu_backends_match_reference(backend, shape, dtype, layout):
    W, F, E, T = make_inputs(*shape, dtype=dtype, device="cuda", layout=layout)
    want = expected(W, F, E, T)
    check(loss_and_grads(backend, W, F, E, T), want, dtype, f"{backend} cuda {shape} {layout}")
    # several tiles, a partial last one; for cuda also the row-chunked accumulate (few columns)
    check(loss_and_grads(backend, W, F, E, T, batch_tile=3), want, dtype, f"{backend} cuda {shape} tiles of 3")


@pytest.mark.gpu
def test_cuda_full_fp32_under_tf32():
    """The cuda backend's cuBLAS GEMMs stay IEEE fp32 even when the caller enabled TF32 (the loss cubes errors)."""
    W, F, E, T = make_inputs(200, 96, 9, 64, 40, device="cuda")
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        got = loss_and_grads("cuda", W, F, E, T)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    check(got, expected(W, F, E, T), torch.float32, "cuda under allow_tf32")


@pytest.mark.parametrize("backend", runnable_backends(OP))
def test_zero_variance_columns_finite_and_match(backend):
    # Exactly zero columns: every backend sees a = 0 (resp. b = 0) exactly, so cos = 0 there by the eps semantics.
    W, F, E, T = make_inputs(6, 5, 3, 4, 2)
    F[:, :, 0] = 0.0  # q[:, :, l=0] == 0
    E[:, 1, :] = 0.0  # p[:, :, l=1] == 0
    got = loss_and_grads(backend, W, F, E, T)
    assert all(torch.isfinite(t).all() for t in got)
    check(got, expected(W, F, E, T), torch.float32, f"{backend} zero columns")
    # Constant, non-zero columns (rounding noise only): finite loss and gradients.
    F[:, :, 1] = 0.5
    E[:, 2, :] = E[0, 2, :]
    got = loss_and_grads(backend, W, F, E, T)
    assert all(torch.isfinite(t).all() for t in got), f"{backend}: non-finite result on constant columns"


@pytest.mark.parametrize("backend", runnable_backends(OP))
def test_batch_of_two(backend):
    # Two centred samples are ±a: every column's cosine is exactly ±1, so the loss is -mean(sign) and the true
    # gradient is 0; what any backend returns is cancellation noise, which must stay tiny next to a real gradient.
    W, F, E, T = make_inputs(2, 5, 3, 4, 2)
    loss, dw, df = loss_and_grads(backend, W, F, E, T)
    want = expected(W, F, E, T)
    assert_close(loss, want[0], rtol=1e-6, atol=1e-6, what=f"{backend} B=2 loss")
    assert abs(float(loss) * 6 - round(float(loss) * 6)) < 1e-5  # -mean of 6 signs
    typical = expected(*make_inputs(3, 5, 3, 4, 2))
    assert float(dw.abs().max()) < 1e-3 * float(typical[1].abs().max()), f"{backend}: dW not ~0 at B=2"
    assert float(df.abs().max()) < 1e-3 * float(typical[2].abs().max()), f"{backend}: dF not ~0 at B=2"


@pytest.mark.parametrize("backend", FAST)
def test_large_eps_semantics(backend):
    # eps comparable to the column norms: every backend must add it to ‖x‖ exactly as the reference does.
    W, F, E, T = make_inputs(9, 4, 2, 5, 3)
    got = loss_and_grads(backend, W, F, E, T, eps=0.05)
    want = loss_and_grads("reference", *(t.double() for t in (W, F, E, T)), eps=0.05)
    check(got, want, torch.float32, f"{backend} eps=0.05")


def test_invariant_to_positive_affine_targets():
    # Why no target standardisation option: a positive per-concept affine map of p leaves the loss unchanged.
    W, F, E, T = make_inputs(10, 4, 3, 5, 3, dtype=torch.float64)
    q = torch.einsum("mc,bcl->bml", W, F)
    p = torch.einsum("bld,md->bml", E, T)
    scale = torch.rand(1, 3, 1, dtype=torch.float64) + 0.5
    a = cubic_cosine_similarity(q.reshape(10, -1), p.reshape(10, -1))
    b = cubic_cosine_similarity(q.reshape(10, -1), (scale * p + 3.0).reshape(10, -1))
    assert_close(a, b, rtol=1e-9, atol=1e-12, what="affine invariance")


def test_reference_gradcheck():
    W, F, E, T = make_inputs(3, 2, 2, 3, 2, dtype=torch.float64)
    W.requires_grad_(True)
    F.requires_grad_(True)
    E.requires_grad_(True)
    T.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *a: cubic_cosine_loss_reference(*a), (W, F, E, T))


@pytest.mark.skipif("cpu" not in FAST, reason="C++ extension not built")
def test_cpu_gradcheck():
    W, F, E, T = make_inputs(4, 3, 2, 3, 2, dtype=torch.float64)
    W.requires_grad_(True)
    F.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w, f: cubic_cosine_loss(w, f, E, T, backend="cpu", batch_tile=3), (W, F))


def test_weight_only_and_features_only_gradients():
    W, F, E, T = make_inputs(7, 4, 3, 5, 3)
    for backend in runnable_backends(OP):
        Wg = W.clone().requires_grad_(True)
        (dw,) = torch.autograd.grad(cubic_cosine_loss(Wg, F, E, T, backend=backend), Wg)
        Fg = F.clone().requires_grad_(True)
        (df,) = torch.autograd.grad(cubic_cosine_loss(W, Fg, E, T, backend=backend), Fg)
        want = expected(W, F, E, T)
        assert_close(dw, want[1], rtol=1e-5, atol=1e-5 * float(want[1].abs().max()), what=f"{backend} dW only")
        assert_close(df, want[2], rtol=1e-5, atol=1e-5 * float(want[2].abs().max()), what=f"{backend} dF only")


def test_cubic_cosine_similarity_definition():
    g = torch.Generator().manual_seed(1)
    q, p = torch.randn(9, 5, generator=g, dtype=torch.float64), torch.randn(9, 5, generator=g, dtype=torch.float64)
    a, b = (q - q.mean(0)) ** 3, (p - p.mean(0)) ** 3
    want = (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0))
    assert_close(cubic_cosine_similarity(q, p), want, rtol=1e-12, atol=1e-12, what="cos3")
    assert_close(cubic_cosine_similarity(q, q), torch.ones(5), rtol=1e-12, atol=1e-12, what="self")
    with pytest.raises(ValueError, match="p must have the shape"):
        cubic_cosine_similarity(q, p[:, :4])
    with pytest.raises(ValueError, match="at least 2"):
        cubic_cosine_similarity(q[:1], p[:1])
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        cubic_cosine_similarity(q[0], p[0])


@pytest.mark.parametrize("device", devices_under_test())
def test_auto_backend_matches(device):
    W, F, E, T = (t.to(device) for t in make_inputs(8, 6, 3, 5, 4))
    got = cubic_cosine_loss(W, F, E, T)
    want = cubic_cosine_loss_reference(*(t.double() for t in (W, F, E, T)))
    assert_close(got, want, rtol=1e-5, atol=1e-5 * (float(want.abs()) + 1e-3), what=f"auto on {device}")


def _bad(name):
    W, F, E, T = make_inputs(4, 3, 2, 5, 2)
    return {
        "B=1": ((W, F[:1], E[:1], T), "at least 2"),
        "weight dims": ((W[0], F, E, T), "weight must be"),
        "features C": ((W, F[:, :2], E, T), "features must be"),
        "prompt_emb B": ((W, F, E[:3], T), "prompt_emb must be"),
        "prompt_emb L": ((W, F, E[:, :1], T), "prompt_emb must be"),
        "text_emb D": ((W, F, E, T[:, :4]), "text_emb must be"),
        "text_emb M": ((W, F, E, T[:1]), "text_emb must be"),
        "dtype": ((W, F.double(), E, T), "features has dtype"),
        "int": ((W, F, E, T.to(torch.int32)), "text_emb must be a floating"),
    }[name]


@pytest.mark.parametrize(
    "case", ["B=1", "weight dims", "features C", "prompt_emb B", "prompt_emb L", "text_emb D", "text_emb M", "dtype",
             "int"]
)
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_bad_inputs_raise_value_error(case, backend):
    args, match = _bad(case)
    with pytest.raises(ValueError, match=match):
        cubic_cosine_loss(*args, backend=backend)


@pytest.mark.skipif("cpu" not in FAST, reason="C++ extension not built")
def test_fused_errors():
    W, F, E, T = make_inputs(4, 3, 2, 5, 2)
    with pytest.raises(ValueError, match="prompt_emb requires grad"):
        cubic_cosine_loss(W, F, E.requires_grad_(True), T, backend="cpu")
    E = E.detach()
    with pytest.raises(ValueError, match="float32 or float64"):
        cubic_cosine_loss(*(t.half() for t in (W, F, E, T)), backend="cpu")
    if "triton" in FAST:
        with pytest.raises(ValueError, match="float32 or float64"):
            cubic_cosine_loss(*(t.bfloat16() for t in (W, F, E, T)), backend="triton")
    with pytest.raises(ValueError, match="batch_tile"):
        cubic_cosine_loss(W, F, E, T, backend="cpu", batch_tile=0)
    with pytest.raises(ValueError, match="backend="):
        cubic_cosine_loss(W, F, E, T, backend="fast")
    with pytest.raises(BackendUnavailableError, match="'cuda' backend takes CUDA tensors"):
        cubic_cosine_loss(W, F, E, T, backend="cuda")


class _HostCudaModule:
    """The two CUDA entry points of csrc/losses/losses.cu, simulated on host memory (numpy over the raw pointers of
    CPU tensors), chunked partial sums and in-place gradient included: runs the cuda backend's launcher end to end
    on a machine without a GPU (the device code itself is compiled in CI and tested by the gpu-marked tests)."""

    calls: list[tuple[str, int]] = []

    @staticmethod
    def _view(ptr: int, n: int, f64: bool):
        import ctypes

        import numpy as np

        ctype = ctypes.c_double if f64 else ctypes.c_float
        return np.ctypeslib.as_array((ctype * n).from_address(ptr))

    def losses_cubic_accumulate(self, q, p, mu_q, mu_p, sums, workspace, rows, cols, chunks, is_f64, stream):
        import numpy as np

        assert 1 <= chunks <= rows and (chunks == 1 or workspace)
        self.calls.append(("accumulate", chunks))
        qa, pa = (self._view(x, rows * cols, is_f64).reshape(rows, cols) for x in (q, p))
        mq, mp = (self._view(x, cols, True) for x in (mu_q, mu_p))
        out = self._view(sums, 5 * cols, True).reshape(5, cols)
        per = -(-rows // chunks)
        partial = []
        for c in range(chunks):
            a = qa[c * per:(c + 1) * per].astype(np.float64) - mq
            b = pa[c * per:(c + 1) * per].astype(np.float64) - mp
            partial.append(np.stack([(a**3 * b**3).sum(0), (a**6).sum(0), (b**6).sum(0), (a**2 * b**3).sum(0),
                                     (a**5).sum(0)]))
        for part in partial:
            out += part

    def losses_cubic_gradient(self, q, p, mu_q, mu_p, coefs, out, rows, cols, is_f64, stream):
        self.calls.append(("gradient", 1))
        qa, pa, oa = (self._view(x, rows * cols, is_f64).reshape(rows, cols) for x in (q, p, out))
        mq, mp = (self._view(x, cols, True) for x in (mu_q, mu_p))
        al, be, gb = self._view(coefs, 3 * cols, True).reshape(3, cols)
        a, b = qa.astype("float64") - mq, pa.astype("float64") - mp
        oa[:] = a**2 * (al * b**3 - be * a**3) - gb


@pytest.mark.parametrize("shape", [(37, 6, 3, 5, 4), (5, 4, 2, 3, 70)])  # few columns (chunked rows) and many
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_launcher_on_a_host_simulation(monkeypatch, shape, dtype):
    import contextlib

    from fastcbm import _ext, backends

    sim = _HostCudaModule()
    sim.calls = []
    monkeypatch.setattr(_ext, "cuda_module", lambda: sim)
    monkeypatch.setattr(_ext, "expect_device", lambda *a, **k: None)
    monkeypatch.setattr(_ext, "on_device", lambda device: contextlib.nullcontext(0))
    monkeypatch.setattr(backends, "backend_problem", lambda name, device=None: None)
    W, F, E, T = make_inputs(*shape, dtype=dtype, layout="noncontiguous")
    got = loss_and_grads("cuda", W, F, E, T, batch_tile=4)
    check(got, expected(W, F, E, T), dtype, f"cuda launcher (host simulation) {shape}")
    assert {name for name, _ in sim.calls} == {"accumulate", "gradient"}
    assert any(chunks > 1 for name, chunks in sim.calls if name == "accumulate") == (shape[2] * shape[4] < 1000)
