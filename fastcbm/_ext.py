"""Thin re-export of the private compiled modules, and the device context every launcher enters.

``fastcbm._C`` (C++ CPU kernels) is imported eagerly when present. ``fastcbm._C_cuda`` (CUDA kernels) is imported
only when torch sees a CUDA device: it links the CUDA runtime, and CPU-only machines may have been built with nvcc
but have no driver.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
from collections.abc import Iterator
from types import ModuleType

import torch

from fastcbm.errors import InternalError


@functools.lru_cache(maxsize=None)
def _load(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module(name), None
    except ImportError as exc:  # not built, or built for another Python
        return None, f"{name} could not be imported ({exc})"


def cpu_ext() -> ModuleType | None:
    """The C++ CPU kernel module, or None when it was not built."""
    return _load("fastcbm._C")[0]


def cpu_ext_error() -> str | None:
    return _load("fastcbm._C")[1]


def cuda_ext() -> ModuleType | None:
    """The CUDA kernel module, or None when it was not built or no CUDA device is visible."""
    if not torch.cuda.is_available():
        return None
    return _load("fastcbm._C_cuda")[0]


def cuda_ext_error() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    err = _load("fastcbm._C_cuda")[1]
    if err is None:
        return None
    return (
        f"{err}; the CUDA module is built only when a CUDA compiler is found at install time "
        "(force it with FASTCBM_CUDA=ON pip install ...)"
    )


def cuda_ext_built() -> bool:
    """Whether the CUDA module file exists next to the package (without importing it)."""
    return importlib.util.find_spec("fastcbm._C_cuda") is not None


def cpu_module() -> ModuleType:
    """``fastcbm._C`` for a launcher: the dispatcher checked it exists, so its absence here is a bug."""
    ext = cpu_ext()
    if ext is None:
        raise InternalError(f"launcher: the C++ extension is not available: {cpu_ext_error()}")
    return ext


def cuda_module() -> ModuleType:
    """``fastcbm._C_cuda`` for a launcher (see :func:`cpu_module`)."""
    ext = cuda_ext()
    if ext is None:
        raise InternalError(f"launcher: the CUDA extension is not available: {cuda_ext_error()}")
    return ext


@contextlib.contextmanager
def on_device(device: torch.device) -> Iterator[int]:
    """Enter ``device`` for a kernel launch and yield the raw handle of its current stream.

    Every launcher allocates and launches inside this, so that on a machine with several GPUs a kernel runs on the
    GPU that holds its tensors (Triton launches on the current device's current stream; CUDA-module calls take the
    stream yielded here), not on whichever GPU happens to be current. CPU tensors: nothing is entered, yields 0."""
    if device.type != "cuda":
        yield 0
        return
    with torch.cuda.device(device):
        yield torch.cuda.current_stream(device).cuda_stream


def expect_device(name: str, t: torch.Tensor, device_type: str) -> None:
    """Launcher invariant: ``t`` lives on a ``device_type`` device."""
    if t.device.type != device_type:
        raise InternalError(f"launcher: expected {name} on {device_type}, got {t.device}")
