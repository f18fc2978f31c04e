"""Public localisation metrics (NRA, IoU curve, EPG, hit rate) with backend dispatch and typed launchers.

Every public function validates, resizes the maps ONCE to the mask resolution (``_common.prepare``: bilinear,
align_corners=False, float32), then hands identical float32 ``[N, H*W]`` values to the chosen backend:

- ``reference``: pure torch (``reference.py``, the definition), any device;
- ``cpu``: C++ (``fastcbm._C``), multi-rank selection instead of a full sort, OpenMP over maps;
- ``triton``: composite keys + segmented ``torch.sort`` + Triton epilogues (``fastcbm.kernels.metrics``);
- ``cuda``: composite keys + ``torch.sort`` + CUDA epilogues (``fastcbm._C_cuda``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fastcbm import _ext
from fastcbm.backends import select_backend
from fastcbm.metrics import reference as ref
from fastcbm.metrics._common import descending_keys, key_index, official_step, prepare
from fastcbm.errors import InternalError, InvalidArgument

NRA_BACKENDS = ("reference", "cpu", "triton", "cuda")
EPG_BACKENDS = ("reference", "cpu", "triton", "cuda")
IOU_BACKENDS = ("reference", "cpu")
VARIANTS = ("official", "paper")

# maps per device chunk * pixels: the sort needs keys, sorted keys and int64 indices (~24 bytes per pixel)
_DEVICE_CHUNK_ELEMENTS = 1 << 25


# ---- launchers: inputs are prepared (float32 / bool, [N, n], contiguous, same device) ------------------------------
def _check_prepared(x: torch.Tensor, mask: torch.Tensor, device_type: str) -> None:
    if x.dtype != torch.float32 or mask.dtype != torch.bool or x.dim() != 2 or x.shape != mask.shape:
        raise InternalError(f"launcher: expected float32 x and bool mask [N, n], got {x.dtype} {tuple(x.shape)} and "
                         f"{mask.dtype} {tuple(mask.shape)}")
    if not (x.is_contiguous() and mask.is_contiguous()):
        raise InternalError("launcher: x and mask must be contiguous")
    if x.device.type != device_type or mask.device.type != device_type:
        raise InternalError(f"launcher: expected {device_type} tensors, got {x.device} and {mask.device}")


def _cpu_call(name: str, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    _check_prepared(x, mask, "cpu")
    return torch.from_numpy(np.asarray(getattr(_ext.cpu_ext(), name)(x.numpy(), mask.numpy())))


def _device_chunks(n_maps: int, n: int):
    per = max(1, _DEVICE_CHUNK_ELEMENTS // n)
    for start in range(0, n_maps, per):
        yield slice(start, min(start + per, n_maps))


def _sorted_keys(x: torch.Tensor, use_triton: bool) -> torch.Tensor:
    if use_triton:
        from fastcbm.kernels import metrics as tk  # lazy: `import fastcbm` never imports triton

        keys = tk.build_keys(x)
    else:
        keys = descending_keys(x)
    return torch.sort(keys, dim=1).values  # keys are unique, so any (unstable) sort gives the exact order


def _nra_device(x: torch.Tensor, mask: torch.Tensor, variant: str, backend: str) -> torch.Tensor:
    """triton / cuda: keys -> segmented sort on device -> per-map epilogue kernel, in chunks of maps."""
    n_maps, n = x.shape
    out = torch.empty(n_maps, dtype=torch.float64, device=x.device)
    use_triton = backend == "triton"
    if variant == "official":
        step = official_step(n)
    elif backend == "cuda":
        # the CUDA module has the official epilogue only; the paper variant's counting is torch searchsorted on device
        return ref.nra_paper(x, mask)
    for sl in _device_chunks(n_maps, n):
        skeys = _sorted_keys(x[sl], use_triton)
        if variant == "official":
            bits = mask[sl].gather(1, key_index(skeys, n)).to(torch.uint8).contiguous()
            if use_triton:
                from fastcbm.kernels import metrics as tk

                out[sl] = tk.official_epilogue(bits, step)
            else:
                res = torch.empty(bits.shape[0], dtype=torch.float64, device=x.device)
                _ext.cuda_ext().metrics_nra_official_epilogue(
                    bits.data_ptr(), res.data_ptr(), bits.shape[0], n, step, torch.cuda.current_stream().cuda_stream
                    if x.is_cuda else 0)
                out[sl] = res
        else:
            from fastcbm.kernels import metrics as tk

            ranks = ref.paper_ranks(n, x.device) - 1
            thr = x[sl].gather(1, key_index(skeys[:, ranks], n)).contiguous()
            out[sl] = tk.paper_epilogue(x[sl], mask[sl].to(torch.uint8), thr)
    return out


def _epg_device(x: torch.Tensor, mask: torch.Tensor, backend: str) -> torch.Tensor:
    mask_u8 = mask.to(torch.uint8)
    if backend == "triton":
        from fastcbm.kernels import metrics as tk

        return tk.epg(x, mask_u8)
    out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    _ext.cuda_ext().metrics_epg(x.data_ptr(), mask_u8.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1],
                                torch.cuda.current_stream().cuda_stream)
    return out


# ---- public API ------------------------------------------------------------------------------------------------
def nra(maps: torch.Tensor, masks: torch.Tensor, variant: str = "official", backend: str = "auto") -> torch.Tensor:
    """Normalised Rank AUC (CE-FAM) of each map against its mask.

    Args:
        maps: float ``[N, h, w]`` (fp16/bf16/fp32/fp64) saliency maps, any resolution; resized to the mask
            resolution (bilinear, align_corners=False, in float32) when the sizes differ. Values are ranked as float32.
        masks: bool ``[N, H, W]`` ground-truth regions.
        variant: ``"official"`` (default): the CE-FAM authors' evaluation code, reproduced to 1e-6 — pixels ranked by
            value descending (ties: higher flat index first, the deterministic reading of their
            ``np.argsort(x.ravel())[::-1]``), IoU after every pixel for the first ``step = H*W // 100`` pixels
            (weight 1/HW) and after every ``step``-th pixel (weight 1/100), ideal curve ``idx/|M|`` / ``|M|/idx``,
            random area ``(|M|/HW)/2``; needs H*W >= 100. ``"paper"``: top-p% thresholds p = 1..100 with ties
            included (``R_p = {x >= T_p}``), trapezoid AUC with IoU_0 = 0, ideal ``min(k_p,|M|)/max(k_p,|M|)``.
        backend: ``"auto"`` (C++ for CPU tensors; CUDA, else Triton, for CUDA tensors), or an explicit name.

    Returns:
        float64 ``[N]``: ``max(AUC - rand, 0) / (AUC_ideal - rand)``. The official ideal curve uses ``idx`` where the
        IoU uses ``idx + 1`` (as in the authors' code), so a perfect map scores slightly above 1 (e.g. 1.0006 for a
        36-pixel mask in 20x20); this is reproduced, not clamped. Degenerate cases: an empty mask gives 0.0;
        a non-positive denominator (e.g. a full mask) gives 0.0; an all-zero or constant map is NOT special-cased (it
        is ranked by the tie rule, i.e. from the last pixel backwards).

    Raises:
        ValueError: bad shapes/dtypes, NaN/inf in maps, empty tensors, unknown variant, official with H*W < 100.
        BackendUnavailableError: an explicitly requested backend cannot run here.
    """
    if variant not in VARIANTS:
        raise InvalidArgument(f"variant must be one of {VARIANTS}, got {variant!r}")
    x, mask = prepare(maps, masks)
    if variant == "official":
        official_step(x.shape[1])  # the same clear error for every backend
    chosen = select_backend("metrics.nra", backend, x.device, NRA_BACKENDS)
    if chosen == "reference":
        return ref.nra_official(x, mask) if variant == "official" else ref.nra_paper(x, mask)
    if chosen == "cpu":
        return _cpu_call("metrics_nra_official" if variant == "official" else "metrics_nra_paper", x, mask)
    return _nra_device(x, mask, variant, chosen)


def iou_curve(maps: torch.Tensor, masks: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """IoU after the k highest pixels, k = 1..H*W, in the metrics pixel order (see :func:`nra`).

    Args:
        maps: float ``[N, h, w]``, resized to the mask resolution as in :func:`nra`.
        masks: bool ``[N, H, W]``.
        backend: ``"auto"``, ``"reference"`` or ``"cpu"`` (on CUDA tensors ``"auto"`` runs the torch reference there).

    Returns:
        float32 ``[N, H*W]`` (computed in float64): ``TP_k / (k + |M| - TP_k)``; an empty mask gives zeros.
    """
    x, mask = prepare(maps, masks)
    chosen = select_backend("metrics.iou_curve", backend, x.device, IOU_BACKENDS)
    if chosen == "cpu":
        return _cpu_call("metrics_iou_curve", x, mask)
    return ref.iou_curve(x, mask)


def epg(maps: torch.Tensor, masks: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Energy-based pointing game: share of the min-max-normalised map's energy inside the mask.

    Args:
        maps: float ``[N, h, w]``, resized to the mask resolution as in :func:`nra`.
        masks: bool ``[N, H, W]``.
        backend: ``"auto"`` or an explicit backend name.

    Returns:
        float64 ``[N]``: ``Σ((x - min)·mask) / Σ(x - min)`` (the (max - min) factor cancels). An all-zero or
        constant map gives 0.0; an empty mask gives 0.0.
    """
    x, mask = prepare(maps, masks)
    chosen = select_backend("metrics.epg", backend, x.device, EPG_BACKENDS)
    if chosen == "reference":
        return ref.epg(x, mask)
    if chosen == "cpu":
        return _cpu_call("metrics_epg", x, mask)
    return _epg_device(x, mask, chosen)


def hit_rate(nra_values: torch.Tensor | np.ndarray | Sequence[float], threshold: float = 0.5) -> float:
    """Share of samples whose NRA is strictly greater than ``threshold`` (a float in [0, 1]).

    Args:
        nra_values: ``[N]`` NRA values (tensor, array or sequence), N >= 1, finite.
    """
    if isinstance(nra_values, torch.Tensor):
        values = nra_values.detach().cpu().to(torch.float64)
    else:
        values = torch.as_tensor(np.asarray(nra_values, dtype=np.float64))
    if values.dim() != 1 or values.numel() == 0:
        raise InvalidArgument(f"nra_values must be a non-empty 1-D sequence, got shape {tuple(values.shape)}")
    if not bool(torch.isfinite(values).all()):
        raise InvalidArgument("nra_values contains NaN or inf")
    return float((values > threshold).to(torch.float64).mean())
