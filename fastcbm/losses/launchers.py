"""Launchers of the fused cubic-cosine loss backends: the streamed forward sums and the recomputed backward tiles,
and the Triton launch tables. The maths (what is summed, the gradient coefficients) is in :mod:`fastcbm.losses.ops`.

A fused backend is a :class:`FusedLoss`: ``forward(W, F, E, T, mu_q, mu_p, tile) -> sums [5, L·M]`` (fp64) and
``backward(W, F, E, T, mu_q, mu_p, coefs, tile, need_dw, need_df) -> (dW | None, dF | None)``, with weight W [M, C],
features F [B, C, L], prompt embeddings E [B, L, D], text embeddings T [M, D] (float32 or float64, any strides, one
device) and per-column batch means / coefficients contiguous fp64 in column order (l, m).

- ``cpu``: torch GEMMs per batch tile (oneDNN/MKL) + one C++/OpenMP kernel per tile for the fused elementwise step
  (``fastcbm._C.losses_cubic_accumulate`` / ``losses_cubic_gradient``);
- ``triton``: fused q/p GEMM + accumulation kernels (``fastcbm.kernels.losses``): nothing of size [B, M·L] exists;
- ``cuda``: the ``cpu`` design on a GPU: cuBLAS GEMMs per batch tile (through torch, in full fp32: TF32 is switched
  off while the loss runs, as the Triton kernels use IEEE dots) + the CUDA twins of the C++ elementwise kernels
  (``fastcbm._C_cuda.losses_cubic_accumulate`` / ``losses_cubic_gradient``, csrc/losses/losses.cu).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from fastcbm import _ext
from fastcbm.backends import triton_interpreted
from fastcbm.errors import InternalError
from fastcbm.triton_launch import TritonKernel, signatures


@dataclass(frozen=True)
class FusedLoss:
    """One fused backend: its forward (streamed column sums) and backward (recomputed tiles) drivers."""

    forward: Callable[..., torch.Tensor]
    backward: Callable[..., tuple[torch.Tensor | None, torch.Tensor | None]]


def _check(W: torch.Tensor, device_type: str) -> None:
    if W.dtype not in (torch.float32, torch.float64):
        raise InternalError(f"launcher: the fused cubic loss takes float32 or float64, got {W.dtype}")
    _ext.expect_device("weight", W, device_type)


# ---- cpu: torch GEMMs per tile + C++ elementwise kernels ---------------------------------------------------------
class _Tiles:
    """Reusable per-tile buffers; ``qp(b0, b1)`` returns q, p as [tb, K] views and the [tb·L, C] features rows."""

    def __init__(self, W, F, E, T, tile):
        self.W, self.F, self.E, self.T, self.tile = W, F, E, T, tile
        _, C, L = F.shape
        M, D = W.shape[0], E.shape[2]
        self.L, self.M, self.C, self.D = L, M, C, D
        kw = dict(dtype=W.dtype, device=W.device)
        self.fr = torch.empty((tile * L, C), **kw)
        self.er = None if E.is_contiguous() else torch.empty((tile * L, D), **kw)
        self.q = torch.empty((tile * L, M), **kw)
        self.p = torch.empty((tile * L, M), **kw)

    def qp(self, b0: int, b1: int):
        tb, L = b1 - b0, self.L
        rows = tb * L
        fr = self.fr[:rows]
        fr.view(tb, L, self.C).copy_(self.F[b0:b1].transpose(1, 2))  # rows (b, l): one big GEMM instead of B small ones
        if self.E.is_contiguous():
            er = self.E[b0:b1].reshape(rows, self.D)  # a view: already rows (b, l)
        else:
            er = self.er[:rows]
            er.view(tb, L, self.D).copy_(self.E[b0:b1])
        q, p = self.q[:rows], self.p[:rows]
        torch.mm(fr, self.W.t(), out=q)
        torch.mm(er, self.T.t(), out=p)
        return q.view(tb, L * self.M), p.view(tb, L * self.M), fr


def _tiled_forward(W, F, E, T, mu_q, tile, accumulate) -> torch.Tensor:
    """The five column sums [5, K] fp64 over all batch tiles: ``accumulate(q [tb, K], p [tb, K], sums)`` adds one
    tile's (the C++ or the CUDA elementwise kernel)."""
    sums = torch.zeros((5, mu_q.numel()), dtype=torch.float64, device=W.device)
    tiles = _Tiles(W, F, E, T, tile)
    for b0 in range(0, F.shape[0], tile):
        q, p, _ = tiles.qp(b0, min(b0 + tile, F.shape[0]))
        accumulate(q, p, sums)
    return sums


