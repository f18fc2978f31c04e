"""Backends and the op registry shared by every op family.

Backends. Each op is implemented by some subset of four:

- ``"reference"``: pure PyTorch, the definition; runs anywhere.
- ``"cpu"``: C++ kernels in ``fastcbm._C`` (OpenMP), CPU tensors only.
- ``"triton"``: Triton kernels in ``fastcbm.kernels``; CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set
  before triton was imported (the interpreter, for tests).
- ``"cuda"``: CUDA kernels in ``fastcbm._C_cuda``, CUDA tensors only.

The op registry. Every op declares, in ONE :func:`define_op` call in its family's ``ops.py``, which backends implement
each of its variants (``metrics.nra`` has ``official`` and ``paper``; most ops have one, ``default``) and the function
each one runs. Dispatch goes only through :func:`resolve`; ``fastcbm info`` prints :func:`op_matrix`; the tests
parametrise from :func:`implemented`. Rules:

- an explicit backend runs exactly that implementation or raises :class:`BackendUnavailableError` — when it does not
  implement the variant (the message names those that do) or cannot run here (the message says what is missing).
  It never falls back;
- ``"auto"`` takes the first backend of :data:`AUTO_ORDER` for the tensors' device type that implements the variant
  and can run here, and never leaves that order (so CPU tensors never go to the Triton interpreter).

File layout of an op family ``<family>`` (``prompts``, ``losses``, ``metrics``, ``cam``), one name everywhere:

- ``fastcbm/<family>/__init__.py``: the public API (re-exports);
- ``fastcbm/<family>/ops.py``: the public functions: input validation, the ``define_op`` table, dispatch;
- ``fastcbm/<family>/reference.py``: the pure-PyTorch definition;
- ``fastcbm/<family>/launchers.py``: typed launchers of the compiled backends (check dtype / device / contiguity,
  allocate, enter the tensors' device, call the kernel) and the Triton launch tables (:mod:`fastcbm.triton_launch`);
- ``kernels/<family>.py`` (shipped as ``fastcbm.kernels.<family>``): the Triton kernels;
- ``csrc/<family>/``: ``<family>.h`` (shared by the C++ and CUDA kernels), ``<family>_cpu.cpp``, ``<family>.cu``;
  helpers shared by every family live in ``csrc/common.h``;
- ``tests/test_<family>*.py`` and ``bench/<family>.py`` (rows in ``bench/results/<family>.csv``).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fastcbm import _ext
from fastcbm.errors import BackendUnavailableError, InternalError, InvalidArgument

BACKENDS = ("reference", "cpu", "triton", "cuda")
#: What ``backend="auto"`` tries, in order, per device type; other device types get the reference.
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
DEFAULT_VARIANT = "default"
#: The op families whose ``ops.py`` define ops (imported by :func:`op_matrix`; none of them imports triton).
FAMILIES = ("prompts", "losses", "metrics", "cam")

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "DEFAULT_VARIANT",
    "FAMILIES",
    "BackendUnavailableError",
    "Implementation",
    "available_backends",
    "backend_problem",
    "define_op",
    "implemented",
    "op_matrix",
    "resolve",
    "triton_installed",
    "triton_interpreted",
    "variants",
]


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


def available_backends(device: torch.device | str = "cpu") -> dict[str, str | None]:
    """Map each backend name to None (usable on ``device``) or the reason it is not."""
    device = torch.device(device)
    return {name: backend_problem(name, device) for name in BACKENDS}


# ---- the op registry ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Implementation:
    """One backend's implementation of one variant of one op; ``fn`` takes the op's prepared arguments."""

    op: str
    variant: str
    backend: str
    fn: Callable[..., Any]


_OPS: dict[str, dict[str, dict[str, Implementation]]] = {}
_NOTES: dict[tuple[str, str], str] = {}


def define_op(op: str, table: Mapping[str, Mapping[str, Callable[..., Any]]],
              notes: Mapping[str, str] | None = None) -> None:
    """Declare ``op``: ``table[variant][backend] = fn``; ``notes[variant]`` says when that variant applies.

    Every variant must have a ``"reference"`` implementation (the definition). Defining an op again replaces it
    (a module reload)."""
    parsed: dict[str, dict[str, Implementation]] = {}
    for variant, impls in table.items():
        unknown = [b for b in impls if b not in BACKENDS]
        if unknown or "reference" not in impls:
            raise InternalError(f"define_op({op!r}): variant {variant!r} has backends {list(impls)}; each must be one "
                                f"of {BACKENDS} and 'reference' is required")
        parsed[variant] = {b: Implementation(op, variant, b, impls[b]) for b in BACKENDS if b in impls}
    _OPS[op] = parsed
    for variant, note in (notes or {}).items():
        _NOTES[(op, variant)] = note


def _variant_table(op: str, variant: str) -> dict[str, Implementation]:
    if op not in _OPS:
        raise InternalError(f"op {op!r} is not defined; defined ops: {sorted(_OPS)}")
    if variant not in _OPS[op]:
        raise InvalidArgument(f"{op}: variant={variant!r} is not one of {tuple(_OPS[op])}")
    return _OPS[op][variant]


def variants(op: str) -> tuple[str, ...]:
    """The variants ``op`` defines, in declaration order."""
    if op not in _OPS:
        raise InternalError(f"op {op!r} is not defined; defined ops: {sorted(_OPS)}")
    return tuple(_OPS[op])


def implemented(op: str, variant: str = DEFAULT_VARIANT) -> tuple[str, ...]:
    """The backends that implement ``variant`` of ``op``, in :data:`BACKENDS` order."""
    return tuple(_variant_table(op, variant))


def _label(op: str, variant: str) -> str:
    return op if len(_OPS[op]) == 1 else f"{op} (variant {variant!r})"


def resolve(op: str, backend: str, device: torch.device, variant: str = DEFAULT_VARIANT) -> Implementation:
    """The implementation of ``op``/``variant`` that ``backend`` (``"auto"`` or a name) means for tensors on
    ``device``. Raises ``InvalidArgument`` for an unknown backend or variant and ``BackendUnavailableError`` when an
    explicit backend does not implement the variant or cannot run here."""
    impls = _variant_table(op, variant)
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ("reference",)):
            if name in impls and backend_problem(name, device) is None:
                return impls[name]
        return impls["reference"]
    if backend not in BACKENDS:
        raise InvalidArgument(f"backend={backend!r} is not one of {('auto',) + BACKENDS}")
    if backend not in impls:
        what = "this op has" if len(_OPS[op]) == 1 else "this variant has"
        note = _NOTES.get((op, variant))
        raise BackendUnavailableError(f"{_label(op, variant)}: no {backend!r} implementation"
                                      f"{f' ({note})' if note else ''}; {what} {', '.join(impls)}")
    problem = backend_problem(backend, device)
    if problem is not None:
        raise BackendUnavailableError(f"{_label(op, variant)}: backend {backend!r} cannot run: {problem}")
    return impls[backend]


def load_families() -> None:
    """Import every op family so that its ops are defined (cheap: no family imports triton)."""
    for family in FAMILIES:
        importlib.import_module(f"fastcbm.{family}")


def op_matrix() -> list[dict]:
    """Every defined op and variant with the backends that implement it:
    ``[{"op", "variant", "note", "backends": {backend: bool}}]``, ops in family order."""
    load_families()
    return [{"op": op, "variant": variant, "note": _NOTES.get((op, variant), ""),
             "backends": {b: b in impls for b in BACKENDS}}
            for op, table in _OPS.items() for variant, impls in table.items()]


def format_op_matrix(matrix: list[dict] | None = None) -> str:
    """The op × backend matrix as a text table (``x`` = implemented)."""
    matrix = op_matrix() if matrix is None else matrix
    w_op = max([len("op")] + [len(r["op"]) for r in matrix])
    w_var = max([len("variant")] + [len(r["variant"]) for r in matrix])
    lines = [(f"  {'op':<{w_op}}  {'variant':<{w_var}}  " + "  ".join(f"{b:<9}" for b in BACKENDS)).rstrip()]
    for r in matrix:
        cells = "  ".join(f"{'x' if r['backends'][b] else '-':<9}" for b in BACKENDS)
        note = f"  ({r['note']})" if r["note"] else ""
        lines.append(f"  {r['op']:<{w_op}}  {r['variant']:<{w_var}}  {cells}".rstrip() + note)
    return "\n".join(lines)
