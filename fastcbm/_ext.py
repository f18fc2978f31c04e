"""Thin re-export of the private compiled modules.

``fastcbm._C`` (C++ CPU kernels) is imported eagerly when present. ``fastcbm._C_cuda`` (CUDA kernels) is imported
only when torch sees a CUDA device: it links the CUDA runtime, and CPU-only machines may have been built with nvcc
but have no driver.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch


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
    import importlib.util

    return importlib.util.find_spec("fastcbm._C_cuda") is not None
