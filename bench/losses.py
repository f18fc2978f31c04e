"""Benchmark: fused cubic-cosine loss vs the materialising reference, forward + backward.

Extra memory = peak memory of one forward+backward step beyond the inputs and the gradients it returns. Each
(size, backend) runs in its own subprocess so that it is measured cleanly:
- CPU: peak RSS delta. The child creates the inputs, runs one warm-up step, resets the kernel's RSS high-water mark
  (``/proc/self/clear_refs`` ← 5), reads VmRSS (inputs included), runs one forward+backward and reads VmHWM:
  extra = VmHWM − VmRSS. ``MALLOC_MMAP_THRESHOLD_=65536`` makes glibc return every large buffer to the OS on free, so
  memory cached from the warm-up cannot hide a step's allocations.
- GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` minus the memory allocated before.
Timing: warm-up, then ``--repeats`` timed forward+backward steps (synchronised on GPU); median and p10/p90.
On GPU ``--search-16gb`` also finds the largest batch whose inputs + step fit in 16 GB, per backend.

    python bench/losses.py            # B=4096, M=1000, L=49, C=512, D=512
    python bench/losses.py --quick    # B=1024, M=250
Rows are appended to bench/results/losses.csv.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from _timing import peak_extra_bytes, peak_start, quantiles

RESULTS = Path(__file__).resolve().parent / "results" / "losses.csv"



def _make(cfg, device):
    import torch

    g = torch.Generator().manual_seed(0)
    B, M, L, C, D = cfg["B"], cfg["M"], cfg["L"], cfg["C"], cfg["D"]
    W = (torch.randn(M, C, generator=g) / C**0.5).to(device).requires_grad_(True)
    F = torch.randn(B, C, L, generator=g).relu_().to(device).requires_grad_(cfg["features_grad"])
    E = torch.nn.functional.normalize(torch.randn(B, L, D, generator=g), dim=-1).to(device)
    T = torch.nn.functional.normalize(torch.randn(M, D, generator=g), dim=-1).to(device)
    return W, F, E, T


def child(cfg: dict) -> dict:
    """Run one configuration in this process; returns times and peak extra memory."""
    import torch

    from fastcbm.losses import cubic_cosine_loss

    device = torch.device(cfg["device"])
    cuda = device.type == "cuda"
    W, F, E, T = _make(cfg, device)

    def step():
        W.grad = None
        F.grad = None
        cubic_cosine_loss(W, F, E, T, backend=cfg["backend"]).backward()
        if cuda:
            torch.cuda.synchronize()

    step()  # warm-up: library init, thread pools, Triton compilation
    W.grad = None
    F.grad = None
    times, extra = [], 0
    for i in range(cfg["repeats"]):
        if i == 0:  # the first timed step also measures memory (the /proc accesses are microseconds)
            base = peak_start(cuda)
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        if i == 0:
            extra = peak_extra_bytes(cuda, base)
    grads = W.numel() * W.element_size() + (F.numel() * F.element_size() if cfg["features_grad"] else 0)
    return {"times": times, "extra_bytes": extra, "grad_bytes": grads}


def fits_16gb(cfg: dict) -> bool:
    """GPU only: whether inputs + one forward+backward step fit in 16 GB."""
    import torch

    from fastcbm.losses import cubic_cosine_loss

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        W, F, E, T = _make(cfg, torch.device("cuda"))
        cubic_cosine_loss(W, F, E, T, backend=cfg["backend"]).backward()
        torch.cuda.synchronize()
        ok = torch.cuda.max_memory_allocated() <= 16 * 2**30
    except torch.cuda.OutOfMemoryError:
        ok = False
    finally:
        W = F = E = T = None
        torch.cuda.empty_cache()
    return ok


def run_child(cfg: dict, mode: str = "bench") -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(
        [sys.executable, __file__, f"--{mode}", json.dumps(cfg)], env=env, capture_output=True, text=True
    )
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def hardware(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or "cpu"
    return f"{name} x{torch.get_num_threads()} threads"



def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller problem (B=1024, M=250)")
    ap.add_argument("--batch", type=int, nargs="*", help="batch sizes (default 4096; quick 1024)")
    ap.add_argument("--concepts", type=int, help="M (default 1000; quick 250)")
    ap.add_argument("--cells", type=int, default=49, help="L")
    ap.add_argument("--channels", type=int, default=512, help="C")
    ap.add_argument("--dim", type=int, default=512, help="D")
    ap.add_argument("--repeats", type=int, help="timed steps (default 5; quick 3)")
    ap.add_argument("--backends", nargs="*", help="default: reference plus the fused backends for the device")
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--features-grad", action="store_true", help="also differentiate the features")
    ap.add_argument("--search-16gb", action="store_true", help="GPU: largest B that fits in 16 GB per backend")
    ap.add_argument("--no-csv", action="store_true")
    ap.add_argument("--bench", help=argparse.SUPPRESS)
    ap.add_argument("--fits", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.bench:
        print(json.dumps(child(json.loads(args.bench))))
        return
    if args.fits:
        print(json.dumps({"fits": fits_16gb(json.loads(args.fits))}))
        return

    import torch

    import fastcbm

    batches = args.batch or ([1024] if args.quick else [4096])
    M = args.concepts or (250 if args.quick else 1000)
    repeats = args.repeats or (3 if args.quick else 5)
    backends = args.backends or default_backends(args.device)
    hw = hardware(args.device)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rows = []
    print(f"# {hw}; torch {torch.__version__}; fastcbm {fastcbm.__version__}; L={args.cells} C={args.channels} "
          f"D={args.dim} M={M}; features_grad={args.features_grad}; forward+backward")
    print(f"{'B':>6} {'backend':>10} {'median s':>9} {'p10 s':>8} {'p90 s':>8} {'samples/s':>10} "
          f"{'extra MiB':>10} {'speedup':>8} {'mem ratio':>9}  (extra: peak memory beyond inputs and gradients)")
    for B in batches:
        base = None
        for backend in backends:
            cfg = dict(B=B, M=M, L=args.cells, C=args.channels, D=args.dim, backend=backend, device=args.device,
                       repeats=repeats, features_grad=args.features_grad)
            res = run_child(cfg)
            if "error" in res:
                print(f"{B:>6} {backend:>10}  failed: {res['error']}")
                continue
            med, p10, p90 = quantiles(res["times"])
            extra = res["extra_bytes"] - res["grad_bytes"]  # beyond inputs and outputs (the gradients)
            if backend == "reference":
                base = (med, extra)
            speedup = base[0] / med if base else float("nan")
            memratio = base[1] / max(extra, 1) if base else float("nan")
            print(f"{B:>6} {backend:>10} {med:>9.3f} {p10:>8.3f} {p90:>8.3f} {B / med:>10.1f} "
                  f"{extra / 2**20:>10.1f} {speedup:>8.2f} {memratio:>9.1f}")
            rows.append(dict(date=date, hardware=hw, torch=torch.__version__, fastcbm=fastcbm.__version__,
                             device=args.device, backend=backend, B=B, M=M, L=args.cells, C=args.channels,
                             D=args.dim, features_grad=args.features_grad, repeats=repeats, median_s=f"{med:.4f}",
                             p10_s=f"{p10:.4f}", p90_s=f"{p90:.4f}", samples_per_s=f"{B / med:.1f}",
                             peak_extra_mib=f"{extra / 2**20:.1f}", grads_mib=f"{res['grad_bytes'] / 2**20:.1f}",
                             speedup_vs_reference=f"{speedup:.3f}",
                             mem_ratio_vs_reference=f"{memratio:.2f}"))
    if args.search_16gb and args.device == "cuda":
        for backend in backends:
            lo, hi = 0, 1024
            cfg = dict(M=M, L=args.cells, C=args.channels, D=args.dim, backend=backend,
                       features_grad=args.features_grad)
            while run_child(dict(cfg, B=hi), "fits").get("fits"):  # double until it does not fit
                lo, hi = hi, hi * 2
            while hi - lo > max(64, lo // 50):  # then bisect to ~2 %
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if run_child(dict(cfg, B=mid), "fits").get("fits") else (lo, mid)
            print(f"largest B in 16 GB, {backend}: {lo}")
            rows.append(dict(date=date, hardware=hw, torch=torch.__version__, fastcbm=fastcbm.__version__,
                             device=args.device, backend=backend, B=lo, M=M, L=args.cells, C=args.channels,
                             D=args.dim, features_grad=args.features_grad, note="largest B in 16 GB"))
    if rows and not args.no_csv:
        from _rows import append_rows

        append_rows(RESULTS, [{**row, "note": row.get("note", "")} for row in rows])


def default_backends(device: str) -> list[str]:
    """The reference plus every fused backend the op registry lists that runs on ``device`` (not the interpreter)."""
    import torch

    from fastcbm.backends import backend_problem, implemented
    from fastcbm.losses import OP

    dev = torch.device(device)
    return ["reference"] + [b for b in implemented(OP) if b != "reference" and backend_problem(b, dev) is None
                            and not (b == "triton" and dev.type == "cpu")]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