def _tiled_backward(W, F, E, T, tile, need_dw, need_df, gradient):
    """dW, dF from recomputed tiles: ``gradient(q, p)`` overwrites q [tb, K] with g_q; then dW += g_qᵀ·F and
    dF = g_q·W for the tile's rows (torch GEMMs)."""
    B, C, L = F.shape
    dW = torch.zeros_like(W, memory_format=torch.contiguous_format) if need_dw else None
    dF = torch.empty_like(F, memory_format=torch.contiguous_format) if need_df else None
    tiles = _Tiles(W, F, E, T, tile)
    for b0 in range(0, B, tile):
        b1 = min(b0 + tile, B)
        q, p, fr = tiles.qp(b0, b1)
        gradient(q, p)
        g = tiles.q[: (b1 - b0) * L]  # [tb·L, M]: g_q, where q was
        if dW is not None:
            dW.addmm_(g.t(), fr)
        if dF is not None:
            dF[b0:b1].copy_((g @ W).view(b1 - b0, L, C).transpose(1, 2))
    return dW, dF


def cpu_forward(W, F, E, T, mu_q, mu_p, tile) -> torch.Tensor:
    _check(W, "cpu")
    ext = _ext.cpu_module()
    mq, mp = mu_q.numpy(), mu_p.numpy()
    return _tiled_forward(W, F, E, T, mu_q, tile,
                          lambda q, p, sums: ext.losses_cubic_accumulate(q.numpy(), p.numpy(), mq, mp, sums.numpy()))


def cpu_backward(W, F, E, T, mu_q, mu_p, coefs, tile, need_dw, need_df):
    _check(W, "cpu")
    ext = _ext.cpu_module()
    mq, mp, cf = mu_q.numpy(), mu_p.numpy(), coefs.numpy()

    def gradient(q, p):
        qn = q.numpy()
        ext.losses_cubic_gradient(qn, p.numpy(), mq, mp, cf, qn)  # g_q overwrites q

    return _tiled_backward(W, F, E, T, tile, need_dw, need_df, gradient)


CPU = FusedLoss(cpu_forward, cpu_backward)


# ---- cuda: torch (cuBLAS) GEMMs per tile + CUDA elementwise kernels ---------------------------------------------
_CUDA_THREADS = 1 << 17  # column walkers that fill an H100 (132 SMs x 2048 resident threads = 270K, ~half)


