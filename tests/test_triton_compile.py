"""Every Triton kernel compiles for sm_90 (and sm_80, which the launch tables claim) exactly as its launcher launches
it, without a GPU, with no spills and within a block's shared memory (bench/triton_resources.py); and the launch
tables agree with the kernels they describe."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastcbm.errors import InternalError
from fastcbm.triton_launch import TritonKernel, all_kernels, triton_type

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
KERNELS = all_kernels()


def _params(kernel: TritonKernel) -> tuple[list[str], list[str]]:
    """(runtime params, constexpr params) of the jit function, from its Python signature."""
    fn = kernel.function()
    py = getattr(fn, "fn", fn)
    runtime, constexprs = [], []
    for p in inspect.signature(py).parameters.values():
        (constexprs if "constexpr" in str(p.annotation) else runtime).append(p.name)
    return runtime, constexprs


def test_every_family_launches_through_tables():
    assert {k.family for k in KERNELS} == {"prompts", "losses", "metrics", "cam"}


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: f"{k.family}.{k.name}")
def test_launch_table_matches_the_kernel(kernel):
    runtime, constexprs = _params(kernel)
    assert list(kernel.params) == runtime
    for cx in (*kernel.gpu, *kernel.interpreter):
        assert sorted(cx) == sorted(constexprs), f"{kernel.name}: constexprs {sorted(cx)} vs {sorted(constexprs)}"
    assert kernel.gpu and kernel.signatures and 90 in kernel.archs


def test_launch_refuses_what_the_table_does_not_list():
    from fastcbm.prompts.launchers import RENDER_KERNEL

    u8, f64, f32 = (torch.zeros(1, dtype=d) for d in (torch.uint8, torch.float64, torch.float32))
    bad_out = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(InternalError, match="signature"):
        RENDER_KERNEL.launch((1,), (u8, f64, f64, f64, f32, bad_out, 1, 1), {"BLOCK": 256}, interpreted=True)
    with pytest.raises(InternalError, match="constexprs"):
        RENDER_KERNEL.launch((1,), (u8, f64, f64, f64, f32, f32, 1, 1), {"BLOCK": 512}, interpreted=True)
    assert triton_type(2**31) == "i64" and triton_type(3) == "i32" and triton_type(0.5) == "fp32"


@pytest.mark.slow
def test_every_kernel_compiles_for_hopper_and_ampere(tmp_path):
    """~20 s on 2 cores: 34 compiles. Prints the resource table (pytest -s shows it)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    out = subprocess.run([sys.executable, "-m", "bench.triton_resources", "--json", str(tmp_path / "r.json"),
                          "--out", str(tmp_path / "r.txt")], cwd=ROOT, env=env, capture_output=True, text=True)
    print(out.stdout)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    got = {(r["kernel"], json.dumps(r["signature"]), json.dumps(r["constexprs"]), r["arch"]) for r in rows}
    want = {(f"{k.family}.{k.name}", json.dumps({p: sig[p] for p in k.params}), json.dumps(cx), arch)
            for k in KERNELS for sig, cx, arch in k.compile_cases()}
    assert got == want
    assert all(not r["problems"] and r["regs"] > 0 for r in rows)
