"""What is installed, which backends can run and which backend implements which op: the data behind
``fastcbm info``."""

from __future__ import annotations

import importlib
import importlib.metadata
import platform

import torch

from fastcbm import __version__, _ext
from fastcbm.backends import format_op_matrix, op_matrix, triton_installed, triton_interpreted


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _try_import(module: str) -> str | None:
    """None if ``module`` imports, else the error text (first line)."""
    try:
        if module == "open_clip":
            from fastcbm.compat import import_open_clip

            import_open_clip()
        else:
            importlib.import_module(module)
        return None
    except Exception as exc:  # any failure means "not usable here"
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def collect() -> dict:
    """A JSON-friendly report of versions and backend availability."""
    cpu = _ext.cpu_ext()
    cpu_info = dict(cpu.build_info()) if cpu is not None else None
    report: dict = {
        "fastcbm": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "backends": {
            "reference": "available",
            "cpu": (
                f"available (OpenMP: {cpu_info['openmp']}, {cpu_info['max_threads']} threads)"
                if cpu_info
                else f"missing: {_ext.cpu_ext_error()}"
            ),
            "cuda": _cuda_status(),
            "triton": _triton_status(),
        },
        # the op registry: which backend implements which variant of which op (x = implemented)
        "ops": op_matrix(),
        "optional": {},
    }
    for name, module, dist in (
        ("DALI", "nvidia.dali", None),
        ("TensorRT", "tensorrt", "tensorrt"),
        ("onnxruntime", "onnxruntime", "onnxruntime"),
        ("onnx", "onnx", "onnx"),
        ("open_clip", "open_clip", "open_clip_torch"),
        ("timm", "timm", "timm"),
        ("torchvision", "torchvision", "torchvision"),
    ):
        error = _try_import(module)
        version = _version(dist) if dist else _dali_version()
        report["optional"][name] = f"{version or '?'}" if error is None else f"missing ({error})"
    return report


def _dali_version() -> str | None:
    for dist in ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110"):
        if (v := _version(dist)) is not None:
            return v
    return None


def _cuda_status() -> str:
    if _ext.cuda_ext() is not None:
        return f"available ({torch.cuda.get_device_name(0)})"
    built = "built" if _ext.cuda_ext_built() else "not built"
    return f"unavailable: module {built}; {_ext.cuda_ext_error()}"


def _triton_status() -> str:
    if not triton_installed():
        return "missing: triton is not installed"
    version = _version("triton") or "?"
    if triton_interpreted():
        return f"available {version} (interpreted: TRITON_INTERPRET=1, CPU tensors)"
    if torch.cuda.is_available():
        return f"available {version} (compiled, CUDA)"
    return f"installed {version}, no GPU: compiled kernels cannot run (set TRITON_INTERPRET=1 for the interpreter)"


def format_report(report: dict) -> str:
    lines = [f"fastcbm {report['fastcbm']}  (python {report['python']}, torch {report['torch']}, "
             f"{report['torch_threads']} torch threads)", f"platform: {report['platform']}",
             f"CUDA device: {report['cuda_device'] or 'none'}", "backends:"]
    lines += [f"  {k:<10} {v}" for k, v in report["backends"].items()]
    lines.append("ops (x = implemented; an explicit backend without an x raises; 'auto' tries cuda, triton, reference "
                 "for GPU tensors and cpu, reference for CPU tensors):")
    lines.append(format_op_matrix(report["ops"]))
    lines.append("optional packages:")
    lines += [f"  {k:<12} {v}" for k, v in report["optional"].items()]
    return "\n".join(lines)