def _row_chunks(rows: int, cols: int) -> int:
    """Row chunks of the accumulate kernel: enough (column, chunk) threads to fill the GPU when K is small."""
    return max(1, min(rows, 65535, -(-_CUDA_THREADS // cols)))


@contextlib.contextmanager
def _ieee_fp32_matmul() -> Iterator[None]:
    """fp32 cuBLAS GEMMs without TF32 while the loss runs (it cubes its inputs: TF32's 1e-3 errors would triple)."""
    m = torch.backends.cuda.matmul
    try:
        old = m.allow_tf32
        m.allow_tf32 = False
    except RuntimeError:  # a torch that refuses the legacy flag next to the fp32_precision API the user set
        yield
        return
    try:
        yield
    finally:
        m.allow_tf32 = old


def cuda_forward(W, F, E, T, mu_q, mu_p, tile) -> torch.Tensor:
    _check(W, "cuda")
    ext = _ext.cuda_module()
    K, f64 = mu_q.numel(), W.dtype == torch.float64
    with _ext.on_device(W.device) as stream, _ieee_fp32_matmul():
        work = torch.empty((_row_chunks(min(tile, F.shape[0]), K), 5, K), dtype=torch.float64, device=W.device)

        def accumulate(q, p, sums):
            ext.losses_cubic_accumulate(q.data_ptr(), p.data_ptr(), mu_q.data_ptr(), mu_p.data_ptr(), sums.data_ptr(),
                                        work.data_ptr(), q.shape[0], K, _row_chunks(q.shape[0], K), f64, stream)

        return _tiled_forward(W, F, E, T, mu_q, tile, accumulate)


def cuda_backward(W, F, E, T, mu_q, mu_p, coefs, tile, need_dw, need_df):
    _check(W, "cuda")
    ext = _ext.cuda_module()
    K, f64 = mu_q.numel(), W.dtype == torch.float64
    with _ext.on_device(W.device) as stream, _ieee_fp32_matmul():

        def gradient(q, p):  # g_q over q
            ext.losses_cubic_gradient(q.data_ptr(), p.data_ptr(), mu_q.data_ptr(), mu_p.data_ptr(), coefs.data_ptr(),
                                      q.data_ptr(), q.shape[0], K, f64, stream)

        return _tiled_backward(W, F, E, T, tile, need_dw, need_df, gradient)


CUDA = FusedLoss(cuda_forward, cuda_backward)


# ---- triton: launch tables and drivers ---------------------------------------------------------------------------
_STRIDES = ("s_wm", "s_wc", "s_fb", "s_fc", "s_fl", "s_eb", "s_el", "s_ed", "s_tm", "s_td")
_FWD = ("W", "F", "E", "T", "MU_Q", "MU_P", "SUMS", "B", "C", "L", "D", "M", *_STRIDES)
_GRAD = ("W", "F", "E", "T", "MU_Q", "MU_P", "COEFS", "G", "TB", "C", "L", "D", "M", *_STRIDES)
_DW = ("G", "F", "DW", "TB", "C", "L", "M", "s_fb", "s_fc", "s_fl")
_DF = ("G", "W", "DF", "TB", "C", "L", "M", "s_wm", "s_wc", "s_db", "s_dc", "s_dl")
_DTYPES = ("fp32", "fp64")  # the fused backends compute in the inputs' dtype (fp32 dots are IEEE, not TF32)


def _sigs(params: tuple[str, ...], fp64_ptrs: tuple[str, ...]) -> tuple[dict[str, str], ...]:
    """One signature per input dtype: tensors of that dtype, the fp64 sums/means/coefficients, i32 sizes/strides."""
    ints = {p: "i32" for p in params if p.startswith("s_") or p in ("B", "C", "L", "D", "M", "TB")}
    fixed = {**ints, **{p: "*fp64" for p in fp64_ptrs}}
    return signatures(params, *({p: f"*{dt}" for p in params if p not in fixed} for dt in _DTYPES), **fixed)


# GPU tiles: the largest whose sm_90 AND sm_80 builds keep every value in registers at 8 warps, for fp32 and fp64,
# under triton 3.9 and 3.6 (python -m bench.triton_resources; the earlier 64x64x32 tiles at 4 warps spilled 56-3192 B
# per thread; the forward's five fp64 column sums make it the tightest: 32x64 tiles still spilled 8 B under 3.6).
_QP_INTERP = ({"BLOCK_B": 16, "BLOCK_M": 16, "BLOCK_C": 16, "BLOCK_D": 16},)  # 16 is tl.dot's minimum
FORWARD_KERNEL = TritonKernel("losses", "_forward_sums_kernel", _FWD, _sigs(_FWD, ("MU_Q", "MU_P", "SUMS")),
                              gpu=({"BLOCK_B": 32, "BLOCK_M": 32, "BLOCK_C": 16, "BLOCK_D": 16},),
                              interpreter=_QP_INTERP, num_warps=8)
GRAD_KERNEL = TritonKernel("losses", "_grad_tile_kernel", _GRAD, _sigs(_GRAD, ("MU_Q", "MU_P", "COEFS")),
                           gpu=({"BLOCK_B": 32, "BLOCK_M": 64, "BLOCK_C": 16, "BLOCK_D": 16},),
                           interpreter=_QP_INTERP, num_warps=8)
DWEIGHT_KERNEL = TritonKernel("losses", "_dweight_kernel", _DW, _sigs(_DW, ()),
                              gpu=({"BLOCK_R": 16, "BLOCK_M": 64, "BLOCK_C": 64},),
                              interpreter=({"BLOCK_R": 16, "BLOCK_M": 16, "BLOCK_C": 16},), num_warps=8)
DFEATURES_KERNEL = TritonKernel("losses", "_dfeatures_kernel", _DF, _sigs(_DF, ()),
                                gpu=({"BLOCK_R": 64, "BLOCK_M": 32, "BLOCK_C": 64},),
                                interpreter=({"BLOCK_R": 16, "BLOCK_M": 16, "BLOCK_C": 16},), num_warps=8)
TRITON_KERNELS = (FORWARD_KERNEL, GRAD_KERNEL, DWEIGHT_KERNEL, DFEATURES_KERNEL)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _strides(W, F, E, T) -> tuple[int, ...]:
    return (*W.stride(), *F.stride(), *E.stride(), *T.stride())


def triton_forward(W, F, E, T, mu_q, mu_p, tile) -> torch.Tensor:
    """Per-column sums [5, L·M] fp64 over the whole batch in one launch (``tile`` is not needed: nothing is held)."""
    _check(W, W.device.type)
    interpreted = triton_interpreted()
    M, C = W.shape
    B, _, L = F.shape
    D = E.shape[2]
    with _ext.on_device(W.device):
        sums = torch.empty((5, L * M), dtype=torch.float64, device=W.device)
        cx = FORWARD_KERNEL.constexpr_sets(interpreted)[0]
        FORWARD_KERNEL.launch((L, _cdiv(M, cx["BLOCK_M"])),
                              (W, F, E, T, mu_q, mu_p, sums, B, C, L, D, M, *_strides(W, F, E, T)), cx, interpreted)
    return sums


def triton_backward(W, F, E, T, mu_q, mu_p, coefs, tile, need_dw, need_df):
    """Per batch tile: g_q into a [tile, L, M] buffer (recomputing q and p), then dW += and dF = from it."""
    _check(W, W.device.type)
    interpreted = triton_interpreted()
    B, C, L = F.shape
    M, D = W.shape[0], E.shape[2]
    cg = GRAD_KERNEL.constexpr_sets(interpreted)[0]
    cw = DWEIGHT_KERNEL.constexpr_sets(interpreted)[0]
    cf = DFEATURES_KERNEL.constexpr_sets(interpreted)[0]
    with _ext.on_device(W.device):
        dW = torch.zeros((M, C), dtype=W.dtype, device=W.device) if need_dw else None
        dF = torch.empty_like(F, memory_format=torch.contiguous_format) if need_df else None
        gbuf = torch.empty((tile, L, M), dtype=W.dtype, device=W.device)
        for b0 in range(0, B, tile):
            b1 = min(b0 + tile, B)
            tb, Ft, Et, g = b1 - b0, F[b0:b1], E[b0:b1], gbuf[: b1 - b0]
            GRAD_KERNEL.launch((_cdiv(tb, cg["BLOCK_B"]), L, _cdiv(M, cg["BLOCK_M"])),
                               (W, Ft, Et, T, mu_q, mu_p, coefs, g, tb, C, L, D, M, *_strides(W, Ft, Et, T)), cg,
                               interpreted)
            if dW is not None:
                DWEIGHT_KERNEL.launch((_cdiv(M, cw["BLOCK_M"]), _cdiv(C, cw["BLOCK_C"])),
                                      (g, Ft, dW, tb, C, L, M, *Ft.stride()), cw, interpreted)
            if dF is not None:
                dFt = dF[b0:b1]
                DFEATURES_KERNEL.launch((_cdiv(tb * L, cf["BLOCK_R"]), _cdiv(C, cf["BLOCK_C"])),
                                        (g, W, dFt, tb, C, L, M, *W.stride(), *dFt.stride()), cf, interpreted)
    return dW, dF


TRITON = FusedLoss(triton_forward, triton_backward)
