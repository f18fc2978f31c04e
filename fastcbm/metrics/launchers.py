"""Typed launchers of the metrics op family's compiled backends, and their Triton launch tables.

Inputs are the prepared buffers of :func:`fastcbm.metrics._common.prepare`: float32 values ``x`` and a bool mask,
both ``[N, n]``, contiguous, on one device. Outputs are float64 ``[N]``.

- ``cpu``: C++ (``fastcbm._C``), multi-rank selection instead of a full sort, OpenMP over maps;
- ``triton``: composite keys (a Triton kernel) + segmented ``torch.sort`` + Triton epilogues;
- ``cuda``: composite keys (torch) + ``torch.sort`` + CUDA epilogues (``fastcbm._C_cuda``; official NRA and EPG).

Device work runs inside :func:`fastcbm._ext.on_device` of the inputs, in chunks of maps that bound the sort's memory.
"""

from __future__ import annotations

import numpy as np
import torch

from fastcbm import _ext
from fastcbm.backends import triton_interpreted
from fastcbm.errors import InternalError
from fastcbm.metrics import reference as ref
from fastcbm.metrics._common import descending_keys, key_index, official_step
from fastcbm.triton_launch import TritonKernel, signatures

# maps per device chunk * pixels: the sort needs keys, sorted keys and int64 indices (~24 bytes per pixel)
_DEVICE_CHUNK_ELEMENTS = 1 << 25

# ---- Triton launch tables: one program per map (keys: per map and block of pixels) ---------------------------------
_POW2_BLOCKS = tuple({"BLOCK": 1 << k} for k in range(11))  # interpreter: the smallest power of two >= n, <= 1024
_GPU_BLOCK = ({"BLOCK": 1024},)  # a GPU takes one block size (masked lanes are cheap), so one binary per kernel
KEYS_KERNEL = TritonKernel(
    family="metrics", name="_keys_kernel", params=("x_ptr", "keys_ptr", "n"),
    signatures=signatures(("x_ptr", "keys_ptr", "n"), x_ptr="*fp32", keys_ptr="*i64", n="i32"),
    gpu=_GPU_BLOCK, interpreter=_POW2_BLOCKS)
OFFICIAL_KERNEL = TritonKernel(
    family="metrics", name="_official_kernel", params=("bits_ptr", "out_ptr", "n", "step"),
    signatures=signatures(("bits_ptr", "out_ptr", "n", "step"), bits_ptr="*u8", out_ptr="*fp64", n="i32",
                          step="i32"),
    gpu=_GPU_BLOCK, interpreter=_POW2_BLOCKS)
PAPER_KERNEL = TritonKernel(
    family="metrics", name="_paper_kernel", params=("x_ptr", "mask_ptr", "thr_ptr", "out_ptr", "n"),
    signatures=signatures(("x_ptr", "mask_ptr", "thr_ptr", "out_ptr", "n"), x_ptr="*fp32", mask_ptr="*u8",
                          thr_ptr="*fp32", out_ptr="*fp64", n="i32"),
    # the [BLOCK, PB] comparison tile (PB = 128 >= the 100 thresholds) bounds BLOCK
    gpu=({"BLOCK": 32, "PB": 128},), interpreter=tuple({"BLOCK": 1 << k, "PB": 128} for k in range(8)))
EPG_KERNEL = TritonKernel(
    family="metrics", name="_epg_kernel", params=("x_ptr", "mask_ptr", "out_ptr", "n"),
    signatures=signatures(("x_ptr", "mask_ptr", "out_ptr", "n"), x_ptr="*fp32", mask_ptr="*u8", out_ptr="*fp64",
                          n="i32"),
    gpu=_GPU_BLOCK, interpreter=_POW2_BLOCKS)
TRITON_KERNELS = (KEYS_KERNEL, OFFICIAL_KERNEL, PAPER_KERNEL, EPG_KERNEL)


def _blocks(kernel: TritonKernel, n: int, interpreted: bool) -> dict:
    """The table's constexprs for ``n`` pixels: on a GPU its one set; in the interpreter the smallest block >= n (or
    the largest)."""
    sets = kernel.constexpr_sets(interpreted)
    return dict(next((c for c in sets if c["BLOCK"] >= n), sets[-1]))


def _check_prepared(x: torch.Tensor, mask: torch.Tensor, device_type: str) -> None:
    if x.dtype != torch.float32 or mask.dtype != torch.bool or x.dim() != 2 or x.shape != mask.shape:
        raise InternalError(f"launcher: expected float32 x and bool mask [N, n], got {x.dtype} {tuple(x.shape)} and "
                            f"{mask.dtype} {tuple(mask.shape)}")
    if not (x.is_contiguous() and mask.is_contiguous()):
        raise InternalError("launcher: x and mask must be contiguous")
    _ext.expect_device("x", x, device_type)
    _ext.expect_device("mask", mask, device_type)


