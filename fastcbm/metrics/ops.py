"""Public localisation metrics (NRA, IoU curve, EPG, hit rate): validation, the op table and dispatch.

Every public function validates, resizes the maps ONCE to the mask resolution (``_common.prepare``: bilinear,
align_corners=False, float32), then hands identical float32 ``[N, H*W]`` values to the chosen backend: ``reference``
(pure torch, ``reference.py``, the definition, any device) or a compiled one (``launchers.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fastcbm import backends
from fastcbm.errors import InvalidArgument
from fastcbm.metrics import launchers as L
from fastcbm.metrics import reference as ref
from fastcbm.metrics._common import official_step, prepare

VARIANTS = ("official", "paper")
NRA, IOU_CURVE, EPG = "metrics.nra", "metrics.iou_curve", "metrics.epg"

backends.define_op(NRA, {
    "official": {"reference": ref.nra_official, "cpu": L.nra_official_cpu, "triton": L.nra_official_triton,
                 "cuda": L.nra_official_cuda},
    "paper": {"reference": ref.nra_paper, "cpu": L.nra_paper_cpu, "triton": L.nra_paper_triton},
}, notes={"paper": "the CUDA module has no paper epilogue: on a GPU it runs in Triton"})
backends.define_op(IOU_CURVE, {"default": {"reference": ref.iou_curve, "cpu": L.iou_curve_cpu}})
backends.define_op(EPG, {"default": {"reference": ref.epg, "cpu": L.epg_cpu, "triton": L.epg_triton,
                                     "cuda": L.epg_cuda}})


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
        backend: ``"auto"`` (C++ for CPU tensors; CUDA, else Triton, for CUDA tensors — for the paper variant,
            which the CUDA module lacks, Triton), or an explicit name.

    Returns:
        float64 ``[N]``: ``max(AUC - rand, 0) / (AUC_ideal - rand)``. The official ideal curve uses ``idx`` where the
        IoU uses ``idx + 1`` (as in the authors' code), so a perfect map scores slightly above 1 (e.g. 1.0006 for a
        36-pixel mask in 20x20); this is reproduced, not clamped. Degenerate cases: an empty mask gives 0.0;
        a non-positive denominator (e.g. a full mask) gives 0.0; an all-zero or constant map is NOT special-cased (it
        is ranked by the tie rule, i.e. from the last pixel backwards).

    Raises:
        InvalidArgument (a ValueError): bad shapes/dtypes, NaN/inf in maps, empty tensors, unknown variant, official
            with H*W < 100.
        BackendUnavailableError: an explicitly requested backend does not implement the variant or cannot run here.
    """
    if variant not in VARIANTS:
        raise InvalidArgument(f"variant must be one of {VARIANTS}, got {variant!r}")
    x, mask = prepare(maps, masks)
    if variant == "official":
        official_step(x.shape[1])  # the same clear error for every backend
    return backends.resolve(NRA, backend, x.device, variant).fn(x, mask)


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
    return backends.resolve(IOU_CURVE, backend, x.device).fn(x, mask)


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
    return backends.resolve(EPG, backend, x.device).fn(x, mask)


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
