"""Triton launch tables: the one description of how each Triton kernel is launched.

Each family's ``launchers.py`` describes every Triton kernel it launches with a :class:`TritonKernel`: the kernel's
runtime parameters, every argument signature the launcher passes (dtypes), and every set of constexprs (block sizes)
it uses on a GPU and under the interpreter. The launcher launches only through :meth:`TritonKernel.launch`, which
refuses (``InternalError``) a signature or constexpr set the table does not list; the sm_90 / sm_80 compile check
(``python -m bench.triton_resources``, ``tests/test_triton_compile.py``) compiles exactly the table's GPU entries.
So what is compiled in CI and what runs on a GPU cannot drift apart.

This module does not import triton (it is imported by the launchers at ``import fastcbm`` time).
"""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fastcbm.errors import InternalError

_TYPES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
    torch.uint8: "u8", torch.int8: "i8", torch.int32: "i32", torch.int64: "i64", torch.bool: "i1",
}
#: Dtype name (as in the tables) of each torch dtype.
TYPE_NAMES = dict(_TYPES)


def triton_type(value: Any) -> str:
    """The Triton signature type of one launch argument (a tensor → ``*fp32`` etc.; ints by range; floats ``fp32``)."""
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise InternalError(f"launcher: no Triton type for a {type(value).__name__} argument")


@dataclass(frozen=True)
class TritonKernel:
    """How one ``@triton.jit`` kernel of ``kernels/<family>.py`` is launched.

    ``signatures``: every ``{param: type}`` the launcher passes (one per dtype combination). ``gpu`` /
    ``interpreter``: every constexpr set it launches with on a GPU / under ``TRITON_INTERPRET=1``. ``archs``: the
    compute capabilities the GPU entries are compiled for in CI (90 = Hopper, 80 = Ampere)."""

    family: str
    name: str
    params: tuple[str, ...]
    signatures: tuple[Mapping[str, str], ...]
    gpu: tuple[Mapping[str, Any], ...]
    interpreter: tuple[Mapping[str, Any], ...]
    num_warps: int = 4
    archs: tuple[int, ...] = (90, 80)

    def __post_init__(self) -> None:
        for sig in self.signatures:
            if tuple(sig) != self.params:
                raise InternalError(f"{self.name}: signature {dict(sig)} does not list the params {self.params}")

    def function(self):
        """The jit function (imports triton)."""
        return getattr(importlib.import_module(f"fastcbm.kernels.{self.family}"), self.name)

    def constexpr_sets(self, interpreted: bool) -> tuple[Mapping[str, Any], ...]:
        return self.interpreter if interpreted else self.gpu

    def launch(self, grid: tuple[int, ...], args: Sequence[Any], constexprs: Mapping[str, Any],
               interpreted: bool) -> None:
        """Launch on ``grid`` after checking ``args`` and ``constexprs`` against the table."""
        if len(args) != len(self.params):
            raise InternalError(f"launcher: {self.name} takes {len(self.params)} arguments, got {len(args)}")
        sig = {p: triton_type(a) for p, a in zip(self.params, args)}
        if sig not in [dict(s) for s in self.signatures]:
            raise InternalError(f"launcher: {self.name} launched with signature {sig}, which its launch table does "
                                f"not list (so it is not compiled in CI); listed: {[dict(s) for s in self.signatures]}")
        if dict(constexprs) not in [dict(c) for c in self.constexpr_sets(interpreted)]:
            raise InternalError(f"launcher: {self.name} launched with constexprs {dict(constexprs)}, not in its "
                                f"{'interpreter' if interpreted else 'GPU'} launch table")
        self.function()[grid](*args, **constexprs, num_warps=self.num_warps)

    def compile_cases(self) -> Iterator[tuple[dict[str, str], dict[str, Any], int]]:
        """``(full signature with constexprs, constexprs, arch)`` for every GPU entry: what CI compiles."""
        for sig, cx, arch in itertools.product(self.signatures, self.gpu, self.archs):
            yield {**sig, **{k: "constexpr" for k in cx}}, dict(cx), arch


def signatures(params: Sequence[str], *variants: Mapping[str, str], **fixed: str) -> tuple[dict[str, str], ...]:
    """Signatures in ``params`` order: the ``fixed`` types plus each variant's (e.g. one per output dtype)."""
    out = []
    for v in variants or ({},):
        types = {**fixed, **v}
        missing = [p for p in params if p not in types]
        if missing or len(types) != len(params):
            raise InternalError(f"signatures: params {list(params)} vs types {types}")
        out.append({p: types[p] for p in params})
    return tuple(out)


def all_kernels() -> list[TritonKernel]:
    """Every Triton kernel the launchers of every family launch (imports the launchers, not triton)."""
    from fastcbm.backends import FAMILIES

    kernels: list[TritonKernel] = []
    for family in FAMILIES:
        module = importlib.import_module(f"fastcbm.{family}.launchers")
        kernels.extend(getattr(module, "TRITON_KERNELS", ()))
    return kernels
