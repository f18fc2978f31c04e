"""Compile every Triton kernel of fastcbm for Hopper (sm_90) and Ampere (sm_80), as its launcher launches it, and
print the resource table: registers, shared memory and local memory (spills) per kernel and signature.

    python -m bench.triton_resources                 # all kernels, every launch-table entry, sm_90 + sm_80
    python -m bench.triton_resources --arch 90 --out build/triton_resources.txt --json build/triton_resources.json

No GPU is needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` produces PTX and cubin on a
CPU machine. What is compiled comes from the launchers' tables (``fastcbm.triton_launch.all_kernels()``: every
signature × every GPU constexpr set × the archs each kernel claims), the same tables the launchers launch from.
Resources are read from the cubin with the ``cuobjdump`` Triton ships (``--dump-resource-usage``; n_regs / n_spills
of a CompiledKernel need a driver) plus Triton's own dynamic shared-memory figure (``metadata.shared``).

Exit status 1 when any case fails to compile, spills (uses local memory), or needs more shared memory than the arch
gives one block (H100: 227 KB opt-in; A100: 163 KB). Each run compiles from scratch (a fresh Triton cache), so it
also times the compiles. TRITON_INTERPRET must be off (it turns @triton.jit into interpreter objects): the script
re-executes itself without it.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Shared memory one block may use (bytes, with the opt-in attribute): H100/H200 227 KB, A100 163 KB.
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


def _resources(cubin: bytes) -> dict[str, int]:
    """REG / STACK / SHARED (static) / LOCAL from ``cuobjdump --dump-resource-usage`` of one cubin."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    if "REG" not in fields:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    return {k.lower(): int(v) for k, v in fields.items()}


def compile_case(family: str, name: str, signature: dict, constexprs: dict, arch: int, num_warps: int) -> dict:
    """Compile one case; returns the resource row (``error`` set when the compile failed)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = {"kernel": f"{family}.{name}", "arch": arch, "num_warps": num_warps, "constexprs": constexprs,
           "signature": {k: v for k, v in signature.items() if v != "constexpr"}}
    t0 = time.perf_counter()
    try:
        fn = getattr(importlib.import_module(f"fastcbm.kernels.{family}"), name)
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
        res = _resources(compiled.asm["cubin"])
        row.update(regs=res["reg"], shared=int(compiled.metadata.shared) + res.get("shared", 0),
                   local=res.get("local", 0), stack=res.get("stack", 0))
    except Exception as exc:  # noqa: BLE001 — a failed compile is a row of the report, not a crash of the report
        row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    row["seconds"] = round(time.perf_counter() - t0, 2)
    row["problems"] = problems(row)
    return row


def problems(row: dict) -> list[str]:
    if "error" in row:
        return [f"compile error ({row['error']})"]
    out = []
    if row["local"] or row["stack"]:
        out.append(f"spills: {row['local']} B local memory, {row['stack']} B stack per thread")
    if row["shared"] > SHARED_LIMIT[row["arch"]]:
        out.append(f"shared memory {row['shared']} B > {SHARED_LIMIT[row['arch']]} B per block on sm_{row['arch']}")
    return out


def cases(archs: list[int]) -> list[tuple]:
    from fastcbm.triton_launch import all_kernels

    return [(k.family, k.name, sig, cx, arch, k.num_warps)
            for k in all_kernels() for sig, cx, arch in k.compile_cases() if arch in archs]


def _short_signature(sig: dict) -> str:
    """The pointer dtypes in order (``u8,fp64,...``): what distinguishes one signature of a kernel from another."""
    return ",".join(v[1:] for v in sig.values() if v.startswith("*"))


def format_table(rows: list[dict]) -> str:
    head = f"{'kernel':<34} {'sm':>3} {'pointer dtypes':<44} {'constexprs':<46} {'regs':>4} {'shared B':>8} " \
           f"{'spill B':>7} {'s':>5}  status"
    lines = [head, "-" * len(head)]
    for r in rows:
        cx = ",".join(f"{k}={v}" for k, v in r["constexprs"].items())
        if "error" in r:
            vals = f"{'-':>4} {'-':>8} {'-':>7}"
        else:
            vals = f"{r['regs']:>4} {r['shared']:>8} {r['local'] + r['stack']:>7}"
        status = "ok" if not r["problems"] else "FAIL: " + "; ".join(r["problems"])
        lines.append(f"{r['kernel']:<34} {r['arch']:>3} {_short_signature(r['signature']):<44} {cx:<46} {vals} "
                     f"{r['seconds']:>5.1f}  {status}")
    return "\n".join(lines)


def run(archs: list[int], jobs: int) -> list[dict]:
    todo = cases(archs)
    if jobs <= 1:
        return [compile_case(*c) for c in todo]
    with cf.ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(compile_case, *zip(*todo)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.triton_resources", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, nargs="+", choices=sorted(SHARED_LIMIT), default=sorted(SHARED_LIMIT,
                    reverse=True), help="compute capabilities to compile for (default: 90 80)")
    ap.add_argument("--out", type=Path, help="also write the table to this file")
    ap.add_argument("--json", type=Path, help="write the rows as JSON to this file")
    ap.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="parallel compiles")
    args = ap.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):  # @triton.jit would give interpreter objects
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, "-m", "bench.triton_resources", *(argv or sys.argv[1:])], env)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 = its current default
    import triton

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fastcbm-triton-cache-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # compile from scratch: the timing is real, nothing stale is reused
        rows = run(args.arch, args.jobs)
    wall = time.perf_counter() - t0
    bad = [r for r in rows if r["problems"]]
    table = format_table(rows)
    summary = (f"triton {triton.__version__}: {len(rows)} compiles of {len({r['kernel'] for r in rows})} kernels for "
               f"sm_{', sm_'.join(map(str, args.arch))} in {wall:.0f} s ({args.jobs} jobs); "
               f"{'all ok' if not bad else f'{len(bad)} FAILED'}")
    print(table)
    print(summary)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n" + summary + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"triton": triton.__version__, "wall_s": wall, "rows": rows}, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
