"""Backend selection shared by every op.

Each op is implemented by some subset of four backends:

- ``"reference"``: pure PyTorch, the definition; runs anywhere.
- ``"cpu"``: C++ kernels in ``fastcbm._C`` (OpenMP), CPU tensors only.
- ``"triton"``: Triton kernels in ``fastcbm.kernels``; CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set
  before triton was imported (the interpreter, for tests).
- ``"cuda"``: CUDA kernels in ``fastcbm._C_cuda``, CUDA tensors only.

``backend="auto"`` picks CUDA, then Triton, for CUDA tensors and C++ for CPU tensors, falling back to the reference
where an op has no faster implementation. Asking for a backend explicitly never falls back: if it is missing, the
error says what is missing and how to get it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Iterable

import torch

from fastcbm import _ext

BACKENDS = ("reference", "cpu", "triton", "cuda")


from fastcbm.errors import BackendUnavailableError, InvalidArgument  # noqa: E402  (re-exported)


def triton_interpreted() -> bool:
    """True when Triton runs its numpy interpreter (``TRITON_INTERPRET=1``), e.g. on CPU-only machines."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def backend_problem(name: str, device: torch.device | None = None) -> str | None:
    """Why ``name`` cannot run here (on ``device``, if given), or None if it can."""
    if name == "reference":
        return None
    if name == "cpu":
        if _ext.cpu_ext() is None:
            return f"the C++ extension is not available: {_ext.cpu_ext_error()}; reinstall fastcbm (pip install .)"
        if device is not None and device.type != "cpu":
            return f"the 'cpu' backend takes CPU tensors, got tensors on {device}"
        return None
    if name == "cuda":
        if device is not None and device.type != "cuda":
            return f"the 'cuda' backend takes CUDA tensors, got tensors on {device}"
        if _ext.cuda_ext() is None:
            return f"the CUDA extension is not available: {_ext.cuda_ext_error()}"
        return None
    if name == "triton":
        if not triton_installed():
            return "triton is not installed (pip install 'fastcbm[triton]')"
        if device is not None and device.type == "cpu" and not triton_interpreted():
            return "triton kernels on CPU tensors need TRITON_INTERPRET=1 set before triton is imported"
        if device is not None and device.type not in ("cpu", "cuda"):
            return f"triton kernels take CUDA tensors, got tensors on {device}"
        return None
    return f"unknown backend {name!r}; choose one of {('auto',) + BACKENDS}"


def select_backend(op: str, backend: str, device: torch.device, implemented: Iterable[str]) -> str:
    """Resolve ``backend`` (``"auto"`` or an explicit name) for ``op`` on tensors living on ``device``.

    ``implemented`` lists the backends this op has. Raises ``ValueError`` for an unknown name and
    ``BackendUnavailableError`` when an explicit backend cannot run, naming what is missing.
    """
    implemented = tuple(implemented)
    if backend == "auto":
        order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")
        for name in order:
            if name in implemented and backend_problem(name, device) is None:
                return name
        return "reference"
    if backend not in BACKENDS:
        raise InvalidArgument(f"backend={backend!r} is not one of {('auto',) + BACKENDS}")
    if backend not in implemented:
        raise BackendUnavailableError(
            f"{op}: no {backend!r} implementation; this op has {', '.join(implemented)}"
        )
    problem = backend_problem(backend, device)
    if problem is not None:
        raise BackendUnavailableError(f"{op}: backend {backend!r} cannot run: {problem}")
    return backend


def available_backends(device: torch.device | str = "cpu") -> dict[str, str | None]:
    """Map each backend name to None (usable on ``device``) or the reason it is not."""
    device = torch.device(device)
    return {name: backend_problem(name, device) for name in BACKENDS}
