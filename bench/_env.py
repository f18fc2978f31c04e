"""Machine and version tags for every benchmark row, and the peak rates derived figures are compared with.

Every CSV row written through ``_rows.append_rows`` carries these tags (a script's own values win), so a row always
says what it was measured on: CPU model and core count, GPU, torch / CUDA / Triton / onnxruntime / TensorRT versions,
fastcbm version, date (UTC).
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import platform
from pathlib import Path

# Peak rates measured on this workplace's GPUs (docs/design.md §4; the device tool's KINDS.md): dense bf16 matmul through
# PyTorch on random data, device-to-device copy (bytes read + written). Datasheet numbers are not used.
GPU_PEAKS = {
    "H100": {"bf16_tflops": 790.0, "copy_gbps": 3000.0},
    "H200": {"bf16_tflops": 788.0, "copy_gbps": 4300.0},
}
# CLIP ViT-B/16 image tower at 224² (open_clip model profile, docs/design.md §4)
VIT_B16_GFLOPS = 35.13


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 — an optional package that is missing or broken is simply "absent"
        return ""
    return str(getattr(mod, "__version__", "?"))


@functools.lru_cache(maxsize=1)
def env_tags() -> dict:
    """The tags of this process's machine (computed once)."""
    import torch

    import fastcbm

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "gpu_model": gpu,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda or "",
        "triton_version": _version("triton"),
        "onnxruntime_version": _version("onnxruntime"),
        "tensorrt_version": _version("tensorrt"),
        "fastcbm_version": fastcbm.__version__,
        # set by `python -m bench` for one invocation; a script run directly leaves it empty
        "load_note": os.environ.get("FASTCBM_BENCH_NOTE", ""),
    }


def now_utc() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def gpu_peak(name: str | None = None) -> dict | None:
    """Measured peaks for the named (or the current) GPU, or None where none is known (CPUs included)."""
    if name is None:
        name = env_tags()["gpu_model"]
    for key, peak in GPU_PEAKS.items():
        if key in (name or ""):
            return peak
    return None


def roofline_fraction(flops_per_s: float, name: str | None = None) -> float | None:
    """Achieved FLOP/s as a fraction of the GPU's measured bf16 peak (None where no peak is known)."""
    peak = gpu_peak(name)
    return None if peak is None else flops_per_s / (peak["bf16_tflops"] * 1e12)