# ---- cpu --------------------------------------------------------------------------------------------------------
def _cpu_call(name: str, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    _check_prepared(x, mask, "cpu")
    return torch.from_numpy(np.asarray(getattr(_ext.cpu_module(), name)(x.numpy(), mask.numpy())))


def nra_official_cpu(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _cpu_call("metrics_nra_official", x, mask)


def nra_paper_cpu(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _cpu_call("metrics_nra_paper", x, mask)


def iou_curve_cpu(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _cpu_call("metrics_iou_curve", x, mask)


def epg_cpu(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _cpu_call("metrics_epg", x, mask)


# ---- triton / cuda ----------------------------------------------------------------------------------------------
def _device_chunks(n_maps: int, n: int):
    per = max(1, _DEVICE_CHUNK_ELEMENTS // n)
    for start in range(0, n_maps, per):
        yield slice(start, min(start + per, n_maps))


def _triton_keys(x: torch.Tensor, interpreted: bool) -> torch.Tensor:
    n_maps, n = x.shape
    keys = torch.empty(n_maps, n, dtype=torch.int64, device=x.device)
    cx = _blocks(KEYS_KERNEL, n, interpreted)
    KEYS_KERNEL.launch((n_maps, -(-n // cx["BLOCK"])), (x, keys, n), cx, interpreted)
    return keys


def _sorted_keys(x: torch.Tensor, use_triton: bool, interpreted: bool) -> torch.Tensor:
    keys = _triton_keys(x, interpreted) if use_triton else descending_keys(x)
    return torch.sort(keys, dim=1).values  # keys are unique, so any (unstable) sort gives the exact order


def _official_device(x: torch.Tensor, mask: torch.Tensor, backend: str) -> torch.Tensor:
    """triton / cuda official NRA: keys → segmented sort on device → per-map epilogue kernel, in chunks of maps."""
    _check_prepared(x, mask, x.device.type if backend == "triton" else "cuda")
    n_maps, n = x.shape
    step = official_step(n)
    interpreted = triton_interpreted()
    ext = _ext.cuda_module() if backend == "cuda" else None
    with _ext.on_device(x.device) as stream:
        out = torch.empty(n_maps, dtype=torch.float64, device=x.device)
        for sl in _device_chunks(n_maps, n):
            skeys = _sorted_keys(x[sl], backend == "triton", interpreted)
            bits = mask[sl].gather(1, key_index(skeys, n)).to(torch.uint8).contiguous()
            res = torch.empty(bits.shape[0], dtype=torch.float64, device=x.device)
            if ext is None:
                cx = _blocks(OFFICIAL_KERNEL, n, interpreted)
                OFFICIAL_KERNEL.launch((bits.shape[0],), (bits, res, n, step), cx, interpreted)
            else:
                ext.metrics_nra_official_epilogue(bits.data_ptr(), res.data_ptr(), bits.shape[0], n, step, stream)
            out[sl] = res
    return out


def nra_official_triton(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _official_device(x, mask, "triton")


def nra_official_cuda(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _official_device(x, mask, "cuda")


def nra_paper_triton(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Paper NRA: the 100 thresholds T_p from the sorted keys, then one counting epilogue program per map."""
    _check_prepared(x, mask, x.device.type)
    n_maps, n = x.shape
    interpreted = triton_interpreted()
    with _ext.on_device(x.device):
        out = torch.empty(n_maps, dtype=torch.float64, device=x.device)
        ranks = ref.paper_ranks(n, x.device) - 1
        for sl in _device_chunks(n_maps, n):
            skeys = _sorted_keys(x[sl], True, interpreted)
            thr = x[sl].gather(1, key_index(skeys[:, ranks], n)).contiguous()
            res = torch.empty(thr.shape[0], dtype=torch.float64, device=x.device)
            cx = _blocks(PAPER_KERNEL, n, interpreted)
            PAPER_KERNEL.launch((thr.shape[0],), (x[sl], mask[sl].to(torch.uint8), thr, res, n), cx, interpreted)
            out[sl] = res
    return out


def epg_triton(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    _check_prepared(x, mask, x.device.type)
    n_maps, n = x.shape
    interpreted = triton_interpreted()
    with _ext.on_device(x.device):
        out = torch.empty(n_maps, dtype=torch.float64, device=x.device)
        EPG_KERNEL.launch((n_maps,), (x, mask.to(torch.uint8), out, n), _blocks(EPG_KERNEL, n, interpreted),
                          interpreted)
    return out


def epg_cuda(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    _check_prepared(x, mask, "cuda")
    ext = _ext.cuda_module()
    with _ext.on_device(x.device) as stream:
        mask_u8 = mask.to(torch.uint8)
        out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
        ext.metrics_epg(x.data_ptr(), mask_u8.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], stream)
    return out
